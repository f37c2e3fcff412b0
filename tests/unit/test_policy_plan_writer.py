"""One writer, no tangle (issue 14 item 2): the policy engine computes a plan from a
snapshot of the node's endpoints with no map at all (agent/policy.py); the policy writer
applies it in the order that never widens before it narrows (agent/policy_writer.py),
handing the endpoints' states to the endpoint manager, the endpoints map's one owner
(agent/endpoint.py apply_policy_state)."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace

import pytest

from cilia.agent.config import AgentConfig
from cilia.agent.endpoint import Endpoint, EndpointManager, Undo
from cilia.agent.policy import PolicyEngine
from cilia.agent.policy_plan import EndpointEntries, EndpointState, PolicyPlan, Written
from cilia.agent.policy_writer import PolicyWriter, _policy_key
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey, IpcacheKey, IpcacheValue, PolicyValue
from cilia.datastore.local import LocalDatastore
from cilia.identity import HOST, REMOTE_NODE
from cilia.policy.compiler import ALLOW, DENY, PASS, TIER_ADMIN, EntryKey

ING = layouts.POLICY_INGRESS
ENFORCED = layouts.ENDPOINT_F_INGRESS_ENFORCED
EGRESS_ENFORCED = layouts.ENDPOINT_F_EGRESS_ENFORCED
TIERED = layouts.ENDPOINT_F_TIERED_INGRESS


def _endpoint(ep_id: int, name: str, ip: str, labels: dict, identity: int = 0,
              flags: int = 0) -> Endpoint:
    return Endpoint(id=ep_id, container_id=f"c-{name}", ifname="eth0", netns=f"/x/{name}",
                    network_name="cilia", pod_namespace="default", pod_name=name, ip=ip,
                    mac="02:00:00:00:00:01", host_ifname=f"lxc{name}", host_ifindex=ep_id,
                    host_mac="02:00:00:00:00:02", mtu=1500, labels=labels,
                    identity=identity, flags=flags)


def _pod(name: str, labels: dict, ip: str, node: str = "n1") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]},
            "status": {"phase": "Running", "podIP": ip}}


def test_the_engine_plans_from_a_snapshot_without_any_map(tmp_path, monkeypatch):
    """No datapath, no writer: the engine computes the whole plan (policy entries,
    ipcache, each endpoint's identity and flags) from a snapshot of records, and
    changes none of them."""
    monkeypatch.setattr(PolicyEngine, "node_addresses", lambda self: ["172.30.0.11"])
    ds = LocalDatastore(tmp_path / "ds")
    ds.put(_pod("web", {"app": "web"}, "10.244.1.2"))
    ds.put(_pod("client", {"app": "client"}, "10.244.2.5", node="n2"))
    ds.put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {
                         "matchLabels": {"app": "client"}}}]}]}})
    snapshot = (_endpoint(7, "web", "10.244.1.2", {"app": "web"}),)
    engine = PolicyEngine(ds, AgentConfig(node_name="n1", pod_cidr="10.244.1.0/24"),
                          endpoints=None, remote_addresses=lambda: ["172.30.0.12"],
                          writer=None, capacity=1000)

    result = engine.compute(snapshot)
    plan = result.plan
    web, client = plan.ipcache["10.244.1.2/32"][0], plan.ipcache["10.244.2.5/32"][0]
    assert plan.after[7] == EndpointState(web, ENFORCED, {"app": "web"})
    assert plan.before[7] == EndpointState(0, 0, {"app": "web"})
    allowed = {k.identity for (ep_id, k), v in plan.entries.items()
               if ep_id == 7 and k.dir == ING and v.action == ALLOW}
    assert allowed == {client}
    assert plan.ipcache["172.30.0.12/32"][0] == REMOTE_NODE
    assert plan.ipcache["172.30.0.11/32"][0] == HOST
    assert snapshot[0].identity == 0 and snapshot[0].flags == 0  # records, untouched
    with pytest.raises(TypeError):
        plan.entries[(7, EntryKey(ING, 1, 0, 0, 0))] = Written(ALLOW, 1)  # frozen data
    # What the engine keeps is no map: nothing it holds can be written to.
    assert not any(hasattr(v, "update") and hasattr(v, "max_entries")
                   for v in vars(engine).values())
    # Nothing published until a writer has applied the plan.
    assert engine.compiled is None and engine.sync_count == 0

    applied = []
    engine.writer = SimpleNamespace(apply=applied.append)
    engine.endpoints = SimpleNamespace(snapshot=lambda: snapshot)
    engine.sync()
    assert applied[0].after == plan.after and applied[0].entries == plan.entries
    assert engine.sync_count == 1 and engine.view.statuses()[0].name == "web"
    assert str(engine.view.rule_of(engine.cookies[next(iter(engine.cookies))]))


class Recorder:
    """Fake BPF maps and endpoint manager that log every write, in order."""

    def __init__(self):
        self.log: list[tuple] = []
        self.maps: dict[str, RecordingMap] = {}
        self.states = {1: EndpointState(100, ENFORCED, {"app": "a"}),
                       2: EndpointState(200, TIERED, {"app": "b"})}

    def map(self, spec):
        return self.maps.setdefault(spec.name, RecordingMap(spec.name, self.log))

    def policy_states(self):
        return dict(self.states)

    def apply_policy_state(self, states):
        if states:
            self.log.append(("endpoints", {i: (s.identity, s.flags) for i, s in
                                           states.items()}))
        self.states.update(states)
        return bool(states)


class RecordingMap:
    def __init__(self, name: str, log: list, max_entries: int = 1000):
        self.name, self.log, self.max_entries = name, log, max_entries
        self.data: dict[str, tuple] = {}
        self.fail_on: int | None = None  # an action whose update fails (a full map)

    def items(self):
        return list(self.data.values())

    def lookup(self, key):
        found = self.data.get(repr(key))
        return found[1] if found else None

    def update(self, key, value):
        if self.name == layouts.POLICY.name and value.action == self.fail_on:
            raise OSError(28, "map full")
        self.log.append(("update", self.name, getattr(value, "action", None)))
        self.data[repr(key)] = (key, value)

    def delete(self, key):
        self.log.append(("delete", self.name, self.data[repr(key)][1].action
                         if self.name == layouts.POLICY.name else None))
        self.data.pop(repr(key))


def _key(identity: int, tier: int = 0) -> EntryKey:
    return EntryKey(ING, identity, 6, 80, 16, tier)


def _writer() -> tuple[Recorder, PolicyWriter]:
    """A writer over maps that hold, for endpoint 1: an allow, a deny and a Pass (of
    the Admin tier) that the plan drops; one ipcache entry that goes."""
    rec = Recorder()
    pmap = rec.map(layouts.POLICY)
    for identity, action in ((11, ALLOW), (12, DENY), (13, PASS)):
        key = _key(identity, TIER_ADMIN if action == PASS else 0)
        pmap.data[repr(_policy_key(1, key))] = (_policy_key(1, key),
                                                PolicyValue(action, 0, 0, identity))
    ipc = rec.map(layouts.IPCACHE)
    gone = IpcacheKey.for_prefix("10.0.0.9/32")
    ipc.data[repr(gone)] = (gone, IpcacheValue(300, 2))
    writer = PolicyWriter(rec, rec)
    rec.log.clear()
    return rec, writer


def _plan(rec: Recorder) -> PolicyPlan:
    """New: a deny, an allow, a Pass; endpoint 1 changes identity and flags."""
    entries = {(1, _key(21)): Written(DENY, 21), (1, _key(22)): Written(ALLOW, 22),
               (1, _key(23, TIER_ADMIN)): Written(PASS, 23, 1)}
    after = dict(rec.states)
    after[1] = EndpointState(101, ENFORCED | EGRESS_ENFORCED, {"app": "a", "v": "2"})
    return PolicyPlan(EndpointEntries.from_flat(entries),
                      MappingProxyType({"10.244.1.2/32": (101, 2)}),
                      MappingProxyType(dict(rec.states)), MappingProxyType(after))


def test_the_writer_narrows_before_it_widens():
    """The writer's order: new denies and Passes, allows that went, ipcache and
    identities (flags as they were), new allows, denies and Passes that went, and the
    flags last; what the maps hold is read back at start."""
    rec, writer = _writer()
    assert set(writer.ipcache) == {"10.0.0.9/32"} and len(writer.written[1]) == 3
    writer.apply(_plan(rec))
    policy, ipcache = layouts.POLICY.name, layouts.IPCACHE.name
    assert rec.log == [
        ("update", policy, DENY), ("update", policy, PASS),           # 1
        ("delete", policy, ALLOW),                                    # 2
        ("update", ipcache, None), ("delete", ipcache, None),         # 3
        ("endpoints", {1: (101, ENFORCED)}),
        ("update", policy, ALLOW),                                    # 4
        ("delete", policy, DENY), ("delete", policy, PASS),           # 5
        ("endpoints", {1: (101, ENFORCED | EGRESS_ENFORCED)}),        # 6
        ("update", layouts.POLICY_REV.name, None),                    # then conntrack
    ]
    assert rec.states[1].labels == {"app": "a", "v": "2"}
    assert set(writer.written) == {1}
    assert set(writer.written[1]) == {_key(21), _key(22), _key(23, TIER_ADMIN)}
    rec.log.clear()
    writer.apply(_plan(rec))  # nothing left to do: nothing written, no revision
    assert rec.log == []


def test_a_failed_write_enforces_with_what_the_map_holds():
    """An allow that cannot be written (a full map): the failure is raised, and every
    endpoint of the plan is left never weaker than before or after (its tiers'
    lookups as they are), with the policy revision bumped."""
    rec, writer = _writer()
    rec.maps[layouts.POLICY.name].fail_on = ALLOW
    plan = _plan(rec)
    after = dict(plan.after)
    after[2] = EndpointState(200, ENFORCED, {"app": "b"})  # loses its tier, enforces
    plan = PolicyPlan(plan.entries, plan.ipcache, plan.before, MappingProxyType(after))
    with pytest.raises(OSError):
        writer.apply(plan)
    assert rec.log[-2] == ("endpoints", {1: (101, ENFORCED | EGRESS_ENFORCED),
                                         2: (200, TIERED | ENFORCED)})
    assert rec.log[-1] == ("update", layouts.POLICY_REV.name, None)


def test_the_endpoint_manager_owns_its_entries(tmp_path):
    """apply_policy_state writes the entries that change and saves; an endpoint being
    admitted gets its state and no entry (its ADD writes it); one a DEL unmapped is
    never written back by a sync that saw it before."""
    maps: dict[str, RecordingMap] = {}
    log: list = []
    datapath = SimpleNamespace(map=lambda spec: maps.setdefault(
        spec.name, RecordingMap(spec.name, log)))
    manager = EndpointManager("n1", datapath, None, tmp_path / "endpoints.json", 1500,
                              lambda namespace, name: None)
    a = _endpoint(1, "a", "10.244.1.2", {"app": "a"}, 100, ENFORCED)
    b = _endpoint(2, "b", "10.244.1.3", {"app": "b"}, 200, 0)
    c = _endpoint(3, "c", "10.244.1.4", {"app": "c"})
    manager.endpoints = {a.key: a, b.key: b}
    manager._admitting = c
    manager._unmapped.add(b.key)
    assert manager.snapshot() == [a, c]

    changed = manager.apply_policy_state({
        1: EndpointState(100, ENFORCED | EGRESS_ENFORCED, {"app": "a"}),
        2: EndpointState(201, ENFORCED, {"app": "b"}),
        3: EndpointState(300, ENFORCED, {"app": "c"})})
    assert changed
    entries = maps[layouts.ENDPOINTS.name].data
    assert list(entries) == [repr(EndpointKey.for_ip(a.ip))]
    assert manager.endpoints[a.key].flags == ENFORCED | EGRESS_ENFORCED
    assert a.flags == ENFORCED  # the old record is unchanged: readers keep theirs
    assert manager.endpoints[b.key] is b
    assert manager._admitting.identity == 300 and manager._admitting.flags == ENFORCED
    assert '"flags": 3' in (tmp_path / "endpoints.json").read_text()
    # Labels alone change no entry, but are saved.
    assert not manager.apply_policy_state({1: EndpointState(100, ENFORCED | EGRESS_ENFORCED,
                                                            {"app": "a", "v": "2"})})
    assert manager.endpoints[a.key].labels == {"app": "a", "v": "2"}
    assert '"v": "2"' in (tmp_path / "endpoints.json").read_text()


def test_a_sync_between_admission_and_entry_keeps_the_new_pod(tmp_path, monkeypatch):
    """ADD against a concurrent sync: a sync that comes after the new pod's admission and
    before its entry exists (the engine's lock is free then) computes its policy too, so
    the entry the ADD writes is enforced as its policy says, and its allows are there."""
    from test_identity_failures import Node, _from, _netpol

    node = Node(tmp_path, monkeypatch)
    client = node.add(node.endpoint("client", {"app": "client"}, "10.244.1.3", 1))
    node.ds.put(_netpol("web-from-client", {"app": "web"}, _from({"app": "client"})))
    web = node.endpoint("web", {"app": "web"}, "10.244.1.2", 2)
    undo = Undo()
    node.manager._admit(undo, web)
    node.engine.sync()  # the reconcile loop's, before the ADD goes on
    web = node.manager._map(undo, web.key)
    assert web.identity == node.identity({"app": "web"}) and web.flags & ENFORCED
    assert node.ingress_allowed(web) == {client.identity}
    entry = node.maps[layouts.ENDPOINTS.name].lookup(EndpointKey.for_ip(web.ip))
    assert (entry.sec_identity, entry.flags) == (web.identity, web.flags)


def test_a_sync_planned_before_a_del_never_maps_its_endpoint_again(tmp_path, monkeypatch):
    """DEL against a concurrent sync: a plan computed while the endpoint was there and
    applied after the DEL removed its entry writes no entry back for it."""
    from test_identity_failures import Node, _netpol

    node = Node(tmp_path, monkeypatch)
    web = node.add(node.endpoint("web", {"app": "web"}, "10.244.1.2", 1))
    node.ds.put(_netpol("web-isolated", {"app": "web"}))
    result = node.engine.compute(node.manager.snapshot())
    assert result.plan.after[web.id].flags & ENFORCED
    emap = node.maps[layouts.ENDPOINTS.name]
    with node.manager._state:  # what DEL does first
        node.manager._unmapped.add(web.key)
        emap.delete(EndpointKey.for_ip(web.ip))
    node.engine.writer.apply(result.plan)
    assert emap.lookup(EndpointKey.for_ip(web.ip)) is None
    assert node.manager.snapshot() == []


def test_other_nodes_addresses_changing_alone_calls_for_a_sync(tmp_path, monkeypatch):
    """A node whose CiliaNode went away and came back is routed again by the routing
    controller; the ipcache's remote-node entries come from the same list, so the
    engine is out of sync when that list changes though no policy kind did (before, it
    stayed 'in sync' and the node's answers were dropped as coming from no node)."""
    monkeypatch.setattr(PolicyEngine, "node_addresses", lambda self: ["172.30.0.11"])
    ds = LocalDatastore(tmp_path / "ds")
    remotes = ["172.30.0.12"]
    engine = PolicyEngine(ds, AgentConfig(node_name="n1", pod_cidr="10.244.1.0/24"),
                          endpoints=None, remote_addresses=lambda: list(remotes),
                          writer=None, capacity=1000)
    result = engine.compute(())
    engine.revision = result.revision
    assert result.plan.ipcache["172.30.0.12/32"][0] == REMOTE_NODE
    assert engine.in_sync()
    remotes.append("172.30.0.13")
    assert not engine.in_sync()
    result = engine.compute(())
    assert result.plan.ipcache["172.30.0.13/32"][0] == REMOTE_NODE
    engine.revision = result.revision
    assert engine.in_sync()
