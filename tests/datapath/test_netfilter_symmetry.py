"""Netfilter sees each connection whole, or not at all, on every node.

kube-proxy (iptables mode) puts `-m conntrack --ctstate INVALID -j DROP` in every node's
filter FORWARD chain. Netfilter's conntrack calls a TCP packet INVALID when it has seen
only half of the connection: a SYN-ACK with no SYN before it, an ACK while the SYN is
still unanswered. So on each node, a connection's packets must all pass netfilter, both
ways, or none of them may:
- pod to pod across nodes, outside to pod, another node itself to a pod: bypass on both
  nodes (cil_from_pod sends by FIB lookup and redirect_neigh, `redirect_neigh`;
  cil_from_netdev delivers by redirect_peer);
- pod to outside (masqueraded), pod to a node's address, Services that kube-proxy NATs:
  through the node's stack both ways;
- pod to pod routed out of a device without cil_from_netdev (whose answers come up the
  stack): through the stack both ways, too.

Every node here carries kube-proxy's rule, and counting rules in FORWARD (before it)
for both directions of each flow under test: per node, both counters move or neither.
Two nodes: pods a1 and a2 on node1, b on node2; in both routing modes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from labkit import PROBE, metric, pod_manifest, probe, servers, unique_lab_name

from cilia.datapath import layouts
from cilia.datapath.maps import BpfMap
from cilia.lab.lab import Lab, Node, in_netns

OUTSIDE_IP = "172.30.0.1"
SERVICE_IP = "10.96.0.20"  # a ClusterIP that kube-proxy (a DNAT rule on node1) translates
TAG = "cilia-test-nf"  # comment on every rule this module adds
NODE_PORT = 8081  # a server in a node's own netns (hostNetwork)
SIDE_IP = "172.30.0.111"  # node1's second link to the underlay (no cil_from_netdev)

# Bulk TCP: the server counts what it reads until EOF and answers with the count.
SINK_SERVER = (
    "import socket\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 9200)); s.listen(); print('ready', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); n = 0\n"
    "    while d := c.recv(1 << 16): n += len(d)\n"
    "    c.sendall(str(n).encode()); c.close()\n"
)
SINK_CLIENT = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], 9200), timeout=20)\n"
    "block = b'x' * (1 << 20)\n"
    "for _ in range(int(sys.argv[2])): c.sendall(block)\n"
    "c.shutdown(socket.SHUT_WR); print(c.recv(64).decode())\n"
)
BULK_MIB = 64

PEER_SERVER = (
    "import socket\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 9100)); s.listen(); print('ready', flush=True)\n"
    "while True:\n"
    "    c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()\n"
)


def _iptables(node: Node, *args: str, check: bool = True) -> str:
    res = subprocess.run(in_netns(node.netns, ["iptables", "-w", *args]),
                         capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"iptables {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def _invalid_rule() -> list[str]:
    return ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-m", "comment",
            "--comment", f"{TAG}:kube-proxy-invalid", "-j", "DROP"]


def _forward_packets(node: Node) -> dict[str, int]:
    """Packets counted by each of this module's FORWARD rules, by comment."""
    out = {}
    for line in _iptables(node, "-L", "FORWARD", "-v", "-x", "-n").splitlines():
        m = re.search(rf"/\* {TAG}:(\S+) \*/", line)
        if m:
            out[m.group(1)] = int(line.split()[0])
    return out


@contextmanager
def counted(lab: Lab, flows: dict[str, tuple[str, str]]) -> Iterator[dict]:
    """Counting rules in FORWARD on every node, one per flow (name -> (src, dst)), ahead
    of kube-proxy's rule; yields {node: {flow: packets}}, filled in on exit."""
    nodes = lab.load().nodes
    added = []
    counts: dict[str, dict[str, int]] = {}
    try:
        for node in nodes:
            for name, (src, dst) in flows.items():
                rule = ["FORWARD", "-s", src, "-d", dst, "-m", "comment", "--comment",
                        f"{TAG}:{name}"]
                _iptables(node, "-I", *rule)
                added.append((node, rule))
        yield counts
        for node in nodes:
            seen = _forward_packets(node)
            counts[node.name] = {name: seen[name] for name in flows}
    finally:
        for node, rule in added:
            _iptables(node, "-D", *rule, check=False)


def invalid_drops(lab: Lab) -> dict[str, int]:
    return {n.name: _forward_packets(n)["kube-proxy-invalid"] for n in lab.load().nodes}


def assert_symmetric(counts: dict, there: str, back: str) -> None:
    """On each node, both directions of a flow passed FORWARD, or neither did."""
    for node, c in counts.items():
        assert (c[there] > 0) == (c[back] > 0), (node, c)


@pytest.fixture(scope="module", params=["native", "vxlan"])
def cluster(request):
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2, routing=request.param)
        pods = {name: lab.run_pod(pod_manifest(name, labels={"pod": name}), node)
                for name, node in (("a1", "node1"), ("a2", "node1"), ("b", "node2"))}
        for node in lab.load().nodes:
            _iptables(node, "-I", *_invalid_rule())
        with servers(lab, "default/a1", [80], "a1"), servers(lab, "default/a2", [80], "a2"), \
             servers(lab, "default/b", [80], "b"):
            yield lab, pods
    finally:
        lab.down()


@pytest.fixture
def no_invalid(cluster):
    """After the test: netfilter found no half-seen connection on any node."""
    lab, _ = cluster
    before = invalid_drops(lab)
    yield
    assert invalid_drops(lab) == before, "kube-proxy's INVALID rule dropped packets"


def _node(lab: Lab, name: str) -> Node:
    return lab.node(lab.load(), name)


def test_cross_node_pod_to_pod_tcp(cluster, no_invalid):
    lab, pods = cluster
    a1, b = pods["a1"].ip, pods["b"].ip
    node1, node2 = _node(lab, "node1"), _node(lab, "node2")
    neigh = metric(node1, "redirect_neigh", "egress"), metric(node2, "redirect_neigh", "egress")
    with counted(lab, {"a1-b": (a1, b), "b-a1": (b, a1)}) as counts:
        for _ in range(5):
            assert probe(lab, "default/a1", b, 80) == "b:hello"
            assert probe(lab, "default/b", a1, 80) == "a1:hello"
        assert probe(lab, "default/a1", b, 80, "udp") == "b:hello"
    # netfilter sees none of it, on either node
    assert all(c == {"a1-b": 0, "b-a1": 0} for c in counts.values()), counts
    # each node sends its pod's half past the stack: requests on one, replies on the other
    assert metric(node1, "redirect_neigh", "egress") - neigh[0] >= 20
    assert metric(node2, "redirect_neigh", "egress") - neigh[1] >= 20


def test_cross_node_long_transfer(cluster, no_invalid):
    lab, pods = cluster
    res = subprocess.run(lab.exec_argv("default/a1", [*PROBE, "stream", pods["b"].ip, "80",
                                                      "--seconds", "3"]),
                         capture_output=True, text=True, timeout=30)
    report = json.loads(res.stdout)
    assert report["error"] is None, report
    assert report["bytes"] > 100_000, report


def test_cross_node_bulk_transfer(cluster, no_invalid):
    """Full-size segments (GSO) past the stack, out of the uplink or the VXLAN device:
    nothing falls back to the stack for want of a route or room."""
    lab, pods = cluster
    server = subprocess.Popen(lab.exec_argv("default/b", [sys.executable, "-c", SINK_SERVER]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        res = subprocess.run(lab.exec_argv("default/a1", [sys.executable, "-c", SINK_CLIENT,
                                                          pods["b"].ip, str(BULK_MIB)]),
                             capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == str(BULK_MIB << 20), res.stderr
    finally:
        server.terminate()
        server.wait()
    for node in lab.load().nodes:
        assert metric(node, "to_stack_fib") == 0, node.name


def test_outside_to_pod_tcp(cluster, no_invalid):
    """The pod answers from its own address (no masquerade of a reply), past the stack."""
    lab, pods = cluster
    a1 = pods["a1"].ip
    node1 = _node(lab, "node1")
    before = metric(node1, "redirect_neigh", "egress")
    with counted(lab, {"out-a1": (OUTSIDE_IP, a1), "a1-out": (a1, OUTSIDE_IP)}) as counts:
        for _ in range(3):
            assert probe(lab, "outside", a1, 80) == "a1:hello"
        assert probe(lab, "outside", a1, 80, "udp") == "a1:hello"
    assert_symmetric(counts, "out-a1", "a1-out")
    assert metric(node1, "redirect_neigh", "egress") - before >= 9


def test_pod_to_outside_tcp_is_masqueraded(cluster, no_invalid):
    """Leaving the cluster needs netfilter (masquerade): the stack, both ways."""
    lab, pods = cluster
    a1 = pods["a1"].ip
    server = subprocess.Popen(lab.exec_argv("outside", [sys.executable, "-c", PEER_SERVER]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        with counted(lab, {"a1-out": (a1, OUTSIDE_IP), "out-a1": (OUTSIDE_IP, a1)}) as counts:
            for _ in range(3):
                assert probe(lab, "default/a1", OUTSIDE_IP, 9100) == _node(lab, "node1").underlay_ip
    finally:
        server.terminate()
        server.wait()
    assert_symmetric(counts, "a1-out", "out-a1")
    assert counts["node1"]["a1-out"] > 0 and counts["node1"]["out-a1"] > 0


def test_other_node_to_pod_tcp(cluster, no_invalid):
    """node2 itself (a hostNetwork client: the API server, a kubelet) to a pod on node1."""
    lab, pods = cluster
    a1 = pods["a1"].ip
    assert probe(lab, "node:node2", a1, 80) == "a1:hello"
    for _ in range(2):
        assert probe(lab, "node:node2", a1, 80) == "a1:hello"


def _remote_node_address(lab: Lab) -> str:
    """What a pod on node1 reaches node2's host at: its underlay address (masqueraded)
    in native routing; its VXLAN address (inside the cluster CIDR, so not masqueraded:
    netfilter sees the pod's own address both ways) in vxlan routing."""
    state = lab.load()
    node2 = lab.node(state, "node2")
    if state.routing == "vxlan":
        return node2.pod_cidr.split("/")[0].rsplit(".", 1)[0] + ".1"
    return node2.underlay_ip


def test_pod_to_other_node_tcp(cluster, no_invalid):
    """Not a pod: through node1's stack both ways. In vxlan routing the answers arrive
    at cilia_vxlan addressed to the pod itself, and cil_from_netdev hands them to the
    stack (to_stack_symmetric) rather than past it."""
    lab, pods = cluster
    a1 = pods["a1"].ip
    node1 = _node(lab, "node1")
    target = _remote_node_address(lab)
    before = metric(node1, "to_stack_symmetric", "ingress")
    with servers(lab, "node:node2", [NODE_PORT], "node2"), \
         counted(lab, {"a1-n2": (a1, target), "n2-a1": (target, a1)}) as counts:
        for _ in range(3):
            assert probe(lab, "default/a1", target, NODE_PORT) == "node2:hello"
    assert_symmetric(counts, "a1-n2", "n2-a1")
    assert counts["node1"]["a1-n2"] > 0
    if lab.load().routing == "vxlan":
        assert metric(node1, "to_stack_symmetric", "ingress") - before >= 6


def test_same_node_pod_to_pod_stays_redirect_peer(cluster, no_invalid):
    lab, pods = cluster
    node1 = _node(lab, "node1")
    peer, neigh = metric(node1, "redirect_peer", "egress"), metric(node1, "redirect_neigh")
    for _ in range(3):
        assert probe(lab, "default/a1", pods["a2"].ip, 80) == "a2:hello"
    assert metric(node1, "redirect_peer", "egress") - peer >= 9
    assert metric(node1, "redirect_neigh") == neigh


@pytest.mark.parametrize("backend", ["a2", "b"])
def test_cluster_ip_through_kube_proxy(cluster, no_invalid, backend):
    """kube-proxy's DNAT on node1 to a backend on node1 (a2) or node2 (b): node1's stack
    sees the connection whole (it must undo the NAT); node2 sees none of it."""
    lab, pods = cluster
    node1 = _node(lab, "node1")
    a1, target = pods["a1"].ip, pods[backend].ip
    rule = ["PREROUTING", "-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", "80",
            "-m", "comment", "--comment", f"{TAG}:service", "-j", "DNAT",
            "--to-destination", f"{target}:80"]
    _iptables(node1, "-t", "nat", "-A", *rule)
    try:
        with counted(lab, {"there": (a1, target), "back": (target, a1)}) as counts:
            for _ in range(3):
                assert probe(lab, "default/a1", SERVICE_IP, 80) == f"{backend}:hello"
    finally:
        _iptables(node1, "-t", "nat", "-D", *rule, check=False)
    assert_symmetric(counts, "there", "back")
    assert counts["node1"]["there"] > 0
    assert counts["node2"] == {"there": 0, "back": 0}


def _link_json(node: Node, name: str) -> dict:
    out = subprocess.run(in_netns(node.netns, ["ip", "-j", "link", "show", name]),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def test_netdevs_map_lists_the_devices_with_from_netdev(cluster):
    lab, _ = cluster
    state = lab.load()
    node1 = lab.node(state, "node1")
    with BpfMap.open_pinned(node1.bpffs_root, layouts.NETDEVS) as netdevs:
        found = {key.value: value.flags for key, value in netdevs.items()}
    want = {_link_json(node1, "eth0")["ifindex"]: layouts.NETDEV_F_UPLINK}
    if state.routing == "vxlan":
        want[_link_json(node1, "cilia_vxlan")["ifindex"]] = layouts.NETDEV_F_OVERLAY
    assert found == want


@contextmanager
def side_path(lab: Lab, a1: str, b: str) -> Iterator[None]:
    """A second link from node1 to the underlay, eth1 (172.30.0.111, no cil_from_netdev),
    which both nodes route a1 <-> b through: node1 sends to b out of eth1, and node2
    answers a1 at eth1's address, so the answers come up node1's stack."""
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    peer = f"{lab.name}-n1b"

    def run(node_or_ns: str, *argv: str, check: bool = True) -> None:
        subprocess.run(in_netns(node_or_ns, list(argv)), check=check, capture_output=True)

    subprocess.run(["ip", "link", "add", "eth1", "netns", node1.netns, "type", "veth",
                    "peer", "name", peer, "netns", state.outside_netns], check=True)
    try:
        run(state.outside_netns, "ip", "link", "set", peer, "master", "underlay", "up")
        run(node1.netns, "ip", "addr", "add", f"{SIDE_IP}/32", "dev", "eth1")
        run(node1.netns, "ip", "link", "set", "eth1", "up")
        eth1_mac = _link_json(node1, "eth1")["address"]
        node2_mac = _link_json(node2, "eth0")["address"]
        run(node1.netns, "ip", "neigh", "replace", node2.underlay_ip, "lladdr", node2_mac,
            "dev", "eth1", "nud", "permanent")
        run(node1.netns, "ip", "route", "add", f"{b}/32", "via", node2.underlay_ip,
            "dev", "eth1", "onlink")
        run(node2.netns, "ip", "neigh", "replace", SIDE_IP, "lladdr", eth1_mac,
            "dev", "eth0", "nud", "permanent")
        run(node2.netns, "ip", "route", "add", f"{a1}/32", "via", SIDE_IP, "dev", "eth0")
        yield
    finally:
        run(node2.netns, "ip", "route", "del", f"{a1}/32", check=False)
        run(node2.netns, "ip", "neigh", "del", SIDE_IP, "dev", "eth0", check=False)
        run(state.outside_netns, "ip", "link", "del", peer, check=False)


def test_route_out_of_a_device_without_from_netdev_takes_the_stack(cluster, no_invalid):
    """Past the stack only out of a device whose answers come back past it: here they
    come up node1's stack, so the whole connection goes through it there."""
    lab, pods = cluster
    a1, b = pods["a1"].ip, pods["b"].ip
    node1 = _node(lab, "node1")
    fib = metric(node1, "to_stack_fib", "egress")
    with side_path(lab, a1, b), \
         counted(lab, {"a1-b": (a1, b), "b-a1": (b, a1)}) as counts:
        for _ in range(3):
            assert probe(lab, "default/a1", b, 80) == "b:hello"
    assert_symmetric(counts, "a1-b", "b-a1")
    assert counts["node1"]["a1-b"] > 0
    assert metric(node1, "to_stack_fib", "egress") - fib >= 3  # each connection's first
    assert probe(lab, "default/a1", b, 80) == "b:hello"  # and all is as before
