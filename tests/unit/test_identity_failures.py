"""An identity that cannot be had harms its own pod only (issue 13 item 8): the policy
engine's sync (agent/policy.py), its writer (agent/policy_writer.py) and the endpoint
manager's records against fake maps and a real local datastore, with an identity store
that refuses some label sets (an API error) or a space that is full.

Before, one failing `allocate` aborted the whole sync: every pod and every policy of the
node stayed as it was, and every later ADD failed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cilia.agent.config import AgentConfig
from cilia.agent.endpoint import Endpoint, EndpointManager, Undo
from cilia.agent.policy import PolicyEngine
from cilia.agent.policy_writer import PolicyWriter
from cilia.cnispec import TRY_AGAIN_LATER, CNIError
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey, IpcacheKey
from cilia.datastore.identities import LocalIdentityStore
from cilia.datastore.local import LocalDatastore
from cilia.identity import (
    INIT,
    MIN_CLUSTER_IDENTITY,
    RESERVED,
    IdentityAllocator,
    IdentityExhausted,
    security_labels,
)
from cilia.policy.compiler import ALLOW, DENY, Compiler, PodView

NODE_IP = "172.30.0.11"


class FakeMap:
    """A BPF map in a dict, keyed by the key's fields."""

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self.data: dict[str, tuple] = {}

    def items(self):
        return list(self.data.values())

    def keys(self):
        return [k for k, _ in self.data.values()]

    def lookup(self, key):
        found = self.data.get(repr(key))
        return found[1] if found else None

    def update(self, key, value):
        self.data[repr(key)] = (key, value)

    def delete(self, key):
        self.data.pop(repr(key), None)


class RefusingStore(LocalIdentityStore):
    """The API refuses to create identities for label sets holding `refused`."""

    def __init__(self, datastore, refused: str):
        super().__init__(datastore)
        self.refused = refused
        self.creates = 0

    def create(self, number, labels):
        self.creates += 1
        if self.refused in labels:
            raise RuntimeError("the API server refused the CiliaIdentity create")
        return super().create(number, labels)


def _pod(name: str, labels: dict, ip: str | None = None, node: str = "n2") -> dict:
    out = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}}
    if ip:
        out["status"] = {"phase": "Running", "podIP": ip}
    return out


def _netpol(name: str, target: dict, ingress: list | None = None) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": target}, "policyTypes": ["Ingress"],
                     **({"ingress": ingress} if ingress is not None else {})}}


def _from(labels: dict) -> list:
    return [{"from": [{"podSelector": {"matchLabels": labels}}]}]


class Node:
    """A real PolicyEngine, PolicyWriter and EndpointManager around maps that are dicts."""

    def __init__(self, tmp_path, monkeypatch, identity_max: int = 0):
        monkeypatch.setattr(PolicyEngine, "node_addresses", lambda self: [NODE_IP])
        self.ds = LocalDatastore(tmp_path / "ds")
        self.maps: dict[str, FakeMap] = {}
        datapath = SimpleNamespace(map=lambda spec: self.maps.setdefault(spec.name,
                                                                         FakeMap()))
        self.manager = EndpointManager("n1", datapath, None, tmp_path / "endpoints.json",
                                       1500, lambda namespace, name: None)
        self.eps = self.manager.endpoints
        config = AgentConfig(node_name="n1", pod_cidr="10.244.1.0/24",
                             identity_max=identity_max)
        self.engine = PolicyEngine(self.ds, config, self.manager, lambda: [],
                                   PolicyWriter(datapath, self.manager))
        self.manager.admit = lambda ep: self.engine.sync(adding=ep.id)

    def refuse(self, label: str) -> RefusingStore:
        store = RefusingStore(self.ds, label)
        self.engine.allocator = IdentityAllocator(store, self.engine.allocator.max_identity)
        return store

    def endpoint(self, name: str, labels: dict, ip: str | None, ep_id: int,
                 store_ip: bool = True) -> Endpoint:
        self.ds.put(_pod(name, labels, ip if store_ip else None, node="n1"))
        ep = Endpoint(id=ep_id, container_id=f"c-{name}", ifname="eth0", netns=f"/x/{name}",
                      network_name="cilia", pod_namespace="default", pod_name=name, ip=ip,
                      mac="02:00:00:00:00:01", host_ifname=f"lxc{name}", host_ifindex=ep_id,
                      host_mac="02:00:00:00:00:02", mtu=1500, labels=dict(labels))
        return ep

    def add(self, ep: Endpoint) -> Endpoint:
        """What ADD does once the veth is there: admission (identity and policy), then
        the endpoints map entry and the record; answers the endpoint as recorded."""
        undo = Undo()
        self.manager._admit(undo, ep)
        return self.manager._map(undo, ep.key)

    def ep(self, name: str) -> Endpoint:
        return self.eps[(f"c-{name}", "eth0")]

    def ipcache(self, ip: str) -> tuple[int, int] | None:
        value = self.maps[layouts.IPCACHE.name].lookup(IpcacheKey.for_prefix(f"{ip}/32"))
        return (value.identity, value.cidr_identity) if value else None

    def ingress_allowed(self, ep: Endpoint) -> set[int]:
        return {k.identity for k, v in self.maps[layouts.POLICY.name].items()
                if k.ep_id == ep.id and k.dir == layouts.POLICY_INGRESS
                and v.action == layouts.POLICY_ALLOW}

    def identity(self, labels: dict) -> int | None:
        self.engine.allocator.refresh()
        return self.engine.allocator.lookup(security_labels(labels, "default", {}))


@pytest.fixture
def node(tmp_path, monkeypatch):
    return Node(tmp_path, monkeypatch)


def test_a_pod_elsewhere_without_identity_is_init_and_the_rest_syncs(node):
    """A pod on another node whose identity the API refuses: it is `reserved:init` in
    the ipcache (never the world's identity, which `world` rules allow), named in the
    engine's report; the pod beside it and this node's policy are written."""
    web = node.add(node.endpoint("web", {"app": "web"}, "10.244.1.2", 1))
    node.refuse("pod:app=refused")
    node.ds.put(_pod("client", {"app": "client"}, "10.244.2.5"))
    node.ds.put(_pod("refused", {"app": "refused"}, "10.244.2.6"))
    node.ds.put(_netpol("web-from-client", {"app": "web"}, _from({"app": "client"})))
    node.engine.sync()

    client = node.identity({"app": "client"})
    assert client is not None
    assert node.ipcache("10.244.2.5")[0] == client
    assert node.ipcache("10.244.2.6")[0] == INIT
    assert node.ingress_allowed(web) == {client}
    (u,) = node.engine.unidentified.values()
    assert (u.namespace, u.name, u.local, u.identity) == ("default", "refused", False, INIT)
    assert "refused the CiliaIdentity create" in u.reason
    assert "default/refused" in str(u)
    assert node.engine.names.peer("10.244.2.6", INIT) == "default/refused"
    assert RESERVED[INIT] == "reserved:init"

    # Policy updates keep flowing while it lasts; each label set is asked once a sync.
    store = node.refuse("pod:app=refused")
    node.ds.put(_pod("refused2", {"app": "refused"}, "10.244.2.7"))
    node.ds.put(_netpol("web-from-client", {"app": "web"}, _from({"app": "nobody"})))
    node.engine.sync()
    assert node.ingress_allowed(web) == set()
    assert store.creates == 1
    assert set(node.engine.unidentified) == {("default", "refused"), ("default", "refused2")}

    # Once the API takes the create, the pod gets its identity at the next try.
    node.refuse("nothing-is-refused")
    node.engine.synced_at = 0.0  # the retry is due
    assert node.engine.retry_due()
    node.engine.sync()
    assert node.engine.unidentified == {}
    assert not node.engine.retry_due()
    assert node.ipcache("10.244.2.6")[0] == node.identity({"app": "refused"})


def test_a_local_pod_whose_relabel_needs_an_identity_keeps_its_own(node):
    """This node's pod is relabelled to a label set whose identity cannot be had: it
    keeps its identity and is compiled with the labels that identity stands for (its
    policy and its peers' rules as before), and a policy change still reaches it."""
    web = node.add(node.endpoint("web", {"app": "web"}, "10.244.1.2", 1))
    client = node.add(node.endpoint("client", {"app": "client"}, "10.244.1.3", 2))
    node.ds.put(_netpol("web-from-client", {"app": "web"}, _from({"app": "client"})))
    node.engine.sync()
    before = node.ep("web").identity
    assert node.ingress_allowed(web) == {client.identity}

    node.refuse("pod:app=moved")
    node.ds.update("Pod", "default", "web", lambda p: {
        **p, "metadata": {**p["metadata"], "labels": {"app": "moved"}}})
    node.ds.put(_netpol("web-deny", {"app": "web"}))  # a second policy on its old labels
    node.engine.sync()
    web = node.ep("web")
    assert web.identity == before and web.labels == {"app": "web"}
    assert node.ipcache(web.ip)[0] == before
    assert node.ingress_allowed(web) == {client.identity}
    flags = node.maps[layouts.ENDPOINTS.name].lookup(EndpointKey.for_ip(web.ip))
    assert flags is None or flags.sec_identity == before  # never rewritten to another
    (u,) = node.engine.unidentified.values()
    assert (u.name, u.local, u.identity) == ("web", True, before)
    assert "keeps identity" in u.effect

    # The client's own change is not held up by web's.
    node.ds.update("Pod", "default", "client", lambda p: {
        **p, "metadata": {**p["metadata"], "labels": {"app": "client", "v": "2"}}})
    node.engine.sync()
    assert node.ep("client").identity == node.identity({"app": "client", "v": "2"})


def test_a_new_pod_in_a_full_space_fails_its_add_and_nothing_else(tmp_path, monkeypatch):
    """Two identities in all (--identity-max 257), both taken: a new pod with a third
    label set fails its ADD with code 11 and a message that names the exhaustion and
    what to do; an existing pod's policy update still goes through."""
    node = Node(tmp_path, monkeypatch, identity_max=MIN_CLUSTER_IDENTITY + 1)
    web = node.add(node.endpoint("web", {"app": "web"}, "10.244.1.2", 1))
    other = node.add(node.endpoint("other", {"app": "other"}, "10.244.1.3", 2))
    assert {web.identity, other.identity} == {MIN_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY + 1}

    # No address in the store: its ADD is the first.
    new = node.endpoint("new", {"app": "new"}, "10.244.1.4", 3, store_ip=False)
    with pytest.raises(CNIError) as err:
        node.add(new)
    assert err.value.code == TRY_AGAIN_LATER
    assert "default/new" in err.value.msg and "exhausted" in err.value.msg
    assert "remove unused label sets" in err.value.msg
    assert new.key not in node.eps
    assert node.manager.snapshot() == [web, other]  # not admitted any more

    # A pod with a label set that has its identity still gets in.
    twin = node.add(node.endpoint("twin", {"app": "web"}, "10.244.1.5", 4))
    assert twin.identity == web.identity
    node.ds.put(_netpol("web-from-other", {"app": "web"}, _from({"app": "other"})))
    node.engine.sync()
    assert node.ingress_allowed(web) == {other.identity}
    # The stored pod "new" (no address yet) is nobody's problem in the sync.
    assert node.engine.unidentified == {}


def test_exhaustion_is_known_without_a_walk_through_the_space(tmp_path):
    """The space can be made small (--identity-max, for tests); a full one is an error
    at once, naming the exhaustion and what to do, with no create tried."""
    store = RefusingStore(LocalDatastore(tmp_path), "never")
    alloc = IdentityAllocator(store, max_identity=MIN_CLUSTER_IDENTITY + 1)
    alloc.allocate(security_labels({"a": "1"}, "default", {}))
    alloc.allocate(security_labels({"a": "2"}, "default", {}))
    assert store.creates == 2
    with pytest.raises(IdentityExhausted, match="identity space exhausted: all 2 cluster"):
        alloc.allocate(security_labels({"a": "3"}, "default", {}))
    assert store.creates == 2
    with pytest.raises(ValueError):
        IdentityAllocator(store, max_identity=70000)


def test_a_deny_by_labels_denies_a_pod_without_identity_and_no_allow_admits_it():
    """INIT (a pod whose identity could not be had) is in the peers of every deny rule
    that selects pods by labels, and of no allow: fail closed both ways."""
    a = security_labels({"app": "a"}, "default", {})
    alloc = IdentityAllocator(SimpleNamespace(identities=dict, create=lambda n, labels: True))
    ident = alloc.allocate(a)
    pods = [PodView("default", "a", {"app": "a"}, "10.244.1.2", ident)]
    deny = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
            "metadata": {"name": "d", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}],
                     "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "evil"}}]}]}}
    compiled = Compiler().compile([], pods, {"default": {}}, {1: pods[0]}, [deny])
    actions = {(k.identity, v.action) for k, v in compiled.endpoints[1].entries.items()}
    assert (INIT, DENY) in actions
    assert (INIT, ALLOW) not in actions
