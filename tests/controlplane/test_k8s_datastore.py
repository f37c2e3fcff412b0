"""The agent's `kubernetes` datastore: LocalDatastore's interface over API watches, and
the identity store over CiliaIdentity objects. Against the real API server, except two
tests whose fault is a watch cache that stays behind while the same client's reads and
creates are answered (and then reads failing with 503): the datastore watches, reads and
writes over one client, and neither a real server nor the network between can hold back
its watch alone; the emulator holds watches, and fails requests, on demand."""

import logging
import threading
import time

import pytest
from cpkit import wait_for

from cilia.datastore.k8s_identities import KubernetesIdentityStore
from cilia.datastore.kubernetes import (
    AGENT_KINDS,
    CILIA_NODES,
    CLUSTER_NETWORK_POLICIES,
    IDENTITIES,
    NETWORK_POLICIES,
    PODS,
    DatastoreUnavailable,
    Informer,
    KubeClient,
    KubernetesDatastore,
)
from cilia.identity import IdentityAllocator, security_labels


def _datastore(cluster):
    ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig), sync_timeout=20)
    try:
        yield ds
    finally:
        ds.close()


@pytest.fixture
def datastore(cluster):
    yield from _datastore(cluster)


@pytest.fixture
def emulated_datastore(emulated):
    yield from _datastore(emulated)


def names(objs) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)


def test_the_read_interface_of_the_local_datastore(cluster, datastore):
    rev = datastore.revision()
    x, y = cluster.ns("x"), cluster.ns("y")
    cluster.namespace("x", {"team": "x"})
    cluster.namespace("y")
    cluster.pod("x", "a", {"app": "a"}, ip="10.244.9.2")
    cluster.pod("y", "b")
    cluster.client.create(NETWORK_POLICIES, {"metadata": {"name": "np", "namespace": x},
                                             "spec": {"podSelector": {}}})
    wait_for(lambda: len(datastore.list("Pod")) == 2 and datastore.list("NetworkPolicy"),
             what="the cache")
    assert datastore.revision() != rev
    assert names(datastore.list("Pod")) == ["a", "b"]
    assert names(datastore.list("Pod", x)) == ["a"]
    # Every namespace of the cluster (kube-system and the like, and other tests'
    # namespaces still being deleted): this test's are the ones with its prefix.
    mine = [n for n in names(datastore.list("Namespace")) if n.startswith(x[:-1])]
    assert mine == [x, y]
    assert datastore.get("Namespace", "", x)["metadata"]["labels"]["team"] == "x"
    assert datastore.get("Pod", x, "a")["status"]["podIP"] == "10.244.9.2"
    assert datastore.get("NetworkPolicy", x, "np")["kind"] == "NetworkPolicy"
    assert datastore.get("Pod", x, "nope") is None
    assert datastore.list("CiliaPrefilter") == []  # served, none made
    # Copies: a caller's change does not reach the cache.
    datastore.get("Pod", x, "a")["metadata"]["labels"]["app"] = "evil"
    assert datastore.get("Pod", x, "a")["metadata"]["labels"]["app"] == "a"
    # Nothing changed, nothing moved.
    rev = datastore.revision()
    assert datastore.revision() == rev
    cluster.client.delete(PODS, y, "b")
    wait_for(lambda: names(datastore.list("Pod")) == ["a"], what="the deletion")
    assert datastore.revision() != rev


def test_listed_and_watched_objects_look_alike(cluster):
    """The API server leaves apiVersion and kind out of the items of a built-in kind's
    list, not out of watch events: the cache has them either way (as LocalDatastore's
    objects do), and listing unchanged objects again is no change."""
    cluster.namespace("x")
    x = cluster.ns("x")
    cluster.pod("x", "listed")
    cluster.client.create(NETWORK_POLICIES, {"metadata": {"name": "listed", "namespace": x},
                                             "spec": {"podSelector": {}}})
    ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig), sync_timeout=20)
    try:
        cluster.pod("x", "watched")
        cluster.client.create(NETWORK_POLICIES, {
            "metadata": {"name": "watched", "namespace": x}, "spec": {"podSelector": {}}})
        wait_for(lambda: all(names(ds.list(k, x)) == ["listed", "watched"]
                             for k in ("Pod", "NetworkPolicy")), what="both in the cache")
        for kind, api_version in (("Pod", "v1"), ("NetworkPolicy", "networking.k8s.io/v1")):
            for obj in ds.list(kind, x):
                assert (obj["apiVersion"], obj["kind"]) == (api_version, kind), \
                    (kind, obj["metadata"]["name"])
        rev = ds.revision()
        ds.informers["Pod"]._list()  # what a relist after 410 Gone does
        assert ds.revision() == rev, "a relist of unchanged pods counted as a change"
    finally:
        ds.close()


def test_close_right_after_connect_stops_every_informer(cluster):
    """close() while the informers are opening their watches (right after their lists)
    stops every one at once. stop() used to find no response to shut down yet; the
    informer then read its new watch until the server ended it (minutes), and close()
    gave up on it after 5 s (about one close in four, here)."""
    for _ in range(12):
        ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig), sync_timeout=20)
        started = time.monotonic()
        ds.close()
        took = time.monotonic() - started
        alive = [k for k, inf in ds.informers.items() if inf._thread.is_alive()]
        assert took < 2.0 and not alive, f"close() took {took:.1f}s; still running: {alive}"


def test_a_pod_not_in_the_cache_yet_is_read_from_the_api(emulated, emulated_datastore):
    """Emulator: the watch held back while reads are answered, then reads failing (503)."""
    cluster, datastore = emulated, emulated_datastore
    cluster.namespace("x")
    cluster.emulator.call(cluster.api.hold_watches)  # the cache cannot learn of it
    try:
        cluster.pod("x", "new", {"app": "new"})
        assert "new" not in names(datastore.list("Pod"))
        assert datastore.get("Pod", "x", "new")["metadata"]["labels"] == {"app": "new"}
        cluster.emulator.call(cluster.api.fail, "GET", "pods")
        with pytest.raises(DatastoreUnavailable, match="cannot read Pod x/new"):
            datastore.get("Pod", "x", "new")
    finally:
        cluster.emulator.call(cluster.api.fail, "GET", "pods", None)
        cluster.emulator.call(cluster.api.release_watches)


def test_update_publishes_the_pod_address_and_put_merges(cluster, datastore):
    cluster.namespace("x")
    cluster.pod("x", "a")
    x = cluster.ns("x")
    wait_for(lambda: datastore.get("Pod", x, "a"), what="the pod")

    def running(pod):
        pod["status"] = {"phase": "Running", "podIP": "10.244.1.7", "nodeName": "node1"}
        return pod

    datastore.update("Pod", x, "a", running)
    status = cluster.client.get(PODS, x, "a")["status"]
    assert status["podIP"] == "10.244.1.7" and status["podIPs"] == [{"ip": "10.244.1.7"}]
    assert status["phase"] == "Pending", "the phase is the kubelet's"
    # The kubelet's address is never overwritten, and deletion is the kubelet's too.
    datastore.update("Pod", x, "a", lambda p: {**p, "status": {"podIP": "10.9.9.9"}})
    datastore.update("Pod", x, "a", lambda p: {k: v for k, v in p.items() if k != "status"})
    assert cluster.client.get(PODS, x, "a")["status"]["podIP"] == "10.244.1.7"
    assert datastore.update("Pod", x, "gone", running) is None

    node = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNode", "metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["10.244.1.0/24"],
                     "addresses": [{"type": "InternalIP", "ip": "172.30.0.11"}]}}
    assert datastore.put(node) == "created"
    assert datastore.put(node) == "unchanged"
    node["spec"]["addresses"][0]["ip"] = "172.30.0.99"
    assert datastore.put(node) == "configured"
    assert cluster.client.get(CILIA_NODES, None, "n1")["spec"]["addresses"][0]["ip"] \
        == "172.30.0.99"
    wait_for(lambda: datastore.get("CiliaNode", "", "n1"), what="the CiliaNode in the cache")
    datastore.update("CiliaNode", "", "n1",
                     lambda n: {**n, "spec": {**n["spec"], "podCIDRs": ["10.244.2.0/24"]}})
    assert cluster.client.get(CILIA_NODES, None, "n1")["spec"]["podCIDRs"] == ["10.244.2.0/24"]
    assert datastore.delete("CiliaNode", "", "n1") and not datastore.delete("CiliaNode", "",
                                                                           "n1")


def test_the_pod_cidr_comes_from_the_cilianode(cluster, datastore):
    with pytest.raises(DatastoreUnavailable, match="no spec.podCIDRs"):
        datastore.wait_pod_cidr(timeout=0.3)
    cluster.client.create(CILIA_NODES, {"metadata": {"name": "node1"},
                                        "spec": {"podCIDRs": ["10.244.7.0/24"]}})
    assert datastore.wait_pod_cidr(timeout=5) == "10.244.7.0/24"


def test_it_blocks_until_everything_is_listed(cluster):
    """An agent must not compile policy from a half-filled cache: without cilia's policy
    CRDs served, it does not start. An optional kind (CiliaPrefilter) that is not served
    does not hold it back: it reads as empty."""
    with cluster.without_crds("cilianetworkpolicies.cilia.io", "ciliaprefilters.cilia.io"):
        with pytest.raises(DatastoreUnavailable, match="did not list CiliaNetworkPolicy"):
            KubernetesDatastore.connect("node1", str(cluster.kubeconfig), sync_timeout=1.0)
        kinds = {k: v for k, v in AGENT_KINDS.items() if k != "CiliaNetworkPolicy"}
        ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig), kinds=kinds,
                                         sync_timeout=20)
        try:
            assert ds.list("CiliaPrefilter") == []
            assert not ds.informers["CiliaPrefilter"].served
        finally:
            ds.close()


def _cnp(name: str) -> dict:
    return {"metadata": {"name": name}, "spec": {
        "tier": "Baseline", "priority": 3, "subject": {"namespaces": {}},
        "egress": [{"action": "Deny", "to": [{"networks": ["192.0.2.0/24"]}]}]}}


def test_cluster_network_policies_are_read_and_without_their_crd_there_are_none(
        cluster, monkeypatch, caplog):
    """ClusterNetworkPolicy (the upstream CRD, cluster-scoped) reaches the agent as
    every policy kind does (`objects`, `peek`, `revision`). Without its CRD none can
    exist: a running agent's cache empties as the API server deletes them with the CRD,
    a starting agent neither fails nor waits, and each says so once, not every retry;
    once the CRD is back, its objects are read again."""
    monkeypatch.setattr(Informer, "absent_retry", 0.5)  # (30 s in an agent)
    kind, name = "ClusterNetworkPolicy", f"{cluster.prefix}-cnp"
    ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig), sync_timeout=20)
    try:
        rev = ds.revision([kind])
        cluster.client.create(CLUSTER_NETWORK_POLICIES, _cnp(name))
        wait_for(lambda: ("", name) in ds.objects(kind), what="the policy in the cache")
        assert ds.revision([kind]) != rev
        obj = ds.peek(kind, "", name)
        assert (obj["apiVersion"], obj["kind"]) == ("policy.networking.k8s.io/v1beta1", kind)
        assert ds.get(kind, "", name)["spec"]["priority"] == 3
        with caplog.at_level(logging.WARNING, logger="cilia.datastore.kubernetes"), \
                cluster.without_crds("clusternetworkpolicies.policy.networking.k8s.io"):
            wait_for(lambda: not ds.objects(kind) and not ds.informers[kind].served, 30,
                     "the running datastore without the policy")
            fresh = KubernetesDatastore.connect("node1", str(cluster.kubeconfig),
                                                sync_timeout=20)
            try:
                assert fresh.objects(kind) == {} and fresh.list(kind) == []
                assert not fresh.informers[kind].served
                time.sleep(1.5)  # looked for again, and again, said once
            finally:
                fresh.close()
            said = [r.getMessage() for r in caplog.records
                    if "clusternetworkpolicies (policy.networking.k8s.io/v1beta1) is not "
                       "served" in r.getMessage()]
            assert len(said) == 2, said  # once by each datastore
            assert "there is no ClusterNetworkPolicy to act on" in said[0]
        cluster.client.create(CLUSTER_NETWORK_POLICIES, _cnp(name))
        wait_for(lambda: ("", name) in ds.objects(kind), 30, "the policy after the CRD")
        assert ds.informers[kind].served
    finally:
        ds.close()


def test_identities_agree_and_never_duplicate_under_races(cluster, datastore):
    """Agents (cached reads) and the operator (API reads) allocate the same label sets
    at once: one identity per set, the same number for all."""
    cluster.namespace("x")
    sets = [security_labels({"app": f"a{i}"}, "x", {}) for i in range(12)]
    operator = KubeClient(str(cluster.kubeconfig), user_agent="operator")
    allocators = [IdentityAllocator(datastore.identity_store()),
                  IdentityAllocator(datastore.identity_store()),
                  IdentityAllocator(KubernetesIdentityStore(operator))]
    results: dict[int, dict] = {}
    errors = []

    def run(i, allocator):
        try:
            order = sets if i % 2 else sets[::-1]
            results[i] = {s: allocator.allocate(s) for s in order}
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(allocators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == results[2]
    assert len(set(results[0].values())) == len(sets)
    stored = cluster.identities()
    assert len(stored) == len(sets) and set(stored.values()) == set(sets)


def test_a_lost_claim_is_learned_even_before_the_cache_has_it(emulated, emulated_datastore):
    """Emulator: the agent's watch cache held behind while its creates are answered."""
    cluster, datastore = emulated, emulated_datastore
    labels = security_labels({"app": "x"}, "x", {})
    first = IdentityAllocator(KubernetesIdentityStore(cluster.client)).allocate(labels)
    cluster.emulator.call(cluster.api.hold_watches)  # the agent's cache stays behind
    try:
        other = security_labels({"app": "y"}, "x", {})
        n = IdentityAllocator(KubernetesIdentityStore(cluster.client)).allocate(other)
        agent = IdentityAllocator(datastore.identity_store())
        assert agent.allocate(other) == n  # 409 on its first claim, then it reads the winner
        assert agent.allocate(labels) == first
        assert len(cluster.client.items(IDENTITIES)) == 2
    finally:
        cluster.emulator.call(cluster.api.release_watches)
