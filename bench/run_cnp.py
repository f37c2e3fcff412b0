#!/usr/bin/env python3
"""ClusterNetworkPolicy benchmark: issue 16's targets, against baselines built in the same run.

    python bench/run_cnp.py [--quick] [--parts cost,propagation] [--json FILE]   (as root)

1. Per-packet cost of the tiers ("with 1,000 ClusterNetworkPolicies at 1,000 distinct
   priorities, TCP_CRR >= 0.97x the same run with none"). Three cilia lab pairs, made as
   bench/run_policy.py part 1 makes them (`cilia_pair`):

     cilia-0        no policy at all
     cilia-cnp-1    the server is the subject of one Admin ClusterNetworkPolicy
                    (priority 0): Deny the client on port 7002, Accept it on 7001
     cilia-cnp-1k   the server is the subject of 1,000 Admin ClusterNetworkPolicies at
                    priorities 0..999, each with two ingress rules (Deny from pods
                    labelled nobody-K on TCP 10000+K; Deny from the client on TCP
                    20000+K) and one egress rule (Deny to 198.18.x.y/32, a CIDR identity
                    each); the one at priority 500 also denies the client on 7002, the
                    one at 999 accepts it on 7001 (the rr port)

   So the client's SYN to the server is decided in the Admin tier, by a rule ranked after
   2,000 others, through keys of its own identity among 1,000 more: the endpoint carries
   ENDPOINT_F_TIERED_INGRESS and the policy map holds every tier entry (both read back from
   the pinned maps before measuring). TCP_RR and TCP_CRR with bench/rr.c in paired
   rounds (run_policy's run_rounds); ratios are medians of per-round ratios.

2. Propagation ("as in the policy engine issue": store -> first effect p99 < 100 ms,
   agent CPU per change < 20 ms). A lab with 100 pods (run_policy's propagation pods)
   and 1,000 ClusterNetworkPolicies over them (Admin and Baseline, priorities 0..999,
   pod/namespace peers, port ranges, Pass, egress networks; every 100th one's subject is
   every pod). Each trial stores an Admin Deny (priority 500) of the probe client ->
   server flow and measures store -> first dropped connection, then deletes it and
   measures delete -> first allowed connection (run_policy's change_trials); the agent's
   CPU seconds (/proc/<pid>/stat) per store and per delete, each until it has synced.

Everything it creates (labs named cbench-<hex>-*, netns, processes, temp files) is
removed at the end, on failure and on Ctrl-C too. `--cleanup-stale` removes what a killed
run left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import benchkit  # first: re-runs this script under the project's venv if need be
import run_policy as rp
from benchkit import BenchError, Run, log, nsenter, sh

from cilia.client import AgentClient
from cilia.lab.lab import Lab

PREFIX = "cbench-"
API = "policy.networking.k8s.io/v1beta1"
KIND = "ClusterNetworkPolicy"
PROBE_PRIORITY = 500


def cnp(name: str, tier: str, priority: int, subject: dict, ingress=(), egress=()) -> dict:
    spec: dict = {"tier": tier, "priority": priority, "subject": subject}
    if ingress:
        spec["ingress"] = list(ingress)
    if egress:
        spec["egress"] = list(egress)
    return {"apiVersion": API, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def pods_peer(labels: dict, namespace: str | None = None) -> dict:
    """Pods with `labels`, in `namespace` or in any."""
    ns = {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}
    return {"pods": {"namespaceSelector": ns, "podSelector": {"matchLabels": labels}}}


def rule(action: str, name: str, peers: list, ports: list | None = None,
         side: str = "from") -> dict:
    out = {"name": name, "action": action, side: peers}
    if ports:
        out["protocols"] = ports
    return out


def tcp(port: int, end: int | None = None) -> dict:
    dst = {"number": port} if end is None else {"range": {"start": port, "end": end}}
    return {"tcp": {"destinationPort": dst}}


def udp(port: int) -> dict:
    return {"udp": {"destinationPort": {"number": port}}}


def net(k: int) -> str:
    return f"198.18.{k >> 8}.{k & 255}/32"


# ---- part 1: per-packet cost ---------------------------------------------------------


def cost_policies(n: int) -> list[dict]:
    """The n ClusterNetworkPolicies of cilia-cnp-1 (n=1) or cilia-cnp-1k; see the
    docstring. Pod labels are cilia_pair's: pod=client, pod=server."""
    server = pods_peer({"pod": "server"})
    client = [pods_peer({"pod": "client"})]
    if n == 1:
        return [cnp("cost-0", "Admin", 0, server, ingress=[
            rule("Deny", "closed", client, [tcp(rp.CLOSED_PORT)]),
            rule("Accept", "rr", client, [tcp(rp.RR_PORT)])])]
    out = []
    for k in range(n):
        ingress = [rule("Deny", "nobody", [pods_peer({"pod": f"nobody-{k}"})],
                        [tcp(10000 + k)]),
                   rule("Deny", "client-port", client, [tcp(20000 + k)])]
        if k == n // 2:
            ingress.insert(0, rule("Deny", "closed", client, [tcp(rp.CLOSED_PORT)]))
        if k == n - 1:
            ingress.append(rule("Accept", "rr", client, [tcp(rp.RR_PORT)]))
        out.append(cnp(f"cost-{k:04d}", "Admin", k, server, ingress=ingress,
                       egress=[rule("Deny", "net", [{"networks": [net(k)]}], side="to")]))
    return out


def cnp_pair(run: Run, tag: str, name: str, n: int) -> rp.Pair:
    """A cilia_pair (no NetworkPolicy) and, for n > 0, its server the subject of the
    cost_policies(n), in the datapath and checked there."""
    pair = rp.cilia_pair(run, tag, name, False, [], 1)
    if n:
        pair.rules = n
        t0 = time.monotonic()
        for obj in cost_policies(n):
            pair.lab.datastore.put(obj)
        stored = time.monotonic() - t0
        synced = rp.wait_synced(pair.lab)
        pair.info.update(cluster_network_policies=n, store_s=round(stored, 2),
                         sync_s=round(synced, 2))
        log(f"{name}: {n} ClusterNetworkPolicies stored in {stored:.1f}s, in the datapath "
            f"{synced:.1f}s later")
        pair.info["policy_map"] = verify_tiers(pair.lab, n)
    return pair


def verify_tiers(lab: Lab, n: int) -> dict:
    """The server endpoint carries ENDPOINT_F_TIERED_INGRESS (and no NetworkPolicy
    enforcement), and the pinned policy map holds the Admin-tier entries the policies
    make: for n=1000, (INIT, TCP 10000+K) and (client, TCP 20000+K) for every K, and the
    client's Accept on the rr port ranked after all of those; bpftool agrees on the
    count."""
    from cilia.datapath import layouts
    from cilia.datapath.maps import BpfMap
    from cilia.identity import INIT

    node = rp.agent(lab)
    eps = {e.pod_name: e for e in AgentClient(node.socket).endpoints()}
    server, client = eps["server"], eps["client"]
    pmap = BpfMap.open_pinned(node.bpffs_root, layouts.POLICY)
    emap = BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS)
    try:
        entries = {(k.dir, k.tier, k.identity, k.proto, k.dport, k.prefixlen): v
                   for k, v in pmap.items() if k.ep_id == server.id}
        info = emap.lookup(layouts.EndpointKey.for_ip(server.ip))
    finally:
        pmap.close()
        emap.close()
    admin, full = layouts.POLICY_TIER_ADMIN, layouts.POLICY_PREFIX_FULL
    ing, eg = layouts.POLICY_INGRESS, layouts.POLICY_EGRESS

    def key(identity: int, port: int) -> tuple:
        return (ing, admin, identity, 6, port, full)

    want = [key(client.identity, rp.RR_PORT), key(client.identity, rp.CLOSED_PORT)]
    if n > 1:
        want += [key(INIT, 10000 + k) for k in range(n)]
        want += [key(client.identity, 20000 + k) for k in range(n)]
    missing = [k for k in want if k not in entries]
    accept = entries.get(key(client.identity, rp.RR_PORT))
    tiered = [k for k in entries if k[1] != layouts.POLICY_TIER_NETWORK_POLICY]
    problems = []
    if info is None or not info.flags & layouts.ENDPOINT_F_TIERED_INGRESS:
        problems.append(f"server endpoint flags {info and info.flags}: no TIERED_INGRESS")
    elif info.flags & layouts.ENDPOINT_F_INGRESS_ENFORCED:
        problems.append(f"server endpoint flags {info.flags}: NetworkPolicy-enforced")
    if missing:
        problems.append(f"{len(missing)} of {len(want)} Admin-tier entries missing "
                        f"(e.g. {missing[:3]})")
    if accept is None or accept.action != layouts.POLICY_ALLOW:
        problems.append(f"the client's Accept on {rp.RR_PORT} is {accept}")
    pin = f"{node.bpffs_root}/{layouts.POLICY.name}"
    dumped = len(json.loads(sh(["bpftool", "-j", "map", "dump", "pinned", pin])))
    if dumped < len(tiered):
        problems.append(f"bpftool dumps {dumped} entries, fewer than {len(tiered)}")
    if problems:
        raise BenchError(f"policy map {pin}: " + "; ".join(problems))
    result = {"pin": pin, "endpoint_flags": info.flags, "expected": len(want), "missing": 0,
              "server_tier_entries": len(tiered),
              "server_tier_ingress": sum(1 for k in tiered if k[0] == ing),
              "server_tier_egress": sum(1 for k in tiered if k[0] == eg),
              "accept_rank": accept.rank,
              "distinct_ranks": len({entries[k].rank for k in tiered}),
              "bpftool_entries": dumped}
    log(f"policy map {pin}: server flags {info.flags:#x} (TIERED_INGRESS), all {len(want)} "
        f"expected Admin-tier entries present; {len(tiered)} tier entries for the server "
        f"({result['server_tier_ingress']} ingress), the client's Accept at rank "
        f"{accept.rank}; bpftool dumps {dumped} in all")
    return result


def measure_cost(run: Run, args, rr: Path) -> dict:
    base = cnp_pair(run, "a", "cilia-0", 0)
    one = cnp_pair(run, "c", "cilia-cnp-1", 1)
    big = cnp_pair(run, "b", "cilia-cnp-1k", args.policies)
    pairs = [one, base, big]  # neighbours are the pairs most compared
    rp.start_pairs(run, pairs, rr)
    elapsed = rp.run_rounds(pairs, rr, args)
    by = {p.name: p for p in pairs}
    comparisons = {"cilia-cnp-1k / cilia-0": ("cilia-cnp-1k", "cilia-0"),
                   "cilia-cnp-1k / cilia-cnp-1": ("cilia-cnp-1k", "cilia-cnp-1"),
                   "cilia-cnp-1 / cilia-0": ("cilia-cnp-1", "cilia-0")}
    return {
        "policies": args.policies, "rounds": args.rounds, "rr_seconds": args.rr_seconds,
        "crr_seconds": args.crr_seconds, "rounds_elapsed_s": round(elapsed, 1),
        "pairs": {p.name: {"client": p.client_ip, "server": p.server_ip, "policies": p.rules,
                           "tcp_rr_median": statistics.median(p.samples["rr"]),
                           "tcp_crr_median": statistics.median(p.samples["crr"]),
                           "tcp_rr": [round(v, 1) for v in p.samples["rr"]],
                           "tcp_crr": [round(v, 1) for v in p.samples["crr"]], **p.info}
                  for p in pairs},
        "ratios": {name: {mode: rp.paired(by, a, b, mode) for mode in ("rr", "crr")}
                   for name, (a, b) in comparisons.items()},
    }


# ---- part 2: propagation -------------------------------------------------------------


def filler_policies(n: int) -> list[dict]:
    """n ClusterNetworkPolicies over run_policy's propagation pods (team-0..9, app-0..9):
    three in four Admin, one Baseline, priority j; every 100th's subject is every pod
    (the probe's too), the others' one app in one namespace; Deny, Accept and Pass from
    pods, namespaces and port ranges; every other one an egress rule (a network, or pods)."""
    out = []
    for j in range(n):
        ns, k = f"team-{j % rp.NAMESPACES}", j // rp.NAMESPACES
        peer = {"app": f"app-{(k + 1) % 10}"}
        subject = {"namespaces": {}} if j % 100 == 0 else \
            pods_peer({"app": f"app-{k % 10}"}, ns)
        kind = j % 3
        if kind == 0:
            ingress = [rule("Deny", "peer", [pods_peer(peer)], [tcp(8000 + k % 100)])]
        elif kind == 1:
            ingress = [rule("Accept", "tier", [{"namespaces": {"matchLabels": {
                "tier": f"t{k % 3}"}}}], [tcp(9000, 9001 + k % 100)]),
                rule("Pass", "nobody", [pods_peer({"app": f"nobody-{j}"})])]
        else:
            ingress = [rule("Pass", "ns", [pods_peer({}, f"team-{(j + 1) % rp.NAMESPACES}")],
                            [udp(5000 + k % 100)])]
        egress = []
        if j % 4 == 0:
            egress = [rule("Deny", "net", [{"networks": [net(j)]}], side="to")]
        elif j % 4 == 1:
            egress = [rule("Accept", "peer", [pods_peer(peer)], [tcp(8000 + k % 100)],
                           side="to")]
        out.append(cnp(f"fill-{j:04d}", "Baseline" if j % 4 == 3 else "Admin", j, subject,
                       ingress, egress))
    return out


def tiered_endpoints(lab: Lab) -> int:
    """How many endpoints of the lab's node the datapath looks the ingress tiers up for."""
    from cilia.datapath import layouts
    from cilia.datapath.maps import BpfMap

    with BpfMap.open_pinned(rp.agent(lab).bpffs_root, layouts.ENDPOINTS) as emap:
        return sum(1 for _, v in emap.items()
                   if v.flags & layouts.ENDPOINT_F_TIERED_INGRESS)


def measure_propagation(run: Run, args, rr: Path) -> dict:
    lab = run.lab("p")
    node = rp.agent(lab)
    rp.wait_synced(lab)
    made: dict = {}
    pods_s, times = rp.create_pods(lab, rp.propagation_pods(lab, args.pods), made)
    rp.wait_synced(lab)
    log(f"{len(made)} pods through `lab run` in {pods_s:.1f}s "
        f"(p50 {statistics.median(times):.2f}s each)")
    t0 = time.monotonic()
    for obj in filler_policies(args.policies):
        lab.datastore.put(obj)
    stored = time.monotonic() - t0
    synced = rp.wait_synced(lab)
    log(f"{args.policies} ClusterNetworkPolicies stored in {stored:.1f}s, compiled and "
        f"written {synced:.1f}s later")
    tiered = tiered_endpoints(lab)
    log(f"{tiered} of {len(made)} endpoints carry ENDPOINT_F_TIERED_INGRESS")
    server, client = made[("probe", "server")], made[("probe", "client")]
    run.spawn(nsenter(server.netns, [str(rr), "server", str(rp.PROBE_PORT)]), "rr-probe.log")
    deny = probe_deny()
    prober = rp.Prober(client.netns)
    try:
        rp.until(prober, server.ip, "open", time.monotonic(), 10)
        deny_s, allow_s, cpu_store, cpu_delete = rp.change_trials(
            lab, prober, server.ip, deny, ("dropped", "open"), args.trials,
            args.probe_timeout)
    finally:
        prober.close()
    status = AgentClient(node.socket, timeout=120).status()
    cpu = cpu_store + cpu_delete
    result = {
        "pods": len(made), "policies": args.policies, "tiered_endpoints": tiered,
        "pods_s": round(pods_s, 1), "policies_store_s": round(stored, 2),
        "policies_first_sync_s": round(synced, 2), "trials": args.trials,
        "probe_priority": PROBE_PRIORITY,
        "store_deny_to_dropped_ms": rp.summary(deny_s),
        "delete_deny_to_open_ms": rp.summary(allow_s),
        "agent_cpu_ms_per_change": rp.summary(cpu),
        # /proc/<pid>/stat counts in clock ticks (10 ms): the mean is the finer figure
        "agent_cpu_ms_per_change_mean": round(1000 * statistics.mean(cpu), 1),
        "agent_cpu_ms_per_store": rp.summary(cpu_store),
        "agent_cpu_ms_per_delete": rp.summary(cpu_delete),
        "policy_syncs": status.policy_syncs,
        "agent_rss_kib": rp.rss_kib(node.pid),
    }
    rp.keep_logs(args, lab)
    run.down_lab(lab)
    return result


def probe_deny() -> dict:
    """The Admin Deny of the probe client -> server flow that the trials store and delete."""
    return cnp("probe-deny", "Admin", PROBE_PRIORITY, pods_peer({"app": "server"}, "probe"),
               ingress=[rule("Deny", "client", [pods_peer({"app": "client"}, "probe")],
                             [tcp(rp.PROBE_PORT)])])


def profile_compile(args) -> None:
    """One change as the agent's compiler sees it, in this process (no root, no lab):
    the propagation lab's pods (every one local, an identity per label set) and the
    filler policies compiled once, then cProfile of the compile with the probe's Deny
    stored and of the one with it deleted, the same objects otherwise (as the local
    datastore hands the agent the same object until its file changes)."""
    import cProfile
    import pstats

    from cilia.policy.compiler import Compiler, PodView

    namespaces = rp.propagation_namespaces()
    idents: dict = {}
    pods = [PodView(ns, name, labels, f"10.244.{1 + i // 250}.{2 + i % 250}",
                    idents.setdefault((ns, tuple(sorted(labels.items()))), 256 + len(idents)),
                    (("http", 6, rp.PROBE_PORT),))
            for i, (ns, name, labels) in enumerate(rp.propagation_pods(None, args.pods))]
    local = {i + 1: pod for i, pod in enumerate(pods)}
    fillers, deny = filler_policies(args.policies), probe_deny()
    compiler = Compiler()

    def compile_(cnps: list[dict]):
        return compiler.compile([], pods, namespaces, local, (), None, cnps)

    t0 = time.perf_counter()
    compile_(fillers)
    log(f"first compile, {len(pods)} pods and {len(fillers)} CNPs: "
        f"{time.perf_counter() - t0:.2f}s")
    for what, cnps in (("store", fillers + [deny]), ("delete", fillers)):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        compiled = compile_(cnps)
        prof.disable()
        entries = sum(len(e.entries) for e in compiled.endpoints.values())
        print(f"\n## compile after the {what}: {time.perf_counter() - t0:.3f}s "
              f"(under cProfile), {entries} entries on {len(local)} endpoints")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(18)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(10)


# ---- report --------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: dict) -> str:
    out = [f"# cilia ClusterNetworkPolicy benchmark, {res['date']}", "", res["command"],
           f"commit: {res.get('commit', '?')}", f"host: {res['host']}", ""]
    cost = res.get("cost")
    if cost:
        out += [f"## Per-packet cost with 0, 1 and {cost['policies']:,} "
                "ClusterNetworkPolicies",
                f"{cost['rounds']} rounds of TCP_RR {cost['rr_seconds']}s and TCP_CRR "
                f"{cost['crr_seconds']}s per pair; medians", "",
                *benchkit.table([["pair", "CNPs", "TCP_RR/s", "TCP_CRR/s"]] + [
                    [name, str(p["policies"]), f"{p['tcp_rr_median']:,.0f}",
                     f"{p['tcp_crr_median']:,.0f}"] for name, p in cost["pairs"].items()]),
                "", *benchkit.table([["ratio (median of per-round ratios)", "TCP_RR",
                                      "TCP_CRR"]] + [
                    [name, *(f"{r[m]['median']:.3f} [{r[m]['min']:.2f}-{r[m]['max']:.2f}]"
                             for m in ("rr", "crr"))]
                    for name, r in cost["ratios"].items()])]
        crr = cost["ratios"]["cilia-cnp-1k / cilia-0"]["crr"]
        pm = cost["pairs"]["cilia-cnp-1k"]["policy_map"]
        out += ["", f"target TCP_CRR cilia-cnp-1k / cilia-0 >= 0.97: {crr['median']:.3f} "
                    f"{verdict(crr['median'] >= 0.97)}",
                f"cilia-cnp-1k: server endpoint flags {pm['endpoint_flags']:#x}, "
                f"{pm['server_tier_entries']} Admin-tier entries ({pm['server_tier_ingress']} "
                f"ingress, {pm['distinct_ranks']} distinct ranks), all {pm['expected']} "
                f"expected present, the client's Accept at rank {pm['accept_rank']}; bpftool "
                f"dumps {pm['bpftool_entries']}",
                "agent CPU during the rounds: " + ", ".join(
                    f"{n} {p['agent_cpu_s_during_rounds']}s"
                    for n, p in cost["pairs"].items()) +
                f" (of {cost['rounds_elapsed_s']}s)", ""]
    prop = res.get("propagation")
    if prop:
        d, a = prop["store_deny_to_dropped_ms"], prop["delete_deny_to_open_ms"]
        c = prop["agent_cpu_ms_per_change"]
        out += [f"## Propagation with {prop['pods']} pods and {prop['policies']:,} "
                "ClusterNetworkPolicies",
                f"{prop['policies']:,} CNPs stored in {prop['policies_store_s']}s, in the "
                f"datapath {prop['policies_first_sync_s']}s later; "
                f"{prop['tiered_endpoints']} endpoints tiered; {prop['trials']} trials "
                f"of an Admin Deny at priority {prop['probe_priority']}", "",
                *benchkit.table([["", "p50", "p99", "min", "max", "n"]] + [
                    [what, *(f"{s[q]:,.0f}" for q in ("p50", "p99", "min", "max")),
                     str(s["n"])]
                    for what, s in (("store Deny -> first dropped (ms)", d),
                                    ("delete Deny -> first allowed (ms)", a),
                                    ("agent CPU per change (ms)", c),
                                    ("  per store (ms)", prop["agent_cpu_ms_per_store"]),
                                    ("  per delete (ms)", prop["agent_cpu_ms_per_delete"]))]),
                "",
                f"target store -> effect p99 < 100 ms: dropped {d['p99']:.0f} ms "
                f"{verdict(d['p99'] < 100)}, allowed {a['p99']:.0f} ms {verdict(a['p99'] < 100)}",
                f"target agent CPU per change < 20 ms: mean "
                f"{prop['agent_cpu_ms_per_change_mean']:.1f} ms (p50 {c['p50']:.0f} ms; "
                "/proc counts 10 ms ticks) "
                f"{verdict(prop['agent_cpu_ms_per_change_mean'] < 20)}",
                f"agent RSS {prop['agent_rss_kib']['VmRSS'] / 1024:.1f} MiB"]
    return "\n".join(out)


def run_all(args, run: Run) -> dict:
    return rp.run_parts(args, run, {"cost": measure_cost, "propagation": measure_propagation})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, trials, policies")
    ap.add_argument("--json", help="write every figure and sample to this file")
    ap.add_argument("--parts", default="cost,propagation",
                    help="comma-separated: cost, propagation (default both)")
    ap.add_argument("--rounds", type=int, help="rounds of the cost test (default 16, quick 3)")
    ap.add_argument("--rr-seconds", type=float, default=1.0)
    ap.add_argument("--crr-seconds", type=float, default=1.0)
    ap.add_argument("--policies", type=int, default=1000,
                    help="ClusterNetworkPolicies in cilia-cnp-1k and the propagation lab")
    ap.add_argument("--pods", type=int, help="pods of the propagation lab (default 100, "
                                             "quick 20)")
    ap.add_argument("--trials", type=int, help="propagation trials (default 30, quick 5)")
    ap.add_argument("--probe-timeout", type=float, default=60.0)
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy the propagation lab's agent log here before it goes")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile of the agent's compiler for one change (the propagation "
                         "lab's pods and policies, in this process; no root), and exit")
    ap.add_argument("--cleanup-stale", action="store_true",
                    help="remove what killed runs left behind, and exit")
    args = ap.parse_args()
    args.pods = args.pods or (20 if args.quick else 100)
    if args.profile:
        profile_compile(args)
        return 0
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        benchkit.cleanup_stale(PREFIX)
        return 0
    args.parts = set(args.parts.split(","))
    if args.parts - {"cost", "propagation"}:
        ap.error(f"unknown parts: {', '.join(args.parts - {'cost', 'propagation'})}")
    args.rounds = args.rounds or (3 if args.quick else 16)
    args.trials = args.trials or (5 if args.quick else 30)
    if args.policies < 2 or args.policies > 1001:
        ap.error("--policies: 2 to 1001 (one priority each, 0..1000)")

    run = Run(PREFIX)
    log(f"run {run.suffix}: labs and netns {PREFIX}{run.suffix}-*")

    def body() -> None:
        res = run_all(args, run)
        print(report(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")

    return benchkit.guarded(body, lambda _status: run.close())


if __name__ == "__main__":
    sys.exit(main())
