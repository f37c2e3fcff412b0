#!/usr/bin/env python3
"""Policy benchmark: what NetworkPolicy costs in cilia, against iptables and nftables.

    python bench/run_policy.py [--quick] [--json FILE]      (as root)

Five measurements (the first three by default), each against a baseline built in the
same run:

1. Per-packet cost against the number of rules. Seven pod pairs, each pair behind its own
   node netns, client and server pinned to different cores:

     cilia-0      a cilia lab, no NetworkPolicy
     cilia-1      a cilia lab whose server pod is selected by one NetworkPolicy allowing
                  the client pod (one policy map entry): the cost of enforcing at all
     cilia-10k    a cilia lab whose server pod is selected by NetworkPolicies holding
                  10,000 distinct (ipBlock CIDR, TCP port) allow entries plus the rule
                  allowing the client pod; all checked present in the BPF policy map
     ptp-0        /usr/lib/cni/ptp + host-local, no rules
     ipt-10k      ptp, the same 10,000 (CIDR, port) pairs as iptables-nft rules in the
                  node's FORWARD chain, the client's rule after them, then a drop
     ipt-ct-10k   the same, behind an "ESTABLISHED,RELATED -j ACCEPT" first rule (how
                  stateful iptables enforcers avoid walking the chain on every packet)
     nft-10k      ptp, one nftables rule looking (saddr . dport) up in an interval set
                  of the 10,000 pairs plus the client's, then a drop

   TCP_RR (one connection, 1-byte request and response) and TCP_CRR (a new connection per
   transaction, so every transaction's SYN takes the policy path) with bench/rr.c, in many
   short rounds, every pair once per round, the order reversed every other round;
   figures are medians, ratios the median of per-round ratios.

2. Policy propagation in a lab holding 100 pods and 1,000 NetworkPolicies: a server pod
   under default-deny ingress; an allow policy is stored (datastore.put, what
   `cilia apply -f` does) and a client pod opens new connections every few ms until one
   gets through; then the policy is deleted and the client probes until connections are
   dropped again. p50/p99 over the trials; a few more trials through the `cilia apply -f`
   CLI. The time to create the 100 pods through `lab run` (CNI ADD) is reported too.

3. The agent's resident memory (VmRSS) in that lab with 0 pods and 0 policies (just
   started), and with 100 pods and 1,000 policies. Pod ADDs with the policies present
   are timed by the agent itself (its log's "added in N ms"): replicas of running pods
   (their identity exists), and three pods of new identities.

4. `--parts scale`: the same with 1,000 pods (lab endpoints, 200 on each of 5 lab
   nodes) and 10,000 policies over 100 namespaces (`--scale-*`).

5. `--parts churn`: 20 policy changes a second for a minute while pods come and go, the
   probe's allow stored and deleted meanwhile and timed to its effect; then the policy
   map is compared with what a fresh engine computes from the datastore (no change lost).

Everything it creates (labs named pbench-<hex>-*, netns, iptables/nft rules, which exist
only inside the run's own node netns, processes, temp files) is removed at the end, on
failure and on Ctrl-C too. `--cleanup-stale` removes what a killed run left behind.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import math
import os
import platform
import random
import re
import secrets
import select
import shutil
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import benchkit  # first: re-runs this script under the project's venv if need be
from benchkit import CNI_BIN, REPO, VENV_BIN, BenchError, Run, log, nsenter, pct, sh

from cilia.client import AgentClient, AgentUnreachable
from cilia.datastore import object_ref
from cilia.lab.lab import Lab

BUILD = benchkit.BENCH / "build" / "policy"
PREFIX = "pbench-"  # labs, netns and temp dirs of a run: pbench-<hex>-...

RR_PORT = 7001        # the rr server in every server pod; the one allowed port
CLOSED_PORT = 7002    # nothing listens: "refused" when open, "dropped" when enforced
PROBE_PORT = 8080     # the propagation server
RULES = 10_000
CLIENT_CPU, SERVER_CPU = benchkit.cpus()


class Prober:
    """New TCP connections from inside a pod's netns, one at a time, with a deadline."""

    def __init__(self, netns: str):
        from cilia.agent.netns import open_netns

        self.netns = netns
        self.target = open_netns(benchkit.netns_path(netns))

    def close(self) -> None:
        os.close(self.target)

    def first_open(self, ip: str, port: int, t0: float, timeout: float,
                   spacing: float = 0.005, patience: float = 0.25) -> float:
        """The start (monotonic) of the first of new connections, one begun every
        `spacing` seconds and each given `patience` to connect, that connects. Each is
        its own: a handshake that takes longer than `spacing` (a loaded machine: the
        SYN forwarded, its SYN-ACK late) still counts, at its own start, instead of the
        prober giving up on it and on every one after it; `patience` stays under the
        kernel's first SYN retransmission (1 s), so a SYN dropped before the policy
        landed never counts by its retransmission."""
        from cilia.agent.netns import entered

        pending: dict[int, tuple[float, socket.socket]] = {}
        poller = select.poll()
        try:
            while True:
                now = time.monotonic()
                if now - t0 > timeout:
                    raise BenchError(f"the probe did not see open within {timeout:.0f}s")
                with entered(self.target, self.netns):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((ip, port))
                if err == 0:
                    s.close()
                    return now
                pending[s.fileno()] = (now, s)
                poller.register(s, select.POLLOUT)
                for fd, _ in poller.poll(spacing * 1000):
                    start, sock = pending.pop(fd)
                    poller.unregister(fd)
                    ok = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    sock.close()
                    if ok:
                        return start
                now = time.monotonic()
                for fd in [fd for fd, (start, _) in pending.items() if now - start > patience]:
                    poller.unregister(fd)
                    pending.pop(fd)[1].close()
        finally:
            for _, sock in pending.values():
                sock.close()

    def attempt(self, ip: str, port: int, timeout: float) -> str:
        """"open", "refused" (RST: not enforced, nothing listening) or "dropped"."""
        from cilia.agent.netns import entered

        with entered(self.target, self.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            err = s.connect_ex((ip, port))
            if err not in (0, errno.EINPROGRESS):
                return "refused" if err == errno.ECONNREFUSED else f"error:{err}"
            if err == errno.EINPROGRESS:
                _, writable, _ = select.select([], [s], [], timeout)
                if not writable:
                    return "dropped"
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return "open"
            return "refused" if err == errno.ECONNREFUSED else f"error:{err}"
        finally:
            s.close()


# ---- build, tools --------------------------------------------------------------------


def build() -> Path:
    return benchkit.build_rr(BUILD)


def check_tools() -> dict:
    missing = benchkit.missing_tools(["iptables-nft-restore", "nft", "bpftool", "taskset",
                                      "nsenter"])
    if missing or not (CNI_BIN / "ptp").exists():
        raise BenchError(
            f"missing: {', '.join(missing) or '/usr/lib/cni/ptp'}; on Debian: "
            "apt-get install iptables nftables bpftool util-linux containernetworking-plugins")
    return {
        "iptables": sh(["iptables-nft", "-V"]).strip(),
        "nft": sh(["nft", "-v"]).strip(),
    }


def rss_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


cpu_seconds = benchkit.cpu_seconds


def agent(lab: Lab):
    return lab.load().nodes[0]


def wait_synced(lab: Lab, timeout: float = 600, every_node: bool = False) -> float:
    """Seconds until the agent (`every_node`: every agent of the lab) has applied the
    datastore as it is now. Status blocks while a sync holds the agent's lock, hence
    the long RPC deadline."""
    nodes = lab.load().nodes if every_node else [agent(lab)]
    clients = [AgentClient(n.socket, timeout=timeout) for n in nodes]
    t0 = time.monotonic()
    while True:
        try:
            if all(c.status().policy_synced for c in clients):
                return time.monotonic() - t0
        except AgentUnreachable:
            if time.monotonic() - t0 > timeout:
                raise
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"agent of {lab.name} did not sync policy in {timeout:.0f}s")
        time.sleep(0.01)


def pod_manifest(name: str, namespace: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "none",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]}}


def netpol(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# ---- part 1: per-packet cost ---------------------------------------------------------


def rule_set(cidrs: int) -> list[tuple[str, int]]:
    """10,000 distinct (CIDR, TCP port) pairs: `cidrs` /24s outside every pod range
    (10.0.0.0/24, 10.0.1.0/24, ...), each with RULES/cidrs ports of its own."""
    per = RULES // cidrs
    return [(f"10.{i >> 8}.{i & 255}.0/24", 10000 + i * per + j)
            for i in range(cidrs) for j in range(per)]


@dataclass
class Pair:
    name: str
    client_ns: str
    server_ns: str
    client_ip: str
    server_ip: str
    rules: int
    pid: int = 0  # the cilia agent, if any
    lab: Lab | None = None  # its cilia lab, if any
    samples: dict[str, list[float]] = field(default_factory=lambda: {"rr": [], "crr": []})
    info: dict = field(default_factory=dict)


def cilia_pair(run: Run, tag: str, name: str, policy: bool,
               pairs_of_rules: list[tuple[str, int]], cidrs: int) -> Pair:
    """A cilia lab with a client and a server pod. With `policy`, the server is selected
    by a NetworkPolicy allowing the client on RR_PORT (one entry) plus, if
    `pairs_of_rules`, ten more holding those (CIDR, port) pairs."""
    lab = run.lab(tag)
    lab.datastore.put({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "default"}})
    pods = {n: lab.run_pod(pod_manifest(n, "default", {"pod": n}))
            for n in ("client", "server")}
    node = agent(lab)
    pair = Pair(name, pods["client"].netns, pods["server"].netns, pods["client"].ip,
                pods["server"].ip, len(pairs_of_rules) + 1 if policy else 0, pid=node.pid,
                lab=lab)
    if policy:
        per = RULES // cidrs
        rules = [{"from": [{"ipBlock": {"cidr": pairs_of_rules[i][0]}}],
                  "ports": [{"protocol": "TCP", "port": port}
                            for _, port in pairs_of_rules[i:i + per]]}
                 for i in range(0, len(pairs_of_rules), per)]
        chunk = max(1, math.ceil(len(rules) / 10))
        server = {"matchLabels": {"pod": "server"}}
        t0 = time.monotonic()
        lab.datastore.put(netpol("allow-client", "default", {
            "podSelector": server, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "client"}}}],
                         "ports": [{"protocol": "TCP", "port": RR_PORT}]}]}))
        for k in range(0, len(rules), chunk):
            lab.datastore.put(netpol(f"cidrs-{k // chunk}", "default", {
                "podSelector": server, "policyTypes": ["Ingress"],
                "ingress": rules[k:k + chunk]}))
        stored = time.monotonic() - t0
        synced = wait_synced(lab)
        npol = 1 + math.ceil(len(rules) / chunk) if rules else 1
        pair.info.update(policies=npol, ingress_rules=len(rules) + 1,
                         store_s=round(stored, 2), sync_s=round(synced, 2))
        log(f"{pair.name}: {npol} NetworkPolicies ({len(rules) + 1} ingress rules) stored "
            f"in {stored:.1f}s, in the datapath {synced:.1f}s later")
        if pairs_of_rules:
            pair.info["policy_map"] = verify_policy_map(lab, pairs_of_rules)
    else:
        wait_synced(lab)
    pair.info["agent_rss_kib"] = rss_kib(node.pid)
    return pair


def verify_policy_map(lab: Lab, pairs_of_rules: list[tuple[str, int]]) -> dict:
    """Every (CIDR, port) pair is an entry of the server's ingress policy in the pinned
    BPF map, under the CIDR identity the ipcache gives that CIDR; bpftool agrees on the
    count."""
    from cilia.datapath import layouts
    from cilia.datapath.maps import BpfMap

    node = agent(lab)
    server = next(e for e in AgentClient(node.socket).endpoints() if e.pod_name == "server")
    pmap = BpfMap.open_pinned(node.bpffs_root, layouts.POLICY)
    imap = BpfMap.open_pinned(node.bpffs_root, layouts.IPCACHE)
    try:
        prefixes = {k.prefix: v.identity for k, v in imap.items()}
        keys = {(k.ep_id, k.dir, k.identity, k.proto, k.dport, k.prefixlen)
                for k in pmap.keys()}
    finally:
        pmap.close()
        imap.close()
    # CIDR rules are keyed by the CIDR identity in its "CIDR view" (the datapath probes
    # a peer's CIDR identity with that bit set), where the layout has one.
    view = getattr(layouts, "IDENTITY_CIDR_VIEW", 0)
    missing = [(c, p) for c, p in pairs_of_rules
               if (server.id, layouts.POLICY_INGRESS, prefixes.get(c, -1) | view, 6, p,
                   layouts.POLICY_PREFIX_FULL) not in keys]
    pin = f"{node.bpffs_root}/{layouts.POLICY.name}"
    dumped = len(json.loads(sh(["bpftool", "-j", "map", "dump", "pinned", pin])))
    show = sh(["bpftool", "map", "show", "pinned", pin]).split()
    server_entries = sum(1 for k in keys if k[0] == server.id)
    if missing or dumped < len(pairs_of_rules):
        raise BenchError(f"policy map {pin}: {len(missing)} of {len(pairs_of_rules)} "
                         f"(CIDR, port) entries missing (e.g. {missing[:3]}); "
                         f"bpftool dumps {dumped} entries")
    log(f"policy map {pin}: all {len(pairs_of_rules)} (CIDR identity, port) entries "
        f"present; {server_entries} entries for the server endpoint, bpftool dumps "
        f"{dumped} in all")
    return {"pin": pin, "expected": len(pairs_of_rules), "missing": 0,
            "server_entries": server_entries, "bpftool_entries": dumped,
            "max_entries": int(show[show.index("max_entries") + 1]),
            "cidr_identities": len({c for c, _ in pairs_of_rules if c in prefixes})}


def ptp_pair(run: Run, name: str, rules: str | None,
             pairs_of_rules: list[tuple[str, int]]) -> Pair:
    """Two pods of the reference ptp plugin in a node netns of their own, and `rules`
    ("ipt", "ipt-ct", "nft" or None) in that node netns only."""
    node = run.add_netns(f"{name}-node")
    config = {"cniVersion": "1.0.0", "name": f"pbench-{name}", "type": "ptp",
              "ipMasq": False,
              "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]],
                       "routes": [{"dst": "0.0.0.0/0"}],
                       "dataDir": str(run.tmp / f"ipam-{name}")}}
    ips = {}
    for pod in ("client", "server"):
        ns = run.add_netns(f"{name}-{pod}")
        env = benchkit.cni_env("ADD", secrets.token_hex(16), ns, pod)
        out = sh(nsenter(node, [str(CNI_BIN / "ptp")]), input=json.dumps(config), env=env)
        ips[pod] = json.loads(out)["ips"][0]["address"].split("/")[0]
    sh(nsenter(node, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
    client, server = ips["client"], ips["server"]
    pair = Pair(name, run.name(f"{name}-client"), run.name(f"{name}-server"), client,
                server, RULES + 1 if rules else 0)
    if rules in ("ipt", "ipt-ct"):
        lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                 ":OUTPUT ACCEPT [0:0]"]
        if rules == "ipt-ct":
            lines.append("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
        lines += [f"-A FORWARD -s {c} -d {server}/32 -p tcp -m tcp --dport {p} -j ACCEPT"
                  for c, p in pairs_of_rules]
        lines += [f"-A FORWARD -s {client}/32 -d {server}/32 -p tcp -m tcp "
                  f"--dport {RR_PORT} -j ACCEPT",
                  f"-A FORWARD -d {server}/32 -j DROP", "COMMIT", ""]
        t0 = time.monotonic()
        sh(nsenter(node, ["iptables-nft-restore"]), input="\n".join(lines))
        count = sh(nsenter(node, ["iptables-nft", "-S", "FORWARD"])).count("\n-A FORWARD")
        pair.info.update(load_s=round(time.monotonic() - t0, 2), forward_rules=count + 1)
        log(f"{name}: {count + 1} rules in the FORWARD chain of {node}, "
            f"loaded in {pair.info['load_s']}s")
    elif rules == "nft":
        elems = ",\n".join(f"{c} . {p}" for c, p in pairs_of_rules)
        text = (f"table ip pbench {{\n set allowed {{\n  type ipv4_addr . inet_service\n"
                f"  flags interval\n  elements = {{ {elems},\n {client}/32 . {RR_PORT} }}\n }}\n"
                f" chain forward {{\n  type filter hook forward priority filter; "
                f"policy accept;\n  ip daddr {server} ip saddr . tcp dport @allowed accept\n"
                f"  ip daddr {server} drop\n }}\n}}\n")
        path = run.tmp / f"{name}.nft"
        path.write_text(text)
        t0 = time.monotonic()
        sh(nsenter(node, ["nft", "-f", str(path)]))
        listed = sh(nsenter(node, ["nft", "-j", "list", "set", "ip", "pbench", "allowed"]))
        elements = next(o["set"] for o in json.loads(listed)["nftables"] if "set" in o)
        pair.info.update(load_s=round(time.monotonic() - t0, 2),
                         set_elements=len(elements.get("elem", [])))
        log(f"{name}: nftables set of {pair.info['set_elements']} elements in {node}, "
            f"loaded in {pair.info['load_s']}s")
    return pair


def start_rr_server(run: Run, pair: Pair, rr: Path) -> None:
    run.spawn(nsenter(pair.server_ns, benchkit.pinned(SERVER_CPU, [str(rr), "server",
                                                                    str(RR_PORT)])),
              f"rr-{pair.name}.log")
    # TCP_CRR opens thousands of connections a second: wide port range, TIME_WAIT reuse.
    sh(nsenter(pair.client_ns, ["sysctl", "-q", "-w",
                                "net.ipv4.ip_local_port_range=1024 65000",
                                "net.ipv4.tcp_tw_reuse=1"]))


def rr_test(pair: Pair, rr: Path, mode: str, seconds: float) -> float:
    return benchkit.rr_client(nsenter(pair.client_ns, benchkit.pinned(CLIENT_CPU, [])), rr,
                              mode, pair.server_ip, RR_PORT, seconds, what=pair.name)["rate"]


def check_enforcement(pair: Pair) -> dict:
    """The rules are really in the path: the allowed port answers; a port nothing listens
    on answers RST when open and nothing when the rules drop it."""
    prober = Prober(pair.client_ns)
    try:
        allowed = prober.attempt(pair.server_ip, RR_PORT, 2.0)
        other = prober.attempt(pair.server_ip, CLOSED_PORT, 0.5)
    finally:
        prober.close()
    expected = "dropped" if pair.rules else "refused"
    if allowed != "open" or other != expected:
        raise BenchError(f"{pair.name}: port {RR_PORT} {allowed} (want open), port "
                         f"{CLOSED_PORT} {other} (want {expected})")
    return {f"port_{RR_PORT}": allowed, f"port_{CLOSED_PORT}": other}


def start_pairs(run: Run, pairs: list[Pair], rr: Path) -> None:
    """Each pair's rr server up, warmed up, and its rules checked in the path."""
    for pair in pairs:
        start_rr_server(run, pair, rr)
    for pair in pairs:
        rr_test(pair, rr, "rr", 0.3)  # warm-up, and the server is up
        pair.info["enforcement"] = check_enforcement(pair)
    log("every pair connects; the rules drop other traffic where there are rules")


def run_rounds(pairs: list[Pair], rr: Path, args) -> float:
    """args.rounds rounds of TCP_RR then TCP_CRR, every pair once per round, the order
    reversed every other round; each pair's samples, and its agent's CPU (during the
    rounds, and while its own pair ran) in its info. Returns the seconds they took."""
    agents = {p.name: (p.pid, cpu_seconds(p.pid)) for p in pairs if p.pid}
    # The agent's own CPU while its pair runs (flow events are drained in Python).
    agent_cpu = {(p.name, m): 0.0 for p in pairs if p.pid for m in ("rr", "crr")}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        # The pairs compared with each other sit side by side, and every other round
        # runs backwards, so each ratio compares samples taken seconds apart and no pair
        # always goes first or last.
        order = pairs if rnd % 2 == 0 else pairs[::-1]
        for mode, seconds in (("rr", args.rr_seconds), ("crr", args.crr_seconds)):
            for pair in order:
                c0 = cpu_seconds(pair.pid) if pair.pid else 0.0
                pair.samples[mode].append(rr_test(pair, rr, mode, seconds))
                if pair.pid:
                    agent_cpu[(pair.name, mode)] += cpu_seconds(pair.pid) - c0
        log(f"round {rnd + 1}/{args.rounds}: " + "  ".join(
            f"{p.name} {p.samples['rr'][-1]:,.0f}/{p.samples['crr'][-1]:,.0f}"
            for p in pairs) + "  (TCP_RR/TCP_CRR per s)")
    elapsed = time.monotonic() - t_start
    for pair in pairs:
        if pair.name in agents:
            pid, before = agents[pair.name]
            pair.info["agent_cpu_s_during_rounds"] = round(cpu_seconds(pid) - before, 2)
            pair.info["agent_cpu_share_during_own_samples"] = {
                m: round(agent_cpu[(pair.name, m)] / (args.rounds * seconds), 3)
                for m, seconds in (("rr", args.rr_seconds), ("crr", args.crr_seconds))}
            pair.info["agent_rss_kib"] = rss_kib(pid)
    return elapsed


def paired(by: dict[str, Pair], a: str, b: str, mode: str) -> dict:
    """The median, min and max of the per-round ratios a / b."""
    ratios = [x / y for x, y in zip(by[a].samples[mode], by[b].samples[mode], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def measure_cost(run: Run, args, rr: Path) -> dict:
    pairs_of_rules = rule_set(args.cidrs)
    cilia0 = cilia_pair(run, "a", "cilia-0", False, [], args.cidrs)
    cilia1 = cilia_pair(run, "c", "cilia-1", True, [], args.cidrs)
    cilia10k = cilia_pair(run, "b", "cilia-10k", True, pairs_of_rules, args.cidrs)
    ptp0 = ptp_pair(run, "ptp-0", None, pairs_of_rules)
    ipt = ptp_pair(run, "ipt-10k", "ipt", pairs_of_rules)
    iptct = ptp_pair(run, "ipt-ct-10k", "ipt-ct", pairs_of_rules)
    nft = ptp_pair(run, "nft-10k", "nft", pairs_of_rules)
    # The order of the rounds: neighbours are the pairs most compared.
    pairs = [cilia1, cilia0, cilia10k, nft, ptp0, iptct, ipt]
    start_pairs(run, pairs, rr)
    elapsed = run_rounds(pairs, rr, args)
    by = {p.name: p for p in pairs}

    comparisons = {
        "cilia-10k / cilia-0": ("cilia-10k", "cilia-0"),
        "cilia-10k / cilia-1": ("cilia-10k", "cilia-1"),
        "cilia-1 / cilia-0": ("cilia-1", "cilia-0"),
        "ipt-10k / ptp-0": ("ipt-10k", "ptp-0"),
        "ipt-ct-10k / ptp-0": ("ipt-ct-10k", "ptp-0"),
        "nft-10k / ptp-0": ("nft-10k", "ptp-0"),
        "cilia-10k / ipt-10k": ("cilia-10k", "ipt-10k"),
        "cilia-10k / ipt-ct-10k": ("cilia-10k", "ipt-ct-10k"),
        "cilia-10k / nft-10k": ("cilia-10k", "nft-10k"),
        "cilia-0 / ptp-0": ("cilia-0", "ptp-0"),
    }
    return {
        "rule_shape": {"pairs": RULES, "cidrs": args.cidrs,
                       "ports_per_cidr": RULES // args.cidrs},
        "rounds": args.rounds, "rr_seconds": args.rr_seconds,
        "crr_seconds": args.crr_seconds, "rounds_elapsed_s": round(elapsed, 1),
        "pairs": {p.name: {"client": p.client_ip, "server": p.server_ip, "rules": p.rules,
                           "tcp_rr_median": statistics.median(p.samples["rr"]),
                           "tcp_crr_median": statistics.median(p.samples["crr"]),
                           "tcp_rr": [round(v, 1) for v in p.samples["rr"]],
                           "tcp_crr": [round(v, 1) for v in p.samples["crr"]],
                           **p.info}
                  for p in pairs},
        "ratios": {name: {mode: paired(by, a, b, mode) for mode in ("rr", "crr")}
                   for name, (a, b) in comparisons.items()},
    }


# ---- parts 2 and 3: propagation and memory -------------------------------------------

PODS_PER_NODE = 200  # the scale lab's: a lab node's pod CIDR is a /24
NAMESPACES = 10  # of the propagation lab (100 / 1,000); the scale lab has one per 100 policies


def filler_policies(n: int, namespaces: int = NAMESPACES) -> list[dict]:
    """`n` NetworkPolicies over the filler namespaces, a mix of what people write:
    pod selectors, namespace+pod selectors with expressions and port ranges, egress,
    and ipBlocks with excepts."""
    out = []
    for j in range(n):
        out.append(filler_policy(j, namespaces))
    return out


def filler_policy(j: int, namespaces: int = NAMESPACES, port_shift: int = 0) -> dict:
    """The j-th filler policy; `port_shift` moves its ports (a changed policy, same
    name, for the churn)."""
    ns, k = f"team-{j % namespaces}", j // namespaces
    app, peer = f"app-{k % 10}", f"app-{(k + 1) % 10}"
    kind = j % 4
    spec: dict = {"podSelector": {"matchLabels": {"app": app}}}
    if kind == 0:
        spec["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                            "ports": [{"protocol": "TCP", "port": 8000 + k + port_shift}]}]
    elif kind == 1:
        spec["ingress"] = [{"from": [{
            "namespaceSelector": {"matchLabels": {"tier": f"t{k % 3}"}},
            "podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": [peer, f"app-{k % 7}"]}]}}],
            "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9000 + k % 1000},
                      {"protocol": "UDP", "port": 5000 + k + port_shift}]}]
    elif kind == 2:
        spec["policyTypes"] = ["Egress"]
        spec["egress"] = [{"to": [{"namespaceSelector": {},
                                   "podSelector": {"matchLabels": {"app": peer}}}],
                           "ports": [{"protocol": "TCP", "port": 8000 + k + port_shift}]}]
    else:
        spec["ingress"] = [{"from": [{"ipBlock": {
            "cidr": f"172.{16 + (j >> 8) % 16}.{j & 255}.0/24",
            "except": [f"172.{16 + (j >> 8) % 16}.{j & 255}.128/25"]}}],
            "ports": [{"protocol": "TCP", "port": 443 + port_shift}]}]
    return netpol(f"pol-{j:05d}", ns, spec)


@dataclass
class PolicyLab:
    """A lab holding pods and filler policies, and what it took to make it."""

    lab: Lab
    made: dict  # (namespace, name) -> lab Pod
    namespaces: int
    policies: int
    facts: dict  # for the report


def agent_add_ms(lab: Lab, pod) -> float | None:
    """The agent's own time for a pod's ADD, from its node's log ("added in N ms")."""
    pattern = re.compile(rf" {re.escape(pod.namespace)}/{re.escape(pod.name)} .* added in "
                         r"([0-9.]+) ms")
    node = lab.node(lab.load(), pod.node)
    found = None
    for line in Path(node.log).read_text(errors="replace").splitlines()[-400:]:
        if (m := pattern.search(line)):
            found = float(m.group(1))
    return found


def populate(run: Run, tag: str, pods_n: int, policies_n: int, namespaces: int,
             late_n: int, agent_args: tuple[str, ...] = (), nodes: int = 1) -> PolicyLab:
    """A lab of `nodes` nodes with `pods_n` pods (the probe's two on the first node, the
    others in turn on each) and `policies_n` filler policies over `namespaces`
    namespaces: most pods are made before the policies, the last `late_n` after them
    (replicas: each has the labels of a pod already running, so its identity exists,
    as a Deployment scaling up); then 3 pods with label sets no pod has (a new identity
    each, which every rule selecting it across namespaces must learn). Each ADD timed
    from outside (`lab run`) and by the agent itself. Figures of the agent are the
    first node's."""
    lab = run.lab(tag, agent_args=list(agent_args), nodes=nodes)
    node = agent(lab)
    wait_synced(lab)
    time.sleep(1.0)
    rss_empty = rss_kib(node.pid)
    log(f"agent RSS, 0 pods and 0 policies: {rss_empty['VmRSS'] / 1024:.1f} MiB")
    pods = propagation_pods(lab, pods_n - late_n, namespaces)
    made: dict = {}
    early_s, early = create_pods(lab, pods, made)
    wait_synced(lab, every_node=True)
    log(f"{len(early)} pods created through `lab run` (CNI ADD) with no policy in "
        f"{early_s:.1f}s (p50 {statistics.median(early):.2f}s each)")

    t0 = time.monotonic()
    for pol in filler_policies(policies_n, namespaces):
        lab.datastore.put(pol)
    stored = time.monotonic() - t0
    synced = wait_synced(lab, timeout=1800, every_node=True)
    log(f"{policies_n} NetworkPolicies stored in {stored:.1f}s, compiled and written "
        f"{synced:.1f}s later")

    def adds(batch: list) -> tuple[float, list[float], list[float]]:
        total, times = create_pods(lab, batch, made)
        agent_ms = [ms for ns, name, _ in batch
                    if (ms := agent_add_ms(lab, made[(ns, name)])) is not None]
        wait_synced(lab, every_node=True)
        return total, times, agent_ms

    rnd = random.Random(7)
    replicas = [(ns, f"{name}-r{i}", labels) for i, (ns, name, labels) in enumerate(
        rnd.sample(pods[2:], min(late_n, len(pods) - 2)))]
    late_s, late_times, late_agent = adds(replicas)
    fresh = [(f"team-{i % namespaces}", f"fresh-{i}", {"app": f"app-{i % 10}",
                                                        "track": f"new-{i}"})
             for i in range(3)]
    _, fresh_times, fresh_agent = adds(fresh)
    if late_times:
        log(f"{len(late_times)} replica pods with {policies_n} policies present: agent-side "
            f"ADD p50 {statistics.median(late_agent):.1f} ms (through `lab run` p50 "
            f"{statistics.median(late_times):.2f}s); 3 pods of new identities: agent-side "
            f"{', '.join(f'{v:.0f}' for v in fresh_agent)} ms")
    time.sleep(1.0)
    rss_full = rss_kib(node.pid)
    log(f"agent RSS, {len(made)} pods and {policies_n} policies: "
        f"{rss_full['VmRSS'] / 1024:.1f} MiB")
    facts = {
        "pods": len(made), "policies": policies_n, "namespaces": namespaces,
        "nodes": nodes,
        "agent_args": list(agent_args),
        "policies_store_s": round(stored, 2), "policies_first_sync_s": round(synced, 2),
        "pods_without_policies": {"n": len(early), "total_s": round(early_s, 1),
                                  "p50_s": round(statistics.median(early), 3),
                                  "max_s": round(max(early), 3),
                                  "samples_s": [round(v, 3) for v in early]},
        "pods_with_policies": {"n": len(late_times), "total_s": round(late_s, 1),
                               "p50_s": round(statistics.median(late_times), 3)
                               if late_times else None,
                               "max_s": round(max(late_times), 3) if late_times else None,
                               "samples_s": [round(v, 3) for v in late_times],
                               "agent_ms": summary([v / 1000 for v in late_agent])},
        "pods_of_new_identities": {"n": len(fresh_times),
                                   "samples_s": [round(v, 3) for v in fresh_times],
                                   "agent_ms": [round(v, 1) for v in fresh_agent]},
        "memory": {"empty_kib": rss_empty, "loaded_kib": rss_full},
    }
    return PolicyLab(lab, made, namespaces, policies_n, facts)


def probe_pair(run: Run, plab: PolicyLab, rr: Path):
    """The probe's server under default-deny ingress, its rr server running, and the
    policy that allows the client: (prober from the client, server pod, allow policy)."""
    lab, made = plab.lab, plab.made
    server, client = made[("probe", "server")], made[("probe", "client")]
    run.spawn(nsenter(server.netns, [str(rr), "server", str(PROBE_PORT)]),
              f"rr-probe-{lab.name}.log")
    sel = {"matchLabels": {"app": "server"}}
    lab.datastore.put(netpol("default-deny", "probe", {"podSelector": sel,
                                                       "policyTypes": ["Ingress"]}))
    allow = netpol("allow-client", "probe", {
        "podSelector": sel, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                     "ports": [{"protocol": "TCP", "port": PROBE_PORT}]}]})
    wait_synced(lab)
    prober = Prober(client.netns)
    deadline = time.monotonic() + 10
    while (v := prober.attempt(server.ip, PROBE_PORT, 0.2)) != "dropped":
        if time.monotonic() > deadline:
            prober.close()
            raise BenchError(f"default-deny not enforced: the probe gets {v}")
        time.sleep(0.05)
    return prober, server, allow


def allow_trials(plab: PolicyLab, prober, server, allow: dict, trials: int, args):
    """`trials` times the probe's allow stored until the client connects, then deleted
    until it is dropped (change_trials)."""
    return change_trials(plab.lab, prober, server.ip, allow, ("open", "dropped"), trials,
                         args.probe_timeout)


def measure_propagation(run: Run, args, rr: Path) -> dict:
    plab = populate(run, "p", args.pods, args.policies, NAMESPACES,
                    min(args.late_pods, args.pods - 2))
    lab = plab.lab
    node = agent(lab)
    prober, server, allow = probe_pair(run, plab, rr)
    try:
        allow_s, revoke_s, cpu, cpu_delete = allow_trials(plab, prober, server, allow,
                                                          args.trials, args)
        cli_s = []
        path = run.tmp / "allow.yaml"
        import yaml

        path.write_text(yaml.safe_dump(allow))
        for _ in range(args.cli_trials):
            time.sleep(random.uniform(0, 0.2))
            t0 = time.monotonic()
            sh([str(VENV_BIN / "cilia"), "--lab", lab.name, "apply", "-f", str(path)])
            cli_s.append(until(prober, server.ip, "open", t0, args.probe_timeout))
            lab.datastore.delete("NetworkPolicy", "probe", "allow-client")
            until(prober, server.ip, "dropped", time.monotonic(), args.probe_timeout)
            wait_synced(lab)
        cli_alone = []
        for _ in range(3):
            t0 = time.monotonic()
            sh([str(VENV_BIN / "cilia"), "--lab", lab.name, "apply", "-f", str(path)])
            cli_alone.append(time.monotonic() - t0)
        wait_synced(lab)
    finally:
        prober.close()
    rss_after = rss_kib(node.pid)
    status = AgentClient(node.socket, timeout=120).status()
    result = {
        **plab.facts, "policies": args.policies + 1, "namespaces": NAMESPACES + 1,
        "trials": args.trials,
        "allow_ms": summary(allow_s), "revoke_ms": summary(revoke_s),
        "cli_apply_to_allow_ms": summary(cli_s),
        "cli_apply_alone_ms": summary(cli_alone),
        "agent_cpu_s_per_allow_trial": round(statistics.median(cpu), 3),
        "agent_cpu_ms_per_change": summary(cpu + cpu_delete),
        # CPU time is counted in ticks (10 ms): over many changes the mean is exact
        "agent_cpu_ms_per_change_mean": round(1000 * statistics.mean(cpu + cpu_delete), 1),
        "policy_syncs": status.policy_syncs,
    }
    result["memory"]["after_trials_kib"] = rss_after
    keep_logs(args, lab)
    run.down_lab(lab)
    return result


def measure_scale(run: Run, args, rr: Path) -> dict:
    """Issue 14's larger target: `--scale-pods` pods (lab endpoints, PODS_PER_NODE on
    each lab node: a node's pod CIDR is a /24) and `--scale-policies` policies over one
    namespace per 100 policies; the policy map sized for them (--policy-map-max). Each
    agent compiles every policy against every pod's identity for its own endpoints."""
    namespaces = max(NAMESPACES, args.scale_policies // 100)
    plab = populate(run, "s", args.scale_pods, args.scale_policies, namespaces,
                    min(args.late_pods, args.scale_pods - 2),
                    ("--policy-map-max", str(args.scale_map)),
                    nodes=math.ceil(args.scale_pods / PODS_PER_NODE))
    lab = plab.lab
    node = agent(lab)
    prober, server, allow = probe_pair(run, plab, rr)
    try:
        allow_s, revoke_s, cpu, cpu_delete = allow_trials(plab, prober, server, allow,
                                                          args.scale_trials, args)
    finally:
        prober.close()
    with pinned(node, "POLICY") as m:
        entries = sum(1 for _ in m.keys())
    result = {**plab.facts, "trials": args.scale_trials, "policy_map_entries": entries,
              "allow_ms": summary(allow_s), "revoke_ms": summary(revoke_s),
              "agent_cpu_ms_per_change": summary(cpu + cpu_delete),
              "agent_cpu_ms_per_change_mean": round(
                  1000 * statistics.mean(cpu + cpu_delete), 1)}
    result["memory"]["after_trials_kib"] = rss_kib(node.pid)
    keep_logs(args, lab)
    run.down_lab(lab)
    return result


def pinned(node, layout: str):
    """A lab node's pinned map by its layout's name (BpfMap closes it as a context)."""
    from cilia.datapath import layouts
    from cilia.datapath.maps import BpfMap

    return BpfMap.open_pinned(node.bpffs_root, getattr(layouts, layout))


def measure_churn(run: Run, args, rr: Path) -> dict:
    """`--churn-rate` policy changes a second for `--churn-seconds` (filler policies
    changed, deleted and stored again, at random) while pods come and go (one made or
    removed every second); meanwhile the probe's allow is stored and deleted, each time
    timed to its effect on new connections. At the end, the policy map must equal what
    a fresh engine computes from the datastore as it is (no change lost)."""
    plab = populate(run, "c", args.pods, args.policies, NAMESPACES, 0)
    lab = plab.lab
    node = agent(lab)
    prober, server, allow = probe_pair(run, plab, rr)
    stop = threading.Event()
    counts = {"policy_changes": 0, "pods_made": 0, "pods_removed": 0, "errors": []}
    rnd = random.Random(11)

    def policies() -> None:
        period = 1.0 / args.churn_rate
        next_at = time.monotonic()
        while not stop.is_set():
            j = rnd.randrange(args.policies)
            pol = filler_policy(j, NAMESPACES, port_shift=rnd.randrange(1, 50))
            if rnd.random() < 0.2:
                lab.datastore.delete("NetworkPolicy", pol["metadata"]["namespace"],
                                     pol["metadata"]["name"])
            else:
                lab.datastore.put(pol)
            counts["policy_changes"] += 1
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

    def pods() -> None:
        mine: list[tuple[str, str]] = []
        i = 0
        while not stop.is_set():
            try:
                if len(mine) < 5 or rnd.random() < 0.5:
                    ns, name = f"team-{i % NAMESPACES}", f"churn-{i}"
                    i += 1
                    plab.made[(ns, name)] = lab.run_pod(pod_manifest(
                        name, ns, {"app": f"app-{i % 10}", "track": "stable"}))
                    mine.append((ns, name))
                    counts["pods_made"] += 1
                else:
                    ns, name = mine.pop(rnd.randrange(len(mine)))
                    lab.remove_pod(ns, name)
                    lab.datastore.delete("Pod", ns, name)
                    plab.made.pop((ns, name), None)
                    counts["pods_removed"] += 1
            except Exception as err:  # noqa: BLE001 - reported, the churn goes on
                counts["errors"].append(repr(err))
            stop.wait(1.0)

    threads = [threading.Thread(target=f, daemon=True) for f in (policies, pods)]
    c0 = cpu_seconds(node.pid)
    t0 = time.monotonic()
    for t in threads:
        t.start()
    stored, deleted = [], []
    kind, namespace, name = object_ref(allow)
    try:
        while time.monotonic() - t0 < args.churn_seconds:
            time.sleep(random.uniform(0, 0.2))
            t1 = time.monotonic()
            lab.datastore.put(copy.deepcopy(allow))
            stored.append(until(prober, server.ip, "open", t1, args.probe_timeout))
            time.sleep(random.uniform(0, 0.2))
            t1 = time.monotonic()
            lab.datastore.delete(kind, namespace, name)
            deleted.append(until(prober, server.ip, "dropped", t1, args.probe_timeout))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        prober.close()
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(node.pid) - c0
    wait_synced(lab)
    check = verify_from_scratch(lab)
    log(f"churn: {counts['policy_changes']} policy changes in {elapsed:.0f}s, "
        f"{counts['pods_made']} pods made and {counts['pods_removed']} removed; "
        f"the policy map {'equals' if check['equal'] else 'DIFFERS from'} a fresh compile "
        f"({check['entries']} entries)")
    result = {**plab.facts, "seconds": round(elapsed, 1), **counts,
              "changes_per_s": round(counts["policy_changes"] / elapsed, 1),
              "agent_cpu_share": round(cpu / elapsed, 3),
              "allow_ms": summary(stored), "revoke_ms": summary(deleted),
              "from_scratch": check}
    keep_logs(args, lab)
    run.down_lab(lab)
    return result


def verify_from_scratch(lab: Lab) -> dict:
    """The agent's policy map against a fresh engine's plan for the datastore as it is
    and the agent's endpoints: every key and its action and rank. CIDR identities are
    numbered by each engine as it meets the prefixes, so keys are compared with the
    prefix in their place (the agent's through its ipcache)."""
    from cilia.agent.endpoint import Endpoint
    from cilia.agent.policy import PolicyEngine
    from cilia.agent.policy_writer import _policy_key
    from cilia.identity import CIDR_IDENTITY_BASE
    from cilia.policy.compiler import CIDR_VIEW

    node = agent(lab)
    records = [Endpoint(e.id, e.container_id, e.ifname, e.netns, e.network_name,
                        e.pod_namespace, e.pod_name, e.ip, e.mac, e.host_ifname,
                        e.host_ifindex, "", 0, dict(e.labels), e.identity)
               for e in AgentClient(node.socket).endpoints()]
    config = SimpleNamespace(node_name=node.name, pod_cidr=node.pod_cidr,
                             policy_audit_mode=False, policy_namespace_share=0.5,
                             identity_max=0)

    class Snapshot:
        def snapshot(self):
            return records

    with pinned(node, "POLICY") as m:
        capacity = m.max_entries  # the agent's: what it refuses, this one must too
    engine = PolicyEngine(lab.datastore, config, Snapshot(), lambda: [], None,
                          capacity=capacity)
    result = engine.compute(records)
    fresh_prefix = {ident: str(net) for net, ident in result.compiled.cidrs.items()}

    def named(identity: int, prefixes: dict[int, str]):
        base = identity & ~CIDR_VIEW
        if base >= CIDR_IDENTITY_BASE:
            return (bool(identity & CIDR_VIEW), prefixes.get(base, f"?{base}"))
        return identity

    want = {}
    for (ep_id, key), value in result.plan.entries.items():
        k = _policy_key(ep_id, key)
        want[(k.ep_id, k.dir, k.tier, named(k.identity, fresh_prefix), k.proto, k.dport,
              k.prefixlen)] = (value.action, value.rank)
    with pinned(node, "IPCACHE") as m:
        agent_prefix = {v.identity: k.prefix for k, v in m.items()
                        if v.identity >= CIDR_IDENTITY_BASE}
    have = {}
    with pinned(node, "POLICY") as m:
        for k, v in m.items():
            have[(k.ep_id, k.dir, k.tier, named(k.identity, agent_prefix), k.proto, k.dport,
                  k.prefixlen)] = (v.action, v.rank)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    differ = [k for k in want if k in have and want[k] != have[k]]
    return {"equal": not (missing or extra or differ), "entries": len(have),
            "missing": len(missing), "extra": len(extra), "differ": len(differ),
            "examples": [repr(k) for k in (missing + extra + differ)[:5]]}


def keep_logs(args, lab: Lab) -> None:
    """The lab's agent logs copied to --keep-logs, if given."""
    if not getattr(args, "keep_logs", None):
        return
    out = Path(args.keep_logs)
    out.mkdir(parents=True, exist_ok=True)
    for node in lab.load().nodes:
        shutil.copy(node.log, out / f"{lab.name}-{node.name}.log")


def propagation_namespaces(namespaces: int = NAMESPACES) -> dict[str, dict[str, str]]:
    """The propagation lab's namespaces and their labels: `probe`, and the filler ones
    labelled tier=t0..t2."""
    return {"probe": {}, **{f"team-{i}": {"tier": f"t{i % 3}"} for i in range(namespaces)}}


def propagation_pods(lab: Lab | None, n: int, namespaces: int = NAMESPACES
                     ) -> list[tuple[str, str, dict]]:
    """Stores the propagation lab's namespaces in `lab` (if any) and returns its `n` pods,
    none made yet: the probe's server and client, and the rest spread over the filler
    namespaces, as (namespace, name, labels)."""
    for name, labels in propagation_namespaces(namespaces).items() if lab else ():
        lab.datastore.put({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}})
    pods = [("probe", "server", {"app": "server"}), ("probe", "client", {"app": "client"})]
    pods += [(f"team-{i % namespaces}", f"pod-{i:04d}",
              {"app": f"app-{(i // namespaces) % 10}",
               "track": "stable" if i % 3 else "canary"})
             for i in range(n - 2)]
    return pods


def create_pods(lab: Lab, batch: list, made: dict) -> tuple[float, list[float]]:
    """Each pod of `batch` made through `lab run` (CNI ADD), into `made` by (namespace,
    name); (seconds in all, seconds each). The probe's pods go on the first node, the
    others on each node in turn."""
    times = []
    nodes = [n.name for n in lab.load().nodes]
    t0 = time.monotonic()
    for ns, name, labels in batch:
        t1 = time.monotonic()
        node = nodes[0] if ns == "probe" else nodes[len(made) % len(nodes)]
        made[(ns, name)] = lab.run_pod(pod_manifest(name, ns, labels), node)
        times.append(time.monotonic() - t1)
        if len(made) % 50 == 0:
            log(f"  {len(made)} pods")
    return time.monotonic() - t0, times


def change_trials(lab: Lab, prober: Prober, ip: str, obj: dict, wants: tuple[str, str],
                  trials: int, timeout: float
                  ) -> tuple[list[float], list[float], list[float], list[float]]:
    """`trials` times: `obj` stored (datastore.put, what `cilia apply -f` does) until the
    prober's new connections are wants[0], then deleted until they are wants[1] ("open"
    or "dropped"; see until()). Returns (seconds store -> effect, seconds delete ->
    effect, agent CPU seconds per store and per delete, each until the agent has synced)."""
    kind, namespace, name = object_ref(obj)
    pid = agent(lab).pid
    stored, deleted, cpu_store, cpu_delete = [], [], [], []
    for trial in range(trials):
        for change, times, cpu in (("put", stored, cpu_store),
                                   ("delete", deleted, cpu_delete)):
            time.sleep(random.uniform(0, 0.2))  # any phase of the agent's work
            c0 = cpu_seconds(pid)
            t0 = time.monotonic()
            if change == "put":
                lab.datastore.put(copy.deepcopy(obj))
            else:
                lab.datastore.delete(kind, namespace, name)
            times.append(until(prober, ip, wants[change == "delete"], t0, timeout))
            wait_synced(lab)
            cpu.append(cpu_seconds(pid) - c0)
        log(f"  trial {trial + 1}/{trials}: {wants[0]} {stored[-1] * 1000:.0f} ms after the "
            f"store, {wants[1]} {deleted[-1] * 1000:.0f} ms after the delete")
    return stored, deleted, cpu_store, cpu_delete


def until(prober: Prober, ip: str, want: str, t0: float, timeout: float) -> float:
    """Seconds from t0 to the start of the first new connection that is `want`
    ("open": it connects; "dropped": no answer, confirmed by two more attempts)."""
    while True:
        start = time.monotonic()
        if start - t0 > timeout:
            raise BenchError(f"the probe did not see {want} within {timeout:.0f}s")
        if want == "open":
            return prober.first_open(ip, PROBE_PORT, t0, timeout) - t0
        elif prober.attempt(ip, PROBE_PORT, 0.05) == "dropped":
            if all(prober.attempt(ip, PROBE_PORT, 0.05) == "dropped" for _ in range(2)):
                return start - t0


def summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    if not ms:
        return {}
    return {"p50": round(statistics.median(ms), 1), "p99": round(pct(ms, 99), 1),
            "min": round(min(ms), 1), "max": round(max(ms), 1), "n": len(ms),
            "samples": [round(v, 1) for v in ms]}


# ---- report --------------------------------------------------------------------------


def report(res: dict) -> str:
    out = [f"# cilia policy benchmark, {res['date']}", "",
           f"{res['command']}", f"commit: {res.get('commit', '?')}", f"host: {res['host']}",
           ""]
    cost = res.get("cost")
    if cost:
        shape = cost["rule_shape"]
        out += [f"## Per-packet cost with 0 and {shape['pairs']:,} rules "
                f"({shape['cidrs']} CIDRs x {shape['ports_per_cidr']} ports)",
                f"{cost['rounds']} rounds of TCP_RR {cost['rr_seconds']}s and TCP_CRR "
                f"{cost['crr_seconds']}s per pair; client on CPU {CLIENT_CPU}, server on "
                f"CPU {SERVER_CPU}; medians", "",
                f"{'pair':<12} {'rules':>6} {'TCP_RR/s':>10} {'TCP_CRR/s':>10}"]
        for name, p in cost["pairs"].items():
            out.append(f"{name:<12} {p['rules']:>6} {p['tcp_rr_median']:>10,.0f} "
                       f"{p['tcp_crr_median']:>10,.0f}")
        out += ["", f"{'ratio (median of per-round ratios)':<26} {'TCP_RR':>22} "
                    f"{'TCP_CRR':>22}"]
        for name, r in cost["ratios"].items():
            cells = [f"{r[m]['median']:.3f} [{r[m]['min']:.2f}-{r[m]['max']:.2f}]"
                     for m in ("rr", "crr")]
            out.append(f"{name:<26} {cells[0]:>22} {cells[1]:>22}")
        ratios = cost["ratios"]

        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT MET"

        rr = ratios["cilia-10k / cilia-0"]["rr"]
        note = ""
        if rr["median"] < 0.97 <= rr["max"]:
            note = (f" (within this run's round-to-round spread {rr['min']:.2f}-"
                    f"{rr['max']:.2f}; TCP_RR asks the policy map only for the SYN, so "
                    "more rounds tell noise from cost)")
        out += ["", f"target TCP_RR cilia-10k / cilia-0 >= 0.97: {rr['median']:.3f}, "
                    f"{verdict(rr['median'] >= 0.97)}{note}"]
        for other in ("ipt-10k", "ipt-ct-10k", "nft-10k"):
            cells = [ratios[f"cilia-10k / {other}"][m]["median"] for m in ("rr", "crr")]
            out.append(f"target cilia-10k ahead of {other}: TCP_RR x{cells[0]:.2f}, TCP_CRR "
                       f"x{cells[1]:.2f}, {verdict(min(cells) > 1.0)}")
        b = cost["pairs"]["cilia-10k"]
        pm = b.get("policy_map", {})
        out += ["", f"cilia-10k policy map: {pm.get('expected')} (CIDR, port) entries "
                f"checked present, {pm.get('server_entries')} for the server endpoint, "
                f"bpftool dumps {pm.get('bpftool_entries')}; NetworkPolicies stored in "
                f"{b.get('store_s')}s, in the datapath {b.get('sync_s')}s later",
                "agent CPU during the rounds: " + ", ".join(
                    f"{n} {p['agent_cpu_s_during_rounds']}s" for n, p in cost["pairs"].items()
                    if "agent_cpu_s_during_rounds" in p) +
                f" (of {cost['rounds_elapsed_s']}s); while its own pair runs: " + ", ".join(
                    f"{n} {p['agent_cpu_share_during_own_samples']['rr']:.1%} of a CPU in "
                    f"TCP_RR, {p['agent_cpu_share_during_own_samples']['crr']:.1%} in TCP_CRR"
                    for n, p in cost["pairs"].items()
                    if "agent_cpu_share_during_own_samples" in p)]
        out.append("")
    prop = res.get("propagation")
    if prop:
        a, r, c = prop["allow_ms"], prop["revoke_ms"], prop["cli_apply_to_allow_ms"]
        early, late = prop["pods_without_policies"], prop["pods_with_policies"]
        mem = prop["memory"]
        out += [f"## Propagation with {prop['pods']} pods and {prop['policies']} policies",
                f"pods through `lab run`: {early['n']} with no policy in {early['total_s']}s "
                f"(p50 {early['p50_s']}s each), then {prop['policies'] - 1} policies stored in "
                f"{prop['policies_store_s']}s and in the datapath "
                f"{prop['policies_first_sync_s']}s later, then {late['n']} pods with the "
                f"policies present in {late['total_s']}s (p50 {late['p50_s']}s each, max "
                f"{late['max_s']}s)",
                f"store allow -> first connection allowed: p50 {a['p50']} ms, p99 {a['p99']} "
                f"ms (min {a['min']}, max {a['max']}, n={a['n']})",
                f"delete allow -> connections dropped:     p50 {r['p50']} ms, p99 {r['p99']} "
                f"ms (min {r['min']}, max {r['max']}, n={r['n']})"]
        if c:
            out.append(f"`cilia apply -f` started -> allowed:   p50 {c['p50']} ms, max "
                       f"{c['max']} ms (n={c['n']}; the CLI alone runs "
                       f"{prop['cli_apply_alone_ms']['p50']} ms)")
        cpu = prop["agent_cpu_ms_per_change"]
        add = late["agent_ms"]
        mean = prop["agent_cpu_ms_per_change_mean"]
        out += [f"agent CPU per change (store or delete, until synced; counted in 10 ms "
                f"ticks): mean {mean} ms, p50 {cpu['p50']} ms, p99 {cpu['p99']} ms "
                f"(n={cpu['n']})",
                f"pod ADD agent-side with the policies present: p50 {add.get('p50')} ms "
                f"(replicas, n={add.get('n')}); of a new identity: "
                f"{prop['pods_of_new_identities']['agent_ms']} ms",
                f"target store -> effect p99 < 100 ms: allow {a['p99']} ms, delete "
                f"{r['p99']} ms, {_met(max(a['p99'], r['p99']) < 100)}",
                f"target agent CPU per change < 20 ms: mean {mean} ms, {_met(mean < 20)}",
                f"target agent RSS < 80 MiB: {mem['loaded_kib']['VmRSS'] / 1024:.1f} MiB, "
                f"{_met(mem['loaded_kib']['VmRSS'] / 1024 < 80)}", "",
                "## Agent memory (VmRSS)",
                f"0 pods, 0 policies:      {mem['empty_kib']['VmRSS'] / 1024:7.1f} MiB",
                f"{prop['pods']} pods, {prop['policies'] - 1} policies: "
                f"{mem['loaded_kib']['VmRSS'] / 1024:7.1f} MiB",
                f"after the trials:        {mem['after_trials_kib']['VmRSS'] / 1024:7.1f} MiB"
                f" (peak VmHWM {mem['after_trials_kib']['VmHWM'] / 1024:.1f} MiB)"]
        if cost:
            b = cost["pairs"]["cilia-10k"]
            out.append(f"cilia-10k agent (2 pods, {RULES:,} CIDR rules): "
                       f"{b['agent_rss_kib']['VmRSS'] / 1024:.1f} MiB")
    out += _report_scale(res.get("scale")) + _report_churn(res.get("churn"))
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _report_scale(sc: dict | None) -> list[str]:
    if not sc:
        return []
    a, r, c = sc["allow_ms"], sc["revoke_ms"], sc["agent_cpu_ms_per_change"]
    add = sc["pods_with_policies"]["agent_ms"]
    rss = sc["memory"]["loaded_kib"]["VmRSS"] / 1024
    return [
        "", f"## Scale: {sc['pods']} pods and {sc['policies']:,} policies in "
        f"{sc['namespaces']} namespaces, {sc['nodes']} lab nodes "
        f"({' '.join(sc['agent_args'])}); figures of the first node's agent",
        f"{sc['policy_map_entries']:,} policy map entries there; policies stored in "
        f"{sc['policies_store_s']}s, in the datapath {sc['policies_first_sync_s']}s later",
        f"store allow -> allowed: p50 {a['p50']} ms, p99 {a['p99']} ms; delete -> dropped: "
        f"p50 {r['p50']} ms, p99 {r['p99']} ms (n={a['n']})",
        f"agent CPU per change: mean {sc['agent_cpu_ms_per_change_mean']} ms, p50 "
        f"{c['p50']} ms, p99 {c['p99']} ms (10 ms ticks)",
        f"pod ADD agent-side: p50 {add.get('p50')} ms, max {add.get('max')} ms (replicas, "
        f"n={add.get('n')}); of a new identity: "
        f"{sc['pods_of_new_identities']['agent_ms']} ms",
        f"target propagation p99 < 1 s: {_met(max(a['p99'], r['p99']) < 1000)}",
        f"target pod ADD agent-side p50 < 50 ms: {_met((add.get('p50') or 1e9) < 50)}",
        f"target agent RSS < 300 MiB: {rss:.1f} MiB, {_met(rss < 300)}"]


def _report_churn(ch: dict | None) -> list[str]:
    if not ch:
        return []
    a, r, fs = ch["allow_ms"], ch["revoke_ms"], ch["from_scratch"]
    return [
        "", f"## Churn: {ch['changes_per_s']} policy changes/s for {ch['seconds']}s, "
        f"{ch['pods_made']} pods made and {ch['pods_removed']} removed meanwhile "
        f"({ch['pods']} pods, {ch['policies']:,} policies)",
        f"the probe's allow under churn: store -> allowed p50 {a['p50']} ms, p99 {a['p99']} "
        f"ms; delete -> dropped p50 {r['p50']} ms, p99 {r['p99']} ms (n={a['n']})",
        f"agent CPU: {ch['agent_cpu_share']:.0%} of a core; errors: {len(ch['errors'])}",
        f"the policy map after it against a fresh compile of the datastore: "
        f"{fs['entries']:,} entries, {fs['missing']} missing, {fs['extra']} extra, "
        f"{fs['differ']} different: {'EQUAL' if fs['equal'] else 'DIFFERENT'}",
        f"target no change lost: {_met(fs['equal'])}"]


def host_info() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs ({model}), "
            f"load average at start {' '.join(load)}")


def run_parts(args, run: Run, measures: dict) -> dict:
    """The header of a report (date, command, host, tools, commit) and each part of
    `measures` (name -> fn(run, args, rr)) that --parts asks for, with the agents of
    one part stopped before the next."""
    rr = build()
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "command": " ".join(["python", *sys.argv]), "host": host_info(),
           "tools": check_tools()}
    try:
        res["commit"] = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
        dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
        if dirty.strip():
            res["commit"] += f" + {len(dirty.splitlines())} modified files"
    except BenchError:
        pass
    first = True
    for name, measure in measures.items():
        if name not in args.parts:
            continue
        if not first:
            for lab in list(run.labs):  # idle agents off before the next part
                run.down_lab(lab)
            for p in list(run.procs):
                run.stop(p)
        first = False
        res[name] = measure(run, args, rr)
    res["host"] += f", at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    return res


def run_all(args, run: Run) -> dict:
    return run_parts(args, run, {"cost": measure_cost, "propagation": measure_propagation,
                                 "scale": measure_scale, "churn": measure_churn})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and trials (~3 min)")
    ap.add_argument("--json", help="write every figure and sample to this file")
    ap.add_argument("--parts", default="cost,propagation",
                    help="comma-separated: cost, propagation, scale, churn (default "
                         "cost,propagation)")
    ap.add_argument("--rounds", type=int, help="rounds of the cost test (default 16, quick 4)")
    ap.add_argument("--rr-seconds", type=float, default=1.0)
    ap.add_argument("--crr-seconds", type=float, default=1.0)
    ap.add_argument("--cidrs", type=int, default=1000,
                    help=f"distinct CIDRs among the {RULES:,} (CIDR, port) rules; a divisor "
                         f"of {RULES}; default 1000 (10 ports each). 10000 works but the "
                         "agent then needs minutes per sync: see bench/POLICY.md")
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--late-pods", type=int,
                    help="of the pods, how many are made after the policies (default 20, "
                         "quick 5; each ADD then takes seconds)")
    ap.add_argument("--trials", type=int, help="propagation trials (default 30, quick 10)")
    ap.add_argument("--scale-pods", type=int, default=1000)
    ap.add_argument("--scale-policies", type=int, default=10000)
    ap.add_argument("--scale-map", type=int, default=512 * 1024,
                    help="the scale lab's --policy-map-max (1,000 pods under 10,000 "
                         "policies take about 1 M entries; a node of 200 pods a fifth)")
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy each lab's agent logs here before it goes")
    ap.add_argument("--scale-trials", type=int, default=10)
    ap.add_argument("--churn-rate", type=float, default=20.0,
                    help="policy changes a second in the churn part")
    ap.add_argument("--churn-seconds", type=float, default=60.0)
    ap.add_argument("--cli-trials", type=int, help="trials through `cilia apply -f` "
                                                   "(default 5, quick 2)")
    ap.add_argument("--probe-timeout", type=float, default=60.0)
    ap.add_argument("--cleanup-stale", action="store_true",
                    help="remove what killed runs left behind, and exit")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        benchkit.cleanup_stale(PREFIX)
        return 0
    args.parts = set(args.parts.split(","))
    args.rounds = args.rounds or (4 if args.quick else 16)
    args.trials = args.trials or (10 if args.quick else 30)
    if args.late_pods is None:
        args.late_pods = 5 if args.quick else 20
    if args.cli_trials is None:
        args.cli_trials = 2 if args.quick else 5
    if RULES % args.cidrs:
        ap.error(f"--cidrs must divide {RULES}")

    run = Run(PREFIX)
    log(f"run {run.suffix}: labs and netns {PREFIX}{run.suffix}-*")

    def body() -> None:
        res = run_all(args, run)
        text = report(res)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")

    return benchkit.guarded(body, lambda _status: run.close())

if __name__ == "__main__":
    sys.exit(main())

