"""Watches that break in the middle resume without losing a change or replaying one: the
agent's informers and the operator's kopf watches, against the real API server.

Each break is a real one: the network between the client and the server (a proxy the
test cuts or holds while changes are made), the server ending a watch at its
timeoutSeconds, and a restart of kube-apiserver, after which every resourceVersion from
before it has expired (its watch cache starts anew) so a resuming watch gets 410 Gone
and must list again.
"""

import pytest
from cpkit import wait_for

from cilia.datastore.kubernetes import PODS, KubernetesDatastore
from cilia.identity import security_labels


def connect(kubeconfig, **kw) -> KubernetesDatastore:
    return KubernetesDatastore.connect("node1", str(kubeconfig),
                                       kinds={"Pod": False, "Namespace": False},
                                       sync_timeout=20, **kw)


@pytest.fixture
def through_proxy(cluster):
    """A datastore reaching the API server through a proxy the test controls."""
    proxy = cluster.proxy()
    ds = connect(proxy.kubeconfig)
    try:
        yield ds, proxy
    finally:
        ds.close()


def record(informer) -> list:
    """Every event the informer applies, in order (bookmarks aside): type, name (for an
    ERROR its code) and resourceVersion."""
    seen = []
    apply = informer._apply

    def spy(event):
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if event.get("type") == "ERROR":
            seen.append(("ERROR", obj.get("code"), 0))
        elif event.get("type") != "BOOKMARK":
            seen.append((event.get("type"), meta.get("name"),
                         int(meta.get("resourceVersion") or 0)))
        apply(event)

    informer._apply = spy
    return seen


def pods_in_api(cluster) -> dict:
    # As the datastore keeps them: with the apiVersion and kind a list's items lack.
    return {p["metadata"]["name"]: {**p, "apiVersion": "v1", "kind": "Pod"}
            for p in cluster.client.items(PODS, cluster.ns("x"))}


def pods_in_cache(cluster, ds) -> dict:
    return {p["metadata"]["name"]: p for p in ds.list("Pod", cluster.ns("x"))}


def churn(cluster):
    """Changes made while the watch is away: relabel twice, delete, create."""
    x = cluster.ns("x")
    cluster.client.patch(PODS, x, "a", {"metadata": {"labels": {"v": "2"}}})
    cluster.client.patch(PODS, x, "a", {"metadata": {"labels": {"v": "3"}}})
    cluster.client.delete(PODS, x, "b")
    cluster.pod("x", "c", {"v": "new"})


def test_informer_resumes_after_a_break_from_its_resource_version(cluster, through_proxy):
    datastore, proxy = through_proxy
    cluster.namespace("x")
    cluster.pod("x", "a", {"v": "1"})
    cluster.pod("x", "b", {"v": "1"})
    informer = datastore.informers["Pod"]
    wait_for(lambda: set(pods_in_cache(cluster, datastore)) == {"a", "b"}, what="the cache")
    seen = record(informer)
    rev = datastore.revision()
    assert proxy.hold() >= 2  # both informers' watches
    churn(cluster)
    proxy.release()
    wait_for(lambda: pods_in_cache(cluster, datastore) == pods_in_api(cluster),
             what="caught up")
    assert pods_in_cache(cluster, datastore)["a"]["metadata"]["labels"] == {"v": "3"}
    assert datastore.revision() != rev
    # Resumed, not relisted; every change once, in order, none replayed. (A pod's
    # deletion is graceful even when it never ran: deletionTimestamp first, MODIFIED.)
    assert informer.relists == 1
    assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "a"), ("MODIFIED", "a"),
                                            ("MODIFIED", "b"), ("DELETED", "b"),
                                            ("ADDED", "c")]
    versions = [rv for _, _, rv in seen]
    assert versions == sorted(set(versions))

    # An abrupt cut with no change in between: nothing replayed either.
    seen.clear()
    before = proxy.connections
    assert proxy.cut() >= 2
    wait_for(lambda: proxy.connections >= before + 2, what="watching again")
    cluster.client.patch(PODS, cluster.ns("x"), "c", {"metadata": {"labels": {"v": "4"}}})
    wait_for(lambda: pods_in_cache(cluster, datastore) == pods_in_api(cluster),
             what="caught up")
    assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "c")]
    assert informer.relists == 1


def test_informer_resumes_when_the_server_ends_its_watch(cluster):
    """The API server ends every watch at its timeoutSeconds (1s here): the informer
    watches again from where it was, and sees each change exactly once."""
    cluster.namespace("x")
    cluster.pod("x", "a", {"v": "0"})
    datastore = connect(cluster.kubeconfig, watch_seconds=1)
    try:
        informer = datastore.informers["Pod"]
        wait_for(lambda: "a" in pods_in_cache(cluster, datastore), what="the cache")
        seen = record(informer)
        resumes = informer.resumes
        for i in range(1, 9):
            cluster.client.patch(PODS, cluster.ns("x"), "a",
                                 {"metadata": {"labels": {"v": str(i)}}})
            if i % 3 == 0:  # changes before, during and after each end of the watch
                n = informer.resumes
                wait_for(lambda n=n: informer.resumes > n, timeout=10,
                         what="the server ending the watch")
        wait_for(lambda: pods_in_cache(cluster, datastore)["a"]["metadata"]["labels"]
                 == {"v": "8"}, what="caught up")
        assert informer.resumes >= resumes + 2, "the server did not end the watches"
        assert informer.relists == 1
        assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "a")] * 8
        versions = [rv for _, _, rv in seen]
        assert versions == sorted(set(versions))
    finally:
        datastore.close()


def watching(cluster, op, pod: str) -> None:
    """Until kopf in `op` lists and watches pods and namespaces, and a pod made then,
    `pod`, has its identity: past kopf's start (an API discovery cut off in the middle
    stops kopf, and then the operator), and with no sweep left to make identities."""
    wait_for(lambda: all(f"Starting the watch-stream for {r}" in op.output()
                         for r in ("pods", "namespaces")), 30, "kopf watching")
    cluster.pod("x", pod, {"app": pod})
    wait_for(lambda: cluster.identity_of(security_labels({"app": pod}, cluster.ns("x"), {})),
             what=f"an identity for {pod}, by kopf's handler")


def test_operator_watch_breaks_and_resumes_without_losing_a_pod(cluster):
    cluster.namespace("x")
    proxy = cluster.proxy()
    # No sweeps after the first: only kopf's watch can notice a new pod. A lease long
    # enough that the break does not also cost the leadership.
    op = cluster.operator("watcher", "--gc-interval", "600", "--no-ipam", "--no-nodegc",
                          "--no-policies", "--lease-duration", "30", "--renew-deadline",
                          "20", "--log-level", "debug", kubeconfig=proxy.kubeconfig)
    op.wait_ready("leader")
    watching(cluster, op, "a")
    assert proxy.hold() >= 2
    cluster.pod("x", "b", {"app": "b"})
    proxy.release()
    wait_for(lambda: cluster.identity_of(security_labels({"app": "b"}, cluster.ns("x"), {})),
             timeout=30, what="an identity for the pod created while the watch was away")
    assert len(cluster.identities()) == 2
    assert op.alive


def test_after_an_api_server_restart_informer_and_operator_list_again(cluster,
                                                                      through_proxy):
    """410 Gone on a real server: both are held away from the API server while changes
    are made, kube-apiserver restarts (its new watch cache begins after those changes),
    and then they are let back: the informer's resume gets 410 and it lists again; kopf
    lists again. Nothing is lost, and the informer's cache holds nothing stale."""
    datastore, proxy = through_proxy
    cluster.namespace("x")
    # Long lease timings: the API server is away for the restart (~10 s on a busy machine).
    op = cluster.operator("watcher", "--gc-interval", "600", "--no-ipam", "--no-nodegc",
                          "--no-policies", "--lease-duration", "90", "--renew-deadline",
                          "80", "--log-level", "debug", kubeconfig=proxy.kubeconfig)
    op.wait_ready("leader")
    watching(cluster, op, "first")
    cluster.pod("x", "a", {"v": "1"})
    cluster.pod("x", "b", {"v": "1"})
    informer = datastore.informers["Pod"]
    wait_for(lambda: set(pods_in_cache(cluster, datastore)) == {"a", "b", "first"},
             what="the cache")
    seen = record(informer)
    proxy.hold()
    churn(cluster)
    cluster.restart_api_server()
    proxy.release()
    wait_for(lambda: informer.relists == 2, timeout=30, what="a relist after 410 Gone")
    wait_for(lambda: pods_in_cache(cluster, datastore) == pods_in_api(cluster),
             what="caught up")
    # b, deleted while away, is gone (a relist replaces the cache), and a is current.
    assert set(pods_in_cache(cluster, datastore)) == {"a", "c", "first"}
    assert pods_in_cache(cluster, datastore)["a"]["metadata"]["labels"] == {"v": "3"}
    assert seen == [("ERROR", 410, 0)], "a 410 Gone, and nothing else, after the restart"
    # And it watches again from the new list: later changes arrive.
    cluster.pod("x", "d")
    wait_for(lambda: "d" in pods_in_cache(cluster, datastore), what="watching again")
    # The operator: identities for the label sets that appeared while it was away.
    for labels in ({"v": "3"}, {"v": "new"}):
        wait_for(lambda ls=labels: cluster.identity_of(
            security_labels(ls, cluster.ns("x"), {})), timeout=60,
            what=f"an identity for {labels}, made while the operator was away")
    assert op.alive
