"""Policy audit mode (issue 15 item 3): cluster-wide (--policy-audit-mode, the chart's
agent.policyAuditMode), per namespace and per pod (the annotation
cilia.io/policy-audit-mode: "true" on the Namespace or the Pod). What a policy would drop
passes, and is counted (policy_audit in `cilia metrics`) and reported: verdict audit in
the flows (with the drop it was spared, and the deny rule where one refused it), AUDIT in
`cilia policy trace`, the endpoint's POLICY column in `cilia endpoint list`. Switched off,
policy is enforced at once: on new connections, and on connections audit mode let
through, at their next packet (the policy revision, lib/enforce.h ct_recheck)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from labkit import OPEN_FLOWS, metric, pod_manifest, probe, servers

from cilia.client import AgentClient

ANNOTATION = "cilia.io/policy-audit-mode"


def _ns(name: str, audit: bool) -> dict:
    meta = {"name": name, "labels": {"team": name}}
    if audit:
        meta["annotations"] = {ANNOTATION: "true"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def _pod(name: str, namespace: str, audit: bool = False) -> dict:
    manifest = pod_manifest(name, namespace, {"app": name})
    if audit:
        manifest["metadata"]["annotations"] = {ANNOTATION: "true"}
    return manifest


def _deny(name: str, namespace: str, app: str, types=("Ingress",)) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": app}},
                     "policyTypes": list(types)}}


def cli(lab, *argv: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def flows(lab, since: float, *argv: str, want=lambda fs: bool(fs)) -> list[dict]:
    """The flows since `since` (`cilia observe`), waiting a little for the agent to drain
    the ring buffer (every 50 ms)."""
    out: list[dict] = []
    for _ in range(40):
        out = [json.loads(line) for line in cli(lab, "observe", "--since", str(since),
                                                *argv, "-o", "jsonl").splitlines()]
        if want(out):
            break
        time.sleep(0.1)
    return out


def trace(lab, src: str, dst: str, port: str = "80/TCP") -> dict:
    return json.loads(cli(lab, "policy", "trace", "--from", src, "--to", dst, "--port", port,
                          "-o", "json"))


def audited(lab, node) -> dict[str, bool]:
    return {f"{e.pod_namespace}/{e.pod_name}": e.policy_audit
            for e in AgentClient(node.socket).endpoints()}


def put_synced(lab, *objs: dict) -> None:
    for o in objs:
        lab.datastore.put(o)
    AgentClient(lab.load().nodes[0].socket).wait_policy_synced()


@pytest.fixture(scope="module")
def pods(lab):
    """aud (annotated) with pods s and c; enf (not annotated) with s and c, where enf/pa
    carries the annotation itself."""
    lab.datastore.put(_ns("aud", True))
    lab.datastore.put(_ns("enf", False))
    out = {}
    for ns, name, audit in (("aud", "s", False), ("aud", "c", False), ("enf", "s", False),
                            ("enf", "pa", True), ("enf", "c", False)):
        out[f"{ns}/{name}"] = lab.run_pod(_pod(name, ns, audit))
    with servers(lab, "aud/s", [80], "aud-s"), servers(lab, "enf/s", [80], "enf-s"), \
         servers(lab, "enf/pa", [80], "enf-pa"):
        yield out


def test_namespace_annotation_audits_its_pods_only(lab, pods, apply):
    """A default-deny ingress policy on s in both namespaces: in the annotated one the
    connection works, and is reported (verdict audit, the drop it was spared, ingress) and
    counted; in the other it is dropped, as ever."""
    node = lab.load().nodes[0]
    apply(_deny("deny-s", "aud", "s"), _deny("deny-s", "enf", "s"))
    assert audited(lab, node) == {"aud/s": True, "aud/c": True, "enf/s": False,
                                  "enf/pa": True, "enf/c": False}
    before = metric(node, "policy_audit", "ingress")
    start = time.time()
    assert probe(lab, "aud/c", pods["aud/s"].ip, 80) == "aud-s:hello"
    assert probe(lab, "aud/c", pods["aud/s"].ip, 80, "udp") == "aud-s:hello"
    assert probe(lab, "enf/c", pods["enf/s"].ip, 80, timeout=1) is None
    assert metric(node, "policy_audit", "ingress") - before == 2  # once per new flow

    seen = flows(lab, start, "--to-pod", "aud/s", "--verdict", "audit",
                 want=lambda fs: len(fs) >= 2)
    assert {(f["protocol"], f["verdict"], f["reason"], f["direction"]) for f in seen} == {
        ("TCP", "audit", "drop_policy", "ingress"), ("UDP", "audit", "drop_policy",
                                                     "ingress")}, seen
    dropped = flows(lab, start, "--to-pod", "enf/s")
    assert dropped and {f["verdict"] for f in dropped} == {"dropped"}, dropped

    t = trace(lab, "aud/c", "aud/s")
    assert not t["allowed"] and t["audit"], t
    assert t["steps"][-1]["audit"] and "audit mode" in t["steps"][-1]["reason"], t
    t = trace(lab, "enf/c", "enf/s")
    assert not t["allowed"] and not t["audit"], t


def test_pod_annotation_audits_that_pod_only(lab, pods, apply):
    """enf/pa (annotated itself) and enf/s (not), both default-deny: only pa is reached;
    and the egress policy of a pod in audit mode audits too."""
    node = lab.load().nodes[0]
    apply(_deny("deny-s", "enf", "s"), _deny("deny-pa", "enf", "pa"))
    assert probe(lab, "enf/c", pods["enf/pa"].ip, 80) == "enf-pa:hello"
    assert probe(lab, "enf/c", pods["enf/s"].ip, 80, timeout=1) is None
    assert "audit" in {line.split()[-1] for line in cli(lab, "endpoint", "list").splitlines()
                       if "enf/pa" in line}
    flags = {e["ip"]: e["flags"] for e in json.loads(cli(lab, "bpf", "endpoint", "list",
                                                         "-o", "json"))}
    assert flags[pods["enf/pa"].ip] == ["ingress-enforced", "policy-audit"], flags
    assert flags[pods["enf/s"].ip] == ["ingress-enforced"], flags

    apply(_deny("pa-no-egress", "enf", "pa", types=["Egress"]))
    before = metric(node, "policy_audit", "egress")
    start = time.time()
    assert probe(lab, "enf/pa", pods["aud/s"].ip, 80) == "aud-s:hello"  # aud/s is open
    assert metric(node, "policy_audit", "egress") - before == 1
    seen = flows(lab, start, "--from-pod", "enf/pa", "--verdict", "audit")
    assert [(f["reason"], f["direction"]) for f in seen] == [("drop_policy", "egress")], seen


def test_explicit_deny_is_audited_and_names_its_rule(lab, pods, apply):
    """A CiliaNetworkPolicy deny rule on a pod in audit mode: passes, and the flow names
    the deny rule and drop_policy_deny."""
    apply({"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
           "metadata": {"name": "s-deny-c", "namespace": "aud"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "s"}},
                    "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "c"}}]}]}})
    start = time.time()
    assert probe(lab, "aud/c", pods["aud/s"].ip, 80) == "aud-s:hello"
    seen = flows(lab, start, "--to-pod", "aud/s", "--verdict", "audit")
    assert seen and seen[0]["reason"] == "drop_policy_deny", seen
    assert "s-deny-c" in seen[0]["rule"], seen
    t = trace(lab, "aud/c", "aud/s")
    assert t["audit"] and "denied by CiliaNetworkPolicy aud/s-deny-c" in \
        t["steps"][-1]["reason"], t


@pytest.mark.parametrize("where", ["namespace", "pod"])
def test_switching_audit_off_enforces_at_once(lab, pods, apply, where):
    """A TCP connection and a UDP flow that audit mode let through; the annotation goes
    (from the namespace, or from the pod): their next packets are dropped, and a new
    connection is refused."""
    ns, target = ("aud", "s") if where == "namespace" else ("enf", "pa")
    ip = pods[f"{ns}/{target}"].ip
    apply(_deny(f"deny-{target}", ns, target))
    proc = subprocess.Popen(
        lab.exec_argv(f"{ns}/c", [sys.executable, "-c", OPEN_FLOWS.format(host=ip, port=80)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == [f"{ns}-{target}:t1", f"{ns}-{target}:u1"]
        if where == "namespace":
            put_synced(lab, _ns("aud", False))
        else:
            put_synced(lab, _pod("pa", "enf", False))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        after = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
        if where == "namespace":
            put_synced(lab, _ns("aud", True))
        else:
            put_synced(lab, _pod("pa", "enf", True))
    assert after == ["none", "none"], f"connections audit mode let in passed: {after}"
    # (restored above; enforced while it was off:)


def test_audit_off_refuses_new_connections(lab, pods, apply):
    apply(_deny("deny-s", "aud", "s"))
    put_synced(lab, _ns("aud", False))
    try:
        assert audited(lab, lab.load().nodes[0])["aud/s"] is False
        assert probe(lab, "aud/c", pods["aud/s"].ip, 80, timeout=1) is None
        assert not trace(lab, "aud/c", "aud/s")["audit"]
    finally:
        put_synced(lab, _ns("aud", True))
    assert probe(lab, "aud/c", pods["aud/s"].ip, 80) == "aud-s:hello"


def test_agent_flag_audits_every_pod():
    """--policy-audit-mode: a default-deny pod (both ways) in a namespace without the
    annotation is reached, and reaches out, each reported as audit; `cilia status` says
    so."""
    from labkit import unique_lab_name

    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up(agent_args=["--policy-audit-mode"])
        node = lab.load().nodes[0]
        web = lab.run_pod(pod_manifest("web", labels={"app": "web"}))
        lab.run_pod(pod_manifest("client", labels={"app": "client"}))
        put_synced(lab, _deny("deny-web", "default", "web", types=["Ingress", "Egress"]))
        assert audited(lab, node) == {"default/web": True, "default/client": True}
        start = time.time()
        with servers(lab, "default/web", [80], "web"), servers(lab, "outside", [9000],
                                                                "outside"):
            assert probe(lab, "default/client", web.ip, 80) == "web:hello"
            assert probe(lab, "default/web", "172.30.0.1", 9000) == "outside:hello"
        seen = flows(lab, start, "--verdict", "audit", want=lambda fs: len(fs) >= 2)
        assert {f["direction"] for f in seen} == {"ingress", "egress"}, seen
        assert "AUDIT MODE for every pod" in cli(lab, "status")
    finally:
        lab.down()
