"""The pinned upstream components, built from their Go modules by packaging/upstream/build.sh.

The build runs once per machine into a cache outside the checkout (`$CILIA_CACHE`,
default /var/cache/cilia), keyed by the pins; this module finds or makes it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

UPSTREAM_DIR = Path(__file__).resolve().parents[2] / "packaging" / "upstream"
BUILD_SCRIPT = UPSTREAM_DIR / "build.sh"

# What `cilia cluster up` runs or puts in an image.
CLUSTER_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
                      "kube-proxy", "kubectl", "etcd", "coredns", "agnhost", "pause")
# What a control plane alone needs (tests of the operator against the real API server).
CONTROL_PLANE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler",
                            "kubectl", "etcd")


class UpstreamError(RuntimeError):
    pass


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (UPSTREAM_DIR / "pins.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def bin_dir() -> Path:
    res = subprocess.run(["bash", str(BUILD_SCRIPT), "--dir"], capture_output=True, text=True)
    if res.returncode != 0:
        raise UpstreamError(f"{BUILD_SCRIPT} --dir failed: {res.stderr.strip()}")
    return Path(res.stdout.strip())


def missing(components: tuple[str, ...] = CLUSTER_COMPONENTS) -> list[str]:
    d = bin_dir()
    return [c for c in components if not os.access(d / c, os.X_OK)]


def ensure(components: tuple[str, ...] = CLUSTER_COMPONENTS) -> Path:
    """Builds what is missing (progress on stderr) and returns the bin directory."""
    if not BUILD_SCRIPT.exists():
        raise UpstreamError(f"{BUILD_SCRIPT} not found: `cilia cluster` runs from a checkout")
    if not missing(components):
        return bin_dir()
    if subprocess.run(["go", "version"], capture_output=True).returncode != 0:
        raise UpstreamError("the upstream components are not built and there is no Go "
                            "toolchain: install Go (1.24 or newer) and try again")
    res = subprocess.run(["bash", str(BUILD_SCRIPT), *components], stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        raise UpstreamError(f"building {', '.join(components)} failed (output above)")
    return Path(res.stdout.strip().splitlines()[-1])
