"""The cluster tier: one real 2-node Kubernetes for the whole tier, removed afterwards.

`cilia cluster up` builds the pinned upstream components once per machine (a cache
outside the checkout) and starts etcd, kube-apiserver, controller-manager, scheduler,
and per node containerd, kubelet, kube-proxy and cilia's agent, in network namespaces.
"""

from __future__ import annotations

import os
import shutil

import pytest
from clusterkit import Kube, unique_name

from cilia.cluster import upstream
from cilia.cluster.cluster import Cluster


def why_not() -> str:
    """Why the cluster tier cannot run here, or "" (also used by test_helm.py)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, containerd)"
    for tool in ("containerd", "runc", "ctr", "openssl", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs it)"
    if upstream.missing() and shutil.which("go") is None:
        return ("the upstream Kubernetes components are not built and there is no Go "
                "toolchain to build them (packaging/upstream/build.sh)")
    return ""


def cluster_of_its_own(prefix: str, **up):
    """A fixture's body: a cluster under a unique name, `Cluster.up(nodes=2, **up)`,
    removed afterwards whatever happened; skipped, saying why, where it cannot run."""
    why = why_not()
    if why:
        pytest.skip(why)
    c = Cluster(unique_name(prefix))
    try:
        c.up(**{"nodes": 2, **up})
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def cluster():
    yield from cluster_of_its_own("k")


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    return Kube(cluster)


@pytest.fixture
def ns(kube):
    """A namespace of the test's own, deleted afterwards."""
    from clusterkit import namespace

    name = unique_name("t")
    kube.apply(namespace(name))
    yield name
    kube("delete", "namespace", name, "--wait=false", check=False)
