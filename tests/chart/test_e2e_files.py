"""The Helm suite's files: its policies are valid objects (NetworkPolicy for the API,
CiliaNetworkPolicy for the chart's CRD), the kind cluster config keeps kube-proxy and
drops the default CNI, the workflow runs the suite on pull requests from the lock, and
both tiers run the one suite (no checks of their own that the other lacks)."""

from __future__ import annotations

import ast

import pytest
import yaml
from chartkit import KUBE_VERSION, REPO, crd_objects, find, render

E2E = REPO / "tests" / "e2e"
KIND = E2E / "kind"
TIERS = (KIND / "test_kind.py", REPO / "tests" / "cluster" / "test_helm.py")
WORKFLOW = REPO / ".github" / "workflows" / "e2e-kind.yml"

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")


def manifests() -> list[dict]:
    return [d for p in sorted((E2E / "manifests").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def test_network_policies_are_valid():
    policies = [m for m in manifests() if m["kind"] == "NetworkPolicy"]
    assert len(policies) == 2
    for obj in policies:
        kv.validate(obj, KUBE_VERSION, strict=True)


def test_cilia_policies_match_the_crd():
    import jsonschema

    crds = {c["spec"]["names"]["kind"]: c for c in crd_objects()}
    if "CiliaNetworkPolicy" not in crds:
        pytest.skip("no CiliaNetworkPolicy CRD in charts/cilia/crds yet")
    crd = crds["CiliaNetworkPolicy"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    schema = version["schema"]["openAPIV3Schema"]
    policies = [m for m in manifests() if m["kind"] == "CiliaNetworkPolicy"]
    assert policies
    for obj in policies:
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        jsonschema.validate(obj, schema)


def test_kind_cluster_config():
    conf = yaml.safe_load((KIND / "kind-config.yaml").read_text())
    net = conf["networking"]
    assert net["disableDefaultCNI"] is True
    assert net.get("kubeProxyMode", "iptables") != "none", "kube-proxy is kept"
    pool = find(render(), "ConfigMap", "cilia-config")["data"]
    assert net["podSubnet"] == pool["cluster-pool-ipv4-cidr"]
    assert [n["role"] for n in conf["nodes"]].count("worker") >= 2


def test_workflow_runs_the_suite_on_pull_requests():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads `on:` as True
    assert "pull_request" in triggers
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    text = "\n".join(str(s.get("run", "")) for s in steps)
    for tool in ("kind", "kubectl", "helm"):
        assert tool in text, f"the workflow does not install {tool}"
    assert "pytest tests/e2e/kind" in text
    assert "uv sync --locked" in text and "--require-hashes" in text, (
        "the workflow installs the test runner from the lock")


@pytest.mark.parametrize("path", TIERS, ids=lambda p: p.parent.name)
def test_each_tier_runs_the_one_helm_suite(path):
    """A tier is a platform and nothing else: classes deriving HelmSuite (one per way the
    platform is set up: with kube-proxy, without), whose only member is the `platform`
    fixture; no test of its own."""
    tree = ast.parse(path.read_text())
    suites = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
              and any(getattr(b, "id", "") == "HelmSuite" for b in c.bases)]
    assert suites, f"{path}: no class deriving HelmSuite"
    for suite in suites:
        members = [n.name for n in suite.body if isinstance(n, ast.FunctionDef)]
        assert members == ["platform"], f"{path}: {suite.name}: {members}"
    tests = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
             and n.name.startswith("test")]
    assert not tests, f"{path} has tests of its own: {tests}"
