"""The flow history and the filter behind `cilia observe` (agent/flows.py), and the CLI's
time parsing and merge (cilia/observe.py)."""

import pytest

from cilia.agent.flows import FlowHistory, matches, parse_selector, selector_matches
from cilia.api.v1 import cilia_pb2
from cilia.observe import history, parse_since


def flow(t, src="x/a", dst="x/b", verdict="forwarded", port=80, proto="TCP", reason="",
         src_labels=("app=a",), dst_labels=("app=b", "tier=web"), src_identity=300,
         dst_identity=301):
    sns, _, spod = src.partition("/")
    dns, _, dpod = dst.partition("/")
    return cilia_pb2.FlowEvent(
        time=t, src_namespace=sns, src_pod=spod, dst_namespace=dns, dst_pod=dpod,
        src_labels=list(src_labels), dst_labels=list(dst_labels), verdict=verdict,
        dst_port=port, src_port=40000, protocol=proto, reason=reason,
        src_identity=src_identity, dst_identity=dst_identity)


F = cilia_pb2.FlowFilter


@pytest.mark.parametrize("selector, labels, want", [
    ("app=b", ["app=b"], True),
    ("app==b", ["app=b"], True),
    ("app=b,tier=web", ["app=b"], False),
    ("app!=b", ["app=a"], True),
    ("app!=b", [], True),
    ("app", ["app=x"], True),
    ("!app", ["app=x"], False),
    ("env in (prod, staging),app", ["env=staging", "app=z"], True),
    ("env notin (prod)", ["env=prod"], False),
])
def test_label_selectors(selector, labels, want):
    assert selector_matches(selector, labels) is want


def test_selector_terms_split_outside_parentheses():
    assert parse_selector("a in (x,y),b") == [
        ("a", "in", frozenset({"x", "y"})), ("b", "exists", frozenset())]


def test_filters_either_end_and_one_end():
    e = flow(1.0)
    assert matches(e, F())
    assert matches(e, F(namespace=["x"])) and not matches(e, F(namespace=["y"]))
    assert matches(e, F(pod=["x/b"])) and matches(e, F(pod=["x/a"]))
    assert matches(e, F(from_pod=["x/a"])) and not matches(e, F(from_pod=["x/b"]))
    assert matches(e, F(to_pod=["x/b"], to_port=[80])) and not matches(e, F(to_port=[81]))
    assert matches(e, F(labels="tier=web")) and not matches(e, F(from_labels="tier=web"))
    assert matches(e, F(to_labels="app=b,tier=web"))
    assert matches(e, F(identity=[300])) and not matches(e, F(to_identity=[300]))
    assert matches(e, F(protocol=["tcp"])) and not matches(e, F(protocol=["UDP"]))
    assert not matches(e, F(verdict="dropped"))
    dropped = flow(2.0, verdict="dropped", reason="drop_policy")
    assert matches(dropped, F(verdict="dropped", reason=["drop_policy"]))
    assert not matches(dropped, F(reason=["no_route"]))
    world = flow(3.0, src="", src_labels=())  # not a pod: no labels to match
    assert not matches(world, F(from_labels="app")) and matches(world, F(to_labels="app"))


def test_history_is_bounded_and_answers_last_and_since():
    h = FlowHistory(size=5)
    for i in range(8):
        h.add(bytes([i]), None)

    def decode(raw, names):
        return flow(float(raw[0]), port=80 if raw[0] % 2 else 81)

    times = [e.time for e in h.query(decode, F())]
    assert times == [3.0, 4.0, 5.0, 6.0, 7.0]  # the oldest went
    assert [e.time for e in h.query(decode, F(), last=2)] == [6.0, 7.0]
    assert [e.time for e in h.query(decode, F(), since=5.0)] == [5.0, 6.0, 7.0]
    assert [e.time for e in h.query(decode, F(to_port=[80]), last=2)] == [5.0, 7.0]
    assert h.recorded == 8
    off = FlowHistory(size=0)
    off.add(b"\0", None)
    assert off.query(decode, F()) == []


def test_since_takes_durations_times_and_unix_seconds():
    now = 1_000_000.0
    assert parse_since("30s", now) == now - 30
    assert parse_since("5m", now) == now - 300
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("1700000000", now) == 1_700_000_000
    assert parse_since("2026-12-07T12:00:00", now) == 1796644800.0
    with pytest.raises(ValueError, match="give a duration"):
        parse_since("yesterday", now)


def test_nodes_histories_merge_in_time_order_and_last_applies_to_the_merge():
    class Node:
        def __init__(self, *times):
            self.times = times

        def observe(self, request):
            assert not request.follow
            return [flow(t) for t in self.times]

    request = cilia_pb2.ObserveRequest(last=3)
    merged = history([Node(1.0, 4.0, 6.0), Node(2.0, 5.0)], request)
    assert [e.time for e in merged] == [4.0, 5.0, 6.0]
