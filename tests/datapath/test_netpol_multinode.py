"""The reachability model spread over three nodes, in both routing modes.

x/a, y/b, z/c run on node1; x/b, y/c, z/a on node2; x/c, y/a, z/b on node3: every
namespace and every pod name is on every node, so each policy below is enforced partly
for local peers (the from-pod program) and partly for remote ones (identities learnt
from other nodes' pods, traffic arriving from the uplink). A representative subset of
the single-node conformance cases, plus label changes, which must reach the other
nodes' ipcaches.
"""

import ipaddress

import pytest
from labkit import unique_lab_name
from reachability import TCP80, UDP80, UDP81, Model, container_ports, labels, netpol, port

from cilia.lab.lab import Lab

PLACEMENT = {"x/a": "node1", "y/b": "node1", "z/c": "node1",
             "x/b": "node2", "y/c": "node2", "z/a": "node2",
             "x/c": "node3", "y/a": "node3", "z/b": "node3"}


@pytest.fixture(scope="module", params=["native", "vxlan"])
def model(request):
    lab = Lab(unique_lab_name())
    m = Model(lab, placement=PLACEMENT.get)
    try:
        lab.up(nodes=3, routing=request.param)
        m.build()
        yield m
    finally:
        m.close()
        lab.down()


def test_no_policy_everything_connects_across_nodes(m):
    m.check(m.reachability())


def test_default_deny_ingress_and_egress_across_nodes(m):
    m.apply(netpol("deny-in", "x", types=["Ingress"]),
            netpol("deny-out", "y", labels(pod="c"), types=["Egress"]))
    m.check(m.reachability().expect_all_ingress("x", False).expect_all_egress("y/c", False))


def test_selectors_across_nodes(m):
    m.apply(netpol("peers", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="c")},
        {"podSelector": labels(pod="c")},
        {"namespaceSelector": labels(ns="z")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(["y/c", "x/c", "z"], "x/a", True))


def test_ports_and_protocols_across_nodes(m):
    m.apply(netpol("udp-81", "z", labels(pod="a"), ingress=[{
        "from": [{"namespaceSelector": {}}], "ports": [port(81, "UDP"), port(80, end=80)]}]))
    out = {}
    for c in (TCP80, UDP80, UDP81):
        r = m.reachability().expect_all_ingress("z/a", False)
        out[c] = r.expect_all_ingress("z/a", True) if c in (TCP80, UDP81) else r
    m.check(out, cases=(TCP80, UDP80, UDP81))


def test_ip_block_except_across_nodes(m):
    """Pods of the other nodes are in other /24s: egress to node2's pod CIDR except
    x/b reaches y/c and z/a only."""
    xb = m.pods["x/b"].ip
    net = ipaddress.ip_network(f"{xb}/24", strict=False)
    m.apply(netpol("cidr", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
        {"ipBlock": {"cidr": str(net), "except": [f"{xb}/32"]}}]}]))
    m.check(m.reachability().expect_all_egress("x/a", False)
            .expect_peer("x/a", ["y/c", "z/a"], True), cases=(TCP80, UDP80))


def test_named_port_egress_resolves_remote_pods_ports(m):
    m.set_pod("z/b", ports=container_ports({"serve-80-udp": 81}), sync=False)
    m.apply(netpol("named", "x", labels(pod="a"), types=["Egress"],
                   egress=[{"ports": [port("serve-80-udp", "UDP")]}]))
    r = m.reachability().expect_all_egress("x/a", False)
    m.check({UDP80: r.copy().expect_peer("x/a", None, True).expect("x/a", "z/b", False),
             UDP81: r.copy().expect("x/a", "z/b", True)}, cases=(UDP80, UDP81),
            sources="x/a")


def test_label_changes_reach_every_node(m):
    m.apply(netpol("from-blue", "x", ingress=[{"from": [
        {"namespaceSelector": labels(team="blue")},
        {"namespaceSelector": {}, "podSelector": labels(role="client")}]}]))
    base = m.reachability().expect_all_ingress("x", False)
    m.check(base, cases=(TCP80,))
    m.set_namespace_labels("z", {"ns": "z", "team": "blue"})
    m.set_pod("y/a", labels={"pod": "a", "role": "client"})
    m.check(base.copy().expect_peer(["z", "y/a"], "x", True), cases=(TCP80, UDP80),
            what="z joined team blue, y/a became a client")
    m.set_namespace_labels("z", {"ns": "z"})
    m.set_pod("y/a", labels={"pod": "a"})
    m.check(base, cases=(TCP80, UDP80), what="labels back")


def test_pods_added_on_other_nodes(m):
    m.apply(netpol("deny-in", "x", types=["Ingress"]),
            netpol("from-b", "x", ingress=[{"from": [
                {"namespaceSelector": {}, "podSelector": labels(pod="b")}]}]))
    m.placement = {"x/d": "node3", "y/e": "node2"}.get
    try:
        m.add_pod("x", "d", sync=False)
        m.add_pod("y", "e", labels={"pod": "b"})
    finally:
        m.placement = PLACEMENT.get
    r = m.reachability().expect_all_ingress("x", False)
    r.expect_peer(lambda p: m.pods[p].labels.get("pod") == "b", "x", True)
    m.check(r, cases=(TCP80, UDP80))
