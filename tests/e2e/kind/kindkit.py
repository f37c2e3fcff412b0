"""The kind cluster of the e2e suite: what it needs, how it is made, and small helpers to
drive it with kubectl, helm and docker (the real command-line tools, nothing emulated)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CHART = REPO / "charts" / "cilia"
NAMESPACE = "cilia-e2e"
SYSTEM = "kube-system"
CLUSTER = os.environ.get("CILIA_E2E_CLUSTER", "cilia-e2e")
IMAGE = os.environ.get("CILIA_E2E_IMAGE", "cilia:e2e")  # set to skip the docker build
NODE_IMAGE = os.environ.get("KIND_NODE_IMAGE", "")  # default: the kind release's own
KEEP = os.environ.get("CILIA_E2E_KEEP") == "1"  # keep the cluster afterwards, to debug


def missing_tools() -> list[str]:
    """What this machine lacks to run the suite, each said exactly."""
    missing = []
    docker = shutil.which("docker")
    if docker is None:
        missing.append("docker is not installed (no docker CLI on PATH)")
    else:
        try:
            res = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                                 capture_output=True, text=True, timeout=20)
            if res.returncode != 0 or not res.stdout.strip():
                why = (res.stderr.strip().splitlines() or ["no server version"])[-1]
                missing.append(f"no working Docker engine (`docker info` failed: {why})")
        except subprocess.TimeoutExpired:
            missing.append("no working Docker engine (`docker info` timed out)")
    for tool in ("kind", "kubectl", "helm"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is not installed (not on PATH)")
    return missing


def run(*argv: str, input: str | None = None, check: bool = True, timeout: float = 600,
        ) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def kubectl(*args: str, input: str | None = None, check: bool = True,
            timeout: float = 300) -> str:
    return run("kubectl", "--context", f"kind-{CLUSTER}", *args, input=input, check=check,
               timeout=timeout).stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json"))


def wait_for(what: str, fn, timeout: float = 60, interval: float = 1.0):
    """Polls fn until it returns something true; returns it, or fails saying what."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def nodes() -> list[str]:
    return [n["metadata"]["name"] for n in kubectl_json("get", "nodes")["items"]]


def node_exec(node: str, script: str) -> subprocess.CompletedProcess:
    """A shell command on a kind node (a container: its network namespace is the node's)."""
    return run("docker", "exec", node, "sh", "-c", script, check=False, timeout=60)


def create_cluster() -> None:
    argv = ["kind", "create", "cluster", "--name", CLUSTER, "--config",
            str(HERE / "kind-config.yaml"), "--wait", "0s"]
    if NODE_IMAGE:
        argv += ["--image", NODE_IMAGE]
    run(*argv, timeout=900)


def delete_cluster() -> None:
    run("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


def build_and_load_image() -> None:
    if "CILIA_E2E_IMAGE" not in os.environ:
        run("docker", "build", "-t", IMAGE, str(REPO), timeout=1800)
    run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER, timeout=600)


def helm_install() -> None:
    repo, _, tag = IMAGE.rpartition(":")
    run("helm", "--kube-context", f"kind-{CLUSTER}", "install", "cilia", str(CHART),
        "--namespace", SYSTEM, "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never", "--wait", "--timeout", "10m", timeout=900)


def helm_uninstall() -> None:
    run("helm", "--kube-context", f"kind-{CLUSTER}", "uninstall", "cilia", "--namespace",
        SYSTEM, "--wait", "--timeout", "5m", timeout=600)


def pods_not_running() -> list[str]:
    """Every pod of the cluster that is neither Running and Ready nor Succeeded."""
    bad = []
    for pod in kubectl_json("get", "pods", "-A")["items"]:
        phase = pod["status"].get("phase")
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in pod["status"].get("conditions", []))
        if phase == "Succeeded" or (phase == "Running" and ready):
            continue
        bad.append(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}: {phase}")
    return bad


def all_nodes_ready() -> bool:
    items = kubectl_json("get", "nodes")["items"]
    return bool(items) and all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
        for n in items)
