"""The kind cluster of the Helm suite: what it needs, how it is made, and how the suite
reaches it (kubectl, helm and docker: the real command-line tools, nothing emulated)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helmsuite import Platform

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
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


def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def create_cluster() -> None:
    argv = ["kind", "create", "cluster", "--name", CLUSTER, "--config",
            str(HERE / "kind-config.yaml"), "--wait", "0s"]
    if NODE_IMAGE:
        argv += ["--image", NODE_IMAGE]
    run(*argv, timeout=900)


def delete_cluster() -> None:
    run("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


class KindPlatform(Platform):
    """kind: nodes are Docker containers; images built by `docker build`, loaded with
    `kind load docker-image`."""

    name = "kind"

    def kubectl_argv(self) -> list[str]:
        return ["kubectl", "--context", f"kind-{CLUSTER}"]

    def helm_argv(self) -> list[str]:
        return ["helm", "--kube-context", f"kind-{CLUSTER}"]

    def workers(self) -> list[str]:
        names = sorted(n for n in self.nodes() if "control-plane" not in n)
        assert len(names) >= 2, f"the kind config has two workers, found {names}"
        return names

    def node_exec(self, node: str, script: str, env: dict[str, str]
                  ) -> subprocess.CompletedProcess:
        flags = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        return run("docker", "exec", *flags, node, "sh", "-c", script, check=False,
                   timeout=60)

    def build_and_load_image(self, tag: str | None = None) -> tuple[str, str]:
        repo, _, default = IMAGE.rpartition(":")
        tag = tag or default
        if "CILIA_E2E_IMAGE" not in os.environ or tag != default:
            # A second tag is a second build: its own label makes its own image ID.
            run("docker", "build", "--label", f"org.opencontainers.image.version={tag}",
                "-t", f"{repo}:{tag}", str(REPO), timeout=1800)
        run("kind", "load", "docker-image", f"{repo}:{tag}", "--name", CLUSTER, timeout=600)
        return repo, tag
