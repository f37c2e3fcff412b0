"""The test API server itself: each kmock gap (DESIGN.md) is filled, checked here with the
official client where the gap was about it."""

import threading

import kubernetes
import pytest
from cpkit import wait_for

from cilia.datastore.kubernetes import (
    EVENTS,
    LEASES,
    NAMESPACES,
    PODS,
    Conflict,
    NotFound,
)


def test_server_fields_generate_name_put_and_conflicts(cluster):
    ns = cluster.namespace("x")
    meta = ns["metadata"]
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["creationTimestamp"]
    assert meta["labels"]["kubernetes.io/metadata.name"] == "x"
    ev = cluster.client.create(EVENTS, {"metadata": {"generateName": "p.", "namespace": "x"},
                                        "reason": "R", "message": "m"})
    assert ev["metadata"]["name"].startswith("p.") and len(ev["metadata"]["name"]) > 2
    with pytest.raises(Conflict, match="already exists"):
        cluster.namespace("x")
    lease = cluster.client.create(LEASES, {"metadata": {"name": "l", "namespace": "x"},
                                           "spec": {"holderIdentity": "a"}})
    stale = dict(lease)
    lease["spec"] = {"holderIdentity": "b"}
    put = cluster.client.replace(LEASES, lease)
    assert int(put["metadata"]["resourceVersion"]) > int(lease["metadata"]["resourceVersion"])
    assert put["metadata"]["uid"] == lease["metadata"]["uid"]
    with pytest.raises(Conflict, match="has been modified"):
        cluster.client.replace(LEASES, stale)
    with pytest.raises(Conflict):
        cluster.client.patch(LEASES, "x", "l", {"metadata": {"resourceVersion": "1"},
                                                "spec": {"holderIdentity": "c"}})
    with pytest.raises(Conflict):
        cluster.client.delete(LEASES, "x", "l", resource_version="1")
    assert cluster.client.delete(LEASES, "x", "l", resource_version=put["metadata"][
        "resourceVersion"])


def test_namespaces_list_and_get(cluster):
    cluster.namespace("a", {"k": "v"})
    cluster.namespace("b")
    assert [n["metadata"]["name"] for n in cluster.client.items(NAMESPACES)] == ["a", "b"]
    assert cluster.client.get(NAMESPACES, None, "a")["metadata"]["labels"]["k"] == "v"
    with pytest.raises(NotFound):
        cluster.client.request("GET", "/api/v1/namespaces/zz")


def test_label_and_field_selectors_in_lists_and_watches(cluster):
    cluster.namespace("x")
    cluster.pod("x", "a", {"app": "web", "tier": "1"}, node="n1")
    cluster.pod("x", "b", {"app": "db"}, node="n2")
    cluster.pod("x", "c", {}, node="n1")

    def names(**sel):
        return sorted(p["metadata"]["name"] for p in cluster.client.items(PODS, "x", **sel))

    assert names(label_selector="app=web") == ["a"]
    assert names(label_selector="app!=web") == ["b", "c"]
    assert names(label_selector="app in (web,db),tier") == ["a"]
    assert names(label_selector="app notin (web)") == ["b", "c"]
    assert names(label_selector="!app") == ["c"]
    assert names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert names(field_selector="metadata.name!=a,spec.nodeName==n1") == ["c"]

    rv = cluster.client.list(PODS, "x")["metadata"]["resourceVersion"]
    events = []
    stream = cluster.client.watch(PODS, "x", resource_version=rv, timeout_seconds=2,
                                  label_selector="app=web")
    reader = threading.Thread(target=lambda: events.extend(
        (e["type"], e["object"]["metadata"]["name"]) for e in stream))
    reader.start()
    wait_for(lambda: cluster.emulator.call(cluster.api.watch_count), what="the watch")
    cluster.client.patch(PODS, "x", "b", {"metadata": {"labels": {"app": "web"}}})  # enters
    cluster.client.patch(PODS, "x", "a", {"metadata": {"labels": {"app": "api"}}})  # leaves
    cluster.client.patch(PODS, "x", "c", {"metadata": {"labels": {"x": "y"}}})  # never in
    reader.join()
    assert events == [("ADDED", "b"), ("DELETED", "a")]


def test_the_official_clients_watch_true_is_a_watch_resumable_without_replay(cluster):
    cluster.namespace("x")
    cluster.pod("x", "a")
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(cluster.kubeconfig), client_configuration=cfg)
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
    w = kubernetes.watch.Watch()
    # No resourceVersion: the current objects first, as ADDED (what the server does).
    first = next(iter(w.stream(core.list_namespaced_pod, "x", timeout_seconds=1)))
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "a")
    w.stop()
    rv = first["object"].metadata.resource_version
    cluster.pod("x", "b")
    # From a resourceVersion: only what came after it, nothing replayed.
    seen = [(e["type"], e["object"].metadata.name) for e in w.stream(
        core.list_namespaced_pod, "x", resource_version=rv, timeout_seconds=1)]
    assert seen == [("ADDED", "b")]
    cluster.emulator.call(cluster.api.compact)
    [expired] = list(cluster.client.watch(PODS, "x", resource_version=rv, timeout_seconds=1))
    assert expired["type"] == "ERROR" and expired["object"]["code"] == 410
