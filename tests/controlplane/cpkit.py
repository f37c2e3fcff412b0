"""Helpers for the control-plane tests: a cluster (the emulated API server with cilia's
CRDs loaded, and a client), operator processes, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cp_emulator import EmulatorThread, load_crds

from cilia.datastore.kubernetes import (
    CILIA_NODES,
    EVENTS,
    IDENTITIES,
    NAMESPACES,
    NODES,
    PODS,
    KubeClient,
    Resource,
)

CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "CustomResourceDefinition", False)
LEASE_NAMESPACE = "kube-system"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The emulated API server as a test sees it."""

    def __init__(self, emulator: EmulatorThread, workdir: Path):
        self.emulator = emulator
        self.workdir = workdir
        self.kubeconfig = emulator.kubeconfig(workdir / "kubeconfig")
        self.client = KubeClient(str(self.kubeconfig), user_agent="cilia-tests")
        self.operators: list[OperatorProcess] = []

    @property
    def api(self):
        return self.emulator.api

    def load_crds(self) -> None:
        for crd in load_crds():
            self.client.create(CRDS, crd)

    # ---- objects ---------------------------------------------------------------------

    def namespace(self, name: str, labels: dict | None = None) -> dict:
        return self.client.create(NAMESPACES, {"metadata": {"name": name,
                                                            "labels": labels or {}}})

    def pod(self, namespace: str, name: str, labels: dict | None = None,
            node: str = "node1", ip: str | None = None) -> dict:
        pod = self.client.create(PODS, {
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}})
        if ip:  # as the kubelet would, once the sandbox has its address
            pod = self.client.patch(PODS, namespace, name,
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

    def events(self, name: str, namespace: str = "default") -> list[dict]:
        return [e for e in self.client.items(EVENTS, namespace)
                if (e.get("involvedObject") or {}).get("name") == name]

    def creators(self, plural: str) -> set[str]:
        """User agents of the requests that created objects of `plural`."""
        def collect():
            return {r.headers.get("User-Agent", "") for r in self.api._requests
                    if r.method == "POST" and r.url.path.endswith(f"/{plural}")}
        return self.emulator.call(collect)

    # ---- operators -------------------------------------------------------------------

    def operator(self, name: str, *args: str, gc_grace: float = 2.0) -> OperatorProcess:
        op = OperatorProcess(self, name, [
            "--gc-interval", "0.3", "--identity-gc-grace", str(gc_grace), *args])
        self.operators.append(op)
        return op.start()

    def close(self) -> None:
        for op in self.operators:
            op.kill()  # the API server goes away with them: no need to be gentle
        self.client.close()


class OperatorProcess:
    def __init__(self, cluster: Cluster, name: str, args: list[str]):
        self.cluster = cluster
        self.name = name
        self.args = args
        self.log = cluster.workdir / f"operator-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self) -> OperatorProcess:
        self.health_port, self.metrics_port = free_port(), free_port()
        argv = [sys.executable, "-m", "cilia.operator.main",
                "--kubeconfig", str(self.cluster.kubeconfig), "--id", self.name,
                "--leader-election-namespace", LEASE_NAMESPACE,
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

    def stop(self, timeout: float = 10.0) -> int | None:
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

    def wait_ready(self, role: str | None = None, timeout: float = 20.0) -> None:
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
        bad = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        assert not bad, f"operator {self.name} logged errors:\n" + text[-4000:]
