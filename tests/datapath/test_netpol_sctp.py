"""SCTP port rules, proven with crafted packets: this kernel has no SCTP sockets.

The source pod sends SCTP INIT chunks built with scapy (from its own address: the
from-pod program drops spoofed sources), one batch per test in one process; every
destination pod listens with a raw IP socket for protocol 132, which receives SCTP
packets without any SCTP support in the kernel. Each INIT has a source port never used
before in the session, so a conntrack entry of an earlier allowed packet cannot carry a
later one through.
"""

import json
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest
from labkit import metric
from reachability import TCP80, TCP81, Model, container_ports, labels, netpol, port

pytest.importorskip("scapy.layers.sctp", reason="scapy crafts the SCTP packets: pip install scapy")

RECEIVER = r"""
import json, select, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
print("ready", flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        data, (src, _) = s.recvfrom(65535)
        ihl = (data[0] & 15) * 4
        sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
        chunk = data[ihl + 12] if len(data) > ihl + 12 else -1
        print(json.dumps([src, sport, dport, chunk]), flush=True)
    if sys.stdin in ready and not sys.stdin.readline():
        break
"""

SENDER = r"""
import json, sys
from scapy.config import conf
from scapy.layers.inet import IP
from scapy.layers.sctp import SCTP, SCTPChunkInit
from scapy.sendrecv import send
from scapy.supersocket import L3RawSocket
conf.L3socket = L3RawSocket  # the kernel routes it: pods reach 169.254.1.1 without ARP
req = json.loads(sys.argv[1])
pkts = [IP(src=req["src"], dst=dst) / SCTP(sport=sport, dport=dport)
        / SCTPChunkInit(init_tag=sport, a_rwnd=65535, n_out_streams=1, n_in_streams=1,
                        init_tsn=1)
        for dst, sport, dport in req["packets"]]
send(pkts, verbose=0)
print(len(pkts))
"""


@pytest.fixture(scope="module")
def model(lab):
    m = Model(lab, namespaces=("x", "y"), pod_names=("a", "b"))
    try:
        m.build()
        yield m
    finally:
        m.close()


def sctp_delivery(m, src: str, targets: Iterable[str], ports=(80, 81)) -> dict:
    """{(target, port): delivered?} for one SCTP INIT from `src` to each target and
    port, observed by raw sockets in the targets."""
    targets = list(targets)
    receivers = {
        t: subprocess.Popen(m.lab.exec_argv(t, [sys.executable, "-c", RECEIVER]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for t in targets
    }
    try:
        for t, proc in receivers.items():
            assert proc.stdout.readline().strip() == "ready", f"receiver in {t} did not start"
        sent = {}
        packets = []
        for t in targets:
            for p in ports:
                sport = m.source_port()
                sent[sport] = (t, p)
                packets.append([m.pods[t].ip, sport, p])
        res = subprocess.run(
            m.lab.exec_argv(src, [sys.executable, "-c", SENDER,
                                  json.dumps({"src": m.pods[src].ip, "packets": packets})]),
            capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == str(len(packets)), res.stderr
        time.sleep(0.3)  # local delivery takes microseconds; be generous
    finally:
        outputs = {}
        for t, proc in receivers.items():
            try:
                outputs[t], _ = proc.communicate(input="", timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs[t], _ = proc.communicate()
    got = {key: False for key in sent.values()}
    for t, out in outputs.items():
        for line in out.splitlines():
            src_ip, sport, dport, chunk = json.loads(line)
            if src_ip == m.pods[src].ip and sent.get(sport) == (t, dport):
                assert chunk == 1, "not the INIT chunk sent"
                got[(t, dport)] = True
    return got


def test_sctp_reaches_every_port_without_policy(m):
    """The method itself: with no policy every INIT arrives where it was sent."""
    got = sctp_delivery(m, "x/b", ["x/a", "y/a", "y/b"])
    assert all(got.values()), got


def test_sctp_port_rule_allows_only_that_port(m):
    m.apply(netpol("sctp-80", "x", labels(pod="a"), ingress=[{"ports": [port(80, "SCTP")]}]))
    got = sctp_delivery(m, "y/b", ["x/a", "x/b"])
    assert got == {("x/a", 80): True, ("x/a", 81): False, ("x/b", 80): True,
                   ("x/b", 81): True}
    # and no TCP: the rule names SCTP only
    m.check(m.reachability().expect_all_ingress("x/a", False), cases=(TCP80,),
            targets="x")


def test_tcp_only_policy_drops_sctp(m):
    m.apply(netpol("tcp-only", "x", labels(pod="a"), ingress=[{
        "ports": [port(80, "TCP"), port(81, "TCP")]}]))
    node = m.lab.load().nodes[0]
    before = metric(node, "drop_policy", "ingress")
    got = sctp_delivery(m, "y/a", ["x/a"])
    assert got == {("x/a", 80): False, ("x/a", 81): False}
    assert metric(node, "drop_policy", "ingress") - before >= 2
    m.check(m.reachability(), cases=(TCP80, TCP81), targets="x/a")


def test_sctp_egress_port_rule(m):
    m.apply(netpol("sctp-out-81", "x", labels(pod="b"), types=["Egress"], egress=[{
        "to": [{"namespaceSelector": labels(ns="y")}], "ports": [port(81, "SCTP")]}]))
    got = sctp_delivery(m, "x/b", ["x/a", "y/a", "y/b"])
    assert got == {("x/a", 80): False, ("x/a", 81): False, ("y/a", 80): False,
                   ("y/a", 81): True, ("y/b", 80): False, ("y/b", 81): True}


def test_sctp_port_range_and_protocol_without_port(m):
    m.apply(netpol("sctp-range", "x", labels(pod="a"), ingress=[{
                "ports": [port(81, "SCTP", end=90)]}]),
            netpol("sctp-any", "y", labels(pod="a"), ingress=[{
                "from": [{"namespaceSelector": labels(ns="x")}],
                "ports": [{"protocol": "SCTP"}]}]))
    got = sctp_delivery(m, "x/b", ["x/a", "y/a"], ports=(80, 81, 90, 91))
    assert got == {("x/a", 80): False, ("x/a", 81): True, ("x/a", 90): True,
                   ("x/a", 91): False, ("y/a", 80): True, ("y/a", 81): True,
                   ("y/a", 90): True, ("y/a", 91): True}


def test_sctp_named_port(m):
    """A named SCTP container port resolves like TCP and UDP ones."""
    m.set_pod("x/a", ports=[*container_ports(), {"name": "serve-81-sctp",
                                                  "containerPort": 81, "protocol": "SCTP"}],
              sync=False)
    m.apply(netpol("sctp-named", "x", labels(pod="a"), ingress=[{
        "ports": [port("serve-81-sctp", "SCTP")]}]))
    got = sctp_delivery(m, "y/a", ["x/a"])
    assert got == {("x/a", 80): False, ("x/a", 81): True}
