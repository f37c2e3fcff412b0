"""The operator's identities: one per distinct security label set, across namespaces;
reused for equal sets, reallocated on label changes, collected when unused. Against the
real API server."""

import time

from cpkit import wait_for

from cilia.datastore.identities import LocalIdentityStore
from cilia.datastore.kubernetes import NAMESPACES, PODS
from cilia.datastore.local import LocalDatastore
from cilia.identity import IdentityAllocator, security_labels


def labels_of(cluster, namespace, pod_labels):
    ns = cluster.client.get(NAMESPACES, None, cluster.ns(namespace))
    return security_labels(pod_labels, cluster.ns(namespace),
                           ns["metadata"].get("labels") or {})


def test_identities_across_namespaces_reuse_relabel_and_gc(cluster, tmp_path):
    cluster.namespace("x", {"team": "blue"})
    cluster.namespace("y", {"team": "red"})
    cluster.pod("x", "a1", {"app": "a"})
    cluster.pod("x", "a2", {"app": "a"})  # same label set as a1
    cluster.pod("y", "a1", {"app": "a"})  # same pod labels, another namespace
    cluster.pod("y", "b1", {"app": "b", "tier": "db"})
    op = cluster.operator("solo")
    op.wait_ready("leader")

    wanted = {labels_of(cluster, ns, pl) for ns, pl in
              [("x", {"app": "a"}), ("y", {"app": "a"}), ("y", {"app": "b", "tier": "db"})]}
    found = wait_for(lambda: set(cluster.identities().values()) >= wanted and
                     cluster.identities(), what="an identity per label set")
    assert sorted(found.values(), key=sorted) == sorted(wanted, key=sorted), \
        "one identity per distinct label set, none for equal sets twice"
    assert all(256 <= n <= 65535 for n in found)

    # The numbers are the ones the local datastore's allocator would pick.
    local = IdentityAllocator(LocalIdentityStore(LocalDatastore(tmp_path / "local")))
    for n, labels in found.items():
        assert local.allocate(labels) == n

    # A new pod with an existing label set reuses its identity; a new set gets one.
    before = cluster.identities()
    cluster.pod("x", "a3", {"app": "a"})
    cluster.pod("x", "c1", {"app": "c"})
    c_labels = labels_of(cluster, "x", {"app": "c"})
    wait_for(lambda: cluster.identity_of(c_labels), what="identity for app=c")
    after = cluster.identities()
    assert {n: ls for n, ls in after.items() if n in before} == before
    assert len(after) == len(before) + 1

    # A label change on a pod: an identity for the new set, at once.
    relabelled = time.monotonic()
    cluster.client.patch(PODS, cluster.ns("y"), "b1", {"metadata": {"labels": {"tier": "cache"}}})
    new = labels_of(cluster, "y", {"app": "b", "tier": "cache"})
    wait_for(lambda: cluster.identity_of(new), what="identity after the label change")
    # A label change on a namespace: every pod in it gets one for its new set.
    cluster.client.patch(NAMESPACES, None, cluster.ns("x"),
                         {"metadata": {"labels": {"team": "green"}}})
    green = labels_of(cluster, "x", {"app": "a"})
    assert "ns:team=green" in green
    wait_for(lambda: cluster.identity_of(green), what="identity after namespace relabel")

    # The old sets are collected after the grace period (2s here), not before.
    db = security_labels({"app": "b", "tier": "db"}, cluster.ns("y"), {"team": "red"})
    blue = security_labels({"app": "a"}, cluster.ns("x"), {"team": "blue"})
    assert cluster.identity_of(db) is not None
    wait_for(lambda: cluster.identity_of(db) is None, timeout=10,
             what="unused identity collected")
    assert time.monotonic() - relabelled >= 2.0, "collected before its grace period"
    wait_for(lambda: cluster.identity_of(blue) is None, timeout=10,
             what="identity of the namespace's old labels collected")
    # What is in use stays.
    assert cluster.identity_of(green) and cluster.identity_of(new)
    assert cluster.identity_of(labels_of(cluster, "y", {"app": "a"}))

    # Deleting the last pod of a set frees it too.
    cluster.client.delete(PODS, cluster.ns("y"), "a1")
    ya = labels_of(cluster, "y", {"app": "a"})
    wait_for(lambda: cluster.identity_of(ya) is None, timeout=10,
             what="identity of a deleted pod's labels collected")
    assert op.metric("cilia_operator_identity_gc_total") >= 3
    assert op.metric("cilia_operator_identity_allocations_total") >= 5
    op.assert_no_errors()
