"""The emulated API server itself: each kmock gap (cp_emulator.py) is filled, checked here
with the official client where the gap was about it. Each test runs against the real API
server too (`server` is either): the emulator must answer as the real one does where the
tests left on it depend on it. Its fault injection (compact) is the emulator's alone."""

import threading

import kubernetes
import pytest
from cpkit import EmulatedCluster, wait_for

from cilia.datastore.kubernetes import (
    EVENTS,
    LEASES,
    NAMESPACES,
    PODS,
    Conflict,
    NotFound,
)


@pytest.fixture(params=["real", "emulated"])
def server(request):
    """The real API server (the conftest's `cluster`), then the emulated one."""
    return request.getfixturevalue("cluster" if request.param == "real" else "emulated")


def test_server_fields_generate_name_put_and_conflicts(server):
    x = server.ns("x")
    ns = server.namespace("x")
    meta = ns["metadata"]
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["creationTimestamp"]
    assert meta["labels"]["kubernetes.io/metadata.name"] == x
    ev = server.client.create(EVENTS, {"metadata": {"generateName": "p.", "namespace": x},
                                        "involvedObject": {"kind": "Pod", "name": "p",
                                                           "namespace": x},
                                        "reason": "R", "message": "m"})
    assert ev["metadata"]["name"].startswith("p.") and len(ev["metadata"]["name"]) > 2
    with pytest.raises(Conflict, match="already exists"):
        server.namespace("x")
    lease = server.client.create(LEASES, {"metadata": {"name": "l", "namespace": x},
                                           "spec": {"holderIdentity": "a"}})
    stale = dict(lease)
    lease["spec"] = {"holderIdentity": "b"}
    put = server.client.replace(LEASES, lease)
    assert int(put["metadata"]["resourceVersion"]) > int(lease["metadata"]["resourceVersion"])
    assert put["metadata"]["uid"] == lease["metadata"]["uid"]
    with pytest.raises(Conflict, match="has been modified"):
        server.client.replace(LEASES, stale)
    with pytest.raises(Conflict):
        server.client.patch(LEASES, x, "l", {"metadata": {"resourceVersion": "1"},
                                              "spec": {"holderIdentity": "c"}})
    with pytest.raises(Conflict):
        server.client.delete(LEASES, x, "l", resource_version="1")
    assert server.client.delete(LEASES, x, "l", resource_version=put["metadata"][
        "resourceVersion"])


def test_namespaces_list_and_get(server):
    a, b = server.ns("a"), server.ns("b")
    server.namespace("a", {"k": "v"})
    server.namespace("b")
    # The real server has namespaces of its own (and other tests'): ours, in order.
    assert [n["metadata"]["name"] for n in server.client.items(NAMESPACES)
            if n["metadata"]["name"] in (a, b)] == [a, b]
    assert server.client.get(NAMESPACES, None, a)["metadata"]["labels"]["k"] == "v"
    with pytest.raises(NotFound):
        server.client.request("GET", "/api/v1/namespaces/zz")


def test_label_and_field_selectors_in_lists_and_watches(server):
    x = server.ns("x")
    server.namespace("x")
    server.pod("x", "a", {"app": "web", "tier": "1"}, node="n1")
    server.pod("x", "b", {"app": "db"}, node="n2")
    server.pod("x", "c", {}, node="n1")

    def names(**sel):
        return sorted(p["metadata"]["name"] for p in server.client.items(PODS, x, **sel))

    assert names(label_selector="app=web") == ["a"]
    assert names(label_selector="app!=web") == ["b", "c"]
    assert names(label_selector="app in (web,db),tier") == ["a"]
    assert names(label_selector="app notin (web)") == ["b", "c"]
    assert names(label_selector="!app") == ["c"]
    assert names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert names(field_selector="metadata.name!=a,spec.nodeName==n1") == ["c"]

    rv = server.client.list(PODS, x)["metadata"]["resourceVersion"]
    events = []
    stream = server.client.watch(PODS, x, resource_version=rv, timeout_seconds=2,
                                  label_selector="app=web")
    reader = threading.Thread(target=lambda: events.extend(
        (e["type"], e["object"]["metadata"]["name"]) for e in stream
        if e["type"] != "BOOKMARK"))
    reader.start()
    if isinstance(server, EmulatedCluster):
        wait_for(lambda: server.emulator.call(server.api.watch_count), what="the watch")
    server.client.patch(PODS, x, "b", {"metadata": {"labels": {"app": "web"}}})  # enters
    server.client.patch(PODS, x, "a", {"metadata": {"labels": {"app": "api"}}})  # leaves
    server.client.patch(PODS, x, "c", {"metadata": {"labels": {"x": "y"}}})  # never in
    reader.join()
    assert events == [("ADDED", "b"), ("DELETED", "a")]


def test_the_official_clients_watch_true_is_a_watch_resumable_without_replay(server):
    x = server.ns("x")
    server.namespace("x")
    server.pod("x", "a")
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(server.kubeconfig), client_configuration=cfg)
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
    w = kubernetes.watch.Watch()
    # No resourceVersion: the current objects first, as ADDED (what the server does).
    first = next(iter(w.stream(core.list_namespaced_pod, x, timeout_seconds=1)))
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "a")
    w.stop()
    rv = first["object"].metadata.resource_version
    server.pod("x", "b")
    # From a resourceVersion: only what came after it, nothing replayed.
    seen = [(e["type"], e["object"].metadata.name) for e in w.stream(
        core.list_namespaced_pod, x, resource_version=rv, timeout_seconds=1)]
    assert seen == [("ADDED", "b")]
    if isinstance(server, EmulatedCluster):
        server.emulator.call(server.api.compact)
        [expired] = list(server.client.watch(PODS, x, resource_version=rv,
                                              timeout_seconds=1))
        assert expired["type"] == "ERROR" and expired["object"]["code"] == 410
