"""Helpers for the cluster tier: a real 2-node Kubernetes made by `cilia cluster up`."""

from __future__ import annotations

import json
import secrets
import subprocess
import time

import yaml

from cilia.cluster import upstream
from cilia.cluster.cluster import Cluster

AGNHOST = f"registry.k8s.io/e2e-test-images/agnhost:{upstream.pins()['AGNHOST_VERSION']}"


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


class Kube:
    """kubectl against one cluster, with the waits the tests need."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json").stdout)

    def apply(self, *objs: dict) -> None:
        self("apply", "-f", "-", input=yaml.safe_dump_all(list(objs), sort_keys=False))

    def delete(self, *objs: dict) -> None:
        self("delete", "--wait=false", "--ignore-not-found", "-f", "-",
             input=yaml.safe_dump_all(list(objs), sort_keys=False))

    def wait_ready(self, namespace: str, *pods: str, timeout: int = 120) -> None:
        self("-n", namespace, "wait", "--for=condition=Ready", f"--timeout={timeout}s",
             *[f"pod/{p}" for p in pods], timeout=timeout + 10)

    def pod_ip(self, namespace: str, name: str) -> str:
        return self.json("-n", namespace, "get", "pod", name)["status"]["podIP"]

    def connect(self, namespace: str, pod: str, target: str, protocol: str = "tcp",
                timeout: float = 3) -> bool:
        """Whether `pod` reaches target (HOST:PORT) with agnhost's connect, as the
        upstream NetworkPolicy suite probes."""
        res = self("-n", namespace, "exec", pod, "--", "/agnhost", "connect", target,
                   f"--timeout={timeout}s", f"--protocol={protocol}", check=False,
                   timeout=timeout + 30)
        return res.returncode == 0

    def wait_connect(self, namespace: str, pod: str, target: str, want: bool,
                     protocol: str = "tcp", within: float = 30) -> None:
        deadline = time.monotonic() + within
        while True:
            got = self.connect(namespace, pod, target, protocol)
            if got == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{namespace}/{pod} -> {target} ({protocol}): "
                                     f"{'reachable' if got else 'unreachable'} after {within} s, "
                                     f"expected {'reachable' if want else 'unreachable'}")
            time.sleep(1)


def namespace(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


def server_pod(name: str, ns: str, node: str, labels: dict | None = None,
               probes: bool = False, host_network: bool = False) -> dict:
    """agnhost netexec: HTTP on 8080, UDP on 8081 (the e2e suites' server)."""
    container = {
        "name": "c", "image": AGNHOST, "imagePullPolicy": "Never",
        "args": ["netexec", "--http-port=8080", "--udp-port=8081"],
        "ports": [{"name": "http", "containerPort": 8080},
                  {"name": "udp", "containerPort": 8081, "protocol": "UDP"}],
    }
    if probes:
        probe = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1,
                 "failureThreshold": 2, "timeoutSeconds": 1}
        container["readinessProbe"] = probe
        container["livenessProbe"] = probe
    spec: dict = {"nodeName": node, "containers": [container],
                  "terminationGracePeriodSeconds": 1}
    if host_network:
        spec["hostNetwork"] = True
        container["args"] = ["netexec", "--http-port=18080", "--udp-port=18081"]
        container["ports"] = [{"containerPort": 18080}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": spec}


def client_pod(name: str, ns: str, node: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": AGNHOST, "imagePullPolicy": "Never",
                                     "args": ["pause"]}]}}


def service(name: str, ns: str, selector: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "udp", "port": 81, "targetPort": 8081, "protocol": "UDP"}]}}
