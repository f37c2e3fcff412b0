"""The control-plane tier's API servers: a real control plane for the whole session
(`cluster`: each test isolated in it, see cpkit.RealCluster), and kmock's emulated one
(`emulated`) for the faults a real server cannot be made to produce on demand."""

from __future__ import annotations

import os
import secrets
import shutil

import pytest
from cp_emulator import EmulatorThread
from cpkit import EmulatedCluster, RealCluster, wait_watch_caches

from cilia import nsutil
from cilia.cluster import upstream
from cilia.cluster.cluster import Cluster as ControlPlane
from cilia.datastore.kubernetes import KubeClient


def _why_not() -> str:
    """Why the real control plane cannot run here ("" if it can)."""
    if os.geteuid() != 0:
        return "needs root (the control plane runs in a network namespace of its own)"
    for tool in ("ip", "nsenter", "openssl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs it)"
    try:
        missing = upstream.missing(upstream.CONTROL_PLANE_COMPONENTS)
    except upstream.UpstreamError as err:
        return str(err)
    if missing and shutil.which("go") is None:
        return (f"the upstream components ({', '.join(missing)}) are not built and there "
                "is no Go toolchain to build them (packaging/upstream/build.sh)")
    return ""


@pytest.fixture(scope="session")
def control_plane():
    """etcd, kube-apiserver, controller-manager and scheduler with cilia's CRDs applied
    (`cilia cluster up --nodes 0`): one for the session, removed at its end."""
    why = _why_not()
    if why:
        pytest.skip(why)
    cp = ControlPlane(f"cp{secrets.token_hex(2)}")
    try:
        cp.up(nodes=0, quiet=True)
        client = KubeClient(str(cp.kubeconfig_path), user_agent="cilia-tests")
        try:
            wait_watch_caches(client)
        finally:
            client.close()
        yield cp
    finally:
        _stop_clients_first(cp)
        cp.down()


def _stop_clients_first(cp: ControlPlane) -> None:
    """Stops the control plane's processes, each before what it depends on. `down()`
    stops them in the order they started: etcd first, which then waits for the API
    server's connections (~7 s), and the API server, without its etcd, until it is
    killed (10 s); the API server also takes its 10 s while controller-manager and
    scheduler still watch it. This way round it takes about a second; `down()` then
    removes the rest."""
    if not cp.exists():
        return
    order = {"kube-controller-manager": 0, "kube-scheduler": 0, "api-forwarder": 1,
             "kube-apiserver": 2, "etcd": 3}
    for proc in sorted(cp.load().procs, key=lambda p: order.get(p.name, 0)):
        # Only if still the process `up` started (its command line names the cluster).
        nsutil.stop(proc.pid, "cilia.cluster" if proc.name == "api-forwarder"
                             else str(cp.dir))


@pytest.fixture
def cluster(control_plane, tmp_path):
    """The real API server, as one test sees it: its own namespaces, and everything it
    made removed afterwards (operators it started are killed first)."""
    c = RealCluster(control_plane, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def emulated(tmp_path):
    """An emulated API server with cilia's CRDs loaded (through its API, as `kubectl
    apply` would), and a client; everything started here is stopped, even on failure."""
    emulator = EmulatorThread().start()
    c = None
    try:
        c = EmulatedCluster(emulator, tmp_path)
        c.load_crds()
        yield c
    finally:
        if c is not None:
            c.close()
        emulator.stop()
