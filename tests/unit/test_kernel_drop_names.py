"""The kernel's drop reasons by name (cilia/datapath/kernel_drops.py): the tracepoint's
format file parsed, the kernel's BTF as the fallback, the number where neither names
it; and how a kernel drop is counted (agent/metrics.py)."""

import os
from pathlib import Path

import pytest

from cilia.agent.config import AgentConfig
from cilia.agent.metrics import FLOWS, POLICY_VERDICTS, FlowMetrics
from cilia.datapath import kernel_drops, layouts

# The print fmt of skb:kfree_skb as a 6.x kernel writes it (fields cut short).
FORMAT = """name: kfree_skb
ID: 1553
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, \
REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, \
{ 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" }, \
{ 0x4a, "TC_INGRESS" }, { 75, "SKB_CSUM" }, { SKB_DROP_REASON_NEW, "NEW" }, \
{ 131, "MAX" })
"""


def test_format_names_every_reason_of_the_symbolic_list():
    names = kernel_drops.parse_format(FORMAT)
    assert names == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 4: "SOCKET_CLOSE",
                     0x4a: "TC_INGRESS", 75: "SKB_CSUM", 131: "MAX"}  # no symbol left


def test_format_without_reasons_names_none():
    old = FORMAT.split("print fmt:")[0] + 'print fmt: "skbaddr=%p protocol=%u", REC->skbaddr'
    assert kernel_drops.parse_format(old) == {}
    # another __print_symbolic (not over the reason) is not taken for it
    assert kernel_drops.parse_format('__print_symbolic(REC->proto, { 1, "X" })') == {}


def test_label_names_as_the_kernel_does_else_the_number(monkeypatch):
    monkeypatch.setattr(kernel_drops, "_names", kernel_drops.parse_format(FORMAT))
    assert kernel_drops.label(3) == "kernel:NO_SOCKET"
    assert kernel_drops.label(999) == "kernel:999"


@pytest.mark.skipif(not os.access(kernel_drops.VMLINUX_BTF, os.R_OK), reason="no kernel BTF")
def test_btf_names_agree_with_the_format_file():
    names = kernel_drops._from_btf()
    assert names[1] == "CONSUMED" and "NO_SOCKET" in names.values()
    for root in kernel_drops.TRACEFS:
        path = Path(root, kernel_drops.FORMAT)
        if os.access(path, os.R_OK):
            listed = kernel_drops.parse_format(path.read_text())  # from 2, NOT_SPECIFIED
            assert listed and listed == {n: names[n] for n in listed}
            break


def test_kernel_drop_counted_by_its_reason_and_never_as_a_rule(monkeypatch):
    monkeypatch.setattr(kernel_drops, "_names", {3: "NO_SOCKET"})
    raw = layouts.FlowEvent(
        ts_ns=1, saddr=bytes([10, 244, 1, 2]), daddr=bytes([10, 244, 1, 3]), src_identity=300,
        dst_identity=301, cookie=3, ifindex=7, sport=40000, dport=9999, src_ep=1, dst_ep=2,
        proto=17, verdict=layouts.VERDICT_DROPPED, reason=layouts.Reason.DROP_KERNEL,
        dir=layouts.Direction.METRIC_DIR_INGRESS, rev_nat_id=0, tcp_flags=0, pad=0).pack()

    class Rule:  # a rule whose cookie happens to be the kernel's reason number
        kind, namespace, name, direction = "NetworkPolicy", "ns", "p", "ingress"

    def value(metric, *labels):
        return metric.labels(*labels)._value.get()

    before = value(FLOWS, "ingress", "dropped", "kernel:NO_SOCKET")
    rules_before = value(POLICY_VERDICTS, "NetworkPolicy", "ns", "p", "ingress", "dropped")
    FlowMetrics().count_raw(raw, {3: Rule()}, None)
    assert value(FLOWS, "ingress", "dropped", "kernel:NO_SOCKET") == before + 1
    assert value(POLICY_VERDICTS, "NetworkPolicy", "ns", "p", "ingress",
                 "dropped") == rules_before


def test_flag_on_by_default_and_off_on_demand():
    base = ["--node-name", "n", "--pod-cidr", "10.244.1.0/24"]
    assert AgentConfig.from_args(base).kernel_drop_reasons
    assert not AgentConfig.from_args([*base, "--no-kernel-drop-reasons"]).kernel_drop_reasons


def test_missing_btf_is_named(monkeypatch):
    monkeypatch.setattr(kernel_drops, "VMLINUX_BTF", "/nonexistent/vmlinux")
    assert "no BTF" in kernel_drops.missing_feature()
    assert kernel_drops.start(object()) is None  # logged, never raised
