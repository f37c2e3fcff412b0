"""Watches that break in the middle resume without losing a change or replaying one:
the agent's informers and the operator's kopf watches, against disconnects and expired
resource versions (410 Gone)."""

import pytest
from cpkit import wait_for

from cilia.datastore.kubernetes import PODS, KubernetesDatastore
from cilia.identity import security_labels


@pytest.fixture
def datastore(cluster):
    ds = KubernetesDatastore.connect("node1", str(cluster.kubeconfig),
                                     kinds={"Pod": False, "Namespace": False},
                                     sync_timeout=10)
    try:
        yield ds
    finally:
        ds.close()


def record(informer) -> list:
    """Every event the informer applies, in order."""
    seen = []
    apply = informer._apply

    def spy(event):
        obj = event.get("object") or {}
        seen.append((event.get("type"), (obj.get("metadata") or {}).get("name"),
                     int((obj.get("metadata") or {}).get("resourceVersion") or 0)))
        apply(event)

    informer._apply = spy
    return seen


def pods_in_api(cluster) -> dict:
    return {p["metadata"]["name"]: p for p in cluster.client.items(PODS, "x")}


def pods_in_cache(ds) -> dict:
    return {p["metadata"]["name"]: p for p in ds.list("Pod", "x")}


def churn(cluster):
    """Changes made while the watch is away: relabel twice, delete, create."""
    cluster.client.patch(PODS, "x", "a", {"metadata": {"labels": {"v": "2"}}})
    cluster.client.patch(PODS, "x", "a", {"metadata": {"labels": {"v": "3"}}})
    cluster.client.delete(PODS, "x", "b")
    cluster.pod("x", "c", {"v": "1"})


def test_informer_resumes_after_a_break_from_its_resource_version(cluster, datastore):
    cluster.namespace("x")
    cluster.pod("x", "a", {"v": "1"})
    cluster.pod("x", "b", {"v": "1"})
    informer = datastore.informers["Pod"]
    wait_for(lambda: set(pods_in_cache(datastore)) == {"a", "b"}, what="the cache")
    seen = record(informer)
    rev = datastore.revision()
    watching = cluster.emulator.call(cluster.api.hold_watches)
    assert watching >= 2
    churn(cluster)
    cluster.emulator.call(cluster.api.release_watches)
    wait_for(lambda: pods_in_cache(datastore) == pods_in_api(cluster), what="caught up")
    assert pods_in_cache(datastore)["a"]["metadata"]["labels"] == {"v": "3"}
    assert datastore.revision() != rev
    # Resumed, not relisted; every change once, in order, none replayed.
    assert informer.relists == 1
    assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "a"), ("MODIFIED", "a"),
                                            ("DELETED", "b"), ("ADDED", "c")]
    versions = [rv for _, _, rv in seen]
    assert versions == sorted(set(versions))

    # An abrupt cut with no change in between: nothing replayed either.
    seen.clear()
    cluster.emulator.call(cluster.api.break_watches)
    wait_for(lambda: cluster.emulator.call(cluster.api.watch_count) >= 2, what="re-watched")
    cluster.client.patch(PODS, "x", "c", {"metadata": {"labels": {"v": "4"}}})
    wait_for(lambda: pods_in_cache(datastore) == pods_in_api(cluster), what="caught up")
    assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "c")]


def test_informer_relists_when_its_resource_version_expired(cluster, datastore):
    cluster.namespace("x")
    cluster.pod("x", "a", {"v": "1"})
    cluster.pod("x", "b", {"v": "1"})
    informer = datastore.informers["Pod"]
    wait_for(lambda: set(pods_in_cache(datastore)) == {"a", "b"}, what="the cache")
    seen = record(informer)
    cluster.emulator.call(cluster.api.hold_watches)
    churn(cluster)
    cluster.emulator.call(cluster.api.compact)  # the history the watch would resume from
    cluster.emulator.call(cluster.api.release_watches)
    wait_for(lambda: informer.relists == 2, what="a relist after 410 Gone")
    wait_for(lambda: pods_in_cache(datastore) == pods_in_api(cluster), what="caught up")
    # b, deleted while away, is gone (a relist replaces the cache), and a is current.
    assert set(pods_in_cache(datastore)) == {"a", "c"}
    assert pods_in_cache(datastore)["a"]["metadata"]["labels"] == {"v": "3"}
    assert [t for t, _, _ in seen] == ["ERROR"]
    # And it watches again from the new list: later changes arrive.
    cluster.pod("x", "d")
    wait_for(lambda: "d" in pods_in_cache(datastore), what="watching again")


@pytest.mark.parametrize("expire", [False, True], ids=["disconnect", "410-gone"])
def test_operator_watch_breaks_and_resumes_without_losing_a_pod(cluster, expire):
    cluster.namespace("x")
    cluster.pod("x", "a", {"app": "a"})
    # No sweeps during the test: only kopf's watch can notice the new pod.
    op = cluster.operator("watcher", "--gc-interval", "600", "--no-ipam", "--no-nodegc")
    op.wait_ready("leader")
    wait_for(lambda: cluster.identity_of(security_labels({"app": "a"}, "x", {})),
             what="the first identity")
    wait_for(lambda: cluster.emulator.call(cluster.api.watch_count) >= 4,
             what="the operator's watches")
    cluster.emulator.call(cluster.api.hold_watches)
    cluster.pod("x", "b", {"app": "b"})
    if expire:
        cluster.emulator.call(cluster.api.compact)
    cluster.emulator.call(cluster.api.release_watches)
    wait_for(lambda: cluster.identity_of(security_labels({"app": "b"}, "x", {})),
             timeout=15, what="an identity for the pod created while the watch was away")
    assert len(cluster.identities()) == 2
