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
import ctypes
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
CNI_BIN = Path("/usr/lib/cni")
PREFIX = "cbin-"

try:  # re-run under the project's venv if started with another interpreter
    import cilia  # noqa: F401
except ImportError:
    if (VENV_BIN / "python").exists() and Path(sys.executable) != VENV_BIN / "python":
        os.execv(str(VENV_BIN / "python"), [str(VENV_BIN / "python"), *sys.argv])
    raise

from cilia.lab.lab import Lab  # noqa: E402

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


@contextmanager
def in_netns(path: str):
    """This thread (and what it starts) in the netns at `path`, then back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def sh(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {res.stderr.strip()}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


class Plugin:
    """One plugin binary and its network config; `netns` is where it runs (None: here)."""

    def __init__(self, name: str, exe: Path, config: dict, netns: str | None = None):
        self.name, self.exe, self.config, self.netns = name, exe, config, netns
        self.pods: list[tuple[str, str]] = []  # (container id, netns path) ADDed

    def invoke(self, command: str, container_id: str = "", netns: str = "") -> float:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
            "CNI_PATH": str(CNI_BIN),
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
                        f"K8S_POD_NAME=p{container_id[:8]}",
        }
        stdin = json.dumps(self.config).encode()
        ctx = in_netns(self.netns) if self.netns else _nothing()
        with ctx:
            t0 = time.perf_counter()
            res = subprocess.run([str(self.exe)], input=stdin, env=env, capture_output=True,
                                 timeout=120)
            elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise BenchError(f"{self.name} {command}: {res.stdout.decode().strip()} "
                             f"{res.stderr.decode().strip()[-500:]}")
        return elapsed


@contextmanager
def _nothing():
    yield


class DirectAgent(Plugin):
    """No plugin process at all: the same ADD/DEL sent to the agent over one long-lived
    gRPC channel, so `ADD - direct` is what a plugin process adds to the agent's work."""

    def __init__(self, config: dict):
        import grpc

        from cilia.api.v1 import cilia_pb2, cilia_pb2_grpc

        super().__init__("direct", Path("-"), config)
        self.pb = cilia_pb2
        self.channel = grpc.insecure_channel(f"unix:{config['socket']}")
        self.stub = cilia_pb2_grpc.CNIStub(self.channel)
        self.stub.Status(cilia_pb2.StatusRequest(), timeout=10)  # connected before timing

    def invoke(self, command: str, container_id: str = "", netns: str = "") -> float:
        args = self.pb.CNIArgs(
            container_id=container_id, netns=netns, ifname="eth0", network_name="cilia",
            cni_version="1.1.0", pod_namespace="default", pod_name=f"p{container_id[:8]}",
            config=json.dumps(self.config).encode())
        method = {"ADD": self.stub.Add, "DEL": self.stub.Del}[command]
        t0 = time.perf_counter()
        resp = method(args, timeout=60)
        elapsed = time.perf_counter() - t0
        if resp.HasField("error"):
            raise BenchError(f"direct {command}: {resp.error.msg}")
        return elapsed


class Run:
    """Everything one run makes, and its removal."""

    def __init__(self):
        self.suffix = secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.suffix}-"))
        self.netns: list[str] = []
        self.lab: Lab | None = None
        self.plugins: list[Plugin] = []

    def add_netns(self, what: str) -> str:
        name = f"{PREFIX}{self.suffix}-{what}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        return f"/run/netns/{name}"

    def close(self) -> None:
        for plugin in self.plugins:
            for cid, ns in reversed(plugin.pods):
                try:
                    plugin.invoke("DEL", cid, ns)
                except Exception as err:  # noqa: BLE001 - best effort, reported
                    log(f"cleanup: {err}")
        for name in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if self.lab is not None:
            self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_standalone() -> Path:
    log("building the standalone plugin (packaging/cni/build.sh)")
    res = subprocess.run(["bash", str(REPO / "packaging" / "cni" / "build.sh"),
                          str(REPO / "build" / "cni")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    if res.returncode != 0:
        raise BenchError(f"build.sh failed:\n{res.stdout[-1500:]}{res.stderr[-2500:]}")
    return REPO / "build" / "cni" / "dist" / "cilia-cni" / "cilia-cni"


def rotate(items: list, i: int) -> list:
    k = i % len(items)
    return items[k:] + items[:k]


def measure(run: Run, runs: int, pods: int) -> dict:
    execs = [p for p in run.plugins if not isinstance(p, DirectAgent)]
    startup: dict[str, list[float]] = {p.name: [] for p in execs}
    add: dict[str, list[float]] = {p.name: [] for p in run.plugins}
    dele: dict[str, list[float]] = {p.name: [] for p in run.plugins}
    for p in execs:  # warm the page cache: the first exec of each reads from disk
        p.invoke("VERSION")
    log(f"start-up: VERSION x {runs} each")
    for i in range(runs):
        for p in rotate(execs, i):
            startup[p.name].append(p.invoke("VERSION"))
    log(f"ADD: {pods} pods each")
    for i in range(pods):
        for p in rotate(run.plugins, i):
            cid = secrets.token_hex(32)
            ns = run.add_netns(f"{p.name[:6]}-{i}")
            p.pods.append((cid, ns))
            add[p.name].append(p.invoke("ADD", cid, ns))
    log("DEL of every pod")
    for i in range(pods):
        for p in rotate(run.plugins, i):
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

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    run = Run()
    status = 1
    try:
        standalone = args.binary or build_standalone()
        run.lab = Lab(f"cbin{run.suffix}")
        log(f"lab {run.lab.name}: one node with a real agent")
        node = run.lab.up().nodes[0]
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
        status = 0
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except BenchError as err:
        log(f"error: {err}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        run.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
