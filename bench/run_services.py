#!/usr/bin/env python3
"""Services benchmark on a real Kubernetes: cilia's BPF Services against kube-proxy.

    python bench/run_services.py [--quick] [--json FILE]      (as root)

Four real 2-node clusters made by `cilia cluster up` (cilia/cluster/cluster.py), up at
the same time so that every test runs on each in turn, in rounds:

  cilia     --kube-proxy none: no kube-proxy, the agents run --kube-proxy-replacement and
            translate every Service in BPF (bpf/lib/lb.h, in cil_from_pod, before
            conntrack and policy; NodePorts from outside in cil_from_netdev)
  iptables  kube-proxy in iptables mode; the agents run --no-services, so netfilter
            alone translates Services
  nftables  kube-proxy in nftables mode; the agents run --no-services
  cilia-ref a second cilia cluster that keeps 1 Service throughout: cilia(N)/cilia(1)
            is cilia against it within the same rounds (with 1 Service in both, the
            same ratio is the control)

Each cluster gets the same pods: `client` on node1, `be1` on node1 and `be2` on node2
(agnhost netexec: HTTP on 8080, whose /hostname names the pod), and the same Services,
all without selectors and with EndpointSlices this run writes (real API objects that
kube-proxy and cilia both program): `rr` (TCP 7001 and 7002, backends be1 and be2),
`flip` (TCP 80 -> 8080, one backend that the latency test moves), `np`/`npl` (UDP
NodePorts, backend be1, externalTrafficPolicy Cluster and Local). bench/rr.c runs in
the pods' network namespaces from this machine (nsenter into the node's mount namespace,
then the pod's netns as the CNI made it): `rr server` in be1 and be2, the clients in
`client`, clients on CPU 0 and servers on CPU 1, at nice -20 (`--nice`; the busy-poll
pair at 0) in every configuration alike, as the machine is shared.

1. TCP_CRR, TCP_RR and TCP_RR busy-poll from `client` to rr's ClusterIP, with 1 Service.
   TCP_CRR spreads its connections over both backends; a TCP_RR run is one connection,
   so one backend: which one is read from the backends' TCP counters, and each round
   runs TCP_RR until it has hit the local and the remote backend once (the round's
   figure is their mean, as for a client whose connections split evenly).
2. The same with N more Services (default 5,000, 2 backends each: be1 and be2), created
   through the API, measured once every datapath holds them all (cilia: `cilia service
   list -o json` on both nodes; kube-proxy: its iptables rules or nft map elements).
   After each phase, one TCP_CRR run per cluster with the kernel's BPF run-time
   statistics on (BPF_ENABLE_STATS, only then): what cil_from_pod costs per packet.
3. Time from an EndpointSlice change to traffic following it: a prober in `client`
   opens a new HTTP connection to flip's ClusterIP every few ms and asks /hostname; the
   slice is patched to move the backend from be1 to be2 (and back), and the latency is
   from the PATCH request to the first answer from the new backend after which the old
   one never answers again. With 1 Service and again with the N present.
4. NodePort from the cluster's outside netns: 64-byte frames (18-byte UDP payload) sent
   with sendmmsg from one core (CPU 0, which also runs every receive-side softirq of
   the path), packets per second reaching the backend's UDP socket in be1.

Tests run in rounds, each test on every cluster in a rotating order; a figure is the
median over the rounds, a ratio the median of the per-round ratios. Every cluster,
process and temp file is removed at the end, on failure and on Ctrl-C too;
`--cleanup-stale` removes what a killed run left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import benchkit  # first: re-runs this script under the project's venv if need be
import requests
from benchkit import BenchError, cpus, log, median, pct, sh, table

from cilia.client import AgentClient
from cilia.cluster import upstream
from cilia.cluster.cluster import (
    CLUSTERS_DIR,
    Cluster,
    ClusterError,
    ClusterNode,
    node_argv,
)

BUILD = benchkit.BENCH / "build"
TMP_PREFIX = "svbench-"  # temp dirs: /tmp/svbench-<suffix>-*, holding the run's pid
CLUSTER_PREFIX = "svb"   # cluster names: svb<suffix><c|i|n>

# cilia-ref: a second cilia cluster that never gets the N Services, so that cilia(N) /
# cilia(1) is measured within the same rounds (with 1 Service each, their ratio is the
# control: what two identical clusters differ by).
CONFIGS = ("cilia", "iptables", "nftables", "cilia-ref")
BASELINES = ("iptables", "nftables", "cilia-ref")  # the ratio columns: cilia / each
CLUSTER_ARGS = {  # config -> Cluster.up arguments
    "cilia": {"kube_proxy": "none"},
    "iptables": {"kube_proxy": "iptables", "agent_args": ["--no-services"]},
    "nftables": {"kube_proxy": "nftables", "agent_args": ["--no-services"]},
    "cilia-ref": {"kube_proxy": "none"},
}
CLUSTER_SUFFIX = {"cilia": "c", "iptables": "i", "nftables": "n", "cilia-ref": "r"}
NS = "bench"
BULK_NS = "bulk"
MANAGED_BY = "bench.cilia.io"
RR_PORT = 7001        # rr server; RR_PORT + 1: the busy-poll one
HTTP_PORT = 8080      # agnhost netexec
UDP_PORT = 9000       # the UDP sink in be1
NODE_PORT = 31900     # np (externalTrafficPolicy Cluster); +1: npl (Local)
AGNHOST = f"registry.k8s.io/e2e-test-images/agnhost:{upstream.pins()['AGNHOST_VERSION']}"
UDP_PAYLOAD = 18      # + 8 UDP + 20 IP + 14 Ethernet + 4 FCS = a 64-byte frame

TESTS = {  # name -> (label, unit)
    "tcp_crr": ("TCP_CRR", "conn/s"),
    "tcp_rr": ("TCP_RR", "trans/s"),
    "tcp_rr_spin": ("TCP_RR busy-poll", "trans/s"),
}
# The issue's targets: (phase, test, numerator, denominator, bound)
TARGETS = [
    ("1 Service", "tcp_crr", "cilia", "iptables", 1.2),
    ("1 Service", "tcp_rr", "cilia", "iptables", 1.2),
    ("N Services", "tcp_crr", "cilia", "iptables", 2.0),
    ("N Services", "tcp_crr", "cilia", "nftables", 1.0),
]
SCALE_TARGET = 0.97      # cilia(N) / cilia(1), TCP_CRR
LATENCY_TARGET_MS = 200  # EndpointSlice change to traffic, p99


NICE = [-20]  # the traffic processes' nice value (--nice), set by main


def pinned(cpu: str, spin: bool = False) -> list[str]:
    """The prefix of a traffic process's argv: on one core, at --nice (the same for
    every configuration: on a shared machine, other work then interleaves less). The
    busy-poll pair is left at nice 0: spinning on both cores at -20 would starve
    everything else on the machine while it runs."""
    return ["nice", "-n", "0" if spin else str(NICE[0]), *benchkit.pinned(cpu, [])]


def cpu_seconds(pid: int) -> float:
    """0 for a daemon that is gone (a restarted kube-proxy has a new pid)."""
    return benchkit.cpu_seconds(pid, gone=0.0)


def snmp(pid: int) -> dict[str, int]:
    """The netns-wide IP/TCP/UDP counters of the network namespace `pid` is in, keyed
    "Tcp.PassiveOpens" and so on (/proc/PID/net is that process's netns)."""
    return benchkit.snmp(Path(f"/proc/{pid}/net/snmp").read_text())


# ---- build ----------------------------------------------------------------------------

# 64-byte UDP from one socket as fast as one core sends them, and a sink that drains a
# port; not a file of its own in bench/, as only this benchmark uses it.
UDPBLAST_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define BATCH 64
static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}
int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	static char buf[BATCH][2048];
	long sent = 0, errors = 0;
	int fd = socket(AF_INET, SOCK_DGRAM, 0), i, len;
	double start, end, t;

	memset(msgs, 0, sizeof(msgs));
	if (fd < 0)
		return perror("socket"), 1;
	if (argc == 3 && !strcmp(argv[1], "sink")) {
		int big = 4 << 20;
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
		addr.sin_port = htons(atoi(argv[2]));
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
			return perror("bind"), 1;
		for (i = 0; i < BATCH; i++) {
			iov[i].iov_base = buf[i];
			iov[i].iov_len = sizeof(buf[i]);
			msgs[i].msg_hdr.msg_iov = &iov[i];
			msgs[i].msg_hdr.msg_iovlen = 1;
		}
		for (;;)
			recvmmsg(fd, msgs, BATCH, 0, NULL);
	}
	if (argc != 6 || strcmp(argv[1], "send")) {
		fprintf(stderr, "usage: udpblast sink PORT | udpblast send HOST PORT SECONDS LEN\n");
		return 2;
	}
	if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1)
		return fprintf(stderr, "bad address %s\n", argv[2]), 2;
	addr.sin_port = htons(atoi(argv[3]));
	len = atoi(argv[5]);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return perror("connect"), 1;
	for (i = 0; i < BATCH; i++) {
		iov[i].iov_base = buf[i];
		iov[i].iov_len = len;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	start = now();
	end = start + atof(argv[4]);
	do {
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n > 0)
			sent += n;
		else
			errors++;  /* ENOBUFS, ECONNREFUSED (an ICMP error came back): keep going */
	} while ((t = now()) < end);
	printf("{\"sent\": %ld, \"seconds\": %.6f, \"errors\": %ld}\n", sent, t - start, errors);
	return 0;
}
"""


def build() -> tuple[Path, Path]:
    """bench/rr.c, the UDP blaster, and cilia's BPF objects if out of date (the
    clusters' agents load them from the checkout)."""
    rr = benchkit.build_rr(BUILD)
    src = BUILD / "udpblast.c"
    src.write_text(UDPBLAST_C)
    blast = BUILD / "udpblast"
    benchkit.build_c(src, blast, extra=False)
    benchkit.make_bpf()
    return rr, blast


# ---- the API --------------------------------------------------------------------------


class Api:
    """The cluster's API server through its forwarder on this machine's loopback, as the
    admin; one HTTP session per thread (objects are created from a thread pool)."""

    def __init__(self, cluster: Cluster):
        state = cluster.load()
        self.base = f"https://127.0.0.1:{state.api_port}"
        pki = cluster.pki.dir
        self.cert = (str(pki / "admin.crt"), str(pki / "admin.key"))
        self.ca = str(pki / "ca.crt")
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # not the machine's CA bundle or proxies
            s.cert, s.verify = self.cert, self.ca
            self._local.session = s
        return s

    def call(self, method: str, path: str, body: dict | None = None,
             content_type: str = "application/json", ok: tuple = (200, 201)) -> dict:
        r = self._session().request(method, self.base + path, timeout=60,
                                    data=json.dumps(body) if body is not None else None,
                                    headers={"Content-Type": content_type})
        if r.status_code not in ok:
            raise BenchError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else {}

    @staticmethod
    def path(kind: str, ns: str) -> str:
        return {
            "Namespace": "/api/v1/namespaces",
            "Pod": f"/api/v1/namespaces/{ns}/pods",
            "Service": f"/api/v1/namespaces/{ns}/services",
            "EndpointSlice": f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
        }[kind]

    def create(self, obj: dict) -> dict:
        return self.call("POST", self.path(obj["kind"], obj["metadata"].get("namespace", "")),
                         obj)

    def get(self, kind: str, ns: str, name: str) -> dict:
        return self.call("GET", f"{self.path(kind, ns)}/{name}")

    def patch(self, kind: str, ns: str, name: str, patch: dict) -> dict:
        return self.call("PATCH", f"{self.path(kind, ns)}/{name}", patch,
                         "application/merge-patch+json")


def pod(name: str, node: str, args: list[str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": AGNHOST,
                                     "imagePullPolicy": "Never", "args": args}]}}


def service(name: str, ns: str, ports: list[tuple[str, int, int, str]],
            node_port: int = 0, local: bool = False) -> dict:
    """A Service without a selector: its EndpointSlices are written by this run."""
    spec: dict = {"ports": [{"name": n, "port": p, "targetPort": t, "protocol": proto}
                            for n, p, t, proto in ports]}
    if node_port:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = node_port
        spec["externalTrafficPolicy"] = "Local" if local else "Cluster"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name: str, ns: str, service_name: str, backends: list[tuple[str, str]],
                   ports: list[tuple[str, int, str]]) -> dict:
    """backends: (pod IP, node name)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
            "endpoints": endpoints(backends)}


def endpoints(backends: list[tuple[str, str]]) -> list[dict]:
    return [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
            for ip, node in backends]


# ---- one cluster ----------------------------------------------------------------------


@dataclass
class PodInfo:
    name: str
    node: ClusterNode
    ip: str
    netns: str  # the CNI's path, as the node sees it (in its mount namespace)
    host_if: str = ""  # its veth's node side, where cil_from_pod runs


@dataclass
class Bed:
    """One cluster under test, its pods, Services and server processes."""

    config: str
    cluster: Cluster
    api: Api | None = None
    pods: dict[str, PodInfo] = field(default_factory=dict)
    cluster_ips: dict[str, str] = field(default_factory=dict)
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    agent_pids: dict[str, int] = field(default_factory=dict)
    proxy_pids: dict[str, int] = field(default_factory=dict)

    @property
    def is_cilia(self) -> bool:
        """cilia translates Services here (no kube-proxy)."""
        return CLUSTER_ARGS[self.config]["kube_proxy"] == "none"

    @property
    def nodes(self) -> list[ClusterNode]:
        return self.cluster.load().nodes

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def pod_argv(self, pod_name: str, argv: list[str]) -> list[str]:
        p = self.pods[pod_name]
        return node_argv(p.node.netns, p.node.mntns, ["nsenter", f"--net={p.netns}", *argv])

    def node_run(self, node: ClusterNode, argv: list[str], timeout: float = 60) -> str:
        return sh(node_argv(node.netns, node.mntns, argv), timeout=timeout)

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        p = benchkit.spawn(argv, **kw)
        self.procs.append(p)
        return p

    def stop_procs(self) -> None:
        for p in self.procs:
            benchkit.stop(p)
        self.procs.clear()

    # -- set-up

    def up(self) -> float:
        t0 = time.monotonic()
        self.cluster.up(nodes=2, quiet=True, **CLUSTER_ARGS[self.config])
        took = time.monotonic() - t0
        self.api = Api(self.cluster)
        state = self.cluster.load()
        for proc in state.procs:
            if proc.name.startswith("cilia-agent-"):
                self.agent_pids[proc.name.removeprefix("cilia-agent-")] = proc.pid
            if proc.name.startswith("kube-proxy-"):
                self.proxy_pids[proc.name.removeprefix("kube-proxy-")] = proc.pid
        return took

    def create_pods(self) -> None:
        netexec = ["netexec", f"--http-port={HTTP_PORT}", "--udp-port=8081"]
        self.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for obj in (pod("client", "node1", ["pause"]), pod("be1", "node1", netexec),
                    pod("be2", "node2", netexec)):
            self.api.create(obj)

    def wait_pods(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        want = {"client", "be1", "be2"}
        while True:
            ready = set()
            for item in self.api.call("GET", self.api.path("Pod", NS))["items"]:
                conds = {c["type"]: c["status"]
                         for c in (item.get("status") or {}).get("conditions", [])}
                if conds.get("Ready") == "True":
                    ready.add(item["metadata"]["name"])
            if want <= ready:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{self.config}: pods {sorted(want - ready)} not Ready after "
                                 f"{timeout:.0f} s")
            time.sleep(0.5)
        for node in self.nodes:
            for ep in AgentClient(node.agent_sock).endpoints():
                if ep.pod_namespace == NS and ep.pod_name in want:
                    self.pods[ep.pod_name] = PodInfo(ep.pod_name, node, ep.ip, ep.netns,
                                                     ep.host_ifname)
        if set(self.pods) != want:
            raise BenchError(f"{self.config}: the agents list {sorted(self.pods)} of {want}")

    def create_services(self) -> None:
        be = [(self.pods["be1"].ip, "node1"), (self.pods["be2"].ip, "node2")]
        rr_ports = [("rr", RR_PORT, "TCP"), ("spin", RR_PORT + 1, "TCP")]
        udp = [("udp", UDP_PORT, "UDP")]
        objs = [
            service("rr", NS, [(n, p, p, proto) for n, p, proto in rr_ports]),
            endpoint_slice("rr-1", NS, "rr", be, rr_ports),
            service("flip", NS, [("http", 80, HTTP_PORT, "TCP")]),
            endpoint_slice("flip-1", NS, "flip", be[:1], [("http", HTTP_PORT, "TCP")]),
            service("np", NS, [("udp", UDP_PORT, UDP_PORT, "UDP")], NODE_PORT),
            endpoint_slice("np-1", NS, "np", be[:1], udp),
            service("npl", NS, [("udp", UDP_PORT, UDP_PORT, "UDP")], NODE_PORT + 1, True),
            endpoint_slice("npl-1", NS, "npl", be[:1], udp),
        ]
        for obj in objs:
            out = self.api.create(obj)
            if obj["kind"] == "Service":
                self.cluster_ips[obj["metadata"]["name"]] = out["spec"]["clusterIP"]

    def start_servers(self, rr: Path, blast: Path) -> None:
        client_cpu, server_cpu = cpus()
        for be in ("be1", "be2"):
            self.servers[f"{be}-rr"] = self.spawn(self.pod_argv(be, [
                *pinned(server_cpu), str(rr), "server", str(RR_PORT)]))
            self.servers[f"{be}-spin"] = self.spawn(self.pod_argv(be, [
                *pinned(server_cpu, spin=True), str(rr), "server", str(RR_PORT + 1),
                "spin"]))
        self.servers["be1-udp"] = self.spawn(self.pod_argv("be1", [
            *pinned(server_cpu), str(blast), "sink", str(UDP_PORT)]))
        # TCP_CRR opens thousands of connections a second: the same port range and
        # TIME_WAIT reuse as bench/run_datapath.py gives its clients.
        sh(self.pod_argv("client", ["sysctl", "-q", "-w",
                                    "net.ipv4.ip_local_port_range=1024 65000",
                                    "net.ipv4.tcp_tw_reuse=1"]))
        deadline = time.monotonic() + 20
        for name, p in self.servers.items():  # each in its pod's netns, listening
            port = {"rr": RR_PORT, "spin": RR_PORT + 1, "udp": UDP_PORT}[name.split("-")[1]]
            table = "udp" if name.endswith("udp") else "tcp"
            while True:
                if p.poll() is not None:
                    raise BenchError(f"{self.config}: server {name} exited ({p.returncode})")
                try:  # exec'ed into the server (so in the pod's netns), and listening
                    comm = Path(f"/proc/{p.pid}/comm").read_text().strip()
                    if comm in ("rr", "udpblast") and any(
                            int(line.split()[1].split(":")[1], 16) == port
                            for line in Path(f"/proc/{p.pid}/net/{table}").read_text()
                            .splitlines()[1:]):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.config}: server {name} not listening")
                time.sleep(0.05)

    # -- what the datapaths hold

    def cilia_frontends(self, node: ClusterNode, prefix: str) -> int:
        """ClusterIP frontends of Services named NAMESPACE/NAME starting with prefix, with
        2 backends, by `cilia service list -o json` on the node's agent socket."""
        out = sh([sys.executable, "-m", "cilia.cli", "--socket", node.agent_sock, "service",
                  "list", "-o", "json"], timeout=120)
        return sum(1 for s in json.loads(out) if s["service"].startswith(prefix)
                   and s["type"] == "ClusterIP" and len(s["backends"]) == 2)

    def proxy_services(self, node: ClusterNode, prefix: str) -> int:
        """ClusterIP ports of Services starting with prefix that kube-proxy has programmed
        with endpoints (without, they would be in its reject rules instead): its
        KUBE-SERVICES rules (iptables), its service-ips map's elements (nftables)."""
        if CLUSTER_ARGS[self.config]["kube_proxy"] == "iptables":
            out = ""
            for save in ("iptables-save", "iptables-legacy-save"):
                out += self.node_run(node, [save, "-t", "nat"], timeout=120)
            return sum(1 for line in out.splitlines()
                       if line.startswith("-A KUBE-SERVICES ") and f'"{prefix}' in line
                       and "cluster IP" in line)
        out = self.node_run(node, ["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
                            timeout=120)
        return out.count(f"-{prefix}")

    def programmed(self, prefix: str) -> int:
        """The smallest count over both nodes of prefix's ClusterIP ports in the
        datapath."""
        count = self.cilia_frontends if self.is_cilia else self.proxy_services
        return min(count(node, prefix) for node in self.nodes)

    def lb_translated(self) -> int:
        """cil_from_pod's Service translations on node1 (0 where kube-proxy does them)."""
        return sum(m.packets for m in AgentClient(self.node("node1").agent_sock).metrics()
                   if m.reason == "lb_translated")

    def daemon_cpu(self) -> float:
        """CPU seconds so far of what programs Services: the agents (cilia) or kube-proxy
        (the baselines), both nodes."""
        pids = self.agent_pids if self.is_cilia else self.proxy_pids
        return sum(cpu_seconds(pid) for pid in pids.values())


# ---- the tests ------------------------------------------------------------------------


def settle(args) -> float:
    """How busy the machine is (over 2 s); with --wait-idle, first waits up to that long
    for it to be under --idle-below (this run's three idle clusters count too)."""
    return benchkit.wait_idle(args.wait_idle, args.idle_below, sample=2)


def rr_run(bed: Bed, rr: Path, mode: str, seconds: float, spin: bool) -> dict:
    """One rr client run to rr's ClusterIP; which backends took it, from their counters."""
    client_cpu, _ = cpus()
    port = RR_PORT + 1 if spin else RR_PORT
    srv = {be: bed.servers[f"{be}-{'spin' if spin else 'rr'}"].pid for be in ("be1", "be2")}
    before = {be: snmp(pid)["Tcp.PassiveOpens"] for be, pid in srv.items()}
    out = benchkit.rr_client(bed.pod_argv("client", pinned(client_cpu, spin)), rr, mode,
                             bed.cluster_ips["rr"], port, seconds, spin, f"on {bed.config}")
    opened = {be: snmp(pid)["Tcp.PassiveOpens"] - before[be] for be, pid in srv.items()}
    total = sum(opened.values()) or 1
    return {"rate": out["rate"], "errors": out["errors"],
            "local_share": opened["be1"] / total, "opened": opened}


def rr_both_backends(bed: Bed, rr: Path, seconds: float, spin: bool,
                     tries: int = 8) -> dict:
    """TCP_RR until one run has gone to the local backend (be1, the client's node) and
    one to the remote one (be2); a run is one connection, so one backend."""
    got: dict[str, float] = {}
    runs = []
    for _ in range(tries):
        res = rr_run(bed, rr, "rr", seconds, spin)
        runs.append(res)
        side = "local" if res["opened"]["be1"] else "remote"
        got.setdefault(side, res["rate"])
        if len(got) == 2:
            break
    mean = (got["local"] + got["remote"]) / 2 if len(got) == 2 else None
    return {"rate": mean, "local": got.get("local"), "remote": got.get("remote"),
            "runs": len(runs)}


def measure_rr(beds: dict[str, Bed], rr: Path, args, phase: str) -> dict:
    """Every test on every cluster, round after round, the cluster order rotating."""
    order = list(beds)
    samples = {c: {t: [] for t in TESTS} for c in beds}
    detail = {c: {"rr_local": [], "rr_remote": [], "rr_spin_local": [],
                  "rr_spin_remote": [], "crr_local_share": [], "crr_errors": []}
              for c in beds}
    translated0 = {c: b.lb_translated() for c, b in beds.items()}
    cpu0 = {c: b.daemon_cpu() for c, b in beds.items()}
    t0 = time.monotonic()
    busy = []
    for rnd in range(args.rounds):
        busy.append(round(settle(args), 3))
        for test in TESTS:
            for config in order:
                bed = beds[config]
                if test == "tcp_crr":
                    res = rr_run(bed, rr, "crr", args.rr_duration, False)
                    samples[config][test].append(res["rate"])
                    detail[config]["crr_local_share"].append(round(res["local_share"], 3))
                    detail[config]["crr_errors"].append(res["errors"])
                else:
                    spin = test == "tcp_rr_spin"
                    res = rr_both_backends(bed, rr, args.rr_duration, spin)
                    samples[config][test].append(res["rate"])
                    key = "rr_spin" if spin else "rr"
                    detail[config][f"{key}_local"].append(res["local"])
                    detail[config][f"{key}_remote"].append(res["remote"])
        log(f"{phase}: round {rnd + 1}/{args.rounds} ({busy[-1]:.0%} busy before): " + "; ".join(
            f"{c} CRR {samples[c]['tcp_crr'][-1]:,.0f} RR "
            + (f"{samples[c]['tcp_rr'][-1]:,.0f}" if samples[c]['tcp_rr'][-1] else "-")
            for c in order))
        order = order[1:] + order[:1]
    took = time.monotonic() - t0
    translated = {c: b.lb_translated() - translated0[c] for c, b in beds.items()}
    cpu = {c: round(100 * (b.daemon_cpu() - cpu0[c]) / took, 1) for c, b in beds.items()}
    med = {c: {t: median(v) for t, v in tests.items()} for c, tests in samples.items()}
    for c in beds:
        for k in ("rr_local", "rr_remote", "rr_spin_local", "rr_spin_remote",
                  "crr_local_share"):
            med[c][k] = median(detail[c][k])
    return {"samples": samples, "detail": detail, "median": med, "busy_before_round": busy,
            "lb_translated": translated, "daemon_cpu_percent": cpu}


BPF_ENABLE_STATS = 32  # bpf(2) command; BPF_STATS_RUN_TIME is type 0
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}


def bpf_stats_on() -> int | None:
    """Turns the kernel's per-program run-time statistics on while the fd stays open
    (BPF_ENABLE_STATS: refcounted, off again when the last holder closes it)."""
    nr = BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return None
    attr = ctypes.c_uint32(0)
    fd = ctypes.CDLL(None, use_errno=True).syscall(nr, BPF_ENABLE_STATS, ctypes.byref(attr),
                                                   ctypes.sizeof(attr))
    return fd if fd >= 0 else None


def prog_stats(prog_id: int) -> tuple[int, int]:
    info = json.loads(sh(["bpftool", "prog", "show", "id", str(prog_id), "-j"]))
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def from_pod_prog(bed: Bed) -> int:
    """The id of cil_from_pod on the client's veth (tc ingress of its node side); the
    one program serves every pod's veth on the node (be1's replies go through it too)."""
    pod = bed.pods["client"]
    out = json.loads(bed.node_run(pod.node, ["bpftool", "net", "show", "dev", pod.host_if,
                                             "-j"]))
    for entry in out:
        for tc in entry.get("tc", []):
            if tc.get("kind", "").endswith("ingress") and tc.get("name", "").startswith(
                    "cil_from_pod"):
                return tc["id"]
    raise BenchError(f"{bed.config}: no cil_from_pod on {pod.host_if}: {out}")


def bpf_cost(beds: dict[str, Bed], rr: Path, seconds: float) -> dict:
    """What cil_from_pod costs per packet on the client's veth during a TCP_CRR run, from
    the kernel's own run-time statistics (on only for these runs): where cilia
    translates, its Service lookup is in it; where kube-proxy does, it is not.
    Programs run with preemption off, so other work on the machine hardly moves this."""
    fd = bpf_stats_on()
    if fd is None:
        return {"error": "BPF_ENABLE_STATS refused"}
    out = {}
    try:
        for config, bed in beds.items():
            try:
                prog = from_pod_prog(bed)
                ns0, n0 = prog_stats(prog)
                res = rr_run(bed, rr, "crr", seconds, False)
                ns1, n1 = prog_stats(prog)
            except (BenchError, ValueError, KeyError) as err:
                out[config] = {"error": str(err)}
                continue
            runs = n1 - n0
            conns = res["rate"] * seconds
            out[config] = {"ns_per_run": round((ns1 - ns0) / runs, 1) if runs else None,
                           "runs_per_connection": round(runs / conns, 2) if conns else None,
                           "prog_id": prog}
    finally:
        os.close(fd)
    log("cil_from_pod per run during TCP_CRR: " + ", ".join(
        f"{c} {v.get('ns_per_run')} ns" for c, v in out.items()))
    return out


def round_ratios(samples: dict, a: str, b: str, test: str) -> list[float]:
    return [x / y for x, y in zip(samples[a][test], samples[b][test], strict=True)
            if x is not None and y]


def create_bulk(bed: Bed, n: int, threads: int = 8) -> float:
    """n Services without selectors, each with an EndpointSlice of 2 backends (be1, be2),
    through the API from a thread pool; returns the seconds it took."""
    be = [(bed.pods["be1"].ip, "node1"), (bed.pods["be2"].ip, "node2")]
    ports = [("rr", RR_PORT, "TCP")]
    bed.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": BULK_NS}})

    def one(i: int) -> None:
        name = f"s{i}"
        bed.api.create(service(name, BULK_NS, [("rr", 80, RR_PORT, "TCP")]))
        bed.api.create(endpoint_slice(name, BULK_NS, name, be, ports))

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(n)))
    return time.monotonic() - t0


def wait_programmed(bed: Bed, prefix: str, n: int, since: float, timeout: float) -> float:
    """Seconds from `since` until both nodes' datapaths hold n ClusterIP ports of the
    Services whose NAMESPACE/NAME starts with prefix."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        got = bed.programmed(prefix)
        if got >= n:
            return time.monotonic() - since
        if time.monotonic() > deadline:
            raise BenchError(f"{bed.config}: {got} of {n} Services in the datapath after "
                             f"{timeout:.0f} s")
        if got != last:
            log(f"{bed.config}: {got}/{n} Services in the datapath")
            last = got
        time.sleep(1)


PROBER = r"""
import socket, sys, time
ip, port, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = sys.stdout
while True:
    t = time.monotonic()
    try:
        s = socket.create_connection((ip, port), timeout=0.5)
        s.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        name = data.split(b"\r\n\r\n", 1)[1].decode().strip() or "-"
    except OSError as err:
        name = "!" + type(err).__name__
    out.write(f"{t:.6f} {time.monotonic():.6f} {name}\n")
    out.flush()
    time.sleep(gap)
"""


class Prober:
    """A new HTTP connection to flip's ClusterIP every few ms from `client`, asking which
    backend answers; the answers, with their start and end times, collected live."""

    def __init__(self, bed: Bed):
        argv = bed.pod_argv("client", [sys.executable, "-c", PROBER, bed.cluster_ips["flip"],
                                       "80", "0.002"])
        self.proc = bed.spawn(argv, stdout=subprocess.PIPE, text=True)
        self.probes: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            start, end, name = line.split(" ", 2)
            with self.lock:
                self.probes.append((float(start), float(end), name.strip()))

    def since(self, t: float) -> list[tuple[float, float, str]]:
        with self.lock:
            return [p for p in self.probes if p[0] >= t]

    def stop(self) -> None:
        benchkit.stop(self.proc)


def switch_latency(probes: list[tuple[float, float, str]], t0: float, new: str,
                   stable: int) -> float | None:
    """From t0 to the end of the first probe that reached `new` after which every probe
    did (at least `stable` of them), or None while that is not yet so."""
    last_other = -1
    for i, (_, _, name) in enumerate(probes):
        if name != new:
            last_other = i
    if len(probes) - (last_other + 1) < stable:
        return None
    return probes[last_other + 1][1] - t0


def measure_latency(bed: Bed, samples: int, label: str) -> dict:
    """EndpointSlice change to traffic: flip's one backend moved be1 -> be2 -> be1 ..."""
    prober = Prober(bed)
    backends = {"be1": (bed.pods["be1"].ip, "node1"), "be2": (bed.pods["be2"].ip, "node2")}
    try:
        t0 = time.monotonic()
        bed.api.patch("EndpointSlice", NS, "flip-1", {"endpoints": endpoints([backends["be1"]])})
        while switch_latency(prober.since(t0), t0, "be1", stable=20) is None:
            if time.monotonic() > t0 + 30 or prober.proc.poll() is not None:
                raise BenchError(f"{bed.config}: the prober does not reach flip's backend be1: "
                                 f"{prober.since(t0)[-3:]}")
            time.sleep(0.1)
        current = "be1"
        lat, api_ms, failed, probes_per_s = [], [], 0, []
        for _ in range(samples):
            time.sleep(random.uniform(1.1, 1.6))  # past kube-proxy's minSyncPeriod (1 s)
            new = "be2" if current == "be1" else "be1"
            t0 = time.monotonic()
            bed.api.patch("EndpointSlice", NS, "flip-1", {"endpoints": endpoints(
                [backends[new]])})
            api_ms.append((time.monotonic() - t0) * 1000)
            deadline = t0 + 15
            while True:
                got = prober.since(t0)
                took = switch_latency(got, t0, new, stable=10)
                if took is not None:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{bed.config}: traffic did not follow flip's "
                                     f"EndpointSlice to {new} within 15 s: {got[-3:]}")
                time.sleep(0.02)
            lat.append(took * 1000)
            failed += sum(1 for p in got if p[2].startswith("!"))
            span = got[-1][1] - got[0][0] if len(got) > 1 else 0
            probes_per_s.append(len(got) / span if span else 0)
            current = new
        log(f"{label} {bed.config}: EndpointSlice -> traffic p50 {pct(lat, 50):.0f} ms, "
            f"p99 {pct(lat, 99):.0f} ms ({samples} samples)")
        return {"samples_ms": [round(x, 1) for x in lat], "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99), "max_ms": max(lat),
                "api_patch_p50_ms": pct(api_ms, 50), "failed_probes": failed,
                "probes_per_s": round(statistics.median(probes_per_s))}
    finally:
        prober.stop()
        bed.procs.remove(prober.proc)


def udp_run(bed: Bed, blast: Path, node_port: int, seconds: float) -> dict:
    """64-byte frames to node1's NodePort from the outside netns, from CPU 0; what the
    backend's UDP layer received (read by the sink or dropped at its full buffer)."""
    client_cpu, _ = cpus()
    state = bed.cluster.load()
    sink = bed.servers["be1-udp"].pid
    before = snmp(sink)
    argv = benchkit.nsenter(state.outside_netns, [
        *pinned(client_cpu), str(blast), "send", bed.node("node1").ip, str(node_port),
        str(seconds), str(UDP_PAYLOAD)])
    out = json.loads(sh(argv, timeout=seconds + 30))
    time.sleep(0.2)  # the last packets still in queues
    after = snmp(sink)
    received = (after["Udp.InDatagrams"] - before["Udp.InDatagrams"]
                + after["Udp.InErrors"] - before["Udp.InErrors"])
    return {"pps": received / out["seconds"], "sent_pps": out["sent"] / out["seconds"],
            "read_pps": (after["Udp.InDatagrams"] - before["Udp.InDatagrams"])
            / out["seconds"]}


def measure_nodeport(beds: dict[str, Bed], blast: Path, args) -> dict:
    order = list(beds)
    res = {c: {"cluster": [], "local": []} for c in beds}
    raw = {c: {"cluster": [], "local": []} for c in beds}
    for rnd in range(args.udp_rounds):
        settle(args)
        for policy, port in (("cluster", NODE_PORT), ("local", NODE_PORT + 1)):
            for config in order:
                r = udp_run(beds[config], blast, port, args.udp_duration)
                res[config][policy].append(r["pps"])
                raw[config][policy].append(r)
        log(f"NodePort UDP: round {rnd + 1}/{args.udp_rounds}: " + "; ".join(
            f"{c} {res[c]['cluster'][-1] / 1e3:,.0f}k/{res[c]['local'][-1] / 1e3:,.0f}k pps"
            for c in order))
        order = order[1:] + order[:1]
    return {"samples": res, "runs": raw,
            "median": {c: {k: median(v) for k, v in d.items()} for c, d in res.items()}}


# ---- report ---------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit == "ms":
        return f"{v:.0f}"
    return f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def verdict(value: float | None, bound: float, below: bool = False) -> str:
    if value is None:
        return "n/a"
    ok = value < bound if below else value >= bound
    return "PASS" if ok else "MISS"


def phase_rows(phase: dict, configs: list[str], title: str) -> list[list[str]]:
    med, ratios = phase["median"], phase["ratios"]
    rows = [[title, *[""] * (len(CONFIGS) + len(BASELINES))]]

    def row(label: str, key: str, unit: str, ratio_key: str | None) -> list[str]:
        vals = [fmt(med[c].get(key), unit) if c in med else "n/a" for c in CONFIGS]
        r = ratios.get(ratio_key or key, {})
        return [label, *vals, *(fmt_ratio(r.get(f"cilia/{b}")) for b in BASELINES)]

    for test, (label, unit) in TESTS.items():
        rows.append(row(f"  {label} ({unit})", test, unit, None))
        if test == "tcp_rr":
            rows.append(row("    local backend", "rr_local", unit, "rr_local"))
            rows.append(row("    remote backend", "rr_remote", unit, "rr_remote"))
        if test == "tcp_rr_spin":
            rows.append(row("    local backend", "rr_spin_local", unit, "rr_spin_local"))
            rows.append(row("    remote backend", "rr_spin_remote", unit, "rr_spin_remote"))
    return rows


def report(results: dict) -> str:
    cfg = results["config"]
    n = cfg["services"]
    configs = [c for c in CONFIGS if c in results["clusters"]]
    rows = [["", *CONFIGS, *(f"cilia/{b}" for b in BASELINES)]]
    rows += phase_rows(results["one"], configs, "1 Service")
    if "many" in results:
        rows += phase_rows(results["many"], configs, f"{n:,} Services")
    lines = table(rows)
    lines.append("ratios: median of the per-round ratios; 'n/a': not measured (see notes)")

    lines.append("cilia-ref: a second cilia cluster that keeps 1 Service throughout; "
                 "cilia/cilia-ref is the control with 1 Service in both, and cilia(N)/"
                 "cilia(1) with N")
    if "many" in results:
        if "scale" in results:
            lines += ["", f"cilia({n:,}) / cilia(1), in the same rounds (cilia against "
                      "cilia-ref; in brackets the control, both at 1 Service):"]
            lines.append("  " + "  ".join(
                f"{TESTS[t][0]} {fmt_ratio(results['scale'][t])} "
                f"({fmt_ratio(results['scale_control'][t])})" for t in TESTS))
        lines += ["", f"each cluster with {n:,} Services against itself with 1 (ratio of "
                  "the medians of two phases minutes apart: the machine's drift is in it):"]
        for c in configs:
            one, many = results["one"]["median"][c], results["many"]["median"][c]
            lines.append(f"  {c:<9} " + "  ".join(
                f"{TESTS[t][0]} {fmt_ratio(many[t] / one[t] if many[t] and one[t] else None)}"
                for t in TESTS))
        p = results["programming"]
        lines += ["", f"programming {n:,} Services (+{n:,} EndpointSlices) through the API "
                  "server (8 threads), one cluster at a time:"]
        for c, x in p.items():
            lines.append(f"  {c:<9} created in {x['create_s']:.0f} s; all in both nodes' "
                         f"datapaths {x['programmed_s']:.0f} s after the first create, "
                         f"{x['programmed_s'] - x['create_s']:.0f} s after the last; "
                         f"{'agents' if c == 'cilia' else 'kube-proxy'} used "
                         f"{x['daemon_cpu_s']:.0f} CPU-s meanwhile")

    for phase in ("one", "many"):
        bpf = results.get(phase, {}).get("bpf")
        if not bpf:
            continue
        title = "1 Service" if phase == "one" else f"{n:,} Services"
        lines += ["", f"cil_from_pod on node1 during one TCP_CRR run ({title}; the kernel's "
                  "run-time statistics of the one program on every pod's veth: the client's "
                  "packets and be1's replies; ns per run x runs per connection):"]
        lines.append("  " + "  ".join(
            f"{c} {v['ns_per_run']} ns x {v['runs_per_connection']}" if "error" not in v
            else f"{c} n/a ({v['error'][:60]})" for c, v in bpf.items()))

    for key, title in (("latency_one", "1 Service"), ("latency_many", f"{n:,} Services")):
        if key not in results:
            continue
        lat = results[key]
        lines += ["", f"EndpointSlice change -> traffic follows ({title} present; "
                  f"{cfg['latency_samples']} samples, PATCH sent to the new backend "
                  "answering and the old one never again):"]
        for c, x in lat.items():
            lines.append(f"  {c:<9} p50 {x['p50_ms']:.0f} ms, p99 {x['p99_ms']:.0f} ms, max "
                         f"{x['max_ms']:.0f} ms (API PATCH p50 {x['api_patch_p50_ms']:.0f} ms; "
                         f"{x['probes_per_s']} probes/s, {x['failed_probes']} failed)")

    if "nodeport" in results:
        npr = results["nodeport"]["median"]
        lines += ["", f"NodePort from outside, UDP, 64-byte frames, one core sending "
                  f"(CPU {cfg['cpus'][0]}), packets/s into the backend's socket "
                  f"(median of {cfg['udp_rounds']} rounds):"]
        for pol, label in (("cluster", "externalTrafficPolicy: Cluster"),
                           ("local", "externalTrafficPolicy: Local")):
            base = npr.get("iptables", {}).get(pol)
            lines.append(f"  {label:<31} " + "  ".join(
                f"{c} {fmt(npr[c][pol])}" for c in npr)
                + f"   cilia/iptables {fmt_ratio(npr['cilia'][pol] / base if base else None)}")

    lines += ["", "checks:"]
    for phase in ("one", "many"):
        if phase not in results:
            continue
        ph = results[phase]
        lines.append(f"  {'1 Service' if phase == 'one' else f'{n:,} Services'}: "
                     "lb_translated on node1 during the runs: " + ", ".join(
                         f"{c} {ph['lb_translated'][c]:,}" for c in configs)
                     + " (cilia clusters only); Service daemon CPU (agents for cilia, kube-proxy "
                     "else): " + ", ".join(f"{c} {ph['daemon_cpu_percent'][c]}%"
                                           for c in configs)
                     + "; TCP_CRR share to the local backend: " + ", ".join(
                         f"{c} {fmt_ratio(ph['median'][c]['crr_local_share'])[:-1]}"
                         for c in configs))

    lines += ["", "targets (issue 12):"]
    for phase, test, a, b, bound in TARGETS:
        key = "one" if phase == "1 Service" else "many"
        label = phase if key == "one" else f"{n:,} Services"
        r = results.get(key, {}).get("ratios", {}).get(test, {}).get(f"{a}/{b}")
        lines.append(f"  {label:<14} {TESTS[test][0]:<8} {a}/{b} >= {bound}: "
                     f"{fmt_ratio(r)} {verdict(r, bound)}")
    if "many" in results:
        s = results.get("scale", {}).get("tcp_crr")
        lines.append(f"  {f'{n:,} Services':<14} TCP_CRR  cilia({n})/cilia(1) >= {SCALE_TARGET}:"
                     f" {fmt_ratio(s)} {verdict(s, SCALE_TARGET)}")
    lat = results.get("latency_one", {}).get("cilia")
    p99 = lat["p99_ms"] if lat else None
    lines.append(f"  EndpointSlice change -> traffic, cilia, p99 < {LATENCY_TARGET_MS} ms: "
                 + (f"{p99:.1f} ms " if p99 is not None else "n/a ")
                 + verdict(p99, LATENCY_TARGET_MS, below=True))
    if n != 5000:
        lines.append(f"  (measured with {n:,} Services, not the issue's 5,000)")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")

    m = results["machine"]
    lines += [
        "",
        f"machine: kernel {m['kernel']}, {m['cpus']} CPUs; {m['busy_before']:.0%} busy just "
        f"before the run, load average (1 min) {m['loadavg_before'][0]:.2f} before and "
        f"{m['loadavg_after'][0]:.2f} after (this run's four clusters add to it); run "
        f"took {results['runtime_seconds']:.0f} s"
        + ("\n  WARNING: other work was running on the machine: the figures are noisy"
           if m["busy_before"] > 0.1 else ""),
        "busy share of the machine just before each round: " + "; ".join(
            f"{ph} " + " ".join(f"{b:.0%}" for b in results[ph]["busy_before_round"])
            for ph in ("one", "many") if ph in results),
        f"traffic: {cfg['rounds']} rounds; rr runs of {cfg['rr_duration']} s, client on CPU "
        f"{cfg['cpus'][0]}, servers on CPU {cfg['cpus'][1]}, at nice {cfg['nice']} (busy-poll "
        "at 0); TCP_RR = mean of a run to the local and one to the remote backend",
        "", "per round (in run order):",
    ]
    for phase in ("one", "many"):
        if phase not in results:
            continue
        for test in TESTS:
            per = results[phase]["samples"]
            lines.append(f"  {phase:<4} {TESTS[test][0]:<17} " + "  ".join(
                f"{c} " + "/".join(f"{x / 1000:.1f}" if x else "-" for x in per[c][test])
                + "k" for c in configs))
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------


def phase_summary(res: dict) -> dict:
    res["ratios"] = {}
    keys = list(TESTS) + ["rr_local", "rr_remote", "rr_spin_local", "rr_spin_remote"]
    for key in keys:
        res["ratios"][key] = {}
        for b in BASELINES:
            if b not in res["samples"]:
                continue
            if key in TESTS:
                rs = round_ratios(res["samples"], "cilia", b, key)
            else:
                rs = [x / y for x, y in zip(res["detail"]["cilia"][key],
                                            res["detail"][b][key], strict=True) if x and y]
            res["ratios"][key][f"cilia/{b}"] = median(rs)
    return res


def run(args, beds: dict[str, Bed], results: dict) -> None:
    rr, blast = build()
    results["clusters"] = {}
    for config, bed in beds.items():
        log(f"cluster {bed.cluster.name} ({config}): up")
        try:
            took = bed.up()
        except Exception as err:
            if config == "nftables":  # the baseline may not run here: say why, go on
                results["notes"].append(f"nftables column n/a: kube-proxy in nftables mode "
                                        f"did not come up here: {str(err)[:400]}")
                log(results["notes"][-1])
                bed.cluster.down()
                continue
            raise
        results["clusters"][config] = {"name": bed.cluster.name, "up_s": round(took, 1)}
        log(f"cluster {bed.cluster.name} ({config}): up in {took:.0f} s")
    beds = {c: b for c, b in beds.items() if c in results["clusters"]}
    for bed in beds.values():
        bed.create_pods()
    for bed in beds.values():
        bed.wait_pods()
        bed.create_services()
    for bed in beds.values():
        bed.start_servers(rr, blast)
        wait_programmed(bed, f"{NS}/rr", 2, time.monotonic(), 60)
    results["config"]["pods"] = {c: {p: b.pods[p].ip for p in b.pods} for c, b in beds.items()}

    main = {c: b for c, b in beds.items() if c != "cilia-ref"}  # the twin only in rounds

    log("phase 1: 1 Service")
    results["one"] = phase_summary(measure_rr(beds, rr, args, "1 Service"))
    results["one"]["bpf"] = bpf_cost(beds, rr, args.rr_duration)
    results["latency_one"] = {c: measure_latency(b, args.latency_samples, "1 Service")
                              for c, b in main.items()}
    if not args.skip_nodeport:
        results["nodeport"] = measure_nodeport(main, blast, args)

    if args.services:
        n = args.services
        log(f"creating {n:,} Services with 2 backends each in every cluster")
        results["programming"] = {}
        for config, bed in main.items():  # one cluster at a time: each has the machine
            t0, cpu0 = time.monotonic(), bed.daemon_cpu()
            created = create_bulk(bed, n)
            log(f"{config}: {n:,} Services and EndpointSlices created in {created:.0f} s")
            took = wait_programmed(bed, f"{BULK_NS}/", n, t0, 900)
            results["programming"][config] = {
                "create_s": round(created, 1), "programmed_s": round(took, 1),
                "daemon_cpu_s": round(bed.daemon_cpu() - cpu0, 1)}
            log(f"{config}: all {n:,} in both nodes' datapaths {took:.0f} s after the first "
                "create")
        time.sleep(5)  # let the daemons settle after the burst
        log(f"phase 2: {n:,} Services")
        results["many"] = phase_summary(measure_rr(beds, rr, args, f"{n:,} Services"))
        results["many"]["bpf"] = bpf_cost(beds, rr, args.rr_duration)
        # cilia(N)/cilia(1): the cilia cluster (N) against its twin (1), in the same
        # rounds; with 1 Service each (phase 1) the same ratio is the control
        if "cilia-ref" in beds:
            results["scale"] = {t: results["many"]["ratios"][t]["cilia/cilia-ref"]
                                for t in TESTS}
            results["scale_control"] = {t: results["one"]["ratios"][t]["cilia/cilia-ref"]
                                        for t in TESTS}
        results["latency_many"] = {c: measure_latency(b, args.latency_samples,
                                                       f"{n:,} Services")
                                   for c, b in main.items()}


def cleanup_stale() -> None:
    """Removes the clusters of runs that no longer exist (killed with -9)."""
    for d in benchkit.stale_runs(TMP_PREFIX)[1]:
        for name in (d / "clusters").read_text().split() if (d / "clusters").exists() else []:
            Cluster(name).down()
            print(f"removed cluster {name}")
        shutil.rmtree(d, ignore_errors=True)
        print(f"removed {d}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round, 500 Services, 5 latency samples")
    p.add_argument("--json", type=Path, help="write all results (and samples) here")
    p.add_argument("--rounds", type=int, help="rounds of the TCP tests (default 5, quick 1)")
    p.add_argument("--rr-duration", type=float, help="seconds per rr run (default 2, quick 1)")
    p.add_argument("--services", type=int,
                   help="Services for phase 2 (default 5000, quick 500; 0 skips it)")
    p.add_argument("--latency-samples", type=int,
                   help="EndpointSlice changes per cluster (default 25, quick 5)")
    p.add_argument("--udp-rounds", type=int, help="NodePort rounds (default 3, quick 1)")
    p.add_argument("--udp-duration", type=float,
                   help="seconds per NodePort run (default 3, quick 2)")
    p.add_argument("--skip-nodeport", action="store_true", help="no NodePort test")
    p.add_argument("--nice", type=int, default=-20,
                   help="nice value of the traffic processes (rr, the UDP sender and sink) "
                   "in every configuration (default -20: other work on the machine then "
                   "interleaves with them less; 0 for none)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each round, wait up to SECONDS for the machine to be less "
                   "busy than --idle-below (other work skews every figure)")
    p.add_argument("--idle-below", type=float, default=0.3, metavar="SHARE",
                   help="with --wait-idle: busy share of all CPUs to wait for (default "
                   "0.3; this run's own idle clusters use some)")
    p.add_argument("--cleanup-stale", action="store_true",
                   help="remove the clusters of killed runs, then exit")
    args = p.parse_args()
    q = args.quick
    for name, default, quick in (("rounds", 5, 1), ("rr_duration", 2, 1),
                                 ("services", 5000, 500), ("latency_samples", 25, 5),
                                 ("udp_rounds", 3, 1), ("udp_duration", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else default)

    NICE[0] = args.nice
    if os.geteuid() != 0:
        print("run as root: the benchmark makes clusters (namespaces, cgroups, containerd)",
              file=sys.stderr)
        return 2
    if args.cleanup_stale:
        cleanup_stale()
        return 0
    for tool in benchkit.missing_tools(["gcc", "clang", "taskset", "nsenter", "containerd",
                                        "nft"]):
        print(f"{tool} not found (scripts/setup.sh; apt-get install gcc clang util-linux "
              "nftables)", file=sys.stderr)
        return 2

    run_ = benchkit.Run(TMP_PREFIX)  # the temp dir, holding the pid and the clusters
    beds = {c: Bed(c, Cluster(f"{CLUSTER_PREFIX}{run_.suffix}{CLUSTER_SUFFIX[c]}"))
            for c in CONFIGS}
    (run_.tmp / "clusters").write_text("\n".join(b.cluster.name for b in beds.values())
                                       + "\n")
    results: dict = {
        "machine": benchkit.machine() | {
            "nft": sh(["nft", "--version"], check=False).strip(),
            "kubernetes": upstream.pins()["KUBERNETES_VERSION"]},
        "config": {"quick": q, "rounds": args.rounds, "rr_duration": args.rr_duration,
                   "services": args.services, "latency_samples": args.latency_samples,
                   "udp_rounds": args.udp_rounds, "udp_duration": args.udp_duration,
                   "cpus": cpus(), "udp_payload": UDP_PAYLOAD, "nice": args.nice},
        "notes": [],
    }

    def body() -> None:
        t0 = time.monotonic()
        results["machine"]["loadavg_before"] = os.getloadavg()
        results["machine"]["busy_before"] = round(benchkit.machine_busy(), 3)
        run(args, beds, results)
        results["runtime_seconds"] = round(time.monotonic() - t0, 1)
        results["machine"]["loadavg_after"] = os.getloadavg()
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"\nresults written to {args.json}")

    def on_error(err: Exception) -> None:
        log(f"error: {err}")
        if not isinstance(err, BenchError | ClusterError):
            traceback.print_exc()
        if args.json:  # what was measured before the failure
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")

    def cleanup(status: int) -> list[str]:
        problems = []
        for bed in beds.values():
            bed.stop_procs()  # they hold the pods' namespaces
        for bed in beds.values():
            for attempt in (1, 2):  # a cgroup the kubelet removes meanwhile: once more
                try:
                    bed.cluster.down()
                    break
                except Exception as err:  # the others still go
                    if attempt == 2:
                        problems.append(f"cluster {bed.cluster.name}: {err}")
                    else:
                        log(f"cleanup: cluster {bed.cluster.name} (attempt {attempt}): {err}")
            # A bring-up that failed leaves its logs beside the clusters (Cluster.up):
            # kept when it failed on its own, for the person to read; not when stopped.
            failed_logs = CLUSTERS_DIR / f".{bed.cluster.name}-failed-logs"
            if failed_logs.exists():
                if status == 130:
                    shutil.rmtree(failed_logs, ignore_errors=True)
                else:
                    log(f"the failed bring-up's logs: {failed_logs}")
        return problems + run_.close()

    return benchkit.guarded(body, cleanup, on_error)

if __name__ == "__main__":
    sys.exit(main())
