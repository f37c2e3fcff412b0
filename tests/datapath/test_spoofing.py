"""Sources that arrive from outside a node claiming to be pods (issue 13, item 1).

cil_from_netdev takes a packet's identity from its source address and delivers it with
bpf_redirect_peer, past the stack's rp_filter. Each test sends what an attacker would
and checks that the target pod received nothing, and why (the drop reason).
Two nodes over the VXLAN overlay; a pod on each.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import pytest
from labkit import metric, pod_manifest, unique_lab_name

from cilia.agent.routing import VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI, node_object, vtep_mac
from cilia.lab.lab import Lab, in_netns

PORT = 8090
FAKE_NODE, FAKE_CIDR, FAKE_IP = "node3", "10.244.3.0/24", "172.30.0.200"
LISTEN = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {port}))
s.settimeout({timeout})
print("ready", flush=True)
got = []
try:
    while True:
        got.append(s.recvfrom(100)[0].decode())
except socket.timeout:
    pass
print(",".join(got) or "nothing")
"""


@pytest.fixture(scope="module")
def overlay():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2, routing="vxlan")
        a = lab.run_pod(pod_manifest("a", labels={"pod": "a"}), "node1")
        b = lab.run_pod(pod_manifest("b", labels={"pod": "b"}), "node2")
        yield lab, a, b
    finally:
        lab.down()


def _received(lab, pod, send, timeout: float = 2.0) -> str:
    """What `pod` receives on PORT (UDP) while `send()` runs."""
    proc = subprocess.Popen(in_netns(pod.netns, [sys.executable, "-c", LISTEN.format(
        port=PORT, timeout=timeout)]), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        send()
        return proc.communicate(timeout=timeout + 10)[0].strip()
    finally:
        proc.kill()


def _py(netns: str, script: str) -> None:
    subprocess.run(in_netns(netns, [sys.executable, "-c", script]), check=True,
                   capture_output=True, timeout=30)


def _vxlan_frame(dst_node_ip: str, inner_src: str, inner_dst: str, payload: bytes) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    inner = (Ether(src="02:00:00:00:00:01", dst=vtep_mac(dst_node_ip))
             / IP(src=inner_src, dst=inner_dst) / UDP(sport=4242, dport=PORT) / payload)
    header = bytes([0x08, 0, 0, 0]) + VXLAN_VNI.to_bytes(3, "big") + b"\0"
    return header + bytes(inner)


def _send_vxlan(node_ip: str, inner_src: str, inner_dst: str, payload: bytes,
                bind: str = "") -> str:
    """A script sending node_ip's VXLAN port five frames claiming inner_src."""
    frame = _vxlan_frame(node_ip, inner_src, inner_dst, payload)
    return ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            + (f"s.bind(('{bind}', 0))\n" if bind else "")
            + f"for _ in range(5): s.sendto({frame!r}, ('{node_ip}', {VXLAN_PORT}))")


def test_vxlan_from_outside_the_cluster_is_dropped(overlay):
    """A host on the underlay (not a node) sends node1's VXLAN port a frame claiming to
    come from pod b: before, cilia_vxlan decapsulated it and pod a got it as from b."""
    lab, a, b = overlay
    state = lab.load()
    node1 = lab.node(state, "node1")
    script = _send_vxlan(node1.underlay_ip, b.ip, a.ip, b"spoofed")
    before = metric(node1, "drop_overlay_source", "ingress")
    got = _received(lab, a, lambda: _py(state.outside_netns, script))
    assert got == "nothing", f"pod a received a spoofed overlay frame: {got}"
    assert metric(node1, "drop_overlay_source", "ingress") >= before + 5


def test_vxlan_from_a_node_is_delivered(overlay):
    """The same frame from node2 (a node of the cluster) is what the overlay is for."""
    lab, a, b = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    script = _send_vxlan(node1.underlay_ip, b.ip, a.ip, b"from-node2", node2.underlay_ip)
    assert "from-node2" in _received(lab, a, lambda: _py(node2.netns, script))


def _ip(node, *argv: str) -> str:
    return subprocess.run(in_netns(node.netns, ["ip", *argv]), check=True,
                          capture_output=True, text=True).stdout


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def third_node(overlay):
    """A third CiliaNode (pod CIDR 10.244.3.0/24) with no machine behind it: every node
    routes its pod CIDR into the overlay, to its address."""
    lab, _, _ = overlay
    lab.datastore.put(node_object(FAKE_NODE, FAKE_CIDR, FAKE_IP))
    try:
        for node in lab.load().nodes:
            _wait(lambda n=node: FAKE_CIDR in _ip(n, "route", "show", "proto", "196"),
                  f"{node.name}'s route to {FAKE_CIDR}")
        yield
    finally:
        lab.datastore.delete("CiliaNode", "", FAKE_NODE)


def test_a_node_cannot_claim_another_nodes_pods(overlay, third_node):
    """Node2, compromised (root in its own netns), sends node1 a VXLAN frame claiming
    to come from a pod of node3: its outer source is a node's, so the uplink lets it
    in; before, cilia_vxlan decapsulated it and pod a got it as from node3's pod (its
    identity, its policy). The inner source must be an address of the node that sent
    it."""
    lab, a, _ = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    claimed = str(ipaddress.IPv4Network(FAKE_CIDR).network_address + 7)
    script = _send_vxlan(node1.underlay_ip, claimed, a.ip, b"as-node3", node2.underlay_ip)
    before = metric(node1, "drop_overlay_inner_source", "ingress")
    got = _received(lab, a, lambda: _py(node2.netns, script))
    assert got == "nothing", f"pod a received node2's frame claiming node3's pod: {got}"
    assert metric(node1, "drop_overlay_inner_source", "ingress") >= before + 5


def test_a_node_cannot_claim_the_world_or_this_nodes_pods(overlay):
    """Nor may node2 speak for an outside address (no reverse-path check holds for
    those: it is the world's identity, which world rules allow) or for a pod of node1
    itself."""
    lab, a, _ = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    for claimed in ("198.51.100.7", str(ipaddress.IPv4Address(a.ip) + 1)):
        script = _send_vxlan(node1.underlay_ip, claimed, a.ip, b"claimed", node2.underlay_ip)
        before = metric(node1, "drop_overlay_inner_source", "ingress")
        got = _received(lab, a, lambda s=script: _py(node2.netns, s))
        assert got == "nothing", f"pod a received node2's frame claiming {claimed}: {got}"
        assert metric(node1, "drop_overlay_inner_source", "ingress") >= before + 5


def test_a_node_may_send_from_its_own_address(overlay):
    """Remote-node traffic over the overlay (a node's own address inside: a NodePort's
    SNAT, a process bound to it) is the node's own: delivered."""
    lab, a, _ = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    script = _send_vxlan(node1.underlay_ip, node2.underlay_ip, a.ip, b"node2-itself",
                         node2.underlay_ip)
    assert "node2-itself" in _received(lab, a, lambda: _py(node2.netns, script))


def test_nothing_leaves_the_overlay_without_a_tunnel(overlay):
    """cilia_vxlan is collect_md: a packet routed into it for an address of no node has
    no tunnel, and is dropped and counted, not sent anywhere."""
    lab, _, _ = overlay
    node1 = lab.node(lab.load(), "node1")
    _ip(node1, "route", "add", "10.244.99.0/24", "via", "10.244.99.1", "dev", VXLAN_DEVICE,
        "onlink")
    _ip(node1, "neigh", "replace", "10.244.99.1", "lladdr", "02:c1:ac:1e:00:63", "dev",
        VXLAN_DEVICE, "nud", "permanent")
    try:
        before = metric(node1, "drop_no_tunnel", "egress")
        _py(node1.netns, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(3): s.sendto(b'x', ('10.244.99.5', 9))")
        assert metric(node1, "drop_no_tunnel", "egress") >= before + 3
    finally:
        _ip(node1, "route", "del", "10.244.99.0/24")
        _ip(node1, "neigh", "del", "10.244.99.1", "dev", VXLAN_DEVICE)


def test_an_old_overlay_device_is_replaced(overlay):
    """An agent starting over an earlier agent's cilia_vxlan (FDB-driven, no collect_md,
    so no outer source to check) makes it anew as a collect_md device, and the overlay
    carries pod traffic both ways again."""
    lab, a, b = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    lab.stop_agent("node1")
    _ip(node1, "link", "del", VXLAN_DEVICE)
    _ip(node1, "link", "add", VXLAN_DEVICE, "address", vtep_mac(node1.underlay_ip), "mtu",
        "1450", "type", "vxlan", "id", str(VXLAN_VNI), "dstport", str(VXLAN_PORT), "local",
        node1.underlay_ip, "dev", "eth0", "nolearning")
    lab.start_agent("node1")
    assert " external " in _ip(node1, "-d", "link", "show", VXLAN_DEVICE)
    assert "cil_from_vxlan" in subprocess.run(
        in_netns(node1.netns, ["tc", "filter", "show", "dev", VXLAN_DEVICE, "ingress"]),
        capture_output=True, text=True, check=True).stdout
    to_b = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(3): s.sendto(b'a-to-b', ('{b.ip}', {PORT}))")
    _wait(lambda: "a-to-b" in _received(lab, b, lambda: _py(a.netns, to_b), 1.0),
          "pod a's datagrams to reach pod b over the new device")
    to_a = to_b.replace("a-to-b", "b-to-a").replace(b.ip, a.ip)
    assert "b-to-a" in _received(lab, a, lambda: _py(b.netns, to_a))
    assert node2  # node2's agent and device were left alone


def _mac(node, device: str = "eth0") -> str:
    return _ip(node, "-br", "link", "show", device).split()[2]


def test_limitation_a_host_on_the_nodes_segment_can_forge_a_node(overlay):
    """What no check on node1 can stop (README, "Sources from outside"): a host on the
    nodes' own L2 segment (here `outside`, on the underlay bridge) forges node2's
    address as the outer source, and node2's MAC too, and claims pod b inside. Outer
    source, inner source and MAC are all what node2 itself would send, so node1
    delivers it: a source MAC check against node2's neighbour entry (bpf_fib_lookup)
    would pass it as well. Only an underlay that authenticates nodes (IPsec, WireGuard)
    or keeps other hosts off their segment stops it."""
    lab, a, b = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    inner = _vxlan_frame(node1.underlay_ip, b.ip, a.ip, b"forged-node2")
    script = (
        "from scapy.all import Ether, IP, UDP, Raw, sendp, conf\n"
        "conf.verb = 0\n"
        f"sendp(Ether(src='{_mac(node2)}', dst='{_mac(node1)}') / IP(src='{node2.underlay_ip}',"
        f" dst='{node1.underlay_ip}') / UDP(sport=40000, dport={VXLAN_PORT}) / Raw({inner!r}),"
        " iface='underlay', count=5)\n")
    got = _received(lab, a, lambda: _py(state.outside_netns, script))
    assert "forged-node2" in got, "the forged frame was stopped: update the README's 'Left:'"


@pytest.fixture(scope="module")
def native():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2, routing="native")
        a = lab.run_pod(pod_manifest("a", labels={"pod": "a"}), "node1")
        b = lab.run_pod(pod_manifest("b", labels={"pod": "b"}), "node2")
        yield lab, a, b
    finally:
        lab.down()


def test_limitation_native_routing_a_host_on_the_segment_can_claim_a_remote_pod(native):
    """Native routing carries pod addresses bare: a host on the nodes' L2 segment sends
    node1 a packet from pod b's address with node2's MAC, byte for byte what node2
    would forward, and pod a gets it as from b. The reverse-path check passes (b is
    routed via node2, on the uplink), and a check of the source MAC against node2's
    neighbour entry would too: as in any routed pod network, the segment is trusted."""
    lab, a, b = native
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    script = (
        "from scapy.all import Ether, IP, UDP, sendp, conf\n"
        "conf.verb = 0\n"
        f"sendp(Ether(src='{_mac(node2)}', dst='{_mac(node1)}') / IP(src='{b.ip}', "
        f"dst='{a.ip}', ttl=63) / UDP(sport=4242, dport={PORT}) / b'claims-b', "
        "iface='underlay', count=5)\n")
    got = _received(lab, a, lambda: _py(state.outside_netns, script))
    assert "claims-b" in got, "the forged packet was stopped: update the README's 'Left:'"


def test_a_pod_cannot_send_to_a_nodes_vxlan_port(overlay):
    """Pod b's datagram to node1's VXLAN port would leave masqueraded, from node2's
    address, and pass as the overlay: it is dropped at b's veth."""
    lab, a, b = overlay
    state = lab.load()
    node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
    script = _send_vxlan(node1.underlay_ip, b.ip, a.ip, b"laundered")
    before = metric(node2, "drop_to_overlay_port", "egress")
    got = _received(lab, a, lambda: _py(b.netns, script))
    assert got == "nothing", f"pod a received a frame pod b laundered: {got}"
    assert metric(node2, "drop_to_overlay_port", "egress") >= before + 5


def test_a_local_pods_address_from_outside_is_dropped(overlay):
    """A packet from the underlay claiming pod a's own node as its home (a's address)
    to another pod of node1: the route back to a does not leave by the uplink."""
    lab, a, _ = overlay
    state = lab.load()
    node1 = lab.node(state, "node1")
    c = lab.run_pod(pod_manifest("c", labels={"pod": "c"}), "node1")
    try:
        script = (
            "from scapy.all import IP, UDP, send, conf\n"
            "conf.verb = 0\n"
            f"send(IP(src='{a.ip}', dst='{c.ip}') / UDP(sport=4242, dport={PORT}) / "
            "b'claims-a', count=5)\n")
        before = metric(node1, "drop_reverse_path", "ingress")
        got = _received(lab, c, lambda: _py(state.outside_netns, script))
        assert got == "nothing", f"pod c received a packet claiming pod a's address: {got}"
        assert metric(node1, "drop_reverse_path", "ingress") >= before + 5
    finally:
        lab.remove_pod("default", "c")



def test_icmp_errors_cross_nodes_under_default_deny_egress(overlay):
    """Pod a (node1) sends to a closed port of pod b (node2), whose egress is
    default-deny: b's ICMP port unreachable is about a's flow (RELATED), so it leaves b
    and reaches a, over the overlay. Before, b's egress policy dropped it."""
    from cilia.client import AgentClient

    lab, a, b = overlay
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "b-no-egress", "namespace": "default"},
              "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                       "policyTypes": ["Egress"]}}
    lab.datastore.put(policy)
    try:
        for node in lab.load().nodes:
            AgentClient(node.socket).wait_policy_synced()
        script = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.settimeout(2)\ns.connect(('{b.ip}', 9))\n"
            "try:\n    s.send(b'x'); s.recv(10); print('answered')\n"
            "except ConnectionRefusedError:\n    print('refused')\n"
            "except socket.timeout:\n    print('silence')\n")
        out = subprocess.run(in_netns(a.netns, [sys.executable, "-c", script]),
                             capture_output=True, text=True, timeout=30).stdout.strip()
        assert out == "refused", f"pod a got {out} instead of b's ICMP port unreachable"
    finally:
        lab.datastore.delete("NetworkPolicy", "default", "b-no-egress")
