#!/usr/bin/env python3
"""CNI plugin start-up and ADD latency: the standalone cilia-cni (PyInstaller, one-folder,
what the chart installs on nodes) against the in-venv plugin and the reference bridge
plugin, in one run, on this machine.

    python bench/run_cni_binary.py [--runs 60] [--pods 40] [--binary PATH] [--json FILE]

- start-up: VERSION, from exec to exit (no agent involved: the interpreter or bootloader,
  imports, one JSON answer).
- ADD: a real ADD into a fresh network namespace, from exec to exit. Both cilia plugins
  talk to the same real agent (a one-node `cilia lab`); bridge (with host-local IPAM)
  builds its bridge and veth in a node namespace of its own.
- DEL of every pod afterwards, timed too.
- direct: the same ADD and DEL sent to the agent over one open gRPC channel, with no
  plugin process, so the difference is what the plugin process itself costs.

The three plugins take turns in a rotating order, so a burst of load on the machine hits
them alike. Figures are p50 and p99 (nearest rank) in milliseconds, with ratios. The
standalone build is packaging/cni/build.sh's (into build/cni, unless --binary is given).
Everything the run makes (lab, namespaces, temp dir) is removed at the end, on errors and
Ctrl-C too. Needs root, the BPF objects (make -C bpf), pyinstaller, and Debian's
containernetworking-plugins (/usr/lib/cni/bridge, host-local).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchkit  # first: re-runs this script under the project's venv if need be
from benchkit import CNI_BIN, REPO, VENV_BIN, BenchError, log, pct

PREFIX = "cbin-"


class Plugin:
    """One plugin binary and its network config; `netns` is where it runs (None: here)."""

    def __init__(self, name: str, exe: Path, config: dict, netns: str | None = None):
        self.name, self.exe, self.config, self.netns = name, exe, config, netns
        self.pods: list[tuple[str, str]] = []  # (container id, netns) ADDed

    def invoke(self, command: str, container_id: str = "", netns: str = "") -> float:
        # Only PATH of this process's environment: what a plugin needs and no more.
        env = benchkit.cni_env(command, container_id, netns, f"p{container_id[:8]}",
                               {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        elapsed, _ = benchkit.run_plugin(self.exe, self.config, env, self.netns,
                                         f"{self.name} {command}")
        return elapsed


class DirectAgent(Plugin):
    """No plugin process at all: the same ADD/DEL sent to the agent over one long-lived
    gRPC channel, so `ADD - direct` is what a plugin process adds to the agent's work."""

    def __init__(self, config: dict):
        super().__init__("direct", Path("-"), config)
        self.direct = benchkit.DirectCNI(config["socket"], config)

    def invoke(self, command: str, container_id: str = "", netns: str = "") -> float:
        return self.direct.call(command, container_id, netns, f"p{container_id[:8]}")


class Run(benchkit.Run):
    """Everything one run makes, and its removal: the plugins' pods are DELeted first."""

    def __init__(self):
        super().__init__(PREFIX)
        self.plugins: list[Plugin] = []
        self.finalizers.append(self.delete_pods)

    def delete_pods(self) -> None:
        for plugin in self.plugins:
            for cid, ns in reversed(plugin.pods):
                try:
                    plugin.invoke("DEL", cid, ns)
                except Exception as err:  # noqa: BLE001 - best effort, reported
                    log(f"cleanup: {err}")
            if isinstance(plugin, DirectAgent):
                plugin.direct.close()


def build_standalone() -> Path:
    log("building the standalone plugin (packaging/cni/build.sh)")
    res = subprocess.run(["bash", str(REPO / "packaging" / "cni" / "build.sh"),
                          str(REPO / "build" / "cni")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    if res.returncode != 0:
        raise BenchError(f"build.sh failed:\n{res.stdout[-1500:]}{res.stderr[-2500:]}")
    return REPO / "build" / "cni" / "dist" / "cilia-cni" / "cilia-cni"


def measure(run: Run, runs: int, pods: int) -> dict:
    execs = [p for p in run.plugins if not isinstance(p, DirectAgent)]
    startup: dict[str, list[float]] = {p.name: [] for p in execs}
    add: dict[str, list[float]] = {p.name: [] for p in run.plugins}
    dele: dict[str, list[float]] = {p.name: [] for p in run.plugins}
    for p in execs:  # warm the page cache: the first exec of each reads from disk
        p.invoke("VERSION")
    log(f"start-up: VERSION x {runs} each")
    for i in range(runs):
        for p in benchkit.rotate(execs, i):
            startup[p.name].append(p.invoke("VERSION"))
    log(f"ADD: {pods} pods each")
    for i in range(pods):
        for p in benchkit.rotate(run.plugins, i):
            cid = secrets.token_hex(32)
            ns = run.add_netns(f"{p.name[:6]}-{i}")
            p.pods.append((cid, ns))
            add[p.name].append(p.invoke("ADD", cid, ns))
    log("DEL of every pod")
    for i in range(pods):
        for p in benchkit.rotate(run.plugins, i):
            cid, ns = p.pods[0]
            dele[p.name].append(p.invoke("DEL", cid, ns))
            p.pods.pop(0)

    def summary(samples: dict[str, list[float]]) -> dict:
        return {name: {"p50_ms": statistics.median(v) * 1000, "p99_ms": pct(v, 99) * 1000,
                       "n": len(v)} for name, v in samples.items()}

    return {"startup": summary(startup), "add": summary(add), "del": summary(dele)}


def report(res: dict) -> str:
    names = ["standalone", "venv", "bridge", "direct"]
    labels = {"startup": "VERSION", "add": "ADD", "del": "DEL"}
    lines = ["", f"{'':<18}" + "".join(f"{n:>13}" for n in names)]
    for test in ("startup", "add", "del"):
        for q in ("p50_ms", "p99_ms"):
            cells = [f"{res[test][n][q]:>13.1f}" if n in res[test] else f"{'-':>13}"
                     for n in names]
            lines.append(f"{labels[test] + ' ' + q[:3] + ' (ms)':<18}" + "".join(cells))
    lines += ["", f"{'ratios of p50':<18}{'standalone/venv':>17}{'standalone/bridge':>19}"
              f"{'venv/bridge':>13}"]
    for test in ("startup", "add", "del"):
        s, v, b = (res[test][n]["p50_ms"] for n in ("standalone", "venv", "bridge"))
        lines.append(f"{labels[test]:<18}{s / v:>17.2f}{s / b:>19.2f}{v / b:>13.2f}")
    lines.append("")
    for test in ("add", "del"):
        d = res[test]["direct"]["p50_ms"]
        lines.append(f"{labels[test]}: the agent's own work (direct gRPC) {d:.1f} ms p50; "
                     f"the plugin process adds {res[test]['standalone']['p50_ms'] - d:.1f} "
                     f"(standalone) / {res[test]['venv']['p50_ms'] - d:.1f} (venv) ms")
    lines.append(f"samples: VERSION {res['startup']['standalone']['n']} per plugin, "
                 f"ADD/DEL {res['add']['standalone']['n']} per plugin; "
                 f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=60, help="VERSION runs per plugin")
    p.add_argument("--pods", type=int, default=40, help="ADDs per plugin")
    p.add_argument("--binary", type=Path, help="a standalone cilia-cni already built")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark creates network namespaces", file=sys.stderr)
        return 2
    for exe in (CNI_BIN / "bridge", CNI_BIN / "host-local"):
        if not exe.exists():
            print(f"{exe} missing: apt-get install containernetworking-plugins",
                  file=sys.stderr)
            return 2

    run = Run()

    def body() -> None:
        standalone = args.binary or build_standalone()
        lab = run.lab("lab")
        log(f"lab {lab.name}: one node with a real agent")
        node = lab.load().nodes[0]
        cilia_conf = {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
                      "socket": node.socket}
        bridge_node = run.add_netns("bridge-node")
        bridge_conf = {
            "cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cbr0",
            "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.203.0.0/16"}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(run.tmp / "ipam")},
        }
        run.plugins = [
            Plugin("standalone", standalone, cilia_conf),
            Plugin("venv", VENV_BIN / "cilia-cni", cilia_conf),
            Plugin("bridge", CNI_BIN / "bridge", bridge_conf, netns=bridge_node),
            DirectAgent(cilia_conf),
        ]
        t0 = time.monotonic()
        res = measure(run, args.runs, args.pods)
        res["seconds"] = round(time.monotonic() - t0, 1)
        print(report(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")

    return benchkit.guarded(body, lambda _status: run.close())

if __name__ == "__main__":
    sys.exit(main())
