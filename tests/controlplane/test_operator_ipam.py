"""The operator's cluster-pool IPAM: a pod CIDR per node in CiliaNode spec.podCIDRs. Against
the real API server, with Node objects made directly (no kubelet)."""

import ipaddress

import pytest
from cpkit import wait_for

from cilia.datastore.kubernetes import CILIA_NODES, NODES
from cilia.operator.ipam import CidrPool, PoolExhausted

POOL = ["--cluster-pool", "10.250.0.0/22", "--node-mask", "24"]


def nets(cidrs: dict) -> dict:
    return {n: [ipaddress.IPv4Network(c) for c in cs] for n, cs in cidrs.items()}


def test_three_nodes_disjoint_cidrs_stable_across_restarts_released_with_the_node(cluster):
    for name in ("node1", "node2", "node3"):
        cluster.node(name)
    # node2's agent registered its CiliaNode (addresses) before the operator ran.
    cluster.client.create(CILIA_NODES, {"metadata": {"name": "node2"}, "spec": {
        "addresses": [{"type": "InternalIP", "ip": "172.30.0.12"}]}})
    op = cluster.operator("ipam", *POOL)
    op.wait_ready("leader")

    cidrs = wait_for(lambda: (c := cluster.pod_cidrs()) and len(c) == 3
                     and all(c.values()) and c, what="three nodes with a pod CIDR")
    blocks = [n for cs in nets(cidrs).values() for n in cs]
    pool = ipaddress.IPv4Network("10.250.0.0/22")
    assert all(b.prefixlen == 24 and b.subnet_of(pool) for b in blocks)
    assert not any(a.overlaps(b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
    # The agent's part of the object is kept.
    node2 = cluster.client.get(CILIA_NODES, None, "node2")
    assert node2["spec"]["addresses"] == [{"type": "InternalIP", "ip": "172.30.0.12"}]
    wait_for(lambda: op.metric("cilia_operator_pod_cidrs_allocated") == 3,
             what="the allocation gauge")

    # A restart (the state is in the CiliaNodes) changes nothing.
    assert op.stop() == 0
    op2 = cluster.operator("ipam-again", *POOL)
    op2.wait_ready("leader")
    cluster.node("node4")
    wait_for(lambda: cluster.pod_cidrs().get("node4"), what="node4's pod CIDR")
    after = cluster.pod_cidrs()
    assert {n: after[n] for n in cidrs} == cidrs, "allocations moved across a restart"
    assert len({c for cs in after.values() for c in cs}) == 4
    wait_for(lambda: op2.metric("cilia_operator_pod_cidrs_available") == 0,
             what="the pool is full")

    # A fifth node finds the pool exhausted: no CIDR, no overlap, an Event on the Node.
    cluster.node("node5")
    wait_for(lambda: any(e["reason"] == "PodCIDRPoolExhausted"
                         for e in cluster.events("node5")), what="the pool exhausted")
    assert "node5" not in cluster.pod_cidrs()
    # A node that goes away releases its block, which the waiting node then gets.
    freed = after["node2"]
    cluster.client.delete(NODES, None, "node2")
    wait_for(lambda: "node2" not in cluster.pod_cidrs(), what="node2's CiliaNode deleted")
    got = wait_for(lambda: cluster.pod_cidrs().get("node5"), timeout=10,
                   what="node5 gets the freed block")
    assert got == freed
    final = [n for cs in nets(cluster.pod_cidrs()).values() for n in cs]
    assert not any(a.overlaps(b) for i, a in enumerate(final) for b in final[i + 1:])
    op2.assert_no_errors()


def test_orphaned_cilianodes_and_overlaps_are_repaired(cluster):
    cluster.node("a")
    cluster.node("b")
    # State left behind: a CiliaNode whose Node is gone, and two nodes claiming one block
    # (b's claim is newer, so b moves).
    cluster.client.create(CILIA_NODES, {"metadata": {"name": "a"},
                                        "spec": {"podCIDRs": ["10.250.1.0/24"]}})
    cluster.client.create(CILIA_NODES, {"metadata": {"name": "gone"},
                                        "spec": {"podCIDRs": ["10.250.0.0/24"]}})
    cluster.client.create(CILIA_NODES, {"metadata": {"name": "b"},
                                        "spec": {"podCIDRs": ["10.250.1.0/24"]}})
    op = cluster.operator("repair", *POOL, gc_grace=0.5)
    op.wait_ready("leader")
    wait_for(lambda: "gone" not in cluster.pod_cidrs(), what="orphaned CiliaNode collected")
    cidrs = wait_for(lambda: (c := cluster.pod_cidrs())["b"] != ["10.250.1.0/24"] and c,
                     what="the overlap repaired")
    assert cidrs["a"] == ["10.250.1.0/24"]
    assert not ipaddress.IPv4Network(cidrs["b"][0]).overlaps(
        ipaddress.IPv4Network("10.250.1.0/24"))
    # Posted right after the move: a moment later than the move is seen.
    wait_for(lambda: any(e["reason"] == "PodCIDROverlap" for e in cluster.events("b")),
             what="an Event about the overlap")


def test_cidr_pool():
    pool = CidrPool("10.0.0.0/23", 25)
    assert pool.size == 4
    used = [ipaddress.IPv4Network("10.0.0.0/25"), ipaddress.IPv4Network("10.0.1.0/24")]
    assert str(pool.first_free(used)) == "10.0.0.128/25"
    used.append(ipaddress.IPv4Network("10.0.0.128/25"))
    with pytest.raises(PoolExhausted, match="no free /25"):
        pool.first_free(used)
    with pytest.raises(ValueError):
        CidrPool("10.0.0.0/24", 16)
