"""The Helm suite (tests/e2e/helmsuite.py) on `cilia cluster`: a 2-node cluster of its
own, up with no CNI (`--cilia none`), then the image built from the Dockerfile by
buildah, `helm install`, the checks, `helm upgrade` under traffic and `helm uninstall`.
The same class runs on kind (tests/e2e/kind/test_kind.py)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import cluster_of_its_own
from helmsuite import HelmSuite, Platform

from cilia.cluster import image
from cilia.cluster.cluster import Cluster, node_argv

pytestmark = [pytest.mark.root, pytest.mark.cluster, pytest.mark.timeout(1800)]


class CiliaClusterPlatform(Platform):
    """`cilia cluster`: nodes are network + mount namespaces on this machine; the image is
    built by buildah and imported into every node's containerd."""

    name = "cilia-cluster"

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        state = cluster.load()
        self.cni_bin_dir = f"{state.nodes[0].view}/cni/bin"
        self.cni_conf_dir = f"{state.nodes[0].view}/cni/net.d"

    def kubectl_argv(self) -> list[str]:
        return self.cluster.kubectl_argv([])

    def helm_argv(self) -> list[str]:
        return self.cluster.helm_argv([])

    def workers(self) -> list[str]:
        return [n.name for n in self.cluster.load().nodes]

    def node_exec(self, node: str, script: str, env: dict[str, str]
                  ) -> subprocess.CompletedProcess:
        n = next(n for n in self.cluster.load().nodes if n.name == node)
        return subprocess.run(node_argv(n.netns, n.mntns, ["sh", "-c", script]),
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
                              capture_output=True, text=True, timeout=60)

    def build_and_load_image(self, tag: str | None = None) -> tuple[str, str]:
        built = image.build(tag)
        self.cluster.import_image(built.archive)
        return built.repository, built.tag

    def install_values(self) -> list[str]:
        return self.cluster.helm_values()


class TestOnCiliaCluster(HelmSuite):
    @pytest.fixture(scope="class")
    @classmethod
    def platform(cls):
        yield from _platform("iptables")


class TestOnCiliaClusterWithoutKubeProxy(HelmSuite):
    """The same, kube-proxy absent: the chart's kubeProxyReplacement (the cluster's
    helm_values set it, with the API server's own address), every Service cilia's."""

    @pytest.fixture(scope="class")
    @classmethod
    def platform(cls):
        yield from _platform("none")


def _platform(kube_proxy: str):
    for cluster in cluster_of_its_own("h", cilia="none", kube_proxy=kube_proxy):
        yield CiliaClusterPlatform(cluster)
