"""ClusterNetworkPolicy in the datapath: the Admin tier before NetworkPolicy, the
Baseline tier after it, priorities and rule order, Accept / Deny / Pass, CIDR peers, and
a policy cilia refuses held closed. The reachability model (namespaces x, y, z labelled
ns=<name>; pods a, b, c labelled pod=<name>; TCP and UDP 80 and 81) through real BPF."""

import json
import subprocess
import sys

from reachability import TCP80, labels, netpol
from test_netpol_conformance import per_port

from cilia.client import AgentClient


def cnp(name: str, tier: str, priority: int, subject: dict, ingress=None, egress=None
        ) -> dict:
    spec: dict = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def ns(name: str) -> dict:
    return {"namespaces": labels(ns=name)}


def pods(namespace: str, pod: str) -> dict:
    return {"pods": {"namespaceSelector": labels(ns=namespace), "podSelector": labels(pod=pod)}}


def rule(action: str, peers: list, name: str = "", protocols=None, side: str = "from") -> dict:
    out = {"action": action, side: peers}
    if name:
        out["name"] = name
    if protocols is not None:
        out["protocols"] = protocols
    return out


def tcp(number: int) -> dict:
    return {"tcp": {"destinationPort": {"number": number}}}


ALL_NAMESPACES = {"namespaces": {}}


def trace(m, src: str, dst: str, port: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "cilia.cli", "--lab", m.lab.name, "policy", "trace",
         "--from", src, "--to", dst, "--port", port, "-o", "json"],
        capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_admin_deny_wins_over_a_networkpolicy_allow(m):
    m.apply(netpol("allow-all-in", "x", ingress=[{}]),
            cnp("deny-y", "Admin", 10, ns("x"),
                ingress=[rule("Deny", [ns("y")], name="no-y")]))
    r = m.reachability()
    r.expect_peer("y", "x", False)
    m.check(r)
    step = trace(m, "y/a", "x/b", "80/TCP")["steps"][-1]
    assert step["allowed"] is False
    assert ("denied by ClusterNetworkPolicy deny-y (Admin tier, priority 10) ingress[0] "
            "'no-y': Deny") in step["reason"]


def test_priority_and_rule_order_decide(m):
    """The lower priority number first; within a policy the first rule. A wildcard rule
    of a better priority beats a more specific (port) rule of a worse one."""
    m.apply(cnp("z-out", "Admin", 20, pods("x", "a"), ingress=[rule("Deny", [ns("z")])]),
            cnp("z-c-80", "Admin", 10, pods("x", "a"),
                ingress=[rule("Accept", [pods("z", "c")], protocols=[tcp(80)])]),
            cnp("z-b-any", "Admin", 5, pods("x", "b"),
                ingress=[rule("Deny", [pods("z", "b")]),
                         rule("Accept", [pods("z", "b")], protocols=[tcp(80)])]))
    rest = m.reachability()
    rest.expect_peer("z", "x/a", False).expect("z/b", "x/b", False)
    tcp80 = rest.copy().expect("z/c", "x/a", True)
    m.check(per_port(m, tcp80=tcp80, rest=rest))


def test_pass_hands_the_decision_to_networkpolicy(m):
    """The Pass (TCP 80 only) outranks the Deny of every port, so on TCP 80 from y the
    NetworkPolicy decides; the Deny holds on the other ports."""
    m.apply(cnp("pass-y", "Admin", 1, ns("x"),
                ingress=[rule("Pass", [ns("y")], protocols=[tcp(80)])]),
            cnp("deny-rest", "Admin", 2, ns("x"), ingress=[rule("Deny", [ALL_NAMESPACES])]),
            netpol("from-y-a", "x", ingress=[{"from": [{
                "namespaceSelector": labels(ns="y"), "podSelector": labels(pod="a")}]}]))
    rest = m.reachability()
    rest.expect_all_ingress("x", False)
    tcp80 = rest.copy().expect_peer("y/a", "x", True)
    m.check(per_port(m, tcp80=tcp80, rest=rest))
    step = trace(m, "y/a", "x/b", "80/TCP")["steps"][-1]
    assert step["allowed"] and step["reason"].startswith("the Admin tier passed it on")
    assert "NetworkPolicy x/from-y-a" in step["reason"]


def test_baseline_decides_only_where_no_networkpolicy_does(m):
    m.apply(cnp("y-closed", "Baseline", 10, ns("y"),
                ingress=[rule("Deny", [ALL_NAMESPACES])]))
    r = m.reachability()
    r.expect_all_ingress("y", False)
    m.check(r, what="baseline deny")
    m.apply(netpol("from-x", "y", ingress=[{"from": [{"namespaceSelector": labels(ns="x")}]}]))
    r = m.reachability()
    r.expect_all_ingress("y", False).expect_peer("x", "y", True)
    m.check(r, what="a NetworkPolicy overrides the baseline")


def test_egress_to_networks_accept_over_networkpolicy(m):
    """A Networks peer matches pods' addresses too (the API says so); an Admin Accept
    lets through what the namespace's NetworkPolicy denies."""
    ip = m.pods["y/b"].ip
    m.apply(netpol("no-egress", "x", types=["Egress"]),
            cnp("to-y-b", "Admin", 3, pods("x", "a"),
                egress=[rule("Accept", [{"networks": [f"{ip}/32"]}], side="to",
                             protocols=[tcp(80)])]))
    rest = m.reachability()
    rest.expect_all_egress("x", False)
    tcp80 = rest.copy().expect("x/a", "y/b", True)
    m.check(per_port(m, tcp80=tcp80, rest=rest), cases=[TCP80], sources="x")


def test_a_refused_policy_holds_its_subject_closed(m):
    """A policy cilia cannot parse (an action the API does not have, stored without the
    API server's checks) denies what its subject does in its directions, and says why."""
    bad = cnp("bad-action", "Admin", 7, ns("z"), ingress=[rule("Allow", [ns("x")])])
    m.apply(bad)
    r = m.reachability()
    r.expect_all_ingress("z", False)
    m.check(r)
    node = m.lab.load().nodes[0]
    statuses = {p.name: p for p in AgentClient(node.socket).policies()}
    assert not statuses["bad-action"].valid
    assert "spec.ingress[0].action" in statuses["bad-action"].error
