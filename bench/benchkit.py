"""What every benchmark in bench/ needs, once: the venv, commands, network namespaces,
background processes, labs, clean-up on errors and signals, the rr and iperf3 clients,
statistics and the report's table. Each run_*.py keeps only its cases and its report.

Importing this module first re-runs the script under the project's venv if it was started
with another interpreter (bench/ is the script's directory, so `import benchkit` finds
this file), so import it before anything of cilia's.

Where the scripts' own copies had drifted apart, the version kept here is the one that
is right in all of them; each docstring says which and why.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
CNI_BIN = Path("/usr/lib/cni")
NETNS_DIR = Path("/run/netns")
BPFFS = Path("/sys/fs/bpf")

try:  # re-run under the project's venv if started with another interpreter
    import cilia  # noqa: F401
except ImportError:
    if (VENV_BIN / "python").exists() and Path(sys.executable) != VENV_BIN / "python":
        os.execv(str(VENV_BIN / "python"), [str(VENV_BIN / "python"), *sys.argv])
    raise

from cilia import nsutil  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A run that cannot go on: reported in one line, then everything is removed."""


def sh(argv: list[str], timeout: float = 120, check: bool = True, **kw) -> str:
    """argv's stdout; a failure raises BenchError with the command and what it printed.

    The copies differed: the one kept is run_policy's message (stderr, else stdout, when a
    tool reports its error on stdout; the last 1,500 characters, so 10,000 iptables rules
    cannot flood the log) with the others' full command line (cut at 300 characters) and
    their keyword arguments (input, env). The timeout is for a hung tool, never a
    measurement: 120 s, the longest any script needed (iptables-restore of 10,000 rules,
    bpftool dumping a large map)."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        cmd = " ".join(argv)
        cmd = cmd if len(cmd) <= 300 else cmd[:300] + " ..."
        raise BenchError(f"{cmd} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-1500:]}")
    return p.stdout


# ---- network namespaces ----------------------------------------------------------------


def netns_path(netns: str) -> str:
    """A netns name (under /run/netns) or already a path."""
    return netns if netns.startswith("/") else str(NETNS_DIR / netns)


def nsenter(netns: str, argv: list[str]) -> list[str]:
    """argv run inside a netns (a name or a path). Only the network namespace: `ip netns
    exec` would also remount /sys, which hides bpffs. cilia.nsutil's rule, as the lab and
    the cluster run their commands."""
    return ["nsenter", f"--net={netns_path(netns)}", *argv]


@contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """The calling thread (and every process it starts, libbpf's and pyroute2's netlink
    sockets included) inside a netns (a name or a path), and back afterwards.

    The agent's own way in, cilia.agent.netns.entered(). Of the scripts' copies of the
    setns dance, run_cni_binary's did not check the setns back home (a failure there
    would have left the thread, and everything it timed afterwards, in the pod's
    namespace without a word); entered() checks both ways."""
    from cilia.agent.netns import entered, open_netns

    fd = open_netns(netns_path(netns))
    try:
        with entered(fd, netns):
            yield
    finally:
        os.close(fd)


def veth(ns_a: str, dev_a: str, addr_a: str, ns_b: str, dev_b: str, addr_b: str) -> None:
    """A veth pair between two netns, each end with its address (CIDR form) and up."""
    sh(["ip", "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
        "netns", ns_b])
    for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
        sh(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])


def pinned(cpu: int | str, argv: list[str]) -> list[str]:
    """argv on one core."""
    return ["taskset", "-c", str(cpu), *argv]


def cpus() -> tuple[str, str]:
    """Client and server cores: one each side, the same core on a 1-CPU machine."""
    return ("0", "1") if (os.cpu_count() or 1) >= 2 else ("0", "0")


# ---- background processes --------------------------------------------------------------


def spawn(argv: list[str], logfile: Path | None = None, **kw) -> subprocess.Popen:
    """A background process in its own session, so a Ctrl-C reaches only the script, which
    then stops everything in order; its output to `logfile` (appended) or nowhere; `kw`
    for Popen (stdout=PIPE, text=True for one read live)."""
    out = open(logfile, "ab") if logfile else subprocess.DEVNULL
    try:
        opts = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": out,
                "start_new_session": True, **kw}
        return subprocess.Popen(argv, **opts)
    finally:
        if logfile:
            out.close()


def stop(p: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM to the process's group, SIGKILL if it has not gone in `timeout` s, then
    reaped. run_datapath's and run_policy's order (run_services sent SIGKILL at once and
    gave up waiting after 5 s, leaving zombies); unlike theirs, a group that is gone
    between the two signals is no error, and the process is always reaped."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def kill_in_netns(netns: str) -> None:
    """SIGKILL to every process inside a netns (what `ip netns pids` lists): ours that
    escaped the books, or a killed run's."""
    for pid in sh(["ip", "netns", "pids", netns], check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_tree(root: Path) -> None:
    """rm -r for bpffs (unpins maps)."""
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    root.rmdir()


# ---- labs ------------------------------------------------------------------------------


def lab_netns(name: str) -> list[str]:
    return [ns.name for ns in NETNS_DIR.glob(f"{name}-*")]


def lab_agents(name: str) -> list[int]:
    """The agents of a lab, found by their socket path (which carries the lab's name)."""
    from cilia.lab.lab import RUN_DIR

    needle = f"{RUN_DIR}/{name}/".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def remove_lab(lab) -> None:
    """Removes a cilia lab, whatever state it is in.

    The two copies did half each: run_policy stopped the agent first (with no agent,
    `down` skips the per-pod CNI DELs, each one a policy recompile, minutes with 1,000
    policies, and removes the pods with their netns), but trusted `down`; run_host made
    sure (if `down` fails or leaves agents or netns behind, the agents are killed by pid,
    the netns deleted and `down` run again) but stopped only the first node's agent
    implicitly. Both, for every node."""
    try:
        if lab.exists():
            for node in lab.load().nodes:
                nsutil.stop(node.pid)
        lab.down()
        if not lab_agents(lab.name) and not lab_netns(lab.name):
            return
        log(f"cleanup: lab {lab.name} left agents or netns behind; removing them")
    except Exception as err:
        log(f"cleanup: lab down {lab.name} failed ({err!r}); removing it by force")
    for pid in lab_agents(lab.name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for ns in lab_netns(lab.name):
        sh(["ip", "netns", "del", ns], check=False)
    lab.down()  # no agent left: only netns, pins and directories to remove


# ---- what a run creates, and its removal ------------------------------------------------


class Run:
    """Everything one run creates, named PREFIX<suffix>-..., and its removal: a temp dir
    holding the run's pid (so `--cleanup-stale` can tell a killed run's leftovers from a
    live run's), network namespaces, background processes, labs, and clean-up steps.

    close() removes, in this order: the processes (traffic servers), the clean-up steps
    in reverse (CNI DELs, BPF objects), the `last` processes (an agent that the DELs
    still need), the labs, the netns (first killing whatever still runs in them), the
    temp dir; it goes on past every failure and returns what could not be removed."""

    def __init__(self, prefix: str, suffix: str | None = None):
        self.prefix = prefix
        self.suffix = suffix or secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{self.suffix}-"))
        (self.tmp / "pid").write_text(str(os.getpid()))
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.late_procs: list[subprocess.Popen] = []
        self.labs: list = []  # cilia.lab.lab.Lab
        self.finalizers: list[Callable[[], object]] = []  # run first, in reverse

    def name(self, what: str) -> str:
        return f"{self.prefix}{self.suffix}-{what}"

    def add_netns(self, what: str) -> str:
        """A new netns with its loopback up (as a runtime gives a pod; run_datapath's
        copy left it down), registered before it is made."""
        name = self.name(what)
        self.netns.append(name)
        sh(["ip", "netns", "add", name])
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def del_netns(self, name: str) -> None:
        sh(["ip", "netns", "del", name], check=False)
        if name in self.netns:
            self.netns.remove(name)

    def spawn(self, argv: list[str], logfile: str | None = None, last: bool = False,
              **kw) -> subprocess.Popen:
        """A background process (see spawn()), its output in the temp dir's `logfile`;
        `last` ones (an agent) are stopped after the clean-up steps."""
        p = spawn(argv, self.tmp / logfile if logfile else None, **kw)
        (self.late_procs if last else self.procs).append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        stop(p)
        for procs in (self.procs, self.late_procs):
            if p in procs:
                procs.remove(p)

    def lab(self, tag: str, **up):
        """A cilia lab named after the run, up (`up`: Lab.up's arguments); registered
        before it comes up, so a half-made one is removed too."""
        from cilia.lab.lab import Lab

        lab = Lab(self.name(tag))
        self.labs.append(lab)
        t0 = time.monotonic()
        lab.up(**up)
        log(f"lab {lab.name} up in {time.monotonic() - t0:.1f}s")
        return lab

    def down_lab(self, lab) -> None:
        t0 = time.monotonic()
        remove_lab(lab)
        if lab in self.labs:
            self.labs.remove(lab)
        if lab.exists() or lab_netns(lab.name):
            raise BenchError(f"lab {lab.name} remains")
        log(f"lab {lab.name} down in {time.monotonic() - t0:.1f}s")

    def close(self) -> list[str]:
        problems = []

        def stop_all(procs: list[subprocess.Popen]) -> None:
            for p in list(reversed(procs)):
                try:
                    self.stop(p)
                except Exception as err:
                    problems.append(f"process {p.pid}: {err}")

        stop_all(self.procs)
        for fn in reversed(self.finalizers):
            try:
                fn()
            except Exception as err:
                problems.append(f"cleanup step: {err}")
        self.finalizers.clear()
        stop_all(self.late_procs)
        for lab in list(reversed(self.labs)):
            try:
                self.down_lab(lab)
            except Exception as err:
                problems.append(f"lab {lab.name}: {err}")
        for ns in list(reversed(self.netns)):
            if (NETNS_DIR / ns).exists():
                kill_in_netns(ns)
            self.del_netns(ns)
            if (NETNS_DIR / ns).exists():
                problems.append(f"netns {ns} remains")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def run_alive(tmp: Path) -> bool:
    """Whether the run whose temp dir this is still runs: its pid is alive and is this
    same script (run_policy's check; the others trusted a pid that may have been reused)."""
    try:
        pid = int((tmp / "pid").read_text())
        os.kill(pid, 0)
        return Path(sys.argv[0]).name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def stale_runs(prefix: str) -> tuple[set[str], list[Path]]:
    """(the suffixes of runs still alive, the temp dirs of those that are not)."""
    alive, dead = set(), []
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if run_alive(d):
            alive.add(d.name[len(prefix):].split("-")[0])
        else:
            dead.append(d)
    return alive, dead


def cleanup_stale(prefix: str) -> None:
    """Removes what runs that no longer exist (killed with -9) left behind: processes in
    their netns (traffic servers, in the run's own netns or its labs' pods), their labs,
    netns, bpffs roots and temp dirs. The union of the scripts' copies (each knew only
    what its own runs make)."""
    alive, dead = stale_runs(prefix)

    def stale(name: str) -> bool:
        return name.startswith(prefix) and name[len(prefix):].split("-")[0] not in alive

    netns = [line.split(" ")[0] for line in sh(["ip", "netns", "list"]).splitlines()]
    netns = [ns for ns in netns if stale(ns)]
    for ns in netns:
        kill_in_netns(ns)
    from cilia.lab.lab import LABS_DIR, Lab

    for d in LABS_DIR.glob(f"{prefix}*") if LABS_DIR.is_dir() else []:
        if stale(d.name):
            remove_lab(Lab(d.name))
            print(f"removed lab {d.name}")
    for ns in netns:
        if (NETNS_DIR / ns).exists():
            sh(["ip", "netns", "del", ns], check=False)
            print(f"removed netns {ns}")
    for root in BPFFS.glob(f"{prefix}*"):
        if stale(root.name):
            remove_tree(root)
            print(f"removed {root}")
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)
        print(f"removed {d}")


# ---- a run's main ------------------------------------------------------------------------


def guarded(body: Callable[[], object], cleanup: Callable[[int], list[str]],
            on_error: Callable[[Exception], None] | None = None) -> int:
    """Runs body, then cleanup(status) whatever happens; returns the exit status: 0, 1 (an
    error, or something the clean-up could not remove), 130 (Ctrl-C, SIGTERM, SIGHUP).

    Signals: the scripts' handling had drifted (one caught SIGTERM only, one SIGHUP even
    under nohup, most left SIGINT as they found it). Kept: SIGINT raises
    KeyboardInterrupt even when the script was started with it ignored (a background
    job; run_policy's), SIGTERM and SIGHUP too, SIGHUP only when not ignored (nohup;
    run_services'), and during the clean-up all three are ignored so a second Ctrl-C
    cannot cut it short. A BenchError is reported in one line; any other error
    propagates with its traceback, or goes to `on_error` if given."""

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, terminate)
    status = 1
    try:
        body()
        status = 0
    except KeyboardInterrupt as err:
        log(f"interrupted ({err or 'SIGINT'})")
        status = 130
    except Exception as err:
        if on_error is not None:
            on_error(err)
        elif isinstance(err, BenchError):
            log(f"error: {err}")
        else:
            raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        log("cleaning up")
        problems = cleanup(status)
        for problem in problems:
            log(f"cleanup: {problem}")
        if problems:
            status = status or 1
    return status


def missing_tools(tools: list[str]) -> list[str]:
    return [t for t in tools if not shutil.which(t)]


def machine() -> dict:
    """The machine, as every report's JSON names it."""
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


# ---- CNI ---------------------------------------------------------------------------------


def cni_env(command: str, container_id: str = "", netns: str = "", pod_name: str = "",
            base: dict | None = None) -> dict:
    """The environment a runtime gives a CNI plugin: `base` (this process's environment
    by default, as libcni passes its own on) and the CNI_ variables; CNI_ARGS as
    containerd sets them (the reference plugins refuse unknown args without
    IgnoreUnknown)."""
    env = dict(os.environ if base is None else base)
    env.update({
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path(netns) if netns else "",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(CNI_BIN),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name}",
    })
    return env


def run_plugin(exe: Path, config: dict, env: dict, netns: str | None = None,
               what: str = "") -> tuple[float, subprocess.CompletedProcess]:
    """Runs a CNI plugin as a runtime does, from `netns` (the node's; None: this one),
    config on stdin; (seconds from exec to exit, the finished process). A failure
    raises BenchError with what the plugin printed."""
    stdin = json.dumps(config).encode()
    with in_netns(netns) if netns else _here():
        t0 = time.perf_counter()
        p = subprocess.run([str(exe)], input=stdin, env=env, capture_output=True, timeout=120)
        elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"{what or exe} failed ({p.returncode}): {p.stdout.decode().strip()} "
                         f"{p.stderr.decode(errors='replace').strip()[-1500:]}")
    return elapsed, p


@contextmanager
def _here() -> Iterator[None]:
    yield


class DirectCNI:
    """ADD and DEL sent straight to the agent over one long-lived gRPC channel, connected
    before anything is timed: the agent's own work plus one RPC, with no plugin process
    around it (so a plugin's ADD minus this is what the plugin process costs)."""

    def __init__(self, socket: str, config: dict):
        import grpc

        from cilia.api.v1 import cilia_pb2, cilia_pb2_grpc

        self.pb = cilia_pb2
        self.config = config
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        try:
            self.stub = cilia_pb2_grpc.CNIStub(self.channel)
            self.stub.Status(cilia_pb2.StatusRequest(), timeout=10)
        except BaseException:
            self.channel.close()
            raise

    def call(self, command: str, container_id: str, netns: str, pod_name: str) -> float:
        """Seconds the ADD or DEL took."""
        args = self.pb.CNIArgs(
            container_id=container_id, netns=netns_path(netns), ifname="eth0",
            network_name=self.config["name"], cni_version=self.config["cniVersion"],
            pod_namespace="default", pod_name=pod_name,
            config=json.dumps(self.config).encode())
        method = {"ADD": self.stub.Add, "DEL": self.stub.Del}[command]
        t0 = time.perf_counter()
        resp = method(args, timeout=60)
        elapsed = time.perf_counter() - t0
        if resp.HasField("error"):
            raise BenchError(f"direct {command}: {resp.error.msg}")
        return elapsed

    def close(self) -> None:
        self.channel.close()


# ---- build -------------------------------------------------------------------------------


def build_rr(build_dir: Path) -> Path:
    """bench/rr.c, the TCP_RR/TCP_CRR client and server."""
    build_dir.mkdir(parents=True, exist_ok=True)
    rr = build_dir / "rr"
    build_c(BENCH / "rr.c", rr)
    return rr


def build_c(src: Path, out: Path, extra: bool = True) -> None:
    sh(["gcc", "-O2", "-Wall", *(["-Wextra"] if extra else []), "-Werror", "-o", str(out),
        str(src)])


def build_bpf(src: Path, out: Path, includes: tuple[Path, ...] = ()) -> None:
    """A BPF object, with the machine's multiarch headers (asm/types.h)."""
    multiarch = sh(["gcc", "-print-multiarch"], check=False).strip() or "x86_64-linux-gnu"
    sh(["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        *(f"-I{d}" for d in includes), f"-I/usr/include/{multiarch}",
        "-c", str(src), "-o", str(out)])


def make_bpf() -> None:
    """cilia's BPF objects, if out of date."""
    sh(["make", "-C", str(REPO / "bpf")], timeout=300)


# ---- traffic -----------------------------------------------------------------------------


def rr_client(client: list[str], rr: Path, mode: str, ip: str, port: int, seconds: float,
              spin: bool = False, what: str = "") -> dict:
    """One bench/rr.c client run (`client`: the argv prefix that puts it in its netns,
    on its core): its JSON, whose "rate" is transactions (rr) or connections (crr) per
    second.

    A connect failure is retried for up to 5 s (the server may still be starting), as
    run_host's and run_policy's copies did (20 x 0.25 s and 50 x 0.1 s); run_datapath's
    and run_services' failed at once, which a warm-up run or a listening check before
    them made rare, not impossible. Any other failure raises at once."""
    argv = [*client, str(rr), mode, ip, str(port), str(seconds), *(["spin"] if spin else [])]
    for attempt in range(20):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        if p.returncode == 0:
            return json.loads(p.stdout)
        if attempt == 19 or "connect" not in p.stderr:
            raise BenchError(f"rr {mode} {what}: {p.stderr.strip()}")
        time.sleep(0.25)
    raise AssertionError("unreachable")


def iperf(client: list[str], ip: str, port: int, seconds: float, streams: int = 1,
          omit: int = 0, what: str = "") -> float:
    """Gbit/s received by one iperf3 run (`client`: the argv prefix, as for rr_client),
    retried while the server refuses or is busy (still starting, or finishing the last
    test). Whole seconds, at least 1 (iperf3 takes no fractions); -P and -O as given,
    iperf3's defaults (1, 0) when not."""
    argv = [*client, "iperf3", "-c", ip, "-p", str(port), "-t", str(max(1, round(seconds))),
            "-P", str(streams), "-O", str(omit), "-J"]
    for attempt in range(20):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit + 60)
        try:
            data = json.loads(p.stdout)
        except ValueError:
            data = {"error": p.stdout + p.stderr}
        if "error" not in data:
            return data["end"]["sum_received"]["bits_per_second"] / 1e9
        retry = "refused" in data["error"] or "busy" in data["error"]
        if attempt == 19 or not retry:
            raise BenchError(f"iperf3 {what}: {data['error']}")
        time.sleep(0.25)
    raise AssertionError("unreachable")


def rotate(items: list, i: int) -> list:
    """Round i's order: items rotated by i, so no case always goes first."""
    k = i % len(items)
    return items[k:] + items[:k]


# ---- the machine and processes -------------------------------------------------------------


def machine_busy(seconds: float = 3) -> float:
    """Fraction of all CPUs' time spent not idle over the next `seconds`."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = v[3] + v[4]  # idle + iowait
        return sum(v[:8]) - idle, sum(v[:8])

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_idle(max_seconds: float, below: float = 0.1, sample: float = 10) -> float:
    """Waits (up to max_seconds) for the machine to be less busy than `below` over
    `sample` seconds; returns the last busy share."""
    deadline = time.monotonic() + max_seconds
    while True:
        busy = machine_busy(sample)
        if busy < below or time.monotonic() > deadline:
            return busy
        log(f"machine {busy:.0%} busy: waiting for it to calm down")


def cpu_seconds(pid: int, gone: float | None = None) -> float:
    """User + system CPU time of a process so far; `gone` for a process that no longer
    exists (without it, that is an error: a figure of 0 would pass unnoticed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        if gone is None:
            raise
        return gone
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snmp(text: str) -> dict[str, int]:
    """/proc/net/snmp (per network namespace) as {"Ip.InReceives": n, "Tcp.PassiveOpens":
    n, ...}."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, names = head.split(":", 1)
        for name, val in zip(names.split(), vals.split(":", 1)[1].split(), strict=False):
            out[f"{proto}.{name}"] = int(val)
    return out


# ---- statistics and the report ---------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def median(values: list) -> float | None:
    """The median of the values measured (None: not measured), None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned columns (the first left, the others right), a rule under the
    first."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines

