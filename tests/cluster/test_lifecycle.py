"""`cilia cluster` keeps to its own: the machine's CNI, kubelet and containerd directories and
the root namespace's iptables stay as they were, and `down` removes everything even after
`up` was killed with SIGKILL halfway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusterkit import unique_name

from cilia.cluster.cluster import BPFFS_DIR, CLUSTERS_DIR, RUN_DIR, Cluster
from cilia.nsutil import NETNS_DIR

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def _root_iptables() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True).stdout


def test_the_machine_is_left_alone(cluster):
    """While a cluster runs: no kube-proxy or cilia chain in the root namespace, and the
    machine's own CNI, kubelet and containerd state untouched."""
    rules = _root_iptables()
    assert "KUBE-" not in rules and "CILIA" not in rules
    for path in ("/etc/cni/net.d/05-cilia.conflist", "/var/lib/kubelet/pods",
                 "/run/containerd/containerd.sock", "/var/log/pods"):
        assert not Path(path).exists() or path_predates(path, cluster), path


def path_predates(path: str, cluster: Cluster) -> bool:
    """Whether path existed before the cluster was made (someone else's)."""
    return Path(path).stat().st_mtime < cluster.state_file.stat().st_ctime - 60


def _ours(name: str) -> list[str]:
    left = []
    for d in (CLUSTERS_DIR / name, RUN_DIR / name, Path(BPFFS_DIR) / name):
        if d.exists():
            left.append(str(d))
    left += [str(p) for p in NETNS_DIR.glob(f"{name}-*")] if NETNS_DIR.is_dir() else []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if f"clusters/{name}/".encode() in cmd:
                left.append(f"process {pid}: {cmd[:120]!r}")
    return left


def test_down_after_up_was_killed():
    name = unique_name("kl")
    cluster = Cluster(name)
    up = subprocess.Popen([sys.executable, "-m", "cilia.cli", "cluster", "up", "--name", name,
                           "--nodes", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill it once the control plane is starting: processes, namespaces and files
        # exist, the command is gone.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if cluster.exists() and any(p.name == "kube-apiserver"
                                        for p in cluster.load().procs):
                break
            time.sleep(0.2)
        else:
            pytest.fail("cilia cluster up never started the API server")
        time.sleep(2)
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
        assert _ours(name), "nothing was made before the kill: the test proves nothing"
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait()
        res = subprocess.run([sys.executable, "-m", "cilia.cli", "cluster", "down", "--name",
                              name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _ours(name) == []
