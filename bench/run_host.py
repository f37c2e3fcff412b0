#!/usr/bin/env python3
"""Host benchmark: the XDP prefilter's drop rate, and cross-node pod-to-pod traffic.

    python bench/run_host.py [--quick] [--json FILE]

Part 1, drop rate. A generator (a small C program, AF_PACKET + sendmmsg) sends 64-byte
UDP frames (60 bytes + FCS) from one namespace into a veth whose other end drops them:

  cilia       cilia's XDP prefilter (cil_xdp_prefilter, native mode) on node1's uplink
              eth0 in a cilia lab, the generator's source CIDR denied with `cilia
              prefilter add`; the generator sends on eth0's peer, the lab bridge's port
  xdp         a bare program that only returns XDP_DROP, native mode
  xdpgeneric  the same program in generic (skb) mode
  tc          a tc clsact ingress program that returns TC_ACT_SHOT
  iptables    an iptables raw-table PREROUTING DROP rule

(the last four on one veth pair between two namespaces this run makes), each in two
placements: "split", the generator on CPU 0 and the receiving veth's NAPI
poll (a threaded-NAPI kernel thread, SCHED_FIFO) on CPU 1; "shared", both on CPU 0 (the
poll runs in softirq right after each send). It reports packets dropped per second, CPU
time per packet, and ratios against the bare XDP_DROP; then each program's own cost
alone, with BPF_PROG_TEST_RUN (bpftool prog run).

Part 2, cross-node pod to pod: TCP_RR (bench/rr.c, blocking and busy-poll) and TCP
throughput (iperf3, 1 stream) between a pod on node1 and a pod on node2 of a 2-node lab
with native routing and one with VXLAN, against two namespaces joined by a plain veth
and against the lab's topology rebuilt with plain kernel routing (no BPF); and, as
diagnostics, native-routing labs with the XDP prefilter detached and in generic mode.
Alternating rounds; each figure is the median over the rounds.

Everything it creates (labs hbench-<hex>-*, netns hbench-<hex>-*, links, programs,
iptables rules inside its own netns, processes) is removed at the end, on failure and on
Ctrl-C too; `--cleanup-stale` removes what a killed run (kill -9) left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchkit  # first: re-runs this script under the project's venv if need be
from benchkit import (
    VENV_BIN,
    BenchError,
    in_netns,
    log,
    median,
    nsenter,
    pinned,
    ratio,
    sh,
    table,
)

BUILD = benchkit.BENCH / "build" / "host"
PREFIX = "hbench-"  # every lab, netns and temp dir of a run starts with this
# The labs' state and datastores. Not under /var/lib/cilia: `cilia-agent --cleanup` run
# with its default --state-dir removes that whole directory, every lab in it included.
LABS_ROOT = Path("/run/hbench/labs")

FLOOD_SRC = "198.18.0.1"  # the generator's source address (RFC 2544 benchmarking range)
FLOOD_CIDR = "198.18.0.0/24"  # what every drop case drops
IPERF_PORT = 5201
RR_PORT = 7001
GEN_CPU, RX_CPU = 0, 1

# ---- the C this benchmark builds (into bench/build/host/) ---------------------------

GEN_C = r"""
/* gen: 64-byte UDP frames (60 + FCS) as fast as one core can send them, on a packet
 * socket (no IP stack, no qdisc): gen IFNAME SRCMAC DSTMAC SRCIP DSTIP SECONDS
 * Prints {"sent", "refused", "seconds"}: refused counts frames the device refused
 * (a veth whose peer's NAPI ring is full drops the frame and says so). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int mac(const char *s, uint8_t *m)
{
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx",
              &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) == 6;
}

static uint16_t csum(const void *p, int n)
{
    const uint16_t *w = p;
    uint32_t s = 0;

    for (; n > 1; n -= 2)
        s += *w++;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return ~s;
}

int main(int argc, char **argv)
{
    static uint8_t frame[60];
    struct ether_header *eth = (void *)frame;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_halen = 6 };
    struct iovec iov = { frame, sizeof(frame) };
    struct mmsghdr msgs[BATCH];
    long sent = 0, refused = 0;
    double start, end, t;
    int fd, one = 1, sndbuf = 64 << 20, i;

    if (argc != 7) {
        fprintf(stderr, "usage: gen IFNAME SRCMAC DSTMAC SRCIP DSTIP SECONDS\n");
        return 2;
    }
    if (!mac(argv[2], eth->ether_shost) || !mac(argv[3], eth->ether_dhost)) {
        fprintf(stderr, "gen: bad MAC address\n");
        return 2;
    }
    eth->ether_type = htons(ETH_P_IP);
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->tot_len = htons(sizeof(frame) - sizeof(*eth));
    if (inet_pton(AF_INET, argv[4], &ip->saddr) != 1 ||
        inet_pton(AF_INET, argv[5], &ip->daddr) != 1) {
        fprintf(stderr, "gen: bad IPv4 address\n");
        return 2;
    }
    ip->check = csum(ip, sizeof(*ip));
    udp->source = htons(9);
    udp->dest = htons(9);
    udp->len = htons(sizeof(frame) - sizeof(*eth) - sizeof(*ip));

    fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) {
        perror("gen: socket");
        return 1;
    }
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
    /* Frames queued on the receiver's ring still count against this socket's send
     * buffer: a small one would make the sender wait for the receiver to free them. */
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf));
    sll.sll_ifindex = if_nametoindex(argv[1]);
    if (!sll.sll_ifindex) {
        perror("gen: if_nametoindex");
        return 1;
    }
    memcpy(sll.sll_addr, eth->ether_dhost, 6);
    memset(msgs, 0, sizeof(msgs));
    for (i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_name = &sll;
        msgs[i].msg_hdr.msg_namelen = sizeof(sll);
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    start = now();
    end = start + atof(argv[6]);
    do {
        for (i = 0; i < 16; i++) {
            int n = sendmmsg(fd, msgs, BATCH, 0);

            /* sendmmsg stops at the first frame the device refuses */
            if (n < 0) {
                if (errno != ENOBUFS && errno != EAGAIN && errno != ENETDOWN) {
                    perror("gen: sendmmsg");
                    return 1;
                }
                refused++;
            } else {
                sent += n;
                refused += n < BATCH;
            }
        }
    } while ((t = now()) < end);
    printf("{\"sent\": %ld, \"refused\": %ld, \"seconds\": %.6f}\n", sent, refused, t - start);
    return 0;
}
"""

DROP_C = r"""
/* The least a program can do to drop a packet, at XDP and at tc. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
    return XDP_DROP;
}

SEC("tc")
int tc_drop(struct __sk_buff *skb)
{
    return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
"""


class Run(benchkit.Run):
    def __init__(self):
        super().__init__(PREFIX)

    def close(self) -> list[str]:
        problems = super().close()
        for d in (LABS_ROOT, LABS_ROOT.parent):
            try:
                d.rmdir()  # only if no other run uses it
            except OSError:
                pass
        return problems


# ---- build --------------------------------------------------------------------------


@dataclass
class Tools:
    gen: Path
    drop_obj: Path
    rr: Path


def build() -> Tools:
    BUILD.mkdir(parents=True, exist_ok=True)
    (BUILD / "gen.c").write_text(GEN_C.lstrip())
    (BUILD / "drop.bpf.c").write_text(DROP_C.lstrip())
    tools = Tools(BUILD / "gen", BUILD / "drop.o", benchkit.build_rr(BUILD))
    benchkit.build_c(BUILD / "gen.c", tools.gen)
    benchkit.build_bpf(BUILD / "drop.bpf.c", tools.drop_obj)
    benchkit.make_bpf()
    return tools


# ---- links, features, stats ---------------------------------------------------------


def link(ns: str, dev: str) -> dict:
    return json.loads(sh(["ip", "-n", ns, "-j", "-s", "-d", "link", "show", "dev", dev]))[0]


def set_features(ns: str, dev: str, **wanted: bool) -> None:
    """`ethtool -K` through pyroute2 (ethtool itself may not be installed)."""
    from pyroute2.ethtool import Ethtool

    with in_netns(ns):
        eth = Ethtool()
        try:
            f = eth.get_features(dev)
            for name, on in wanted.items():
                f.features[name.replace("_", "-")].enable = on
            eth.set_features(dev, f)
        finally:
            eth.close()


def features(ns: str, dev: str, names: list[str]) -> dict[str, bool]:
    from pyroute2.ethtool import Ethtool

    with in_netns(ns):
        eth = Ethtool()
        try:
            f = eth.get_features(dev).features
            return {n: bool(f[n].enable) for n in names}
        finally:
            eth.close()


def napi_threads() -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("napi/"):
                out[int(d.name)] = comm
    return out


def snmp(ns: str) -> dict[str, int]:
    """The netns's IP counters (/proc/net/snmp is per network namespace)."""
    return benchkit.snmp(sh(nsenter(ns, ["cat", "/proc/net/snmp"])))


def thread_cpu(pid: int) -> tuple[int, int]:
    """(ns on CPU, voluntary context switches, i.e. times it slept) of a thread."""
    ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
    return ns, int(m.group(1)) if m else 0


@dataclass
class Receiver:
    """A veth end that drops the flood, and the peer the generator sends on."""

    ns: str
    dev: str
    peer_ns: str
    peer_dev: str
    dst_ip: str
    napi_pid: int = 0

    def macs(self) -> tuple[str, str]:
        return link(self.peer_ns, self.peer_dev)["address"], link(self.ns, self.dev)["address"]

    def set_threaded(self, on: bool) -> None:
        """Threaded NAPI (a kernel thread we can pin) or softirq on the sender's CPU."""
        before = napi_threads()
        sh(["ip", "netns", "exec", self.ns, "sh", "-c",
            f"echo {int(on)} > /sys/class/net/{self.dev}/threaded"])
        self.napi_pid = 0
        if on:
            new = [pid for pid in napi_threads() if pid not in before]
            if len(new) != 1:
                raise BenchError(f"expected one new NAPI thread for {self.dev} in {self.ns}, "
                                 f"found {len(new)}")
            self.napi_pid = new[0]
            os.sched_setaffinity(self.napi_pid, {RX_CPU})
            # Real-time priority: it runs the moment a packet is queued instead of waiting
            # behind whatever else shares the CPU (it is busy only while we flood).
            os.sched_setscheduler(self.napi_pid, os.SCHED_FIFO, os.sched_param(10))

    def counters(self) -> dict[str, int]:
        rx, tx = link(self.ns, self.dev)["stats64"], link(self.peer_ns, self.peer_dev)["stats64"]
        out = {"rx_packets": rx["rx"]["packets"], "ring_full": tx["tx"]["dropped"],
               "ip_in": snmp(self.ns).get("Ip.InReceives", 0)}
        if self.napi_pid:
            out["napi_ns"], out["napi_sleeps"] = thread_cpu(self.napi_pid)
        return out


# ---- part 1: drop rate ----------------------------------------------------------------


class DropCase:
    """One way of dropping the flood: set up, count, tear down."""

    name = ""
    label = ""

    def __init__(self, receiver: Receiver):
        self.rx = receiver

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def dropped(self) -> int | None:
        """The case's own drop counter, where it has one."""
        return None


class CiliaCase(DropCase):
    name, label = "cilia", "cilia prefilter (XDP)"

    def __init__(self, receiver: Receiver, lab, node):
        super().__init__(receiver)
        self.lab, self.node = lab, node

    def dropped(self) -> int | None:
        from cilia.client import AgentClient

        for e in AgentClient(self.node.socket).prefilter().entries:
            if e.cidr == FLOOD_CIDR:
                return int(e.packets)
        raise BenchError(f"{FLOOD_CIDR} is not in node1's prefilter list")


class BareXdpCase(DropCase):
    name, label = "xdp", "bare XDP_DROP"

    def __init__(self, receiver: Receiver, obj, generic: bool = False):
        super().__init__(receiver)
        self.fd = obj.program_fd("xdp_drop")
        self.generic = generic
        if generic:
            self.name, self.label = "xdpgeneric", "bare XDP_DROP, generic mode"

    def start(self) -> None:
        from cilia.datapath import xdp
        from cilia.datapath.libbpf import XDP_FLAGS_SKB_MODE, check, ffi, lib

        with in_netns(self.rx.ns):
            index = socket.if_nametoindex(self.rx.dev)
            if self.generic:
                check(lib().bpf_xdp_attach(index, self.fd, XDP_FLAGS_SKB_MODE, ffi.NULL),
                      f"generic XDP attach on {self.rx.dev}")
                mode, want = xdp.query(index)[1], xdp.GENERIC
            else:
                mode, want = xdp.attach(index, self.fd), xdp.NATIVE
            if mode != want:
                xdp.detach(index)
                raise BenchError(f"XDP attached in {mode} mode, not {want}, on {self.rx.dev}")

    def stop(self) -> None:
        from cilia.datapath import xdp

        with in_netns(self.rx.ns):
            xdp.detach(socket.if_nametoindex(self.rx.dev))


class TcCase(DropCase):
    name, label = "tc", "tc clsact TC_ACT_SHOT"

    def __init__(self, receiver: Receiver, obj):
        super().__init__(receiver)
        self.fd = obj.program_fd("tc_drop")

    def start(self) -> None:
        from cilia.datapath import tc

        with in_netns(self.rx.ns):
            self.prog_id = tc.attach(socket.if_nametoindex(self.rx.dev), self.fd, tc.INGRESS)

    def stop(self) -> None:
        # Removing the clsact qdisc removes the filter too, and leaves the device as bare
        # as before for the next case.
        sh(["tc", "-n", self.rx.ns, "qdisc", "del", "dev", self.rx.dev, "clsact"], check=False)


class IptablesCase(DropCase):
    name, label = "iptables", "iptables raw PREROUTING DROP"

    def rule(self, op: str) -> list[str]:
        return nsenter(self.rx.ns, ["iptables", "-w", "-t", "raw", op, "PREROUTING", "-i",
                                    self.rx.dev, "-s", FLOOD_CIDR, "-j", "DROP"])

    def start(self) -> None:
        sh(self.rule("-A"))

    def stop(self) -> None:
        sh(self.rule("-D"), check=False)

    def dropped(self) -> int | None:
        out = sh(nsenter(self.rx.ns, ["iptables", "-w", "-t", "raw", "-n", "-v", "-x", "-L",
                                      "PREROUTING"]))
        for line in out.splitlines():
            f = line.split()
            if len(f) > 2 and f[2] == "DROP" and FLOOD_CIDR in line:
                return int(f[0])
        raise BenchError("the iptables DROP rule is gone")


def ksoftirqd(cpu: int) -> int:
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                if (pid / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(pid.name)
            except OSError:
                continue
    raise BenchError(f"no ksoftirqd/{cpu}")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def flood_once(case: DropCase, gen: Path, placement: str, seconds: float) -> dict:
    rx = case.rx
    src_mac, dst_mac = rx.macs()
    softirqd = ksoftirqd(GEN_CPU)
    before, own_before = rx.counters(), case.dropped()
    softirqd_before = thread_cpu(softirqd)[0]
    cpu0, t0 = children_cpu(), time.monotonic()
    p = subprocess.Popen(
        nsenter(rx.peer_ns, pinned(GEN_CPU, [str(gen), rx.peer_dev, src_mac, dst_mac,
                                             FLOOD_SRC, rx.dst_ip, str(seconds)])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=seconds + 30)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    wall, gen_cpu = time.monotonic() - t0, children_cpu() - cpu0  # gen is the only child
    if p.returncode != 0:
        raise BenchError(f"gen ({case.name}): {err.strip()}")
    g = json.loads(out)
    time.sleep(0.05)  # let the receiver drain its ring
    softirqd_cpu = (thread_cpu(softirqd)[0] - softirqd_before) / 1e9
    after, own_after = rx.counters(), case.dropped()
    arrived = after["rx_packets"] - before["rx_packets"]
    dropped = own_after - own_before if own_before is not None else arrived
    res = {
        "case": case.name, "placement": placement, "seconds": g["seconds"],
        "sent": g["sent"], "refused": g["refused"], "arrived": arrived, "dropped": dropped,
        "pps": dropped / g["seconds"],
        "offered_pps": (g["sent"] + g["refused"]) / g["seconds"],
        "ring_full": after["ring_full"] - before["ring_full"],
        "reached_ip": after["ip_in"] - before["ip_in"],
        "wall": wall,
        # The generator's CPU time: the sends, and in the shared placement the NAPI poll
        # too (softirq work is charged to the task it interrupts, or to ksoftirqd).
        "gen_cpu_s": gen_cpu, "ksoftirqd_cpu_s": softirqd_cpu,
        "gen_cpu_share": gen_cpu / g["seconds"],
        "gen_ns_per_packet": gen_cpu * 1e9 / max(1, g["sent"] + g["refused"]),
    }
    if placement == "shared" and arrived:
        res["cpu_ns_per_packet"] = (gen_cpu + softirqd_cpu) * 1e9 / arrived
    if "napi_ns" in before:
        cpu = after["napi_ns"] - before["napi_ns"]
        sleeps = after["napi_sleeps"] - before["napi_sleeps"]
        res["rx_ns_per_packet"] = cpu / arrived if arrived else None
        res["rx_cpu_busy"] = cpu / 1e9 / g["seconds"]
        res["packets_per_wakeup"] = arrived / sleeps if sleeps else None
    return res


PLACEMENTS = ("split", "shared")


def udp_frame(src: str, dst: str) -> bytes:
    """The generator's frame: Ethernet, IPv4, UDP, 18 bytes of payload (60 bytes)."""
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 46, 0, 0, 64, socket.IPPROTO_UDP, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    return eth + bytes(ip) + struct.pack("!HHHH", 9, 9, 26, 0) + bytes(18)


def test_run(prog_id: int, frame: Path, repeat: int, runs: int) -> dict:
    """BPF_PROG_TEST_RUN through bpftool: the kernel runs the program `repeat` times on
    the frame and reports the average ns per run; median of `runs` such calls."""
    ns, ret = [], None
    for _ in range(runs):
        out = sh(["bpftool", "prog", "run", "id", str(prog_id), "data_in", str(frame),
                  "repeat", str(repeat)])
        m = re.search(r"Return value: (\d+), duration \(average\): (\d+)ns", out)
        if not m:
            raise BenchError(f"bpftool prog run: unexpected output {out!r}")
        ret, ns = int(m.group(1)), [*ns, int(m.group(2))]
    return {"ns": statistics.median(ns), "samples": ns, "return": ret}


def program_costs(r: Run, cases: dict[str, DropCase], lab_rx: Receiver, repeat: int) -> dict:
    """What each program costs alone, without veth, NAPI or skbs around it."""
    from cilia.datapath import xdp

    if not shutil.which("bpftool"):
        return {"error": "bpftool not installed (apt-get install bpftool)"}
    frames = {}
    for what, src in (("denied", FLOOD_SRC), ("other", "203.0.113.1")):
        frames[what] = r.tmp / f"frame-{what}.bin"
        frames[what].write_bytes(udp_frame(src, "10.250.0.2"))
    out = {}
    cilia_id = link(lab_rx.ns, lab_rx.dev)["xdp"]["prog"]["id"]
    # The prefilter's counters count these runs too; nothing reads them afterwards.
    out["cilia"] = test_run(cilia_id, frames["denied"], repeat, 5)
    out["cilia_pass"] = test_run(cilia_id, frames["other"], repeat, 5)
    bare = cases["xdp"]
    bare.start()
    try:
        with in_netns(bare.rx.ns):
            prog_id, _ = xdp.query(socket.if_nametoindex(bare.rx.dev))
        out["xdp"] = test_run(prog_id, frames["denied"], repeat, 5)
    finally:
        bare.stop()
    tc_case = cases["tc"]
    tc_case.start()
    try:
        out["tc"] = test_run(tc_case.prog_id, frames["denied"], repeat, 5)
    finally:
        tc_case.stop()
    expected = {"cilia": 1, "cilia_pass": 2, "xdp": 1, "tc": 2}  # XDP_DROP, XDP_PASS, SHOT
    for name, want in expected.items():
        if out[name]["return"] != want:
            raise BenchError(f"test run of {name} returned {out[name]['return']}, not {want}")
    out["repeat"] = repeat
    return out


def measure_drops(cases: list[DropCase], gen: Path, args) -> dict:
    receivers = list({id(c.rx): c.rx for c in cases}.values())
    samples: list[dict] = []
    order = [c.name for c in cases]
    by_name = {c.name: c for c in cases}
    try:
        for rnd in range(args.rounds):
            rotated = benchkit.rotate(order, rnd)
            for placement in PLACEMENTS:
                for rx in receivers:
                    rx.set_threaded(placement == "split")
                for name in rotated:
                    case = by_name[name]
                    case.start()
                    try:
                        s = flood_once(case, gen, placement, args.flood_seconds)
                    finally:
                        case.stop()
                    s["round"] = rnd
                    samples.append(s)
                    log(f"  round {rnd + 1} {placement:<6} {name:<8} {s['pps'] / 1e3:7.0f} kpps"
                        + (f", receiver {s['rx_ns_per_packet']:.0f} ns/packet"
                           if s.get("rx_ns_per_packet") else ""))
    finally:
        for rx in receivers:
            try:
                rx.set_threaded(False)  # as the devices were (the kernel's default)
            except BenchError as err:
                log(f"cleanup: {err}")
    summary: dict = {}
    for placement in PLACEMENTS:
        for name in order:
            ss = [s for s in samples if s["case"] == name and s["placement"] == placement]
            row = {k: median([s[k] for s in ss if s.get(k) is not None])
                   for k in ("pps", "offered_pps", "rx_ns_per_packet", "rx_cpu_busy",
                             "packets_per_wakeup", "gen_cpu_share", "gen_ns_per_packet",
                             "cpu_ns_per_packet")}
            # What one core could drop: the receiving thread's (split) or the whole
            # path's (shared) CPU time per packet, inverted.
            cost = row["rx_ns_per_packet"] if placement == "split" else row["cpu_ns_per_packet"]
            row["capacity_pps"] = 1e9 / cost if cost else None
            row["refused_share"] = median([s["refused"] / max(1, s["sent"] + s["refused"])
                                           for s in ss])
            row["reached_ip"] = sum(s["reached_ip"] for s in ss)
            row["dropped_total"] = sum(s["dropped"] for s in ss)
            row["arrived_total"] = sum(s["arrived"] for s in ss)
            summary.setdefault(placement, {})[name] = row
    for rows in summary.values():
        base = rows["xdp"]
        for row in rows.values():
            row["pps_vs_xdp"] = ratio(row["pps"], base["pps"])
            row["capacity_vs_xdp"] = ratio(row["capacity_pps"], base["capacity_pps"])
    return {"samples": samples, "median": summary}


# ---- part 2: pod to pod -----------------------------------------------------------------


@dataclass
class Pair:
    name: str
    label: str
    client_ns: str
    server_ns: str
    server_ip: str


POD = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "c", "image": "-"}]}}


def lab_pair(lab, name: str, label: str) -> Pair:
    pods = {}
    for role, node in (("client", "node1"), ("server", "node2")):
        manifest = dict(POD, metadata={"name": role, "namespace": "default",
                                       "labels": {"app": f"hbench-{role}"}})
        pods[role] = lab.run_pod(manifest, node_name=node)
    return Pair(name, label, pods["client"].netns, pods["server"].netns, pods["server"].ip)


def veth_pair(run: Run, a: str, b: str) -> Pair:
    benchkit.veth(a, "plain0", "10.251.0.1/30", b, "plain1", "10.251.0.2/30")
    return Pair("veth", "plain veth", a, b, "10.251.0.2")


def prefilter_to_generic(lab) -> None:
    """Moves the agent's XDP prefilter on every node's eth0 from native to generic mode
    (the same loaded program, so the same maps)."""
    from cilia.datapath import xdp
    from cilia.datapath.libbpf import XDP_FLAGS_SKB_MODE, check, ffi, lib

    for node in lab.load().nodes:
        with in_netns(node.netns):
            index = socket.if_nametoindex("eth0")
            found = xdp.query(index)
            if found is None:
                raise BenchError(f"no XDP program on {node.netns} eth0")
            fd = check(lib().bpf_prog_get_fd_by_id(found[0]), "prefilter program fd")
            try:
                xdp.detach(index)
                check(lib().bpf_xdp_attach(index, fd, XDP_FLAGS_SKB_MODE, ffi.NULL),
                      f"generic XDP attach on {node.netns} eth0")
            finally:
                os.close(fd)
            if xdp.query(index) != (found[0], xdp.GENERIC):
                raise BenchError(f"the prefilter is not in generic mode on {node.netns} eth0")


def routed_pair(r: Run) -> Pair:
    """The lab's topology without cilia: pod - veth - node - veth - bridge - veth - node -
    veth - pod, forwarded by the nodes' kernel routing (proxy ARP on the pod veths, no
    BPF, no netfilter rules)."""
    pa, n1, br, n2, pb = (r.add_netns(f"r-{x}") for x in ("pa", "n1", "br", "n2", "pb"))
    sh(["ip", "-n", br, "link", "add", "underlay", "type", "bridge"])
    sh(["ip", "-n", br, "link", "set", "underlay", "up"])
    for i, (pod, node) in enumerate(((pa, n1), (pb, n2)), start=1):
        pod_ip, node_ip = f"10.252.{i}.2", f"172.31.0.1{i}"
        sh(["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "lxc",
            "netns", node])
        sh(["ip", "-n", pod, "addr", "add", f"{pod_ip}/32", "dev", "eth0"])
        sh(["ip", "-n", pod, "link", "set", "eth0", "up"])
        sh(["ip", "-n", pod, "route", "add", "default", "dev", "eth0"])
        sh(["ip", "-n", node, "link", "set", "lxc", "up"])
        sh(["ip", "-n", node, "route", "add", f"{pod_ip}/32", "dev", "lxc"])
        sh(["ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", f"node{i}",
            "netns", br])
        sh(["ip", "-n", br, "link", "set", f"node{i}", "master", "underlay", "up"])
        sh(["ip", "-n", node, "addr", "add", f"{node_ip}/24", "dev", "eth0"])
        sh(["ip", "-n", node, "link", "set", "eth0", "up"])
        sh(["ip", "-n", node, "route", "add", f"10.252.{3 - i}.0/24", "via",
            f"172.31.0.1{3 - i}"])
        sh(nsenter(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                          "net.ipv4.conf.lxc.proxy_arp=1"]))
    return Pair("routed", "same topology, kernel routing", pa, pb, "10.252.2.2")


def start_servers(run: Run, pair: Pair, rr: Path) -> None:
    ns = pair.server_ns
    run.spawn(nsenter(ns, pinned(RX_CPU, ["iperf3", "-s", "-p", str(IPERF_PORT)])))
    run.spawn(nsenter(ns, pinned(RX_CPU, [str(rr), "server", str(RR_PORT)])))
    run.spawn(nsenter(ns, pinned(RX_CPU, [str(rr), "server", str(RR_PORT + 1), "spin"])))


def iperf(pair: Pair, seconds: int) -> float:
    """Gbit/s received."""
    return benchkit.iperf(nsenter(pair.client_ns, pinned(GEN_CPU, [])), pair.server_ip,
                          IPERF_PORT, seconds, what=pair.name)


def rr_test(pair: Pair, rr: Path, seconds: float, spin: bool) -> float:
    return benchkit.rr_client(nsenter(pair.client_ns, pinned(GEN_CPU, [])), rr, "rr",
                              pair.server_ip, RR_PORT + 1 if spin else RR_PORT, seconds,
                              spin, pair.name)["rate"]


TESTS = {  # name -> (label, unit)
    "tcp_rr": ("TCP_RR", "trans/s"),
    "tcp_rr_spin": ("TCP_RR busy-poll", "trans/s"),
    "tcp_stream": ("TCP_STREAM 1 stream", "Gbit/s"),
}


def measure_pods(pairs: list[Pair], rr: Path, args) -> dict:
    samples = {p.name: {t: [] for t in TESTS} for p in pairs}
    for p in pairs:  # warm-up, and proof that every pair connects
        rr_test(p, rr, 0.3, False)
        iperf(p, 1)
    for rnd in range(args.rounds):
        rotated = benchkit.rotate(pairs, rnd)
        for test in TESTS:
            for p in rotated:
                if test == "tcp_stream":
                    v = iperf(p, args.iperf_seconds)
                else:
                    v = rr_test(p, rr, args.rr_seconds, spin=test == "tcp_rr_spin")
                samples[p.name][test].append(v)
        log(f"  round {rnd + 1}: " + "; ".join(
            f"{p.name} rr {samples[p.name]['tcp_rr'][-1] / 1e3:.1f}k "
            f"spin {samples[p.name]['tcp_rr_spin'][-1] / 1e3:.1f}k "
            f"{samples[p.name]['tcp_stream'][-1]:.2f} Gbit/s" for p in pairs))
    med = {k: {t: median(v) for t, v in tests.items()} for k, tests in samples.items()}
    ratios = {base: {k: {t: ratio(med[k][t], med[base][t]) for t in TESTS} for k in med}
              for base in ("veth", "routed")}
    return {"samples": samples, "median": med, "vs_veth": ratios["veth"],
            "vs_routed": ratios["routed"]}


# ---- report -----------------------------------------------------------------------------


def fx(v: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if v is None else fmt.format(v)


def report_drops(res: dict) -> list[str]:
    d = res["drops"]["median"]
    labels = res["config"]["case_labels"]
    out = ["XDP prefilter drop rate: 64-byte UDP (60 B + FCS) from one generator core; "
           f"median of {res['config']['rounds']} rounds x {res['config']['flood_seconds']} s",
           "",
           f"split: generator on CPU {GEN_CPU}, the receiving veth's NAPI thread on CPU "
           f"{RX_CPU} (SCHED_FIFO)"]
    rows = [["", "dropped kpps", "vs xdp", "gen CPU", "gen ns/pkt", "rx ns/pkt",
             "rx capacity kpps", "vs xdp", "rx busy", "pkts/wakeup", "ring full"]]
    for name, row in d["split"].items():
        rows.append([labels[name], fx(row["pps"] / 1e3, "{:.0f}"), fx(row["pps_vs_xdp"]),
                     fx(row["gen_cpu_share"], "{:.0%}"),
                     fx(row["gen_ns_per_packet"], "{:.0f}"),
                     fx(row["rx_ns_per_packet"], "{:.0f}"),
                     fx(row["capacity_pps"] and row["capacity_pps"] / 1e3, "{:.0f}"),
                     fx(row["capacity_vs_xdp"]), fx(row["rx_cpu_busy"], "{:.0%}"),
                     fx(row["packets_per_wakeup"], "{:.0f}"),
                     fx(row["refused_share"], "{:.0%}")])
    out += table(rows)
    out += ["", f"shared: generator and receiver both on CPU {GEN_CPU} (NAPI poll in softirq)"]
    rows = [["", "dropped kpps", "vs xdp", "gen CPU", "CPU ns/pkt (send + drop)",
             "extra ns vs xdp", "1-core capacity kpps", "vs xdp"]]
    base = d["shared"]["xdp"]["cpu_ns_per_packet"]
    for name, row in d["shared"].items():
        cost = row["cpu_ns_per_packet"]
        rows.append([labels[name], fx(row["pps"] / 1e3, "{:.0f}"), fx(row["pps_vs_xdp"]),
                     fx(row["gen_cpu_share"], "{:.0%}"), fx(cost, "{:.0f}"),
                     fx(cost - base if cost and base else None, "{:+.0f}"),
                     fx(row["capacity_pps"] and row["capacity_pps"] / 1e3, "{:.0f}"),
                     fx(row["capacity_vs_xdp"])])
    out += table(rows)
    tr = res["drops"].get("test_run", {})
    if "error" in tr:
        out += ["", f"program cost alone: not measured ({tr['error']})"]
    elif tr:
        out += ["", f"program cost alone (BPF_PROG_TEST_RUN, {tr['repeat']:,} runs on the "
                "60-byte frame, median of 5; includes the test harness's own per-run cost):"]
        rows = [["", "ns/run", "vs xdp"]]
        for name, label in (("cilia", "cilia prefilter, denied source (XDP_DROP)"),
                            ("cilia_pass", "cilia prefilter, other source (XDP_PASS)"),
                            ("xdp", "bare XDP_DROP"), ("tc", "tc TC_ACT_SHOT (skb harness)")):
            rows.append([label, f"{tr[name]['ns']:.0f}", fx(ratio(tr[name]["ns"],
                                                                   tr["xdp"]["ns"]))])
        out += table(rows)
    reached = {n: d["split"][n]["reached_ip"] + d["shared"][n]["reached_ip"] for n in labels}
    dropped = {n: d["split"][n]["dropped_total"] + d["shared"][n]["dropped_total"]
               for n in labels}
    out += ["", "packets dropped in all rounds / of them seen by the IP layer (InReceives "
            "of the receiving netns): " + "; ".join(
                f"{n} {dropped[n]:,}/{reached[n]:,}" for n in labels)]
    return out


def report_pods(res: dict) -> list[str]:
    p = res["pods"]
    names = list(p["median"])
    plabels = res["config"]["pair_labels"]
    out = ["cross-node pod to pod (node1 -> node2) vs a plain veth; median of "
           f"{res['config']['rounds']} alternating rounds; client CPU {GEN_CPU}, "
           f"server CPU {RX_CPU}; TCP_RR {res['config']['rr_seconds']} s, "
           f"iperf3 {res['config']['iperf_seconds']} s"]
    rows = [["", *names]]
    for t, (label, unit) in TESTS.items():
        fmt = "{:.2f}" if unit == "Gbit/s" else "{:,.0f}"
        rows.append([f"{label} ({unit})", *(fx(p["median"][n][t], fmt) for n in names)])
    for base in ("veth", "routed"):
        for t, (label, _) in TESTS.items():
            rows.append([f"  {label} / {base}", *(fx(p[f"vs_{base}"][n][t]) for n in names)])
    out += table(rows)
    out += ["pairs: " + "; ".join(f"{n} = {plabels[n]}" for n in names)]
    out += ["", "per round (in run order):"]
    for t, (label, unit) in TESTS.items():
        scale, suffix, fmt = (1, "", "{:.2f}") if unit == "Gbit/s" else (1e3, "k", "{:.1f}")
        out.append(f"  {label:<20} " + "  ".join(
            f"{n} " + "/".join(fmt.format(v / scale) for v in p["samples"][n][t]) + suffix
            for n in names))
    out.append("TSO on the lab bridge's port toward node2's eth0: " + "; ".join(
        f"{n} {'on' if on else 'off'}" for n, on in res["uplink_tso"].items()))
    return out


def report(res: dict) -> str:
    out = []
    if "drops" in res:
        out += report_drops(res) + [""]
    if "pods" in res:
        out += report_pods(res) + [""]
    m = res["machine"]
    out += [f"machine: kernel {m['kernel']}, {m['cpus']} CPUs; load average (1 min) "
            f"{m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after; "
            f"run took {res['runtime_seconds']:.0f} s"
            + ("\n  WARNING: the machine was busy before the run: figures are noisy"
               if m["loadavg_before"][0] > 0.5 else "")]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------


def flood_pair(r: Run) -> tuple[str, str, Receiver]:
    """Two namespaces joined by a veth that the flood crosses: gen/flood0 -> sink/flood1."""
    gen_ns, sink_ns = r.add_netns("gen"), r.add_netns("sink")
    benchkit.veth(gen_ns, "flood0", "10.250.0.1/30", sink_ns, "flood1", "10.250.0.2/30")
    # veth hands frames to its peer through a NAPI ring when the peer has an XDP program
    # (which also turns the sender's TSO off) or GRO on with the sender's TSO off. Set
    # the latter, so the tc and iptables cases take the same ring and NAPI path as XDP
    # (and as a NIC driver): every case differs only in where it drops.
    set_features(sink_ns, "flood1", rx_gro=True)
    set_features(gen_ns, "flood0", tx_tcp_segmentation=False, tx_tcp6_segmentation=False,
                 tx_tcp_ecn_segmentation=False, tx_tcp_mangleid_segmentation=False)
    return gen_ns, sink_ns, Receiver(sink_ns, "flood1", gen_ns, "flood0", "10.250.0.2")


def part_drops(args, r: Run, tools: Tools, native, simple: Receiver) -> tuple[dict, dict]:
    from cilia.client import AgentClient
    from cilia.datapath.loader import BpfObject

    state = native.load()
    node1 = native.node(state, "node1")
    sh([str(VENV_BIN / "cilia"), "--lab", native.name, "prefilter", "add", FLOOD_CIDR])
    deadline = time.monotonic() + 30
    while True:
        pf = AgentClient(node1.socket).prefilter()
        if any(e.cidr == FLOOD_CIDR for e in pf.entries):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"node1's agent did not take up {FLOOD_CIDR} within 30 s")
        time.sleep(0.1)
    modes = {dev.name: dev.xdp_mode for dev in pf.devices}
    if modes.get("eth0") != "native":
        raise BenchError(f"cilia's prefilter on node1's eth0 is in mode {modes}, not native")
    # The generator sends on eth0's peer: the lab bridge's port for node1, in outside.
    lab_rx = Receiver(node1.netns, "eth0", state.outside_netns, node1.name, node1.underlay_ip)

    obj = BpfObject(tools.drop_obj, f"/sys/fs/bpf/{r.name('unused')}")  # it has no maps
    r.finalizers.append(obj.close)
    cases = [CiliaCase(lab_rx, native, node1), BareXdpCase(simple, obj),
             BareXdpCase(simple, obj, generic=True), TcCase(simple, obj), IptablesCase(simple)]
    log(f"part 1: drop rate, {len(cases)} cases x {len(PLACEMENTS)} placements x "
        f"{args.rounds} rounds x {args.flood_seconds} s")
    drops = measure_drops(cases, tools.gen, args)
    log("part 1: program cost alone (BPF_PROG_TEST_RUN)")
    drops["test_run"] = program_costs(r, {c.name: c for c in cases}, lab_rx, args.test_repeat)
    sh([str(VENV_BIN / "cilia"), "--lab", native.name, "prefilter", "delete", FLOOD_CIDR])
    return drops, {c.name: c.label for c in cases}


def part_pods(args, r: Run, tools: Tools, labs: dict, gen_ns: str, sink_ns: str
              ) -> tuple[dict, dict, dict]:
    pairs = [veth_pair(r, gen_ns, sink_ns), routed_pair(r),
             lab_pair(labs["native"], "native", "cilia native routing"),
             lab_pair(labs["vxlan"], "vxlan", "cilia VXLAN")]
    if "noxdp" in labs:
        # The agent's --no-prefilter, done by hand (the lab has no switch for it).
        for node in labs["noxdp"].load().nodes:
            sh(["ip", "-n", node.netns, "link", "set", "dev", "eth0", "xdp", "off"])
            if "xdp" in link(node.netns, "eth0"):
                raise BenchError(f"XDP still attached to {node.netns} eth0")
        pairs.append(lab_pair(labs["noxdp"], "noxdp", "cilia native, no XDP"))
    if "xdpgeneric" in labs:
        prefilter_to_generic(labs["xdpgeneric"])
        pairs.append(lab_pair(labs["xdpgeneric"], "xdpgeneric",
                              "cilia native, prefilter in generic XDP mode"))
    # Why throughput differs: a veth whose peer runs XDP loses TSO, so the lab bridge's
    # port facing node2's eth0 segments every TCP super-packet in software.
    uplink = {name: features(lab.load().outside_netns, "node2", ["tx-tcp-segmentation"])[
        "tx-tcp-segmentation"] for name, lab in labs.items()}
    for p in pairs:
        start_servers(r, p, tools.rr)
    log(f"part 2: pod to pod, {len(pairs)} pairs x {args.rounds} rounds")
    pods = measure_pods(pairs, tools.rr, args)
    return pods, {p.name: p.label for p in pairs}, uplink


def run(args, r: Run) -> dict:
    tools = build()
    log(f"run {r.suffix}: building the labs")
    labs = {"native": r.lab("n", nodes=2, routing="native")}
    if args.only != "drops":
        labs["vxlan"] = r.lab("v", nodes=2, routing="vxlan")
        if args.diagnostic:
            labs["noxdp"] = r.lab("x", nodes=2, routing="native")
            labs["xdpgeneric"] = r.lab("g", nodes=2, routing="native")
    gen_ns, sink_ns, simple = flood_pair(r)
    res = {
        "machine": benchkit.machine() | {
            "iperf3": sh(["iperf3", "--version"], check=False).split("\n")[0]},
        "config": {"quick": args.quick, "rounds": args.rounds,
                   "flood_seconds": args.flood_seconds, "rr_seconds": args.rr_seconds,
                   "iperf_seconds": args.iperf_seconds, "gen_cpu": GEN_CPU, "rx_cpu": RX_CPU,
                   "labs": [lab.name for lab in r.labs]},
    }
    if args.only != "pods":
        res["drops"], res["config"]["case_labels"] = part_drops(args, r, tools, labs["native"],
                                                                simple)
    if args.only != "drops":
        res["pods"], res["config"]["pair_labels"], res["uplink_tso"] = part_pods(
            args, r, tools, labs, gen_ns, sink_ns)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    p.add_argument("--json", type=Path, help="write all results (and samples) here")
    p.add_argument("--rounds", type=int, help="rounds (default 7, quick 2)")
    p.add_argument("--flood-seconds", type=float, help="per drop case (default 2, quick 1)")
    p.add_argument("--rr-seconds", type=float, help="per TCP_RR run (default 1.5, quick 1)")
    p.add_argument("--iperf-seconds", type=int, help="per iperf3 run (default 2, quick 1)")
    p.add_argument("--no-diagnostic", dest="diagnostic", action="store_false", default=None,
                   help="skip the native-routing labs without XDP and with generic-mode XDP "
                   "(skipped with --quick)")
    p.add_argument("--test-repeat", type=int, default=1_000_000,
                   help="BPF_PROG_TEST_RUN repetitions per call (default 1000000)")
    p.add_argument("--only", choices=["drops", "pods"], help="run one part only")
    p.add_argument("--cleanup-stale", action="store_true",
                   help="remove what killed runs left behind, then exit")
    args = p.parse_args()
    os.environ.setdefault("CILIA_LABS_DIR", str(LABS_ROOT))  # before cilia.lab is imported
    for name, default, quick in (("rounds", 7, 2), ("flood_seconds", 2.0, 1.0),
                                 ("rr_seconds", 1.5, 1.0), ("iperf_seconds", 2, 1),
                                 ("diagnostic", True, False)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)

    if os.geteuid() != 0:
        print("run as root: the benchmark creates network namespaces and loads BPF",
              file=sys.stderr)
        return 2
    if args.cleanup_stale:
        benchkit.cleanup_stale(PREFIX)
        return 0
    for tool in benchkit.missing_tools(["iperf3", "clang", "gcc", "taskset", "nsenter", "ip",
                                        "tc", "iptables"]):
        print(f"{tool} not found (apt-get install iperf3 clang gcc util-linux iproute2 "
              "iptables)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (generator and receiver on different cores)", file=sys.stderr)
        return 2

    r = Run()

    def body() -> None:
        t0, load_before = time.monotonic(), os.getloadavg()
        res = run(args, r)
        res["runtime_seconds"] = round(time.monotonic() - t0, 1)
        res["machine"]["loadavg_before"] = load_before
        res["machine"]["loadavg_after"] = os.getloadavg()
        res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        print(report(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
            print(f"\nresults written to {args.json}")

    return benchkit.guarded(body, lambda _status: r.close())

if __name__ == "__main__":
    sys.exit(main())
