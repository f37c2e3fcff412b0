"""NetworkPolicy conformance: the upstream reachability model against the real datapath.

Namespaces x, y, z with pods a, b, c, echo servers on TCP and UDP 80 and 81 in every
pod; each case stores policies, waits for the agent, and probes every pair on every
port and protocol (see tests/reachability.py). Covers point 3 of issue 3 (the whole
NetworkPolicy API) and point 5 (changes take effect: policies, pod and namespace
labels, pods coming and going).
"""

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reachability import (
    ALL_PORTS,
    TCP80,
    TCP81,
    UDP80,
    UDP81,
    container_ports,
    expr,
    labels,
    netpol,
    port,
)


def per_port(m, **tables):
    """One table per port/protocol: tcp80=..., udp81=...; unnamed ones default to
    `rest` (everything connects if not given)."""
    rest = tables.pop("rest", None) or m.reachability()
    names = {"tcp80": TCP80, "tcp81": TCP81, "udp80": UDP80, "udp81": UDP81}
    out = {c: rest for c in ALL_PORTS}
    for k, v in tables.items():
        out[names[k]] = v
    return out


def only_ports(m, pod, allowed_cases, from_=None, egress=False):
    """Into (or out of) `pod`: connects on `allowed_cases` from/to `from_` (a matcher),
    blocked everywhere else; everything else connects."""
    out = {}
    for c in ALL_PORTS:
        r = m.reachability()
        if egress:
            r.expect_all_egress(pod, False)
            if c in allowed_cases:
                r.expect_peer(pod, from_, True)
        else:
            r.expect_all_ingress(pod, False)
            if c in allowed_cases:
                r.expect_peer(from_, pod, True)
        out[c] = r
    return out


# ---- no policy, default deny, policyTypes ---------------------------------------------


def test_no_policy_everything_connects(m):
    m.check(m.reachability())


def test_default_deny_ingress(m):
    m.apply(netpol("deny-ingress", "x", types=["Ingress"]))
    m.check(m.reachability().expect_all_ingress("x", False))


def test_default_deny_egress(m):
    m.apply(netpol("deny-egress", "x", types=["Egress"]))
    m.check(m.reachability().expect_all_egress("x", False))


def test_default_deny_both_directions(m):
    m.apply(netpol("deny-all", "x", types=["Ingress", "Egress"]))
    m.check(m.reachability().expect_all_ingress("x", False).expect_all_egress("x", False))


def test_policy_types_default_to_ingress(m):
    """No policyTypes and no egress section: Ingress only, egress stays open."""
    m.apply(netpol("select-a", "x", labels(pod="a")))
    m.check(m.reachability().expect_all_ingress("x/a", False))


def test_policy_types_default_include_egress_when_egress_present(m):
    """No policyTypes, an egress section: Ingress and Egress both."""
    m.apply(netpol("a-to-b", "x", labels(pod="a"),
                   egress=[{"to": [{"podSelector": labels(pod="b")}]}]))
    r = m.reachability().expect_all_ingress("x/a", False).expect_all_egress("x/a", False)
    m.check(r.expect("x/a", "x/b", True))


def test_policy_types_default_ignores_an_empty_egress_list(m):
    """The API server adds Egress only when there are egress rules (len(egress) != 0):
    `egress: []` leaves the policy Ingress-only."""
    m.apply(netpol("empty-egress", "x", labels(pod="a"), egress=[]))
    m.check(m.reachability().expect_all_ingress("x/a", False), cases=(TCP80, UDP80))


def test_empty_policy_types_list_means_the_default(m):
    """`policyTypes: []` is defaulted by the API server like an absent field."""
    m.apply(netpol("no-types", "x", labels(pod="a"), types=[], ingress=[{
        "from": [{"podSelector": labels(pod="b")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True),
            cases=(TCP80, UDP80))


def test_policy_types_egress_only_ignores_ingress_rules(m):
    m.apply(netpol("egress-only", "x", labels(pod="a"), types=["Egress"],
                   ingress=[{"from": [{"podSelector": labels(pod="b")}]}],
                   egress=[{"to": [{"namespaceSelector": labels(ns="y")}]}]))
    m.check(m.reachability().expect_all_egress("x/a", False).expect_peer("x/a", "y", True))


def test_pod_selected_by_no_policy_stays_open(m):
    """Policies in x selecting only x/a leave x/b, x/c and the other namespaces open in
    both directions, even towards x/a's neighbours."""
    m.apply(netpol("a-isolated", "x", labels(pod="a"), types=["Ingress", "Egress"]),
            netpol("b-nothing", "y", labels(pod="nobody"), types=["Ingress", "Egress"]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_all_egress("x/a", False))


# ---- peers: podSelector, namespaceSelector, both --------------------------------------


def test_ingress_pod_selector_is_own_namespace(m):
    m.apply(netpol("from-b", "x", labels(pod="a"),
                   ingress=[{"from": [{"podSelector": labels(pod="b")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True))


def test_egress_pod_selector_is_own_namespace(m):
    m.apply(netpol("to-c", "y", labels(pod="a"), types=["Egress"],
                   egress=[{"to": [{"podSelector": labels(pod="c")}]}]))
    m.check(m.reachability().expect_all_egress("y/a", False).expect("y/a", "y/c", True))


def test_empty_pod_selector_peer_means_every_pod_of_own_namespace(m):
    m.apply(netpol("from-x", "x", labels(pod="a"),
                   ingress=[{"from": [{"podSelector": {}}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_peer("x", "x/a", True))


def test_ingress_namespace_selector(m):
    m.apply(netpol("from-y", "x", labels(pod="a"),
                   ingress=[{"from": [{"namespaceSelector": labels(ns="y")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_peer("y", "x/a", True))


def test_egress_namespace_selector(m):
    m.apply(netpol("to-z", "x", labels(pod="b"), types=["Egress"],
                   egress=[{"to": [{"namespaceSelector": labels(ns="z")}]}]))
    m.check(m.reachability().expect_all_egress("x/b", False).expect_peer("x/b", "z", True))


def test_namespace_selector_matches_implicit_name_label(m):
    m.apply(netpol("from-z-by-name", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_peer("z", "x/a", True))


def test_empty_namespace_selector_means_all_namespaces(m):
    m.apply(netpol("from-any-b", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": {}, "podSelector": labels(pod="b")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(["x/b", "y/b", "z/b"], "x/a", True))


def test_namespace_and_pod_selector_in_one_peer_is_and(m):
    m.apply(netpol("from-y-b", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="b")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("y/b", "x/a", True))


def test_namespace_and_pod_selector_as_two_peers_is_or(m):
    m.apply(netpol("from-y-or-b", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": labels(ns="y")}, {"podSelector": labels(pod="b")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(["y", "x/b"], "x/a", True))


def test_egress_namespace_and_pod_selector_in_one_peer(m):
    m.apply(netpol("to-z-c", "y", labels(pod="a"), types=["Egress"], egress=[{"to": [
        {"namespaceSelector": labels(ns="z"), "podSelector": labels(pod="c")}]}]))
    m.check(m.reachability().expect_all_egress("y/a", False).expect("y/a", "z/c", True))


# ---- matchLabels and matchExpressions --------------------------------------------------


@pytest.mark.parametrize("operator,values,allowed", [
    ("In", ("db", "web"), ["y/b", "z/c"]),
    ("NotIn", ("db",), ["x/a", "x/b", "x/c", "y/a", "y/c", "z/a", "z/b", "z/c"]),
    ("Exists", (), ["y/b", "z/c"]),
    ("DoesNotExist", (), ["x/a", "x/b", "x/c", "y/a", "y/c", "z/a", "z/b"]),
])
def test_match_expressions_operators_on_peer_pods(m, operator, values, allowed):
    """tier=db on y/b, tier=web on z/c; NotIn and DoesNotExist match pods without the
    key."""
    m.set_pod("y/b", labels={"pod": "b", "tier": "db"}, sync=False)
    m.set_pod("z/c", labels={"pod": "c", "tier": "web"}, sync=False)
    m.apply(netpol(f"from-{operator.lower()}", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": {}, "podSelector": expr("tier", operator, *values)}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(allowed, "x/a", True))


@pytest.mark.parametrize("operator,values,isolated", [
    ("In", ("a", "b"), ["x/a", "x/b"]),
    ("NotIn", ("a", "b"), ["x/c"]),
    ("Exists", (), ["x/a", "x/b", "x/c"]),
    ("DoesNotExist", (), []),
])
def test_match_expressions_operators_in_policy_pod_selector(m, operator, values, isolated):
    m.apply(netpol("deny", "x", expr("pod", operator, *values), types=["Ingress"]))
    r = m.reachability()
    for pod in isolated:
        r.expect_all_ingress(pod, False)
    m.check(r, cases=(TCP80, UDP81))


def test_match_labels_and_expressions_together_on_namespaces_and_pods(m):
    """Every requirement of a selector must hold: ns In (y, z) and pod=c and pod Exists;
    a second peer: namespaces NotIn (x, y) — only z."""
    m.apply(netpol("mixed", "x", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": expr("ns", "In", "y", "z"),
         "podSelector": {"matchLabels": {"pod": "c"},
                         "matchExpressions": [{"key": "pod", "operator": "Exists"}]}},
        {"namespaceSelector": expr("ns", "NotIn", "x", "y"),
         "podSelector": expr("pod", "In", "a")},
    ]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(["y/c", "z/c", "z/a"], "x/a", True))


# ---- ipBlock ---------------------------------------------------------------------------


def _net24(ip: str) -> str:
    return str(ipaddress.ip_network(f"{ip}/24", strict=False))


def test_ip_block_with_except_egress(m):
    """Egress to x/b's /24 except x/b's /32: every pod but x/b."""
    xb = m.pods["x/b"].ip
    m.apply(netpol("cidr-except", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
        {"ipBlock": {"cidr": _net24(xb), "except": [f"{xb}/32"]}}]}]))
    m.check(m.reachability().expect("x/a", "x/b", False))


def test_ip_block_ingress_from_pod_addresses(m):
    ya, zc = m.pods["y/a"].ip, m.pods["z/c"].ip
    m.apply(netpol("from-cidrs", "x", labels(pod="a"), ingress=[{"from": [
        {"ipBlock": {"cidr": f"{ya}/32"}}, {"ipBlock": {"cidr": f"{zc}/32"}}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False)
            .expect_peer(["y/a", "z/c"], "x/a", True))


def test_ip_block_except_hole_filled_by_another_policy(m):
    """A hole punched by `except` in one policy is allowed by another: the union wins;
    and holes of different sizes resolve by longest prefix."""
    xb, yc = m.pods["x/b"].ip, m.pods["y/c"].ip
    m.apply(
        netpol("cidr-except", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": _net24(xb), "except": [f"{xb}/32", f"{yc}/32"]}}]}]),
        netpol("cidr-hole", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": f"{xb}/32"}}]}]),
    )
    m.check(m.reachability().expect("x/a", "y/c", False))


def test_ip_block_with_ports(m):
    xb = m.pods["x/b"].ip
    m.apply(netpol("cidr-udp", "y", labels(pod="b"), types=["Egress"], egress=[{
        "to": [{"ipBlock": {"cidr": _net24(xb), "except": [f"{xb}/32"]}}],
        "ports": [port(81, "UDP")]}]))
    r = m.reachability().expect_all_egress("y/b", False)
    m.check(per_port(m, rest=r, udp81=r.copy().expect_peer("y/b", None, True)
                     .expect("y/b", "x/b", False)))


def test_ip_block_nested_prefixes_resolve_by_longest_prefix(m):
    """/24 except the /29 around x/b, and x/b's /32 allowed by another policy: pods in
    the /29 are denied but x/b; every other pod allowed."""
    ips = {k: ipaddress.ip_address(p.ip) for k, p in m.pods.items()}
    hole = ipaddress.ip_network(f"{ips['x/b']}/29", strict=False)
    assert sum(ip in hole for ip in ips.values()) >= 2, "the /29 should hold several pods"
    m.apply(
        netpol("cidr-hole", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": _net24(m.pods["x/b"].ip), "except": [str(hole)]}}]}]),
        netpol("cidr-xb", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": f"{ips['x/b']}/32"}}]}]),
    )
    r = m.reachability().expect_all_egress("x/a", False)
    r.expect_peer("x/a", lambda d: ips[d] not in hole or d == "x/b", True)
    m.check(r, sources="x/a")


def test_ip_block_world_except_the_pod_network(m):
    """0.0.0.0/0 except 10.0.0.0/8 reaches no pod; 0.0.0.0/0 alone admits every pod."""
    m.apply(
        netpol("world-not-pods", "x", labels(pod="a"), types=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]),
        netpol("from-world", "y", labels(pod="a"), ingress=[{"from": [
            {"ipBlock": {"cidr": "0.0.0.0/0"}}]}]),
    )
    m.check(m.reachability().expect_all_egress("x/a", False))


# ---- ports -----------------------------------------------------------------------------


def test_port_by_number(m):
    m.apply(netpol("tcp-80", "x", labels(pod="a"), ingress=[{"ports": [port(80)]}]))
    m.check(only_ports(m, "x/a", [TCP80]))


def test_protocol_defaults_to_tcp(m):
    m.apply(netpol("port-81", "x", labels(pod="a"), ingress=[{"ports": [{"port": 81}]}]))
    m.check(only_ports(m, "x/a", [TCP81]))


def test_udp_versus_tcp(m):
    m.apply(netpol("udp-80", "x", labels(pod="a"), ingress=[{"ports": [port(80, "UDP")]}]))
    m.check(only_ports(m, "x/a", [UDP80]))


def test_protocol_without_port_means_every_port(m):
    m.apply(netpol("all-udp", "x", labels(pod="a"), ingress=[{"ports": [{"protocol": "UDP"}]}]))
    m.check(only_ports(m, "x/a", [UDP80, UDP81]))


def test_named_port_ingress(m):
    m.apply(netpol("named", "x", labels(pod="a"), ingress=[{
        "from": [{"namespaceSelector": labels(ns="y")}],
        "ports": [port("serve-81-udp", "UDP")]}]))
    m.check(only_ports(m, "x/a", [UDP81], from_="y"))


def test_named_port_ingress_resolves_each_selected_pods_own_ports(m):
    """serve-80-tcp is port 81 on x/a and 80 on x/b: one policy opens a different
    number on each."""
    m.set_pod("x/a", ports=container_ports({"serve-80-tcp": 81}), sync=False)
    m.apply(netpol("named", "x", expr("pod", "In", "a", "b"),
                   ingress=[{"ports": [port("serve-80-tcp")]}]))
    out = {}
    for c in ALL_PORTS:
        r = m.reachability().expect_all_ingress(["x/a", "x/b"], False)
        if c == TCP81:
            r.expect_all_ingress("x/a", True)
        if c == TCP80:
            r.expect_all_ingress("x/b", True)
        out[c] = r
    m.check(out)


def test_named_port_egress_resolves_against_destination(m):
    """Egress to the name serve-80-udp: port 80 on every pod but y/b, where the name is
    port 81."""
    m.set_pod("y/b", ports=container_ports({"serve-80-udp": 81}), sync=False)
    m.apply(netpol("named-egress", "x", labels(pod="a"), types=["Egress"],
                   egress=[{"ports": [port("serve-80-udp", "UDP")]}]))
    r = m.reachability().expect_all_egress("x/a", False)
    m.check(per_port(m, rest=r,
                     udp80=r.copy().expect_peer("x/a", None, True).expect("x/a", "y/b", False),
                     udp81=r.copy().expect("x/a", "y/b", True)))


def test_named_port_egress_to_pods_sharing_an_identity(m):
    """y/e has y/b's labels (one identity) but its serve-80-udp is port 81: each
    destination's own number is allowed, not the union of both — or, if cilia cannot
    tell them apart, the policy says so loudly (issue 3: never silently widened)."""
    m.add_pod("y", "e", labels={"pod": "b"}, ports=container_ports({"serve-80-udp": 81}),
              sync=False)
    m.apply(netpol("named-egress", "x", labels(pod="a"), types=["Egress"],
                   egress=[{"ports": [port("serve-80-udp", "UDP")]}]))
    r = m.reachability().expect_all_egress("x/a", False)
    expected = {UDP80: r.copy().expect_peer("x/a", None, True).expect("x/a", "y/e", False),
                UDP81: r.copy().expect("x/a", "y/e", True)}
    try:
        m.check(expected, cases=(UDP80, UDP81), sources="x/a")
    except AssertionError as exact:
        status = [p for p in m.client.policies() if p.name == "named-egress"]
        assert status and any("serve-80-udp" in w for w in status[0].warnings), \
            f"widened without a warning in the policy's status:\n{exact}"


def test_named_port_with_other_protocol_matches_nothing(m):
    """serve-80-tcp is a TCP port: asked for as UDP it names no port at all."""
    m.apply(netpol("named-wrong-proto", "x", labels(pod="a"),
                   ingress=[{"ports": [port("serve-80-tcp", "UDP")]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False))


@pytest.mark.parametrize("proto,start,end,allowed", [
    ("TCP", 80, 81, [TCP80, TCP81]),
    ("TCP", 81, 81, [TCP81]),
    ("TCP", 81, 1000, [TCP81]),
    ("UDP", 1, 80, [UDP80]),
    ("UDP", 79, 96, [UDP80, UDP81]),
    ("TCP", 1, 65535, [TCP80, TCP81]),
])
def test_end_port_range(m, proto, start, end, allowed):
    m.apply(netpol("range", "x", labels(pod="a"), ingress=[{
        "from": [{"namespaceSelector": {}}], "ports": [port(start, proto, end=end)]}]))
    m.check(only_ports(m, "x/a", allowed))


def test_end_port_range_egress(m):
    m.apply(netpol("range-out", "z", labels(pod="c"), types=["Egress"], egress=[{
        "to": [{"namespaceSelector": labels(ns="x")}], "ports": [port(81, "TCP", end=82)]}]))
    m.check(only_ports(m, "z/c", [TCP81], from_="x", egress=True))


def test_several_ports_in_one_rule(m):
    m.apply(netpol("two-ports", "x", labels(pod="a"), ingress=[{
        "ports": [port(80, "UDP"), port(81, "TCP")]}]))
    m.check(only_ports(m, "x/a", [UDP80, TCP81]))


# ---- empty means all -------------------------------------------------------------------


def test_empty_rule_allows_everything(m):
    m.apply(netpol("allow-all", "x", types=["Ingress", "Egress"], ingress=[{}], egress=[{}]))
    m.check(m.reachability())


def test_empty_from_with_ports_means_every_peer(m):
    m.apply(netpol("any-on-81", "x", labels(pod="c"), ingress=[{"from": [], "ports": [
        port(81, "UDP")]}]))
    m.check(only_ports(m, "x/c", [UDP81]))


def test_empty_ports_means_every_port(m):
    m.apply(netpol("b-any-port", "x", labels(pod="a"), ingress=[{
        "from": [{"podSelector": labels(pod="b")}], "ports": []}]))
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True))


def test_empty_to_means_every_destination(m):
    m.apply(netpol("to-any-80", "y", labels(pod="a"), types=["Egress"], egress=[{
        "ports": [port(80)]}]))
    m.check(only_ports(m, "y/a", [TCP80], egress=True))


# ---- stacking --------------------------------------------------------------------------


def test_stacked_policies_are_a_union(m):
    m.apply(
        netpol("deny-x", "x", types=["Ingress"]),
        netpol("b-on-80", "x", labels(pod="a"), ingress=[{
            "from": [{"podSelector": labels(pod="b")}], "ports": [port(80)]}]),
        netpol("y-on-81", "x", labels(pod="a"), ingress=[{
            "from": [{"namespaceSelector": labels(ns="y")}], "ports": [port(81)]}]),
        netpol("udp-from-c", "x", expr("pod", "In", "a", "b"), ingress=[{
            "from": [{"namespaceSelector": {}, "podSelector": labels(pod="c")}],
            "ports": [port(protocol="UDP")]}]),
    )
    base = m.reachability().expect_all_ingress("x", False)
    udp = base.copy().expect_peer(["x/c", "y/c", "z/c"], ["x/a", "x/b"], True)
    m.check(per_port(m, tcp80=base.copy().expect("x/b", "x/a", True),
                     tcp81=base.copy().expect_peer("y", "x/a", True),
                     udp80=udp, udp81=udp))


def test_rules_of_one_policy_are_a_union(m):
    m.apply(netpol("two-rules", "x", labels(pod="a"), ingress=[
        {"from": [{"podSelector": labels(pod="b")}], "ports": [port(80)]},
        {"from": [{"podSelector": labels(pod="c")}], "ports": [port(81, "UDP")]},
    ]))
    base = m.reachability().expect_all_ingress("x/a", False)
    m.check(per_port(m, rest=base, tcp80=base.copy().expect("x/b", "x/a", True),
                     udp81=base.copy().expect("x/c", "x/a", True)))


def test_egress_of_source_and_ingress_of_destination_must_both_allow(m):
    m.apply(
        # y/b may send only to x/a; x/a accepts only y/a and y/b on 80
        netpol("b-to-xa", "y", labels(pod="b"), types=["Egress"], egress=[{"to": [
            {"namespaceSelector": labels(ns="x"), "podSelector": labels(pod="a")}]}]),
        netpol("xa-from-y", "x", labels(pod="a"), ingress=[{
            "from": [{"namespaceSelector": labels(ns="y"),
                      "podSelector": expr("pod", "In", "a", "b")}],
            "ports": [port(80)]}]),
    )
    base = m.reachability().expect_all_egress("y/b", False).expect_all_ingress("x/a", False)
    m.check(per_port(m, rest=base, tcp80=base.copy().expect_peer(["y/a", "y/b"], "x/a", True)))


# ---- invalid policies fail closed ------------------------------------------------------


def _cli(m, *argv: str, stdin: str | None = None) -> str:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", m.lab.name, *argv],
                         input=stdin, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


INVALID = {
    "bogus-operator": {"from": [{"podSelector": expr("pod", "Bogus", "b")}]},
    "end-port-below-port": {"ports": [port(81, end=80)]},
    "icmp-protocol": {"ports": [port(80, "ICMP")]},
    "except-outside-cidr": {"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                  "except": ["192.168.0.0/16"]}}]},
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_policy_is_rejected_and_keeps_its_pods_isolated(m, name):
    m.apply(netpol(name, "x", labels(pod="a"), types=["Ingress"], ingress=[INVALID[name]]))
    m.check(m.reachability().expect_all_ingress("x/a", False))
    status = json.loads(_cli(m, "status", "-o", "json"))
    assert status["policies_rejected"] == 1, status
    log = Path(m.lab.load().nodes[0].log).read_text()
    assert f"NetworkPolicy x/{name} rejected" in log


def test_invalid_policy_does_not_take_away_what_a_valid_one_allows(m):
    m.apply(netpol("bogus", "x", labels(pod="a"), types=["Ingress"],
                   ingress=[INVALID["bogus-operator"]]),
            netpol("from-b", "x", labels(pod="a"), ingress=[{
                "from": [{"podSelector": labels(pod="b")}], "ports": [port(80)]}]))
    base = m.reachability().expect_all_ingress("x/a", False)
    m.check(per_port(m, rest=base, tcp80=base.copy().expect("x/b", "x/a", True)))
    listed = json.loads(_cli(m, "policy", "list", "-o", "json"))
    by_name = {p["name"]: p for p in listed}
    assert not by_name["bogus"]["valid"] and "Bogus" in by_name["bogus"]["error"], listed
    assert by_name["from-b"]["valid"] and by_name["from-b"]["selected"] == ["x/a"], listed


def test_invalid_pod_selector_isolates_the_whole_namespace(m):
    """A policy whose own podSelector cannot be read: cilia cannot tell which pods it
    means, so it isolates every pod of its namespace (never fewer)."""
    m.apply(netpol("bad-selector", "y", expr("pod", "Bogus", "a"), types=["Egress"],
                   egress=[{}]))
    m.check(m.reachability().expect_all_egress("y", False), cases=(TCP80, UDP80))


def test_fixing_an_invalid_policy_applies_it(m):
    pol = netpol("fixme", "x", labels(pod="a"), types=["Ingress"],
                 ingress=[INVALID["bogus-operator"]])
    m.apply(pol)
    m.check(m.reachability().expect_all_ingress("x/a", False), cases=(TCP80,))
    pol["spec"]["ingress"][0]["from"][0]["podSelector"] = expr("pod", "In", "b")
    m.apply(pol)
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True))
    assert json.loads(_cli(m, "status", "-o", "json"))["policies_rejected"] == 0


# ---- changes take effect (point 5) -----------------------------------------------------


def test_policy_added_changed_deleted(m):
    m.check(m.reachability(), cases=(TCP80, UDP80))
    pol = netpol("p", "x", labels(pod="a"), ingress=[{
        "from": [{"podSelector": labels(pod="b")}], "ports": [port(80)]}])
    m.apply(pol)
    base = m.reachability().expect_all_ingress("x/a", False)
    m.check(per_port(m, rest=base, tcp80=base.copy().expect("x/b", "x/a", True)),
            what="added")
    # changed: another peer, another protocol
    pol["spec"]["ingress"] = [{"from": [{"namespaceSelector": labels(ns="z")}],
                               "ports": [port(80, "UDP")]}]
    m.apply(pol)
    m.check(per_port(m, rest=base, udp80=base.copy().expect_peer("z", "x/a", True)),
            what="changed")
    # changed: now selects x/b instead of x/a
    pol["spec"]["podSelector"] = labels(pod="b")
    m.apply(pol)
    base_b = m.reachability().expect_all_ingress("x/b", False)
    m.check(per_port(m, rest=base_b, udp80=base_b.copy().expect_peer("z", "x/b", True)),
            what="selector changed")
    m.delete_policy("x", "p")
    m.check(m.reachability(), what="deleted")


def test_policy_applied_and_deleted_with_the_cli(m):
    """The user's path: `cilia apply -f` / `cilia delete -f` of a YAML file with a
    Namespace relabel and a NetworkPolicy."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "z", "labels": {"ns": "z", "env": "prod"}}},
        netpol("from-prod", "y", labels(pod="c"), ingress=[{
            "from": [{"namespaceSelector": labels(env="prod")}]}]),
    ]
    text = yaml.safe_dump_all(docs)
    out = _cli(m, "apply", "-f", "-", stdin=text)
    assert "networkpolicy/from-prod created" in out, out
    m.sync()
    m.check(m.reachability().expect_all_ingress("y/c", False).expect_peer("z", "y/c", True),
            cases=(TCP80, UDP81))
    out = _cli(m, "delete", "-f", "-", stdin=yaml.safe_dump(docs[1]))
    assert "networkpolicy/from-prod deleted" in out, out
    m.sync()
    m.check(m.reachability(), cases=(TCP80, UDP81))


def test_pod_labels_changed(m):
    m.apply(
        netpol("servers", "x", labels(role="server"), types=["Ingress"], ingress=[{
            "from": [{"namespaceSelector": {}, "podSelector": labels(role="client")}]}]),
    )
    m.check(m.reachability(), cases=(TCP80, UDP81), what="no pod labelled yet")
    m.set_pod("x/a", labels={"pod": "a", "role": "server"})
    m.check(m.reachability().expect_all_ingress("x/a", False), cases=(TCP80, UDP81),
            what="x/a became a server")
    m.set_pod("y/c", labels={"pod": "c", "role": "client"})
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("y/c", "x/a", True),
            what="y/c became a client")
    m.set_pod("y/c", labels={"pod": "c"})
    m.set_pod("z/b", labels={"pod": "b", "role": "client"})
    m.check(m.reachability().expect_all_ingress("x/a", False).expect("z/b", "x/a", True),
            cases=(TCP80, UDP81), what="the client is z/b now")
    m.set_pod("x/a", labels={"pod": "a"})
    m.check(m.reachability(), cases=(TCP80, UDP81), what="x/a is no server any more")


def test_pod_relabelled_into_and_out_of_another_pods_identity(m):
    """x/a takes x/b's labels (and so its identity), then they swap back: who may talk
    to z/a follows the labels every time."""
    m.apply(netpol("from-a-pods", "z", labels(pod="a"), ingress=[{
        "from": [{"namespaceSelector": {}, "podSelector": labels(pod="a")}]}]))
    base = m.reachability().expect_all_ingress("z/a", False)
    m.check(base.copy().expect_peer(["x/a", "y/a"], "z/a", True), cases=(TCP80, UDP80))
    m.set_pod("x/a", labels={"pod": "b"})
    m.check(base.copy().expect("y/a", "z/a", True), cases=(TCP80, UDP80),
            what="x/a labelled like x/b")
    m.set_pod("x/b", labels={"pod": "a"})
    m.check(base.copy().expect_peer(["x/b", "y/a"], "z/a", True), cases=(TCP80, UDP80),
            what="x/a and x/b swapped labels")
    m.set_pod("x/a", labels={"pod": "a"}, sync=False)
    m.set_pod("x/b", labels={"pod": "b"})
    m.check(base.copy().expect_peer(["x/a", "y/a"], "z/a", True), cases=(TCP80, UDP80),
            what="labels back")


def test_namespace_labels_changed(m):
    m.apply(netpol("from-blue", "x", labels(pod="a"), ingress=[{
        "from": [{"namespaceSelector": labels(team="blue")}]}]))
    m.check(m.reachability().expect_all_ingress("x/a", False), cases=(TCP80, UDP80))
    m.set_namespace_labels("z", {"ns": "z", "team": "blue"})
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_peer("z", "x/a", True),
            what="z joined team blue")
    m.set_namespace_labels("z", {"ns": "z"})
    m.set_namespace_labels("y", {"ns": "y", "team": "blue"})
    m.check(m.reachability().expect_all_ingress("x/a", False).expect_peer("y", "x/a", True),
            cases=(TCP80, UDP80), what="y instead of z")
    # the policy's own namespace changing labels: x leaves the blue team's reach
    m.apply(netpol("blue-egress", "y", types=["Egress"], egress=[{
        "to": [{"namespaceSelector": labels(team="blue")}]}]))
    r = m.reachability().expect_all_ingress("x/a", False).expect_peer("y", "x/a", True)
    r.expect_all_egress("y", False).expect_peer("y", "y", True)
    m.check(r, cases=(TCP80, UDP80), what="y may send only within team blue")
    m.set_namespace_labels("x", {"ns": "x", "team": "blue"})
    r.expect_peer("y", "x", True).expect_peer("x", "x/a", True)
    m.check(r, cases=(TCP80, UDP80), what="x joined team blue")


def test_pods_added_and_removed(m):
    m.apply(netpol("deny-x", "x", types=["Ingress"]),
            netpol("from-b", "x", ingress=[{"from": [
                {"namespaceSelector": {}, "podSelector": labels(pod="b")}]}]))

    def expected():
        r = m.reachability().expect_all_ingress("x", False)
        return r.expect_peer(lambda p: m.pods[p].labels.get("pod") == "b", "x", True)

    m.check(expected(), cases=(TCP80, UDP80), what="before")
    # a new pod in x is isolated from its first packet; a new pod labelled pod=b in y
    # shares y/b's identity and is allowed in like y/b
    m.add_pod("x", "d", sync=False)
    m.add_pod("y", "e", labels={"pod": "b"})
    m.check(expected(), what="x/d and y/e added")
    # removed pods leave the rest as it was
    m.remove_pod("y/b")
    m.remove_pod("x/c")
    m.check(expected(), what="y/b and x/c removed")
    # a new pod in a brand-new namespace
    m.add_pod("w", "b")
    m.check(expected(), cases=(TCP80, UDP81), what="w/b added")
    m.remove_pod("y/e")
    m.check(expected(), cases=(TCP80, UDP81), what="y/e removed")


HAMMER = r"""
import json, select, socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print("ready", flush=True)
end = time.monotonic() + seconds
tries = connected = 0
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((ip, port))
    _, w, _ = select.select([], [s], [], 0.01)
    if w and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
        connected += 1
    s.close()
    tries += 1
print(json.dumps({"tries": tries, "connected": connected}))
"""


def test_policy_churn_never_transiently_allows_what_stays_denied(m):
    """y/a -> x/a:80 is denied in every state below; a new connection attempt every
    ~10 ms while policies, pod labels and namespace labels change must never get
    through (the agent narrows before it widens)."""
    m.apply(netpol("deny-x", "x", types=["Ingress"]),
            netpol("allow", "x", labels(pod="a"), ingress=[{
                "from": [{"podSelector": labels(pod="b")}]}]))
    proc = subprocess.Popen(
        m.lab.exec_argv("y/a", [sys.executable, "-c", HAMMER, m.pods["x/a"].ip, "80", "5"]),
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        steps = [
            lambda: m.apply(netpol("allow", "x", labels(pod="a"), ingress=[{
                "from": [{"namespaceSelector": labels(ns="z")}]}])),
            lambda: m.apply(netpol("allow-yb", "x", labels(pod="a"), ingress=[{
                "from": [{"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="b")}],
                "ports": [port(80), port(81, "UDP")]}])),
            lambda: m.set_pod("y/a", labels={"pod": "a", "tier": "web"}),
            lambda: m.set_namespace_labels("y", {"ns": "y", "team": "blue"}),
            lambda: m.apply(netpol("allow", "x", labels(pod="a"), ingress=[{
                "from": [{"namespaceSelector": labels(team="red")}]}])),
            lambda: m.set_pod("y/a", labels={"pod": "a"}),
            lambda: m.delete_policy("x", "allow-yb"),
            lambda: m.apply(netpol("allow", "x", labels(pod="a"), ingress=[{
                "from": [{"ipBlock": {"cidr": _net24(m.pods["y/a"].ip),
                                      "except": [f"{m.pods['y/a'].ip}/32"]}}]}])),
            lambda: m.delete_policy("x", "allow"),
        ]
        for step in steps:
            step()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out)
    assert result["connected"] == 0, f"y/a got through to x/a during the changes: {result}"
    assert result["tries"] > 100, result
    m.check(m.reachability().expect_all_ingress("x", False), cases=(TCP80,))


def test_named_port_follows_container_port_changes(m):
    """The pod's manifest changes after the policy: its named port now means 81."""
    m.apply(netpol("named", "x", labels(pod="a"), ingress=[{"ports": [port("serve-80-tcp")]}]))
    m.check(only_ports(m, "x/a", [TCP80]), cases=(TCP80, TCP81), targets="x/a")
    m.set_pod("x/a", ports=container_ports({"serve-80-tcp": 81}))
    m.check(only_ports(m, "x/a", [TCP81]), cases=(TCP80, TCP81), targets="x/a")


def test_policy_survives_agent_restart_and_changes_apply_after_it(m):
    m.apply(netpol("deny-x", "x", types=["Ingress"]),
            netpol("from-y", "x", labels(pod="a"), ingress=[{
                "from": [{"namespaceSelector": labels(ns="y")}]}]))
    r = m.reachability().expect_all_ingress("x", False).expect_peer("y", "x/a", True)
    m.check(r, cases=(TCP80, UDP80))
    m.lab.restart_agent()
    m.sync()
    m.check(r, cases=(TCP80, UDP80), what="after the agent restarted")
    m.delete_policy("x", "from-y")
    m.check(m.reachability().expect_all_ingress("x", False), cases=(TCP80, UDP80),
            what="policy deleted after the restart")
    # changed while the agent is away: enforced the old way meanwhile, the new way after
    m.lab.stop_agent()
    try:
        m.apply(netpol("from-z", "x", labels(pod="b"), ingress=[{
            "from": [{"namespaceSelector": labels(ns="z")}]}]), sync=False)
        m.delete_policy("x", "deny-x", sync=False)
        m.check(m.reachability().expect_all_ingress("x", False), cases=(TCP80,),
                what="agent stopped: the datapath keeps the last policy")
    finally:
        m.lab.start_agent()
    m.sync()
    m.check(m.reachability().expect_all_ingress("x/b", False).expect_peer("z", "x/b", True),
            cases=(TCP80, UDP80), what="changes made while the agent was away")
