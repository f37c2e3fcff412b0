"""`cilia policy trace` agrees with the datapath, cell by cell.

Under a set of policies mixing allows and denies, ingress and egress, selectors,
ipBlock and ports, the trace of every pair is taken as the expected truth table and the
datapath is probed against it: any cell where trace and traffic disagree fails with
both matrices. 80/TCP goes through the command line (`cilia policy trace ... -o json`),
the other ports and protocols through the same agent API the command uses.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from reachability import (
    ALL_PORTS,
    TCP80,
    PortProtocol,
    Reachability,
    expr,
    labels,
    netpol,
    port,
)

from cilia.api.v1 import cilia_pb2


@pytest.fixture(scope="module")
def policies(model):
    """A mix: default deny and allows in x, egress limits in y, ipBlock and UDP in z."""
    xc = model.pods["x/c"].ip
    model.apply(
        netpol("deny-in", "x", types=["Ingress"]),
        netpol("a-from-yb", "x", labels(pod="a"), ingress=[{
            "from": [{"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="b")}],
            "ports": [port(80)]}]),
        netpol("b-from-all", "x", labels(pod="b"), ingress=[{
            "from": [{"namespaceSelector": {}}], "ports": [port(80, end=81)]}]),
        netpol("c-to-z", "y", labels(pod="c"), types=["Egress"], egress=[{
            "to": [{"namespaceSelector": labels(ns="z")}]}]),
        netpol("a-mixed", "z", labels(pod="a"), ingress=[
            {"from": [{"ipBlock": {"cidr": f"{xc}/32"}}], "ports": [port(80)]},
            {"from": [{"namespaceSelector": labels(ns="x"), "podSelector": labels(pod="b")}],
             "ports": [port(protocol="UDP")]}]),
        netpol("b-no-egress", "z", labels(pod="b"), types=["Egress"]),
        netpol("not-c", "y", expr("pod", "NotIn", "c"), types=["Ingress"], ingress=[{
            "from": [{"namespaceSelector": expr("ns", "In", "x", "z")}],
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "UDP"}]}]),
    )
    yield model
    model.reset()


def cli_trace(m, src: str, dst: str, case: PortProtocol) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "cilia.cli", "--lab", m.lab.name, "policy", "trace",
         "--from", src, "--to", dst, "--port", str(case), "-o", "json"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def api_trace(m, src: str, dst: str, case: PortProtocol) -> dict:
    req = cilia_pb2.TraceRequest(port=case.port, protocol=case.protocol)
    getattr(req, "from").CopyFrom(cilia_pb2.PodRef(namespace=src.split("/")[0],
                                                   name=src.split("/")[1]))
    req.to.CopyFrom(cilia_pb2.PodRef(namespace=dst.split("/")[0], name=dst.split("/")[1]))
    res = m.client.trace(req)
    return {"allowed": res.allowed,
            "steps": [{"direction": s.direction, "endpoint": s.endpoint,
                       "enforced": s.enforced, "allowed": s.allowed, "reason": s.reason}
                      for s in res.steps]}


def traces(m, case: PortProtocol, pairs) -> dict:
    fn = cli_trace if case == TCP80 else api_trace
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = pool.map(lambda p: fn(m, p[0], p[1], case), pairs)
        return dict(zip(pairs, results, strict=True))


def check_steps(src: str, dst: str, t: dict) -> None:
    """Egress of the source, then ingress of the destination; the verdict is both."""
    steps = t["steps"]
    assert [(s["direction"], s["endpoint"]) for s in steps] == \
        [("egress", src), ("ingress", dst)], t
    assert t["allowed"] == all(s["allowed"] for s in steps), t
    for s in steps:
        assert s["reason"], t
        if not s["enforced"]:
            assert s["allowed"], t


@pytest.mark.parametrize("case", ALL_PORTS, ids=str)
def test_trace_agrees_with_the_datapath_on_every_pair(policies, case):
    m = policies
    pairs = [(s, d) for s in m.pods for d in m.pods if s != d]
    found = traces(m, case, pairs)
    for (s, d), t in found.items():
        check_steps(s, d, t)
    expected = Reachability(list(m.pods))
    for (s, d), t in found.items():
        expected.expect(s, d, t["allowed"])
    allowed = sum(t["allowed"] for t in found.values())
    assert 0 < allowed < len(pairs), "the policy set should allow some pairs, deny others"
    m.check({case: expected}, cases=(case,), what=f"trace (expected) vs datapath, {case}")


def test_trace_names_the_deciding_policy(policies):
    m = policies
    t = cli_trace(m, "y/b", "x/a", TCP80)
    assert t["allowed"] and "x/a-from-yb" in t["steps"][1]["reason"], t
    t = cli_trace(m, "y/a", "x/a", TCP80)
    assert not t["allowed"] and "x/deny-in" in t["steps"][1]["reason"], t
    t = cli_trace(m, "y/c", "x/b", TCP80)
    assert not t["allowed"] and "y/c-to-z" in t["steps"][0]["reason"], t
    assert t["steps"][1]["allowed"] and "x/b-from-all" in t["steps"][1]["reason"], t


def test_trace_of_a_pod_to_itself_agrees_with_the_datapath(policies):
    m = policies
    # the datapath: every pod reaches itself, on every port, even when isolated
    for key in ("x/a", "z/b"):
        out = subprocess.run(
            m.lab.exec_argv(key, [sys.executable, "-m", "cilia.lab.probe", "connect",
                                  m.pods[key].ip, "80", "--timeout", "2"]),
            capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == f"{key}:hello", out.stderr
    wrong = {p: t for p in m.pods if not (t := cli_trace(m, p, p, TCP80))["allowed"]}
    assert not wrong, f"trace says a pod cannot reach itself: {wrong}"
