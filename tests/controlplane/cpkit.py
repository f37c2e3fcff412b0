"""Helpers for the control-plane tests: a cluster (an API server with cilia's CRDs, and a
client), operator processes, network faults, waiting.

Two API servers stand behind the one `Cluster` interface:

- `RealCluster` (the `cluster` fixture): one test's view of the session's real control
  plane (etcd, kube-apiserver, controller-manager and scheduler with cilia's CRDs
  applied: `cilia cluster up --nodes 0`). Tests use it one after another, isolated:
  every namespace a test asks for is its own (`ns("x")` is `t1a2b-x`), the operators'
  Lease lives in the test's own namespace, and teardown deletes the test's pods at once
  (no kubelet would confirm a graceful deletion) and its namespaces, and removes every
  cluster-scoped object tests make (CiliaIdentity, CiliaNode, Node, cluster-wide
  policies, prefilters, the test's admission policies, Events in `default`). Faults are
  made as they happen in a cluster: a `TcpProxy` between a client and the server cuts,
  holds or refuses its connections (the network); the API server process restarts
  (which also expires every older resourceVersion: a watch resuming from before the
  restart gets 410 Gone, as after any API server restart); a ValidatingAdmissionPolicy
  refuses writes.
- `EmulatedCluster` (the `emulated` fixture): kmock's emulated API server
  (cp_emulator.py), kept for the faults a real server cannot be made to produce on
  demand (see the tests that use it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from cilia.cluster.forward import pipe
from cilia.datastore.kubernetes import (
    CILIA_CLUSTER_POLICIES,
    CILIA_NODES,
    CILIA_POLICIES,
    CILIA_PREFILTERS,
    CLUSTER_NETWORK_POLICIES,
    EVENTS,
    IDENTITIES,
    LEASES,
    NAMESPACES,
    NETWORK_POLICIES,
    NODES,
    PODS,
    ApiError,
    KubeClient,
    Resource,
)

CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "CustomResourceDefinition", False)
POLICIES = Resource("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies",
                    "ValidatingAdmissionPolicy", False)
BINDINGS = Resource("admissionregistration.k8s.io", "v1",
                    "validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding",
                    False)
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount", True)
# Cluster-scoped kinds the tests make, removed after every test on the real server.
CLUSTER_SCOPED = (IDENTITIES, CILIA_NODES, NODES, CILIA_CLUSTER_POLICIES, CILIA_PREFILTERS,
                  CLUSTER_NETWORK_POLICIES)
CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "cilia" / "crds"
CILIA_KINDS = (IDENTITIES, CILIA_NODES, CILIA_POLICIES, CILIA_CLUSTER_POLICIES, CILIA_PREFILTERS)
# Pods no scheduler picks (there are no nodes): nothing but the test ever writes them.
UNSCHEDULED = "cilia-tests-none"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "",
             interval: float = 0.05):
    """The predicate's first truthy value; fails saying what was awaited."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}"
                                 f" (last: {last!r})")
        time.sleep(interval)


def wait_watch_caches(client: KubeClient, timeout: float = 60) -> None:
    """Until the API server serves, from its watch cache, every kind the tests and cilia
    watch. A server just started answers 429 ("storage is (re)initializing") for a
    moment; clients retry, but a test should not start in that moment."""
    kinds = [PODS, NAMESPACES, NODES, EVENTS, LEASES, NETWORK_POLICIES, *CILIA_KINDS,
             CLUSTER_NETWORK_POLICIES]

    def cached(res: Resource) -> bool:
        try:
            client.request("GET", res.path(), query={"resourceVersion": "0", "limit": "1"})
        except ApiError as err:
            if err.status == 429:
                return False
            raise
        return True

    # At once: the client waits out each 429's Retry-After (a second) before retrying.
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        wait_for(lambda: all(pool.map(cached, kinds)), timeout,
                 "the API server's watch caches", interval=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """An API server as a test sees it."""

    lease_namespace = "kube-system"

    def __init__(self, workdir: Path, kubeconfig: Path):
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.client = KubeClient(str(kubeconfig), user_agent="cilia-tests")
        self.operators: list[OperatorProcess] = []

    def ns(self, short: str) -> str:
        """The namespace a test calls `short`."""
        return short

    # ---- objects ---------------------------------------------------------------------

    def namespace(self, short: str, labels: dict | None = None) -> dict:
        return self.client.create(NAMESPACES, {"metadata": {"name": self.ns(short),
                                                            "labels": labels or {}}})

    def pod(self, namespace: str, name: str, labels: dict | None = None,
            node: str | None = None, ip: str | None = None) -> dict:
        """A pod in the namespace the test calls `namespace`; bound to `node` if given,
        else never scheduled (no controller writes it: every change is the test's)."""
        spec: dict = {"containers": [{"name": "c", "image": "none"}]}
        if node:
            spec["nodeName"] = node
        else:
            spec["schedulerName"] = UNSCHEDULED
        ns = self.ns(namespace)
        pod = self.client.create(PODS, {
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": spec})
        if ip:  # as the kubelet would, once the sandbox has its address
            pod = self.client.patch(PODS, ns, name,
                                    {"status": {"podIP": ip, "podIPs": [{"ip": ip}],
                                                "phase": "Running"}}, "status")
        return pod

    def node(self, name: str) -> dict:
        return self.client.create(NODES, {"metadata": {"name": name}})

    def identities(self) -> dict[int, frozenset]:
        return {int(o["metadata"]["name"]): frozenset(o.get("securityLabels") or [])
                for o in self.client.items(IDENTITIES)}

    def identity_of(self, labels: frozenset) -> int | None:
        return next((n for n, ls in self.identities().items() if ls == labels), None)

    def pod_cidrs(self) -> dict[str, list[str]]:
        return {o["metadata"]["name"]: (o.get("spec") or {}).get("podCIDRs") or []
                for o in self.client.items(CILIA_NODES)}

    def events(self, name: str, namespace: str | None = None) -> list[dict]:
        """Events about `name` in the test's `namespace` (None: `default`)."""
        ns = "default" if namespace is None else self.ns(namespace)
        return [e for e in self.client.items(EVENTS, ns)
                if (e.get("involvedObject") or {}).get("name") == name]

    # ---- operators -------------------------------------------------------------------

    def operator(self, name: str, *args: str, gc_grace: float = 2.0,
                 kubeconfig: Path | None = None, prelude: str = "") -> OperatorProcess:
        """An operator process; `prelude`: Python run in it before the operator (a fault
        injected into it)."""
        op = OperatorProcess(self, name, [
            "--gc-interval", "0.3", "--identity-gc-grace", str(gc_grace), *args],
            kubeconfig or self.kubeconfig, prelude)
        self.operators.append(op)
        return op.start()

    def close(self) -> None:
        for op in self.operators:
            op.kill()
        self.client.close()


class EmulatedCluster(Cluster):
    """kmock's emulated API server (cp_emulator.py), with cilia's CRDs loaded through its
    API (as `kubectl apply` would)."""

    def __init__(self, emulator, workdir: Path):
        self.emulator = emulator
        super().__init__(workdir, emulator.kubeconfig(workdir / "kubeconfig"))

    @property
    def api(self):
        return self.emulator.api

    def load_crds(self) -> None:
        from cp_emulator import load_crds

        for crd in load_crds():
            self.client.create(CRDS, crd)


class RealCluster(Cluster):
    """One test's view of the session's real control plane (see the module docstring)."""

    def __init__(self, control_plane, workdir: Path):
        self.control_plane = control_plane
        self.prefix = f"t{secrets.token_hex(2)}"
        self.lease_namespace = self.prefix
        self.api_port = control_plane.load().api_port
        self._namespaces: list[str] = []
        self._policies: list[str] = []
        self._proxies: list[TcpProxy] = []
        super().__init__(workdir, control_plane.kubeconfig_path)
        self._check_clean()
        self.client.create(NAMESPACES, {"metadata": {"name": self.prefix}})
        self._namespaces.append(self.prefix)

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def namespace(self, short: str, labels: dict | None = None) -> dict:
        """The namespace, once pods can be made in it: the controller-manager gives it its
        `default` ServiceAccount a moment after it is made, and until then the API
        server refuses pods ("error looking up service account")."""
        self._namespaces.append(self.ns(short))
        out = super().namespace(short, labels)
        wait_for(lambda: self.client.get(SERVICE_ACCOUNTS, self.ns(short), "default"), 30,
                 f"the default ServiceAccount of {self.ns(short)}")
        return out

    def _check_clean(self) -> None:
        left = {res.kind: [o["metadata"]["name"] for o in self.client.items(res)]
                for res in CLUSTER_SCOPED}
        left = {k: v for k, v in left.items() if v}
        assert not left, f"objects left by an earlier test: {left}"

    # ---- faults ------------------------------------------------------------------------

    def proxy(self, listener: socket.socket | None = None) -> TcpProxy:
        """A TcpProxy to the API server, and a kubeconfig through it (`.kubeconfig`)."""
        proxy = TcpProxy(("127.0.0.1", self.api_port), listener)
        self._proxies.append(proxy)
        cfg = yaml.safe_load(Path(self.kubeconfig).read_text())
        cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        path = self.workdir / f"kubeconfig-proxy-{proxy.port}"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)
        proxy.kubeconfig = path
        return proxy

    def kubeconfig_in_netns(self, netns_path: str) -> Path:
        """A kubeconfig for a process in another network namespace: the server is a
        proxy listening on that namespace's loopback (the certificate names 127.0.0.1)."""
        return self.proxy(socket_in_netns(netns_path)).kubeconfig

    def restart_api_server(self, timeout: float = 90) -> float:
        """Kills kube-apiserver and starts it again (same flags, same etcd), as after a
        crash; the seconds until it is ready. (Asked to stop, it takes 10 s to give up
        its watches before `restart_process` kills it anyway.)"""
        started = time.monotonic()
        proc = next(p for p in self.control_plane.load().procs if p.name == "kube-apiserver")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        wait_for(lambda: not _running(proc.pid), 10, "kube-apiserver gone")
        new = self.control_plane.restart_process("kube-apiserver")
        try:
            wait_for(lambda: self.control_plane.kubectl(
                "get", "--raw", "/readyz", check=False, timeout=10).returncode == 0,
                timeout, "kube-apiserver ready after its restart", interval=0.3)
        except AssertionError as err:
            tail = Path(new.log).read_text(errors="replace")[-3000:]
            raise AssertionError(f"{err}; alive: {_running(new.pid)}; its log ends:\n"
                                 f"{tail}") from None
        wait_watch_caches(self.client)
        return time.monotonic() - started

    @contextlib.contextmanager
    def refusing_creates(self, res: Resource, probe: dict) -> Iterator[None]:
        """A ValidatingAdmissionPolicy refuses every create of `res` meanwhile. `probe` is
        a valid object of that kind, created with dryRun to see the policy in force
        (and then gone)."""
        name = f"{self.prefix}-refuse-{res.plural}"[:63]
        self.client.create(POLICIES, {"metadata": {"name": name}, "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [res.group], "apiVersions": ["*"], "operations": ["CREATE"],
                "resources": [res.plural]}]},
            "validations": [{"expression": "false",
                             "message": f"creating {res.kind} is refused (a test's fault)"}]}})
        self._policies.append(name)
        self.client.create(BINDINGS, {"metadata": {"name": name}, "spec": {
            "policyName": name, "validationActions": ["Deny"]}})

        def refused() -> bool:
            try:
                self.client.request("POST", res.path(), query={"dryRun": "All"}, body={
                    "apiVersion": res.api_version, "kind": res.kind, **probe})
            except ApiError as err:
                if "a test's fault" in err.message:
                    return True
                raise
            return False

        try:
            wait_for(refused, 20, f"the admission policy refusing {res.kind} creates",
                     interval=0.2)
            yield
        finally:
            self._remove_policy(name)
            self._policies.remove(name)
            wait_for(lambda: not refused(), 20, f"{res.kind} creates allowed again",
                     interval=0.2)

    @contextlib.contextmanager
    def without_crds(self, *names: str) -> Iterator[None]:
        """The chart's CRDs `names` deleted meanwhile (with their objects), and created
        again from the chart afterwards, served before the next test runs."""
        files = {c["metadata"]["name"]: c for c in (
            yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*.yaml")))}
        kinds = [Resource(files[n]["spec"]["group"], v["name"],
                          files[n]["spec"]["names"]["plural"], "", False)
                 for n in names for v in files[n]["spec"]["versions"] if v["storage"]]
        for name in names:
            self.client.delete(CRDS, None, name)
        try:
            wait_for(lambda: not any(self.client.get(CRDS, None, n) for n in names), 60,
                     f"{', '.join(names)} deleted", interval=0.2)
            wait_for(lambda: not any(map(self._served, kinds)), 30,
                     f"{', '.join(names)} no longer served", interval=0.2)
            yield
        finally:
            for name in names:
                if self.client.get(CRDS, None, name) is None:
                    crd = {k: v for k, v in files[name].items() if k != "status"}
                    self.client.create(CRDS, crd)

            def established(name: str) -> bool:
                conds = ((self.client.get(CRDS, None, name) or {}).get("status")
                         or {}).get("conditions") or []
                return any(c["type"] == "Established" and c["status"] == "True"
                           for c in conds)

            wait_for(lambda: all(map(established, names)) and all(map(self._served, kinds)),
                     60, f"{', '.join(names)} served again", interval=0.2)

    def _served(self, res: Resource) -> bool:
        try:
            self.client.request("GET", res.path())
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    def _remove_policy(self, name: str) -> None:
        self.client.delete(BINDINGS, None, name)
        self.client.delete(POLICIES, None, name)

    # ---- isolation -------------------------------------------------------------------

    def close(self) -> None:
        for op in self.operators:
            op.kill()  # first: nothing must recreate what is removed below
        for proxy in self._proxies:
            proxy.close()
        problems = []

        def attempt(fn, *args, **kw):
            try:
                fn(*args, **kw)
            except ApiError as err:
                problems.append(f"{getattr(fn, '__name__', fn)}{args}: {err}")

        for name in self._policies:
            attempt(self._remove_policy, name)
        for ns in self._namespaces:
            # No kubelet confirms a graceful deletion here: pods go at once.
            attempt(self.client.request, "DELETE", PODS.path(ns),
                    query={"gracePeriodSeconds": 0})
            attempt(self.client.delete, NAMESPACES, None, ns)
        for res in CLUSTER_SCOPED:
            attempt(self.client.request, "DELETE", res.path())
        attempt(self.client.request, "DELETE", EVENTS.path("default"))
        self.client.close()
        assert not problems, "cleaning up after the test failed:\n" + "\n".join(problems)


def socket_in_netns(netns_path: str, host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket inside another network namespace (a socket stays in the
    namespace it was made in, whatever thread serves it later)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    out: dict = {}

    def make():
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            s.listen(128)
            s.setblocking(False)
            out["sock"] = s
        except BaseException as err:
            out["err"] = err

    # A thread of its own: it dies in the other namespace, nothing else ever enters it.
    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "err" in out:
        raise out["err"]
    return out["sock"]


def _running(pid: int) -> bool:
    """Any thread of the process still there. A killed process's main thread is a zombie
    at once, while its other threads may take a moment more to go, and with them its
    sockets: an API server started again before that finds its port taken."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        tasks = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" or tasks > 1


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


class TcpProxy:
    """TCP between clients and the API server, in the test's hands: `cut()` closes every
    connection (a network break), `hold()` also makes new connections wait until
    `release()` (a partition that heals), `refuse(True)` closes new ones at once (the
    server unreachable). TLS passes through untouched: clients talk to the real server.
    `connections` counts the connections forwarded so far."""

    def __init__(self, upstream: tuple[str, int], listener: socket.socket | None = None):
        self.upstream = upstream
        self.listener = listener or socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.kubeconfig: Path | None = None
        self.connections = 0
        self._open = threading.Event()
        self._open.set()
        self._refusing = False
        self._closed = False
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        while True:
            self._open.wait()
            if self._refusing or self._closed:
                _close(conn)
                return
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(conn)
                return
            up.settimeout(None)
            with self._lock:
                if self._open.is_set() and not self._refusing and not self._closed:
                    self._live |= {conn, up}
                    self.connections += 1
                    break
            _close(up)  # held in the meantime: wait again
        back = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        back.start()
        pipe(conn, up)
        back.join()
        with self._lock:
            self._live -= {conn, up}
        _close(conn)
        _close(up)

    def live(self) -> int:
        with self._lock:
            return len(self._live) // 2

    def cut(self) -> int:
        """Closes every open connection; returns how many there were."""
        with self._lock:
            live = list(self._live)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return len(live) // 2

    def hold(self) -> int:
        self._open.clear()
        return self.cut()

    def release(self) -> None:
        self._open.set()

    def refuse(self, refusing: bool = True) -> None:
        self._refusing = refusing
        if refusing:
            self.cut()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()


def _retried_429(line: str) -> bool:
    """kopf logs a request it retries at ERROR; a 429 (an API server whose storage for a
    kind is still initializing, or priority and fairness turning a request away) asks
    for exactly that retry, and is no failure."""
    return "will retry" in line and "status=429" in line


class OperatorProcess:
    def __init__(self, cluster: Cluster, name: str, args: list[str], kubeconfig: Path,
                 prelude: str = ""):
        self.cluster = cluster
        self.name = name
        self.args = args
        self.kubeconfig = kubeconfig
        self.prelude = prelude
        self.log = cluster.workdir / f"operator-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self) -> OperatorProcess:
        self.health_port, self.metrics_port = free_port(), free_port()
        program = (["-c", f"{self.prelude}\nfrom cilia.operator.main import main\nmain()"]
                   if self.prelude else ["-m", "cilia.operator.main"])
        argv = [sys.executable, *program,
                "--kubeconfig", str(self.kubeconfig), "--id", self.name,
                "--leader-election-namespace", self.cluster.lease_namespace,
                "--lease-duration", "2", "--renew-deadline", "1.5", "--retry-period", "0.2",
                "--bind-address", "127.0.0.1", "--health-port", str(self.health_port),
                "--metrics-port", str(self.metrics_port), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def http(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""

    def health(self, path: str = "/readyz") -> tuple[int, dict]:
        status, body = self.http(self.health_port, path)
        return status, (json.loads(body) if body.startswith("{") else {})

    def metrics(self) -> dict[str, float]:
        status, body = self.http(self.metrics_port, "/metrics")
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def wait_ready(self, role: str | None = None, timeout: float = 30.0) -> None:
        def ready():
            if not self.alive:
                raise AssertionError(f"operator {self.name} exited: {self.output()[-3000:]}")
            status, body = self.health()
            return status == 200 and (role is None or body.get("role") == role)
        wait_for(ready, timeout, f"operator {self.name} ready"
                 + (f" as {role}" if role else ""))

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def assert_no_errors(self) -> None:
        """No handler failed, no traceback: the sweeps must not be what made it work."""
        # Until it was told to stop (kopf may complain about requests it had in flight).
        text = self.output().split("stopping the controllers", 1)[0]
        bad = [line for line in text.splitlines()
               if (" ERROR " in line or "Traceback" in line) and not _retried_429(line)]
        assert not bad, f"operator {self.name} logged errors:\n" + text[-4000:]
