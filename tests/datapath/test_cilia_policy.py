"""CiliaNetworkPolicy and CiliaClusterwideNetworkPolicy in the datapath: what
NetworkPolicy cannot say — explicit deny (deny wins), entities, ICMP, cluster-wide."""

import json
import subprocess
import sys

import pytest
from labkit import PROBE, pod_manifest, probe, servers

from cilia.client import AgentClient


def _ns(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _cnp(name, spec, namespace="x", kind="CiliaNetworkPolicy") -> dict:
    meta = {"name": name} | ({"namespace": namespace} if kind == "CiliaNetworkPolicy" else {})
    return {"apiVersion": "cilia.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


@pytest.fixture(scope="module")
def pods(lab):
    lab.datastore.put(_ns("x", {"team": "x"}))
    lab.datastore.put(_ns("y", {"team": "y"}))
    out = {}
    for ns, name in (("x", "a"), ("x", "b"), ("x", "c"), ("y", "d")):
        out[name] = lab.run_pod(pod_manifest(name, ns, {"pod": name}))
    with servers(lab, "x/a", [80], "a"), servers(lab, "x/b", [80, 81], "b"), \
         servers(lab, "y/d", [80], "d"):
        yield out


def test_deny_wins_over_a_networkpolicy_allow(lab, pods, apply):
    apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "b-from-x", "namespace": "x"},
           "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                    "ingress": [{"from": [{"podSelector": {}}]}]}},
          _cnp("b-deny-c", {"endpointSelector": {"matchLabels": {"pod": "b"}},
                            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "c"}}],
                                             "toPorts": [{"ports": [{"port": "80"}]}]}]}))
    b = pods["b"].ip
    assert probe(lab, "x/a", b, 80) == "b:hello"
    assert probe(lab, "x/c", b, 80, timeout=1) is None  # denied despite the allow
    assert probe(lab, "x/c", b, 81) == "b:hello"  # the deny names port 80 only
    trace = json.loads(subprocess.run(
        [sys.executable, "-m", "cilia.cli", "--lab", lab.name, "policy", "trace",
         "--from", "x/c", "--to", "x/b", "--port", "80/TCP", "-o", "json"],
        capture_output=True, text=True, check=True).stdout)
    assert trace["allowed"] is False
    assert "denied by CiliaNetworkPolicy x/b-deny-c ingressDeny[0]" in trace["steps"][-1]["reason"]


def test_entities_world_and_cluster(lab, pods, apply):
    a = pods["a"].ip
    apply(_cnp("a-world-only", {"endpointSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"fromEntities": ["world"]}]}))
    assert probe(lab, "outside", a, 80) == "a:hello"
    assert probe(lab, "x/b", a, 80, timeout=1) is None  # a pod is not the world
    apply(_cnp("a-world-only", {"endpointSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"fromEntities": ["cluster"]}]}))
    assert probe(lab, "x/b", a, 80) == "a:hello"
    assert probe(lab, "y/d", a, 80) == "a:hello"
    assert probe(lab, "outside", a, 80, timeout=1) is None


def _ping(lab, src, ip) -> bool:
    res = subprocess.run(lab.exec_argv(src, [*PROBE, "ping", ip, "--timeout", "1"]),
                         capture_output=True)
    return res.returncode == 0


def test_icmp_types(lab, pods, apply):
    a = pods["a"].ip
    assert _ping(lab, "x/b", a)
    apply(_cnp("a-ping", {"endpointSelector": {"matchLabels": {"pod": "a"}},
                          "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}],
                                       "icmps": [{"fields": [{"type": 8}]}]}]}))
    assert _ping(lab, "x/b", a)  # echo request allowed, the reply rides conntrack
    assert probe(lab, "x/b", a, 80, timeout=1) is None  # nothing else
    assert not _ping(lab, "x/c", a)  # and only from b


def test_clusterwide_policy_spans_namespaces(lab, pods, apply):
    apply(_cnp("no-egress-to-y", {
        "endpointSelector": {},
        "egressDeny": [{"toEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "y"}}]}],
        "egress": [{"toEntities": ["all"]}],
    }, kind="CiliaClusterwideNetworkPolicy"))
    assert probe(lab, "x/a", pods["d"].ip, 80, timeout=1) is None
    assert probe(lab, "x/a", pods["b"].ip, 80) == "b:hello"
    assert probe(lab, "outside", pods["d"].ip, 80) == "d:hello"  # egress only


def test_rejected_cilia_policy_keeps_pods_isolated(lab, pods, apply):
    apply(_cnp("broken", {"endpointSelector": {"matchLabels": {"pod": "a"}},
                          "ingress": [{"fromEntities": ["everyone"]}]}))
    assert probe(lab, "x/b", pods["a"].ip, 80, timeout=1) is None
    (status,) = [p for p in AgentClient(lab.load().nodes[0].socket).policies()
                 if p.name == "broken"]
    assert not status.valid and "spec.ingress[0].fromEntities[0]" in status.error
