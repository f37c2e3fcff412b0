"""Sources that arrive from outside a node claiming to be pods (issue 13, item 1).

cil_from_netdev takes a packet's identity from its source address and delivers it with
bpf_redirect_peer, past the stack's rp_filter. Each test sends what an attacker would
and checks that the target pod received nothing, and why (the drop reason).
Two nodes over the VXLAN overlay; a pod on each.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from labkit import metric, pod_manifest, unique_lab_name

from cilia.agent.routing import VXLAN_PORT, VXLAN_VNI, vtep_mac
from cilia.lab.lab import Lab, in_netns

PORT = 8090
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
