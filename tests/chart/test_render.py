"""The chart renders (default and non-default values), lints clean, and every object it
renders, and every CRD it ships, is valid for the Kubernetes API (kubernetes-validate)."""

from __future__ import annotations

import json

import pytest
from chartkit import (
    CHART,
    CRDS,
    CUSTOM_VALUES,
    KPR_VALUES,
    KUBE_VERSION,
    crd_files,
    crd_objects,
    find,
    helm,
    render,
    render_files,
)

kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: pip install -e '.[test]'"
)

# Kinds that are not in the Kubernetes API's own schemas.
NOT_IN_K8S = {("monitoring.coreos.com/v1", "ServiceMonitor")}

VALUE_SETS = {"default": {}, "custom": CUSTOM_VALUES, "kpr": KPR_VALUES}


def test_lint_is_clean():
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_valid_for_the_api(name):
    objs = render(VALUE_SETS[name])
    assert len(objs) >= 10
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_K8S:
            continue
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {err.message} at "
                        f"{'/'.join(map(str, err.path))}")


def test_default_install_has_the_parts():
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render()}
    assert kinds >= {
        ("DaemonSet", "cilia-agent"), ("Deployment", "cilia-operator"),
        ("ConfigMap", "cilia-config"), ("ServiceAccount", "cilia-agent"),
        ("ServiceAccount", "cilia-operator"), ("ClusterRole", "cilia-agent"),
        ("ClusterRole", "cilia-operator"), ("ClusterRoleBinding", "cilia-agent"),
        ("ClusterRoleBinding", "cilia-operator"), ("Role", "cilia-operator-leader-election"),
        ("RoleBinding", "cilia-operator-leader-election"),
        ("PodDisruptionBudget", "cilia-operator"),
    }
    assert not [k for k in kinds if k[0] == "ServiceMonitor"], "ServiceMonitor is off by default"
    for obj in render():
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                               "ValidatingAdmissionPolicyBinding"):
            assert obj["metadata"]["namespace"] == "kube-system", obj["metadata"]["name"]


def test_service_monitor_when_enabled():
    objs = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    sm = find(objs, "ServiceMonitor", "cilia")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    selected = sm["spec"]["selector"]["matchLabels"]
    services = [o for o in objs if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"cilia-agent-metrics",
                                                         "cilia-operator-metrics"}
    for svc in services:
        assert selected.items() <= svc["metadata"]["labels"].items()
        assert svc["spec"]["ports"][0]["name"] == "metrics"


def test_configmap_follows_values():
    default = find(render(), "ConfigMap", "cilia-config")["data"]
    assert default["cluster-pool-ipv4-cidr"] == "10.244.0.0/16"
    assert default["cluster-pool-ipv4-mask-size"] == "24"
    assert default["datastore"] == "kubernetes"
    assert default["devices"] == "" and default["log-level"] == "info"
    assert default["agent-metrics-port"] == "9962"
    custom = find(render(CUSTOM_VALUES), "ConfigMap", "cilia-config")["data"]
    assert custom["cluster-pool-ipv4-cidr"] == "172.16.0.0/12"
    assert custom["cluster-pool-ipv4-mask-size"] == "26"
    assert custom["devices"] == "eth0,eth1" and custom["log-level"] == "debug"
    assert custom["routing"] == "vxlan" and custom["agent-metrics-port"] == "19962"


def test_conflist_is_what_the_plugin_reads():
    for values in VALUE_SETS.values():
        objs = render(values)
        conflist = json.loads(find(objs, "ConfigMap", "cilia-config")["data"]["cni-conflist"])
        assert conflist["cniVersion"] == (values.get("cni", {}).get("version") or "1.1.0")
        assert conflist["name"] == "cilia"
        (plugin,) = conflist["plugins"]
        assert plugin == {"type": "cilia-cni", "socket": "/run/cilia/cilia.sock"}
        ds = find(objs, "DaemonSet", "cilia-agent")
        agent = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
        assert f"--socket={plugin['socket']}" in agent[0]["args"]


def test_config_change_rolls_the_pods():
    def checksums(values):
        objs = render(values)
        return [find(objs, kind, name)["spec"]["template"]["metadata"]["annotations"]
                ["checksum/config"] for kind, name in (("DaemonSet", "cilia-agent"),
                                                       ("Deployment", "cilia-operator"))]

    a, b = checksums({}), checksums({"logLevel": "debug"})
    assert a[0] == a[1] and b[0] == b[1] and a != b


def test_notes_tell_how_to_check():
    notes = render_files()["cilia/templates/NOTES.txt"]
    for text in ("kubectl -n kube-system rollout status daemonset/cilia-agent",
                 "rollout status deployment/cilia-operator", "kubectl get cilianodes",
                 "cilia status", "10.244.0.0/16"):
        assert text in notes


# ---- CRDs: whatever charts/cilia/crds/ holds ------------------------------------------


def _need_crds():
    if not crd_files():
        pytest.skip(f"no CRDs in {CRDS.relative_to(CHART.parents[1])} yet: "
                    "nothing to validate (they are written separately)")


def test_crds_are_valid_for_the_api():
    _need_crds()
    for obj in crd_objects():
        assert obj["kind"] == "CustomResourceDefinition", obj.get("kind")
        # cilia's own, and the upstream admin policy API's (vendored verbatim)
        assert obj["spec"]["group"] in ("cilia.io", "policy.networking.k8s.io")
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"CRD {obj['metadata']['name']}: {err.message} at "
                        f"{'/'.join(map(str, err.path))}")
        for version in obj["spec"]["versions"]:
            assert version["schema"]["openAPIV3Schema"], f"{obj['metadata']['name']}: no schema"


def test_helm_ships_every_crd_file():
    _need_crds()
    with helm.Chart.load(str(CHART)) as chart:
        shipped = {c["filename"].rsplit("/", 1)[-1] for c in chart.crds}
    assert shipped == {p.name for p in crd_files()}


def test_documented_kinds_have_crds():
    _need_crds()
    kinds = {o["spec"]["names"]["kind"] for o in crd_objects()}
    assert kinds >= {"CiliaIdentity", "CiliaNode", "CiliaNetworkPolicy",
                     "CiliaClusterwideNetworkPolicy", "ClusterNetworkPolicy"}
