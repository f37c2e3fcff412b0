"""Policy audit mode's pure parts (issue 15 item 3): who audits (the agent's flag, the
annotation on the namespace or the pod), flags that must never loosen when a write fails,
and the verdict's name in flows and metrics. The datapath's part is
tests/datapath/test_policy_audit.py."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from cilia.agent.config import AgentConfig
from cilia.agent.metrics import FlowMetrics, _verdict
from cilia.agent.policy import AUDIT_ANNOTATION, audit_annotated, audit_mode
from cilia.agent.policy_writer import _tighter
from cilia.datapath import layouts
from cilia.datapath.layouts import FlowEvent

AUDIT = layouts.ENDPOINT_F_AUDIT
IN, OUT = layouts.ENDPOINT_F_INGRESS_ENFORCED, layouts.ENDPOINT_F_EGRESS_ENFORCED


def _obj(annotations: dict | None) -> dict:
    return {"metadata": {"name": "x", **({"annotations": annotations}
                                         if annotations is not None else {})}}


@pytest.mark.parametrize("annotations,expected", [
    ({AUDIT_ANNOTATION: "true"}, True),
    ({AUDIT_ANNOTATION: "True"}, True),
    ({AUDIT_ANNOTATION: " TRUE "}, True),
    ({AUDIT_ANNOTATION: "false"}, False),
    ({AUDIT_ANNOTATION: "yes"}, False),  # a boolean as Kubernetes writes it, nothing else
    ({AUDIT_ANNOTATION: ""}, False),
    ({"cilia.io/other": "true"}, False),
    ({}, False),
    (None, False),
])
def test_the_annotation_turns_audit_on_only_when_true(annotations, expected):
    assert audit_annotated(_obj(annotations)) is expected


def test_an_object_without_metadata_or_none_is_not_annotated():
    assert not audit_annotated(None)
    assert not audit_annotated({})
    assert not audit_annotated({"metadata": None})


@pytest.mark.parametrize("cluster,namespace,pod,expected", [
    (False, False, None, False),
    (False, False, {AUDIT_ANNOTATION: "false"}, False),
    (True, False, None, True),            # the agent flag: every pod
    (True, False, {AUDIT_ANNOTATION: "false"}, True),
    (False, True, None, True),            # the namespace's annotation: its pods
    (False, True, {AUDIT_ANNOTATION: "false"}, True),  # a pod cannot opt out of it
    (False, False, {AUDIT_ANNOTATION: "true"}, True),  # the pod's own
])
def test_audit_mode_is_any_of_flag_namespace_and_pod(cluster, namespace, pod, expected):
    assert audit_mode(cluster, namespace, _obj(pod) if pod is not None else None) is expected


@pytest.mark.parametrize("current,wanted,expected", [
    (0, IN, IN),
    (IN, OUT, IN | OUT),                    # enforcement only ever added
    (IN | AUDIT, IN, IN),                   # audit off: at once
    (IN, IN | AUDIT, IN),                   # audit on: only once the write succeeds
    (IN | AUDIT, OUT | AUDIT, IN | OUT | AUDIT),
    (0, 0, 0),
])
def test_flags_after_a_failed_write_never_loosen(current, wanted, expected):
    assert _tighter(current, wanted) == expected


def test_the_verdicts_are_named():
    assert _verdict(layouts.VERDICT_FORWARDED) == "forwarded"
    assert _verdict(layouts.VERDICT_DROPPED) == "dropped"
    assert _verdict(layouts.VERDICT_AUDIT) == "audit"
    assert layouts.Reason.REASON_POLICY_AUDIT.label == "policy_audit"
    assert not layouts.Reason.REASON_POLICY_AUDIT.is_drop


def _sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_audit_flow_is_counted_as_audit_with_the_drop_it_was_spared():
    event = FlowEvent(ts_ns=1, saddr=bytes([10, 0, 0, 1]), daddr=bytes([10, 0, 0, 2]),
                      src_identity=300, dst_identity=301, cookie=0, ifindex=4, sport=40000,
                      dport=80, src_ep=1, dst_ep=2, proto=6, verdict=layouts.VERDICT_AUDIT,
                      reason=layouts.Reason.DROP_POLICY, dir=layouts.Direction.METRIC_DIR_INGRESS,
                      rev_nat_id=0, tcp_flags=2, pad=0)
    labels = {"direction": "ingress", "verdict": "audit", "reason": "drop_policy"}
    before = _sample("cilia_flows_total", labels)
    FlowMetrics().count_raw(event.pack(), {}, None)
    assert _sample("cilia_flows_total", labels) == before + 1


def test_the_agent_flag_parses():
    base = ["--node-name", "n", "--pod-cidr", "10.244.1.0/24"]
    assert AgentConfig.from_args([*base, "--policy-audit-mode"]).policy_audit_mode
    assert not AgentConfig.from_args(base).policy_audit_mode
