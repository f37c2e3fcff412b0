"""The flags the chart passes, parsed by the real command-line parsers of the agent and
the operator, with $(VAR) expanded from the rendered ConfigMap and downward API as the
kubelet expands them. A flag a parser does not know yet is reported by name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from chartkit import CUSTOM_VALUES, KPR_VALUES, container, find, render

DOWNWARD = {"spec.nodeName": "kind-worker", "status.hostIP": "172.18.0.3",
            "metadata.name": "cilia-operator-5d9c7-x2x1q", "metadata.namespace": "kube-system"}
PARSERS = {
    "agent": "from cilia.agent.config import AgentConfig as C",
    "operator": "from cilia.operator.config import OperatorConfig as C",
}


def expanded_args(objs, kind, name, cname) -> list[str]:
    config = find(objs, "ConfigMap", "cilia-config")["data"]
    c = container(find(objs, kind, name), cname)
    env = {}
    for e in c.get("env", []):
        src = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in src:
            env[e["name"]] = config[src["configMapKeyRef"]["key"]]
        elif "fieldRef" in src:
            env[e["name"]] = DOWNWARD[src["fieldRef"]["fieldPath"]]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]


def parse(component: str, args: list[str]) -> subprocess.CompletedProcess:
    code = f"import sys; {PARSERS[component]}; print(C.from_args(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES], ids=["default", "custom"])
def test_operator_accepts_the_charts_flags(values):
    objs = render(values)
    args = [a for a in expanded_args(objs, "Deployment", "cilia-operator", "operator")
            if a not in (values.get("operator", {}).get("extraArgs") or [])]
    res = parse("operator", args)
    assert res.returncode == 0, res.stderr
    assert "cluster_pool='" + find(objs, "ConfigMap", "cilia-config")["data"][
        "cluster-pool-ipv4-cidr"] in res.stdout


def test_agent_accepts_the_charts_flags():
    objs = render()
    args = expanded_args(objs, "DaemonSet", "cilia-agent", "agent")
    assert "--node-name=kind-worker" in args and "--node-ip=172.18.0.3" in args
    res = parse("agent", args)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("values,mode", [
    ({}, "kube_proxy_replacement=False, socket_lb=False"),
    (KPR_VALUES, "kube_proxy_replacement=True, socket_lb=True, "
                 "socket_lb_cgroup='/run/cilia/cgroupv2'"),
    ({**KPR_VALUES, "socketLB": {"enabled": False}},
     "kube_proxy_replacement=True, socket_lb=False"),
    ({"socketLB": {"enabled": True}}, "kube_proxy_replacement=False, socket_lb=True"),
], ids=["default", "kpr", "kpr-no-socket-lb", "socket-lb-only"])
def test_agent_runs_in_the_charts_services_mode(values, mode):
    """The Services mode the chart renders is the one the agent's parser ends up in."""
    args = expanded_args(render(values), "DaemonSet", "cilia-agent", "agent")
    res = parse("agent", args)
    assert res.returncode == 0, res.stderr
    assert mode in res.stdout, res.stdout


@pytest.mark.parametrize("audit", [False, True])
def test_agent_runs_in_the_charts_policy_audit_mode(audit):
    """agent.policyAuditMode reaches the agent as --policy-audit-mode, and only then."""
    args = expanded_args(render({"agent": {"policyAuditMode": audit}}), "DaemonSet",
                         "cilia-agent", "agent")
    res = parse("agent", args)
    assert res.returncode == 0, res.stderr
    assert f"policy_audit_mode={audit}" in res.stdout, res.stdout
