"""A malformed IPv4 header between two pods of a node (issue 14 item 6): dropped by the pod
programs (one IPv4 parse for all, lib/ipv4.h ipv4_parse), counted (drop_invalid) and
reported as a dropped flow (lib/drop.h drop(): every drop counted and reported), with the
addresses its header has. Both ways: from a pod toward another (cil_from_pod), and from the
node into a pod (cil_to_pod). Before, these drops were counted and never reported.

The frames are written by hand through packet sockets (a pod's own stack never sends such
a header): version 6 in an IPv4 frame, ihl 4 (shorter than the fixed header), and ihl 15
(options running past the end of the frame).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

import pytest
from labkit import endpoint_list, metric, pod_manifest

from cilia.lab.lab import in_netns

NS = "mf"
PORT = 9999
SEND = """
import socket, sys
frames = [bytes.fromhex(h) for h in sys.argv[3:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], int(sys.argv[2])))
for f in frames:
    for _ in range(3):
        try:
            s.send(f)
        except OSError:  # ENOBUFS: dropped at tc egress (cil_to_pod), as it should be
            pass
"""


def _header(version: int, ihl: int, src: str, dst: str) -> bytes:
    udp = struct.pack("!HHHH", 4242, PORT, 8 + 5, 0) + b"hello"
    return struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, 20 + len(udp), 1, 0, 64,
                       socket.IPPROTO_UDP, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + udp


def _frames(src: str, dst: str) -> list[bytes]:
    eth = b"\xee" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    return [eth + _header(6, 5, src, dst),  # not version 4
            eth + _header(4, 4, src, dst),  # shorter than the fixed 20 bytes
            eth + _header(4, 15, src, dst)[:34]]  # 60 bytes of header, 20 in the frame


def _send(netns: str, dev: str, frames: list[bytes]) -> None:
    subprocess.run(in_netns(netns, [sys.executable, "-c", SEND, dev, str(0x0800),
                                    *(f.hex() for f in frames)]),
                   check=True, capture_output=True, timeout=30)


def _dropped(lab, start: float, src: str, dst: str, want: int) -> list[dict]:
    """The flows dropped since `start` from `src` to `dst`, once `want` are there (the
    agent drains its ring every 50 ms)."""
    deadline = time.monotonic() + 10
    while True:
        res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "observe",
                              "--since", str(start), "--verdict", "dropped", "-o", "jsonl"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        flows = [json.loads(line) for line in res.stdout.splitlines()]
        flows = [f for f in flows if (f.get("src_ip"), f.get("dst_ip")) == (src, dst)]
        if len(flows) >= want or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pods(lab):
    return (lab.run_pod(pod_manifest("a", NS, {"app": "a"})),
            lab.run_pod(pod_manifest("b", NS, {"app": "b"})))


def test_from_a_pod_toward_another(lab, pods):
    a, b = pods
    node = lab.load().nodes[0]
    before = metric(node, "drop_invalid", "egress")
    start = time.time()
    _send(a.netns, "eth0", _frames(a.ip, b.ip))
    assert metric(node, "drop_invalid", "egress") >= before + 9
    flows = _dropped(lab, start, a.ip, b.ip, 9)
    assert len(flows) >= 9, json.dumps(flows)
    for f in flows:
        assert (f["reason"], f["direction"], f["node"]) == ("drop_invalid", "egress",
                                                            node.name), json.dumps(f)
        assert (f.get("src_pod"), f.get("dst_pod")) == ("a", "b"), json.dumps(f)


def test_from_the_node_into_a_pod(lab, pods):
    _, b = pods
    node = lab.load().nodes[0]
    (ep,) = [e for e in endpoint_list(node) if e["ip"] == b.ip]
    before = metric(node, "drop_invalid", "ingress")
    start = time.time()
    src = "192.0.2.1"  # no source is trusted with a malformed header, the node's neither
    _send(node.netns, ep["hostInterface"], _frames(src, b.ip))
    assert metric(node, "drop_invalid", "ingress") >= before + 9
    flows = _dropped(lab, start, src, b.ip, 9)
    assert len(flows) >= 9, json.dumps(flows)
    for f in flows:
        assert (f["reason"], f["direction"], f.get("dst_pod")) == (
            "drop_invalid", "ingress", "b"), json.dumps(f)
