"""Renders charts/cilia in-process with helm-python-sdk (Helm's own Go SDK, no helm binary)
and hands the tests the rendered objects."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cilia"
CRDS = CHART / "crds"
NAMESPACE = "kube-system"
RELEASE = "cilia"
# The Kubernetes version rendered objects are checked against (kubernetes-validate's
# schemas; kind's node images of the e2e suite are of the same minor).
KUBE_VERSION = "1.33"

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[test]'"
)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML with duplicate keys rejected: Kubernetes' own decoder rejects them too."""


def _mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@functools.cache
def _render(values_json: str) -> tuple[tuple[str, str], ...]:
    values = json.loads(values_json)
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values or None, name=RELEASE, namespace=NAMESPACE,
                           is_install=True)
    return tuple(sorted(out.items()))


def render_files(values: dict | None = None) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), as `helm template` renders."""
    return dict(_render(json.dumps(values or {}, sort_keys=True)))


def render(values: dict | None = None) -> list[dict]:
    """Every object the chart renders (hooks included), parsed."""
    objs = []
    for path, text in render_files(values).items():
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.load_all(text, Loader=UniqueKeyLoader):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                objs.append(doc)
    return objs


def find(objs: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def container(obj: dict, name: str) -> dict:
    (c,) = [c for c in containers(obj) if c["name"] == name]
    return c


def crd_files() -> list[Path]:
    return sorted(p for p in CRDS.glob("*") if p.suffix in (".yaml", ".yml", ".json"))


def crd_objects() -> list[dict]:
    out = []
    for path in crd_files():
        out += [d for d in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if d]
    return out


# Values that change everything that can change, for the "non-default" renders.
CUSTOM_VALUES = {
    "image": {"repository": "registry.example.com/net/cilia", "tag": "0.1.0-rc1",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "ipam": {"clusterPoolIPv4CIDR": "172.16.0.0/12", "clusterPoolIPv4MaskSize": 26},
    "datastore": "kubernetes",
    "logLevel": "debug",
    "kubeProxyReplacement": True, "k8sServiceHost": "192.0.2.10", "k8sServicePort": 443,
    "socketLB": {"hostCgroupRoot": "/sys/fs/cgroup/unified"},
    "cni": {"version": "1.0.0", "binDir": "/home/kubernetes/bin",
            "confDir": "/etc/cni/custom.d", "confFileName": "00-cilia.conflist"},
    "agent": {"devices": ["eth0", "eth1"], "prefilter": False, "routing": "vxlan",
              "masquerade": False, "mtu": 1450, "metricsPort": 19962,
              "sysctls": {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0"},
              "hostPID": True, "updateStrategy": {"maxUnavailable": "10%"},
              "cleanupOnUninstall": False, "extraArgs": ["--verbose-datapath"],
              "metricsWorkloadLabels": True, "metricsWorkloadSeries": 500,
              "conntrackMapMax": 1048576, "conntrackEndpointMax": 10000,
              "kernelDropReasons": False},
    "operator": {"replicas": 3, "hostNetwork": False, "metricsPort": 19963,
                 "healthPort": 19234, "leaderElection": {"leaseName": "cilia-op"}},
    "serviceAccounts": {"agent": {"name": "agent-sa", "annotations": {"a": "b"}}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
    "dashboards": {"enabled": True, "namespace": "monitoring"},
}

# kube-proxy replacement with everything else default (the hooks on, unlike CUSTOM_VALUES).
KPR_VALUES = {"kubeProxyReplacement": True, "k8sServiceHost": "192.0.2.10"}
