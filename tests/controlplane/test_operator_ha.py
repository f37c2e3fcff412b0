"""High availability: two replicas, one active (a coordination.k8s.io Lease)."""

import datetime
import time

from cpkit import LEASE_NAMESPACE, wait_for

from cilia.datastore.kubernetes import LEASES
from cilia.identity import security_labels


def leader(cluster) -> str | None:
    lease = cluster.client.get(LEASES, LEASE_NAMESPACE, "cilia-operator") or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def test_two_replicas_only_the_leader_allocates_and_a_standby_takes_over(cluster):
    cluster.namespace("x")
    for i in range(4):
        cluster.pod("x", f"p{i}", {"app": f"a{i}"})
    a = cluster.operator("replica-a")
    a.wait_ready("leader")
    b = cluster.operator("replica-b")
    b.wait_ready("standby")
    assert leader(cluster) == "replica-a"

    # Liveness, readiness and metrics on both; only the leader works.
    assert a.health("/healthz")[0] == 200 and b.health("/healthz")[0] == 200
    assert b.health("/readyz") == (200, {"ok": True, "role": "standby", "detail": "ok"})
    assert a.metric("cilia_operator_is_leader") == 1
    assert b.metric("cilia_operator_is_leader") == 0
    wait_for(lambda: len(cluster.identities()) == 4, what="four identities")
    cluster.pod("x", "p4", {"app": "a4"})
    wait_for(lambda: len(cluster.identities()) == 5, what="a fifth identity")
    time.sleep(0.5)  # room for a standby that would (wrongly) work too
    assert cluster.creators("ciliaidentities") == {"cilia-operator/replica-a"}
    assert b.metric("cilia_operator_identity_allocations_total") == 0
    assert a.metric("cilia_operator_identity_allocations_total") == 5
    assert b.metric("cilia_operator_sweeps_total") == 0

    # The leader dies without a word: after the lease duration (2s), b leads.
    a.kill()
    started = time.monotonic()
    b.wait_ready("leader", timeout=10)
    took = time.monotonic() - started
    assert leader(cluster) == "replica-b"
    assert 1.0 < took < 6.0, f"took over after {took:.1f}s, lease duration is 2s"
    cluster.pod("x", "p5", {"app": "a5"})
    new = security_labels({"app": "a5"}, "x", {})
    wait_for(lambda: cluster.identity_of(new), what="the new leader allocates")
    assert "cilia-operator/replica-b" in cluster.creators("ciliaidentities")
    assert b.metric("cilia_operator_is_leader") == 1

    # A third replica stands by; a clean stop of the leader hands over at once.
    c = cluster.operator("replica-c")
    c.wait_ready("standby")
    started = time.monotonic()
    assert b.stop() == 0
    c.wait_ready("leader", timeout=10)
    assert time.monotonic() - started < 1.9, "a released lease is taken without waiting out " \
                                             "its duration (2s)"
    assert leader(cluster) == "replica-c"
    lease = cluster.client.get(LEASES, LEASE_NAMESPACE, "cilia-operator")
    assert lease["spec"]["leaseTransitions"] == 2
    for op in (b, c):
        op.assert_no_errors()


def test_a_leader_that_cannot_renew_steps_down_before_its_lease_expires(cluster):
    a = cluster.operator("cut-off")
    a.wait_ready("leader")
    failing_since = time.time()
    cluster.emulator.call(cluster.api.fail, "GET", "leases")  # renewals fail from now on
    assert a.proc.wait(timeout=10) == 1
    # It stops leading within the renew deadline (1.5s) plus a retry: before its lease
    # (2s) expires and another replica may take over, so never two act at once.
    line = next(x for x in a.output().splitlines() if "stepping down" in x)
    stepped_down = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert stepped_down - failing_since < 2.0
    cluster.emulator.call(cluster.api.fail, "GET", "leases", None)
    b = cluster.operator("successor")
    b.wait_ready("leader", timeout=10)
    assert leader(cluster) == "successor"
