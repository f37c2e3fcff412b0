"""cilia_vxlan's own programs (issue 13 item 1) under BPF_PROG_TEST_RUN, against their
model, over FUZZ_INPUTS generated frames each (CILIA_FUZZ_SEED, CILIA_FUZZ_INPUTS as in
test_differential_fuzz.py):

- cil_to_vxlan (tc egress): an IPv4 packet to an address that cilia_tunnel gives a node
  (a pod CIDR, a node address) gets its tunnel and passes; anything else is dropped
  (drop_no_tunnel), for a collect_md device sends nothing without one.
- cil_from_vxlan (tc ingress): a test run's skb has no tunnel (as on a device without
  collect_md), so every IPv4 frame is dropped (drop_overlay_inner_source): a frame whose
  sender is unknown is never taken for its inner source; other frames go on as
  cil_from_netdev lets them (to the stack).

Whether a frame that has a tunnel is matched to the right node is for the real kernel
to show: tests/datapath/test_spoofing.py, in a lab over a real overlay.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import struct

import pytest
from test_differential_fuzz import FUZZ_INPUTS, SEED, TestRun, tc_runnable

from cilia.datapath import layouts
from cilia.datapath.layouts import IpcacheKey, MetricsKey, Reason, TunnelEndpoint
from cilia.datapath.loader import Datapath, remove_pins

TC_ACT_OK, TC_ACT_SHOT = 0, 2
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x0806, 0x86DD, 0x8100
LOCAL = "172.30.0.11"
TUNNELS = {"10.244.2.0/24": "172.30.0.12", "172.30.0.12/32": "172.30.0.12",
           "10.244.3.0/24": "172.30.0.13", "172.30.0.13/32": "172.30.0.13"}
OTHERS = ["10.244.1.5", "10.244.4.1", "172.30.0.11", "172.30.0.14", "8.8.8.8", "0.0.0.0",
          "255.255.255.255", "10.244.2.255", "10.244.3.0"]


def _tunnelled(addr: str) -> bool:
    a = ipaddress.IPv4Address(addr)
    return any(a in ipaddress.IPv4Network(p) for p in TUNNELS)


@pytest.fixture(scope="module")
def dp():
    root = f"/sys/fs/bpf/cilia-vxlan-{secrets.token_hex(4)}"
    d = None
    try:
        d = Datapath(root)
        tunnel = d.map(layouts.TUNNEL)
        for prefix, node in TUNNELS.items():
            tunnel.update(IpcacheKey.for_prefix(prefix), TunnelEndpoint.for_ips(node, LOCAL))
        yield d
    finally:
        if d is not None:
            d.close()
        remove_pins(root)


def _addr(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.4:
        net = ipaddress.IPv4Network(rng.choice(list(TUNNELS)))
        return str(net.network_address + rng.randrange(net.num_addresses))
    if roll < 0.8:
        return rng.choice(OTHERS)
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def _frame(rng: random.Random) -> tuple[bytes, str | None]:
    """A frame a device could be handed, and its IPv4 destination if it has one."""
    ethertype = rng.choices([ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, ETH_P_8021Q, rng.getrandbits(16)],
                            [0.8, 0.05, 0.05, 0.05, 0.05])[0]
    src, dst = _addr(rng), _addr(rng)
    ihl = rng.choices([5, rng.randrange(16)], [0.9, 0.1])[0]
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + 8, rng.getrandbits(16), 0, 64,
                         rng.choice([1, 6, 17, 132, rng.getrandbits(8)]), 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    body = header + rng.randbytes(rng.randrange(0, 64))
    if ethertype != ETH_P_IP and rng.random() < 0.5:
        body = rng.randbytes(rng.randrange(0, 80))
    frame = rng.randbytes(6) + rng.randbytes(6) + struct.pack("!H", ethertype) + body
    if rng.random() < 0.1:
        frame = frame[:rng.randrange(14, len(frame) + 1)]
    ipv4 = ethertype == ETH_P_IP and len(frame) >= 34
    return frame, (str(ipaddress.IPv4Address(frame[30:34])) if ipv4 else None)


def _count(d: Datapath, reason: Reason, direction: int) -> int:
    got = d.map(layouts.METRICS).lookup(MetricsKey(reason, direction))
    return sum(v.packets for v in got) if got else 0


@pytest.mark.parametrize("prog", ["cil_to_vxlan", "cil_from_vxlan"])
def test_vxlan_program_agrees_with_model(dp, prog):
    rng = random.Random(f"{SEED}-{prog}")
    runner = TestRun()
    fd = dp.to_vxlan_fd if prog == "cil_to_vxlan" else dp.from_vxlan_fd
    reason, direction = ((Reason.DROP_NO_TUNNEL, layouts.Direction.METRIC_DIR_EGRESS)
                         if prog == "cil_to_vxlan" else
                         (Reason.DROP_OVERLAY_INNER_SOURCE,
                          layouts.Direction.METRIC_DIR_INGRESS))
    before = _count(dp, reason, direction)
    dropped = passed = 0
    runs = 0
    while runs < FUZZ_INPUTS:
        frame, daddr = _frame(rng)
        if not tc_runnable(frame):
            continue
        runs += 1
        if prog == "cil_to_vxlan":
            want = TC_ACT_OK if daddr is not None and _tunnelled(daddr) else TC_ACT_SHOT
        else:
            want = TC_ACT_SHOT if daddr is not None else TC_ACT_OK
        got = runner.run(fd, frame, (0, 1))[0]
        assert got == want, f"{prog}: {got} for {frame.hex()}, the model says {want}"
        dropped += want == TC_ACT_SHOT
        passed += want == TC_ACT_OK
    assert dropped and passed, (dropped, passed)  # both verdicts were exercised
    assert _count(dp, reason, direction) - before == dropped
