"""Policy on the paths the pod-to-pod matrix does not cover: traffic from outside the
cluster and from the node into a pod (the to-pod program), and flows that a policy
change does not concern, which must not notice it."""

import json
import subprocess

import pytest
from labkit import PROBE, pod_manifest, probe, servers


def _policy(name: str, spec: dict, namespace: str = "default") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


@pytest.fixture(scope="module")
def web(lab):
    return lab.run_pod(pod_manifest("web", labels={"app": "web"}))


def test_outside_to_pod_obeys_ingress_policy(lab, web, apply):
    node = lab.load().nodes[0]
    with servers(lab, "default/web", [80], "web"):
        assert probe(lab, "outside", web.ip, 80) == "web:hello"
        apply(_policy("web-deny", {"podSelector": {"matchLabels": {"app": "web"}}}))
        assert probe(lab, "outside", web.ip, 80, timeout=1) is None
        # the node itself may always reach its pods (kubelet probes)
        assert probe(lab, f"node:{node.name}", web.ip, 80) == "web:hello"
        apply(_policy("web-from-outside", {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "172.30.0.0/24"}}],
                         "ports": [{"port": 80}]}],
        }))
        assert probe(lab, "outside", web.ip, 80) == "web:hello"
        assert probe(lab, "outside", web.ip, 80, "udp", timeout=1) is None  # TCP only


def test_egress_to_world_and_replies_from_outside(lab, web, apply):
    with servers(lab, "outside", [9000], "outside"):
        assert probe(lab, "default/web", "172.30.0.1", 9000) == "outside:hello"
        apply(_policy("web-egress-deny", {"podSelector": {"matchLabels": {"app": "web"}},
                                          "policyTypes": ["Egress"]}))
        assert probe(lab, "default/web", "172.30.0.1", 9000, timeout=1) is None
        apply(_policy("web-egress-world", {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}],
        }))
        # allowed out, and the replies come back in through the to-pod program,
        # even though the pod's ingress is isolated too
        apply(_policy("web-deny", {"podSelector": {"matchLabels": {"app": "web"}}}))
        assert probe(lab, "default/web", "172.30.0.1", 9000) == "outside:hello"
        assert probe(lab, "default/web", "172.30.0.1", 9000, "udp") == "outside:hello"


def test_flows_a_change_does_not_concern_keep_moving(lab, apply):
    x = lab.run_pod(pod_manifest("flow-x", labels={"app": "flow-x"}))
    y = lab.run_pod(pod_manifest("flow-y", labels={"app": "flow-y"}))
    other = lab.run_pod(pod_manifest("flow-other", labels={"app": "other"}))
    try:
        with servers(lab, "default/flow-y", [5001], "y"):
            stream = subprocess.Popen(
                lab.exec_argv("default/flow-x", [*PROBE, "stream", y.ip, "5001",
                                                 "--seconds", "4"]),
                stdout=subprocess.PIPE, text=True)
            # churn: policies for other pods come and go, labels of another pod change
            for i in range(6):
                apply(_policy(f"churn-{i}", {
                    "podSelector": {"matchLabels": {"app": "other"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"n": str(i)}}}],
                                 "ports": [{"port": 1000 + i}]}],
                }))
                lab.datastore.put(pod_manifest("flow-other", labels={"app": "other",
                                                                       "gen": str(i)}))
            # and a default deny on the stream's own destination: established flows
            # keep going (conntrack), new ones are refused
            apply(_policy("flow-y-deny", {"podSelector": {"matchLabels": {"app": "flow-y"}}}))
            out, _ = stream.communicate(timeout=30)
            report = json.loads(out)
            assert report["error"] is None, report
            assert report["max_gap"] < 0.5, report
            assert probe(lab, "default/flow-x", y.ip, 5001, timeout=1) is None
    finally:
        for p in (x, y, other):
            lab.remove_pod(p.namespace, p.name)
