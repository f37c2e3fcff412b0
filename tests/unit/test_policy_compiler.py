"""The policy compiler, judged by the verdicts its output gives: `verdict()` looks an
endpoint's entries up as bpf/lib/policy.h does (the peer's identity, its CIDR identity
and ANY; longest prefix within one identity; a deny from any wins), and the ipcache
side is emulated as the agent fills it (a pod's /32 carries its identity and the CIDR
identity of the most specific ipBlock prefix containing it).

The cluster is the Kubernetes reachability model: namespaces x, y, z; pods a, b, c in
each, labelled pod=<name>; every pod local to the node.
"""

import ipaddress
import itertools
import random

import pytest

from cilia.datapath import layouts
from cilia.identity import WORLD, IdentityAllocator, security_labels
from cilia.policy.compiler import (
    ALLOW,
    ANY,
    DENY,
    DIRS,
    CidrIdentities,
    Compiled,
    Compiler,
    EndpointPolicy,
    Entry,
    EntryKey,
    PodView,
    RuleRef,
    port_prefixes,
    verdict,
)
from cilia.policy.model import EGRESS, INGRESS

TCP, UDP, SCTP = 6, 17, 132
PROTOS = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NS_LABELS = {"x": {"ns": "x", "team": "red"}, "y": {"ns": "y", "team": "blue"},
             "z": {"ns": "z", "team": "blue", "env": "dev"}}
POD_LABELS = {"a": {"pod": "a", "tier": "web"}, "b": {"pod": "b", "tier": "db"},
              "c": {"pod": "c"}}
# Servers on 80 and 81 of every protocol; the named port "http" differs per pod.
SERVE = tuple((f"serve-{n}-{p.lower()}", PROTOS[p], n) for n in (80, 81) for p in PROTOS)
HTTP = {"a": (("http", TCP, 80),), "b": (("http", TCP, 81),), "c": ()}
EXTERNAL = ("192.168.1.7", "192.168.2.5", "8.8.8.8")


class MemoryStore:
    def __init__(self):
        self.data = {}

    def identities(self):
        return dict(self.data)

    def create(self, number, labels):
        return self.data.setdefault(number, labels) is labels


class Cluster:
    def __init__(self, extra: tuple[tuple[str, str, dict, str], ...] = (), local=None):
        self.allocator = IdentityAllocator(MemoryStore())
        self.namespaces = {ns: dict(NS_LABELS[ns]) for ns in NAMESPACES}
        self.pods: dict[str, PodView] = {}
        for i, ns in enumerate(NAMESPACES):
            for j, name in enumerate(PODS):
                self.add(ns, name, POD_LABELS[name], f"10.{i + 1}.0.{j + 1}",
                         SERVE + HTTP[name])
        for ns, name, labels, ip in extra:
            self.add(ns, name, labels, ip, SERVE)
        names = sorted(self.pods) if local is None else local
        self.ep_ids = {name: i + 1 for i, name in enumerate(names)}

    def add(self, ns, name, labels, ip, ports):
        ident = self.allocator.allocate(security_labels(labels, ns, self.namespaces[ns]))
        self.pods[f"{ns}/{name}"] = PodView(ns, name, dict(labels), ip, ident, tuple(ports))

    def compile(self, *policies, compiler=None) -> "Result":
        compiler = compiler or Compiler()
        local = {ep: self.pods[name] for name, ep in self.ep_ids.items()}
        compiled = compiler.compile(list(policies), list(self.pods.values()), self.namespaces,
                                    local)
        return Result(self, compiled)


class Result:
    def __init__(self, cluster: Cluster, compiled: Compiled):
        self.cluster, self.compiled = cluster, compiled
        self.by_ip = {p.ip: p for p in cluster.pods.values()}

    def policy(self, pod: str) -> EndpointPolicy:
        return self.compiled.endpoints[self.cluster.ep_ids[pod]]

    def cidr_identity(self, ip: str) -> int:
        addr = ipaddress.IPv4Address(ip)
        nets = [net for net in self.compiled.cidrs if addr in net]
        return self.compiled.cidrs[max(nets, key=lambda n: n.prefixlen)] if nets else WORLD

    def ipcache(self, ip: str) -> tuple[int, int]:
        """(identity, CIDR identity) of an address, as the agent's ipcache says."""
        pod = self.by_ip.get(ip)
        cidr = self.cidr_identity(ip)
        return (pod.identity, cidr) if pod else (cidr, cidr)

    def _check(self, pod: str, direction: str, peer_ip: str, port: int, proto: str) -> bool:
        ident, cidr = self.ipcache(peer_ip)
        return verdict(self.policy(pod), direction, ident, cidr, PROTOS[proto], port)[0]

    def ingress(self, dst: str, src: str, port: int = 80, proto: str = "TCP") -> bool:
        """Does dst's ingress policy admit src (a pod name or an address)?"""
        src_ip = self.cluster.pods[src].ip if src in self.cluster.pods else src
        return self._check(dst, INGRESS, src_ip, port, proto)

    def egress(self, src: str, dst: str, port: int = 80, proto: str = "TCP") -> bool:
        dst_ip = self.cluster.pods[dst].ip if dst in self.cluster.pods else dst
        return self._check(src, EGRESS, dst_ip, port, proto)

    def can(self, src: str, dst: str, port: int = 80, proto: str = "TCP") -> bool:
        """A connection between two pods passes the source's egress and the destination's
        ingress policy, the two checks of the from-pod path."""
        return self.egress(src, dst, port, proto) and self.ingress(dst, src, port, proto)

    def matrix(self, port: int = 80, proto: str = "TCP") -> set[tuple[str, str]]:
        pods = sorted(self.cluster.pods)
        return {(s, d) for s in pods for d in pods if self.can(s, d, port, proto)}

    def status(self, name: str):
        (s,) = [s for s in self.compiled.statuses if s.name == name]
        return s


def all_pairs(pods=None):
    pods = sorted(pods or [f"{ns}/{p}" for ns in NAMESPACES for p in PODS])
    return set(itertools.product(pods, pods))


def assert_matrix(result: Result, expected: set, port=80, proto="TCP"):
    got = result.matrix(port, proto)
    wrong = sorted((s, d, "allowed" if (s, d) in got else "denied")
                   for s, d in all_pairs(result.cluster.pods) if ((s, d) in got) != ((s, d) in
                                                                                 expected))
    assert not wrong, f"{port}/{proto}: cells that differ from the expected table: {wrong}"


def expect(fn) -> set:
    return {(s, d) for s, d in all_pairs() if fn(s, d)}


def netpol(name, spec, ns="x"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ns_of(pod):
    return pod.split("/")[0]


def name_of(pod):
    return pod.split("/")[1]


@pytest.fixture(scope="module")
def cluster():
    return Cluster()


# ---------------------------------------------------------------- isolation basics


def test_no_policy_everything_is_open(cluster):
    r = cluster.compile()
    assert all(not p.ingress_enforced and not p.egress_enforced and not p.entries
               for p in r.compiled.endpoints.values())
    assert_matrix(r, all_pairs())
    assert r.ingress("x/a", "8.8.8.8") and r.egress("x/a", "8.8.8.8", 53, "UDP")


def test_default_deny_ingress(cluster):
    r = cluster.compile(netpol("deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x"))
    for proto in PROTOS:
        assert_matrix(r, expect(lambda s, d: ns_of(d) != "x"), 81, proto)
    assert not r.ingress("x/a", "8.8.8.8")
    # Egress of the isolated pods is untouched.
    assert r.egress("x/a", "8.8.8.8") and r.egress("x/a", "y/b")
    assert not r.policy("x/a").egress_enforced and r.policy("x/a").ingress_enforced
    assert r.status("deny").selected == ["x/a", "x/b", "x/c"]


def test_default_deny_egress(cluster):
    r = cluster.compile(netpol("deny", {"podSelector": {}, "policyTypes": ["Egress"]}))
    assert_matrix(r, expect(lambda s, d: ns_of(s) != "x"))
    assert not r.egress("x/b", "8.8.8.8", 53, "UDP")
    assert r.ingress("x/b", "8.8.8.8")


def test_default_deny_both_directions(cluster):
    r = cluster.compile(netpol("deny", {"podSelector": {},
                                        "policyTypes": ["Ingress", "Egress"]}, ns="y"))
    assert_matrix(r, expect(lambda s, d: "y" not in (ns_of(s), ns_of(d))))


@pytest.mark.parametrize("spec,ingress,egress", [
    ({"podSelector": {}}, True, False),
    ({"podSelector": {}, "ingress": [{}]}, True, False),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}, True, True),
    ({"podSelector": {}, "egress": []}, True, False),
    ({"podSelector": {}, "policyTypes": [], "egress": [{}]}, True, True),
    ({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}, False, True),
])
def test_policy_types_defaults_decide_what_is_isolated(cluster, spec, ingress, egress):
    r = cluster.compile(netpol("p", spec))
    pol = r.policy("x/a")
    assert (pol.ingress_enforced, pol.egress_enforced) == (ingress, egress)
    assert r.policy("y/a").ingress_enforced is False


def test_rules_of_an_undeclared_direction_allow_nothing_and_isolate_nothing(cluster):
    # policyTypes Egress with an ingress rule: the ingress rule is ignored, ingress open.
    r = cluster.compile(netpol("p", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    assert r.ingress("x/a", "x/c") and r.ingress("x/a", "8.8.8.8")
    assert not r.egress("x/a", "x/b")
    assert all(k.dir == DIRS[EGRESS] for k in r.policy("x/a").entries)


def test_pods_selected_by_no_policy_stay_open(cluster):
    r = cluster.compile(netpol("only-a", {"podSelector": {"matchLabels": {"pod": "a"}},
                                          "policyTypes": ["Ingress", "Egress"]}))
    assert_matrix(r, expect(lambda s, d: "x/a" not in (s, d)))
    for pod in ("x/b", "x/c", "y/a"):
        assert not r.policy(pod).ingress_enforced and not r.policy(pod).egress_enforced
    assert r.status("only-a").selected == ["x/a"]


def test_a_policy_selects_only_pods_of_its_own_namespace(cluster):
    r = cluster.compile(netpol("deny-a", {"podSelector": {"matchLabels": {"pod": "a"}}},
                               ns="z"))
    assert r.status("deny-a").selected == ["z/a"]
    assert_matrix(r, expect(lambda s, d: d != "z/a"))


# ---------------------------------------------------------------- peers


def allow_a_from(*peers, ns="x", ports=None):
    rule = {"from": list(peers)}
    if ports is not None:
        rule["ports"] = ports
    return netpol("allow-a", {"podSelector": {"matchLabels": {"pod": "a"}},
                              "ingress": [rule]}, ns=ns)


def test_pod_selector_peer_means_pods_of_the_policys_namespace(cluster):
    r = cluster.compile(allow_a_from({"podSelector": {"matchLabels": {"pod": "b"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or s == "x/b"))
    assert not r.ingress("x/a", "8.8.8.8")


def test_empty_pod_selector_peer_means_every_pod_of_the_namespace(cluster):
    r = cluster.compile(allow_a_from({"podSelector": {}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) == "x"))
    assert not r.ingress("x/a", "8.8.8.8")


def test_namespace_selector_peer_means_every_pod_of_those_namespaces(cluster):
    r = cluster.compile(allow_a_from({"namespaceSelector": {"matchLabels": {"team": "blue"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) in ("y", "z")))


def test_namespace_selector_can_use_the_automatic_name_label(cluster):
    r = cluster.compile(allow_a_from(
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) == "z"))


def test_empty_namespace_selector_means_every_pod_but_not_the_outside(cluster):
    r = cluster.compile(allow_a_from({"namespaceSelector": {}}))
    assert_matrix(r, all_pairs())
    assert r.policy("x/a").ingress_enforced
    assert not r.ingress("x/a", "8.8.8.8") and not r.ingress("x/a", "192.168.2.5")


def test_both_selectors_in_one_peer_must_both_match(cluster):
    r = cluster.compile(allow_a_from({"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                      "podSelector": {"matchLabels": {"pod": "b"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or s == "y/b"))


def test_two_peers_are_a_union(cluster):
    r = cluster.compile(allow_a_from({"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                     {"podSelector": {"matchLabels": {"pod": "b"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) == "y" or s == "x/b"))


def test_pod_selector_across_all_namespaces(cluster):
    r = cluster.compile(allow_a_from({"namespaceSelector": {},
                                      "podSelector": {"matchLabels": {"pod": "b"}}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or name_of(s) == "b"))


@pytest.mark.parametrize("expr,sources", [
    ({"key": "pod", "operator": "In", "values": ["b", "c"]}, {"b", "c"}),
    ({"key": "pod", "operator": "NotIn", "values": ["b"]}, {"a", "c"}),
    ({"key": "tier", "operator": "NotIn", "values": ["db"]}, {"a", "c"}),
    ({"key": "tier", "operator": "In", "values": ["db", "cache"]}, {"b"}),
    ({"key": "tier", "operator": "Exists"}, {"a", "b"}),
    ({"key": "tier", "operator": "DoesNotExist"}, {"c"}),
])
def test_every_match_expressions_operator(cluster, expr, sources):
    r = cluster.compile(allow_a_from({"podSelector": {"matchExpressions": [expr]}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or (ns_of(s) == "x"
                                                         and name_of(s) in sources)))


@pytest.mark.parametrize("expr,namespaces", [
    ({"key": "team", "operator": "In", "values": ["blue"]}, {"y", "z"}),
    ({"key": "team", "operator": "NotIn", "values": ["blue"]}, {"x"}),
    ({"key": "env", "operator": "Exists"}, {"z"}),
    ({"key": "env", "operator": "DoesNotExist"}, {"x", "y"}),
])
def test_match_expressions_on_namespaces(cluster, expr, namespaces):
    r = cluster.compile(allow_a_from({"namespaceSelector": {"matchExpressions": [expr]}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) in namespaces))


def test_match_labels_and_expressions_together(cluster):
    r = cluster.compile(allow_a_from({
        "namespaceSelector": {"matchLabels": {"team": "blue"},
                              "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]},
        "podSelector": {"matchLabels": {"tier": "db"},
                        "matchExpressions": [{"key": "pod", "operator": "Exists"}]}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or s == "y/b"))


def test_policy_pod_selector_with_expressions(cluster):
    r = cluster.compile(netpol("deny", {"podSelector": {"matchExpressions": [
        {"key": "tier", "operator": "Exists"}]}}, ns="y"))
    assert r.status("deny").selected == ["y/a", "y/b"]
    assert_matrix(r, expect(lambda s, d: d not in ("y/a", "y/b")))


def test_egress_peers(cluster):
    r = cluster.compile(netpol("egress", {
        "podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}},
                            "podSelector": {"matchLabels": {"pod": "a"}}},
                           {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    assert_matrix(r, expect(lambda s, d: s != "x/c" or d in ("z/a", "x/b")))
    assert not r.egress("x/c", "8.8.8.8")


def test_peers_on_other_nodes_are_resolved_too():
    cluster = Cluster(local=["x/a"])
    r = cluster.compile(allow_a_from({"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                      "podSelector": {"matchLabels": {"pod": "b"}}}))
    assert list(r.compiled.endpoints) == [cluster.ep_ids["x/a"]]
    assert r.ingress("x/a", "y/b") and not r.ingress("x/a", "y/c")
    assert {k.identity for k in r.policy("x/a").entries} == {cluster.pods["y/b"].identity}


def test_a_new_pod_with_existing_labels_changes_no_entry():
    before = Cluster().compile(allow_a_from({"namespaceSelector": {}}, ports=[{"port": 80}]))
    after = Cluster(extra=(("y", "a2", POD_LABELS["a"], "10.2.0.9"),)).compile(
        allow_a_from({"namespaceSelector": {}}, ports=[{"port": 80}]))
    assert before.cluster.pods["y/a"].identity == after.cluster.pods["y/a2"].identity
    assert after.policy("x/a").entries == before.policy("x/a").entries
    assert after.ingress("x/a", "y/a2")


# ---------------------------------------------------------------- ipBlock


def test_ip_block_with_except_for_outside_addresses(cluster):
    r = cluster.compile(netpol("egress", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "192.168.0.0/16",
                                        "except": ["192.168.1.0/24"]}}]}]}))
    assert r.egress("x/a", "192.168.2.5") and r.egress("x/a", "192.168.255.255", 9, "UDP")
    assert not r.egress("x/a", "192.168.1.7") and not r.egress("x/a", "192.168.1.0")
    assert not r.egress("x/a", "8.8.8.8") and not r.egress("x/a", "y/b")
    assert r.egress("x/b", "8.8.8.8")
    assert {ipaddress.ip_network(n) for n in ("0.0.0.0/0", "192.168.0.0/16", "192.168.1.0/24")} \
        == set(r.compiled.cidrs)


def test_ip_block_applies_to_pod_addresses_by_their_cidr_identity(cluster):
    # x pods are 10.1.0.0/24, y 10.2.0.0/24, z 10.3.0.0/24.
    r = cluster.compile(allow_a_from({"ipBlock": {"cidr": "10.0.0.0/8",
                                                  "except": ["10.2.0.0/16", "10.3.0.3/32"]}}))
    assert_matrix(r, expect(lambda s, d: d != "x/a" or ns_of(s) == "x" or s in ("z/a", "z/b")))
    assert r.ingress("x/a", "10.200.1.1") and not r.ingress("x/a", "10.2.7.7")
    assert not r.ingress("x/a", "192.168.2.5")


def test_ip_block_of_everything_except_the_pod_network(cluster):
    r = cluster.compile(netpol("egress", {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}))
    assert r.egress("x/a", "8.8.8.8") and r.egress("x/a", "192.168.1.7")
    assert not r.egress("x/a", "10.9.9.9")
    assert_matrix(r, expect(lambda s, d: ns_of(s) != "x"))


def test_ip_block_is_exact_although_other_policies_split_its_prefixes(cluster):
    """Other policies' prefixes inside an ipBlock (or inside its except) give addresses
    a more specific CIDR identity; that must change no verdict of this policy."""
    main = netpol("main", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "192.168.0.0/16",
                                        "except": ["192.168.1.0/24"]}}]}]})
    other = netpol("other", {
        "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "192.168.2.0/24"}},
                           {"ipBlock": {"cidr": "192.168.1.128/25"}},
                           {"ipBlock": {"cidr": "192.0.0.0/8",
                                        "except": ["192.168.0.0/17"]}}]}]})
    r = cluster.compile(main, other)
    a = {ip: r.egress("x/a", ip) for ip in
         ("192.168.2.5", "192.168.1.200", "192.168.1.7", "192.168.200.1", "192.1.1.1")}
    assert a == {"192.168.2.5": True, "192.168.1.200": False, "192.168.1.7": False,
                 "192.168.200.1": True, "192.1.1.1": False}
    b = {ip: r.egress("x/b", ip) for ip in
         ("192.168.2.5", "192.168.1.200", "192.168.1.7", "192.168.200.1", "192.1.1.1")}
    assert b == {"192.168.2.5": True, "192.168.1.200": True, "192.168.1.7": False,
                 "192.168.200.1": True, "192.1.1.1": True}


def test_ip_blocks_of_stacked_policies_are_a_union(cluster):
    # One policy's except is another's allow: a union of allows, never a deny.
    r = cluster.compile(
        allow_a_from({"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}),
        netpol("more", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "192.168.1.0/25"}}]}]}))
    assert r.ingress("x/a", "192.168.1.7") and not r.ingress("x/a", "192.168.1.200")
    assert r.ingress("x/a", "192.168.2.5")


def test_ipv6_ip_block_warns_and_allows_nothing(cluster):
    r = cluster.compile(allow_a_from({"ipBlock": {"cidr": "fd00::/8"}}))
    status = r.status("allow-a")
    assert status.valid and status.warnings and "IPv6" in status.warnings[0]
    assert r.policy("x/a").ingress_enforced and not r.policy("x/a").entries
    assert_matrix(r, expect(lambda s, d: d != "x/a"))
    assert not r.ingress("x/a", "8.8.8.8")


def test_ipv6_ip_block_beside_a_pod_peer(cluster):
    r = cluster.compile(allow_a_from({"ipBlock": {"cidr": "::/0"}},
                                     {"podSelector": {"matchLabels": {"pod": "c"}}}))
    assert r.status("allow-a").warnings
    assert_matrix(r, expect(lambda s, d: d != "x/a" or s == "x/c"))


def test_cidr_identities_are_stable_across_compiles(cluster):
    compiler = Compiler()
    one = cluster.compile(allow_a_from({"ipBlock": {"cidr": "192.168.0.0/16"}}),
                          compiler=compiler)
    two = cluster.compile(allow_a_from({"ipBlock": {"cidr": "172.16.0.0/12"}},
                                       {"ipBlock": {"cidr": "192.168.0.0/16"}}),
                          compiler=compiler)
    net = ipaddress.ip_network("192.168.0.0/16")
    assert one.compiled.cidrs[net] == two.compiled.cidrs[net]
    assert one.compiled.cidrs[ipaddress.ip_network("0.0.0.0/0")] == WORLD
    assert len(set(two.compiled.cidrs.values())) == len(two.compiled.cidrs)
    assert compiler.cidr_ids.prefix_of(two.compiled.cidrs[net]) == net
    assert all(i != WORLD and i >= 1 << 24 for n, i in two.compiled.cidrs.items()
               if n.prefixlen)


def test_shared_cidr_identities():
    ids = CidrIdentities()
    a = ids.get(ipaddress.ip_network("10.0.0.0/8"))
    assert ids.get(ipaddress.ip_network("10.0.0.0/8")) == a
    assert ids.get(ipaddress.ip_network("10.0.0.0/9")) != a
    assert ids.prefix_of(12345) is None


# ---------------------------------------------------------------- ports


def test_ports_by_number_and_protocol(cluster):
    r = cluster.compile(allow_a_from({"podSelector": {}}, ports=[
        {"port": 80}, {"protocol": "UDP", "port": 81}, {"protocol": "SCTP", "port": 80}]))
    x_to_a = expect(lambda s, d: d != "x/a" or ns_of(s) == "x")
    only_a_closed = expect(lambda s, d: d != "x/a")
    assert_matrix(r, x_to_a, 80, "TCP")
    assert_matrix(r, only_a_closed, 81, "TCP")
    assert_matrix(r, only_a_closed, 80, "UDP")
    assert_matrix(r, x_to_a, 81, "UDP")
    assert_matrix(r, x_to_a, 80, "SCTP")
    assert_matrix(r, only_a_closed, 81, "SCTP")


@pytest.mark.parametrize("proto", ["TCP", "UDP", "SCTP"])
def test_a_protocol_without_a_port_is_every_port_of_it(cluster, proto):
    r = cluster.compile(allow_a_from({"podSelector": {}}, ports=[{"protocol": proto}]))
    for other in PROTOS:
        for port in (1, 80, 81, 65535):
            assert r.ingress("x/a", "x/b", port, other) is (other == proto)


def test_empty_from_and_ports_allow_everything(cluster):
    for rule in ({}, {"from": [], "ports": []}, None):
        r = cluster.compile(netpol("all", {"podSelector": {}, "ingress": [rule]}))
        assert r.policy("x/a").ingress_enforced
        for proto, port in itertools.product(PROTOS, (1, 80, 65535)):
            assert r.ingress("x/a", "8.8.8.8", port, proto)
            assert r.ingress("x/a", "z/c", port, proto)
        (key,) = r.policy("x/a").entries
        assert key == EntryKey(DIRS[INGRESS], ANY, ANY, 0, 0)


def test_empty_from_with_ports(cluster):
    r = cluster.compile(netpol("web", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}))
    assert r.ingress("x/a", "8.8.8.8", 81) and not r.ingress("x/a", "8.8.8.8", 80)
    assert_matrix(r, all_pairs(), 81)
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x"), 80)


def test_egress_empty_to_with_ports(cluster):
    r = cluster.compile(netpol("dns", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}))
    assert r.egress("x/a", "8.8.8.8", 53, "UDP") and r.egress("x/a", "8.8.8.8", 53, "TCP")
    assert not r.egress("x/a", "8.8.8.8", 53, "SCTP") and not r.egress("x/a", "8.8.8.8", 54, "UDP")
    assert_matrix(r, expect(lambda s, d: ns_of(s) != "x"))


def test_end_port_range(cluster):
    r = cluster.compile(allow_a_from({"podSelector": {}}, ports=[
        {"port": 8000, "endPort": 8100},
        {"protocol": "SCTP", "port": 1, "endPort": 1023},
        {"protocol": "UDP", "port": 65000, "endPort": 65535}]))
    tcp = {p: r.ingress("x/a", "x/b", p) for p in (7999, 8000, 8001, 8050, 8099, 8100, 8101)}
    assert tcp == {7999: False, 8000: True, 8001: True, 8050: True, 8099: True, 8100: True,
                   8101: False}
    assert all(r.ingress("x/a", "x/c", p, "TCP") is (8000 <= p <= 8100) for p in range(7000, 9000))
    assert all(r.ingress("x/a", "x/c", p, "SCTP") is (p <= 1023) for p in range(1, 1100))
    assert all(r.ingress("x/a", "x/c", p, "UDP") is (p >= 65000) for p in range(64000, 65536))
    assert not r.ingress("x/a", "y/c", 8050)


def test_ingress_named_ports_resolve_against_the_selected_pods_own_ports(cluster):
    r = cluster.compile(netpol("http", {"podSelector": {}, "ingress": [
        {"ports": [{"port": "http"}]}]}))
    # x/a serves http on 80, x/b on 81, x/c has no such port.
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x" or d == "x/a"), 80)
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x" or d == "x/b"), 81)
    assert not r.ingress("x/c", "8.8.8.8", 80) and not r.ingress("x/c", "8.8.8.8", 81)
    assert not r.ingress("x/a", "y/a", 80, "UDP")


def test_ingress_named_ports_match_the_protocol_too(cluster):
    r = cluster.compile(netpol("http", {"podSelector": {}, "ingress": [
        {"ports": [{"port": "http", "protocol": "UDP"}, {"port": "serve-81-udp",
                                                        "protocol": "UDP"}]}]}))
    assert not r.ingress("x/a", "y/a", 80, "TCP") and not r.ingress("x/a", "y/a", 80, "UDP")
    assert r.ingress("x/a", "y/a", 81, "UDP") and not r.ingress("x/a", "y/a", 81, "TCP")
    r = cluster.compile(netpol("sctp", {"podSelector": {}, "ingress": [
        {"ports": [{"port": "serve-80-sctp", "protocol": "SCTP"}]}]}))
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x"), 80, "TCP")
    assert_matrix(r, all_pairs(), 80, "SCTP")


def test_egress_named_ports_resolve_per_destination(cluster):
    r = cluster.compile(netpol("http-out", {
        "podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "http"}]}]}))
    # a pods serve http on 80, b pods on 81, c pods not at all; the outside has no names.
    assert_matrix(r, expect(lambda s, d: s != "x/c" or name_of(d) == "a"), 80)
    assert_matrix(r, expect(lambda s, d: s != "x/c" or name_of(d) == "b"), 81)
    assert not r.egress("x/c", "8.8.8.8", 80) and not r.egress("x/c", "8.8.8.8", 81)
    # One entry per destination pod that has the port, at its own number only: keyed by
    # the pod's /32 in the CIDR view, since pods sharing an identity may not share it.
    keys = r.policy("x/c").entries
    view = {name: r.cidr_identity(cluster.pods[name].ip) | layouts.IDENTITY_CIDR_VIEW
            for name in cluster.pods}
    assert {(k.identity, k.port) for k in keys} == (
        {(view[f"{ns}/a"], 80) for ns in NAMESPACES}
        | {(view[f"{ns}/b"], 81) for ns in NAMESPACES})


def test_egress_named_ports_only_for_the_selected_peers(cluster):
    r = cluster.compile(netpol("http-out", {
        "podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": "http"}, {"port": 9000}]}]}))
    assert r.egress("x/c", "y/a", 80) and r.egress("x/c", "y/b", 81)
    assert not r.egress("x/c", "y/a", 81) and not r.egress("x/c", "z/a", 80)
    assert r.egress("x/c", "y/c", 9000) and not r.egress("x/c", "y/c", 80)


def test_multiple_rules_are_not_cross_multiplied(cluster):
    r = cluster.compile(netpol("two-rules", {"podSelector": {"matchLabels": {"pod": "a"}},
                                             "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]},
        {"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}], "ports": [{"port": 81}]}]}))
    assert r.ingress("x/a", "x/b", 80) and not r.ingress("x/a", "x/b", 81)
    assert r.ingress("x/a", "x/c", 81) and not r.ingress("x/a", "x/c", 80)


def test_stacked_policies_are_a_union(cluster):
    r = cluster.compile(
        allow_a_from({"podSelector": {"matchLabels": {"pod": "b"}}}, ports=[{"port": 80}]),
        netpol("from-y", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
             "ports": [{"port": 81}]}]}),
        netpol("deny-all", {"podSelector": {}}),
        netpol("egress-deny", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "policyTypes": ["Egress"]}, ns="y"))
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x" and s != "y/a"
                            or d == "x/a" and s == "x/b"), 80)
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "x" and s != "y/a"
                            or d == "x/a" and s in ("y/b", "y/c")), 81)
    assert r.status("deny-all").selected == ["x/a", "x/b", "x/c"]


def test_verdict_names_the_deciding_rule(cluster):
    r = cluster.compile(netpol("two", {"podSelector": {"matchLabels": {"pod": "a"}},
                                       "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
        {"ports": [{"port": 81}]}]}))
    ident = cluster.pods["x/b"].identity
    allowed, entry = verdict(r.policy("x/a"), INGRESS, ident, WORLD, TCP, 80)
    assert allowed and entry == Entry(ALLOW, RuleRef("NetworkPolicy", "x", "two", INGRESS, 0))
    assert str(entry.rule) == "NetworkPolicy x/two ingress[0]"
    allowed, entry = verdict(r.policy("x/a"), INGRESS, 12345, WORLD, TCP, 81)
    assert allowed and entry.rule.index == 1
    assert verdict(r.policy("x/a"), INGRESS, 12345, WORLD, TCP, 80) == (False, None)
    assert verdict(r.policy("x/b"), INGRESS, 12345, WORLD, TCP, 80) == (True, None)


# ---------------------------------------------------------------- invalid policies


INVALID = [
    ({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
        {"from": [{"podSelector": {"matchExpressions": [
            {"key": "pod", "operator": "Has", "values": ["b"]}]}}]}]},
     "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator", {"x/a"}, {INGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
        {"ports": [{"port": 8100, "endPort": 8000}]}]},
     "spec.ingress[0].ports[0].endPort", {"x/a"}, {INGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [
        {"ports": [{"port": "http", "endPort": 8000}]}]},
     "spec.egress[0].ports[0].endPort", {"x/a"}, {EGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "b"}}, "egress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/16"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]", {"x/b"}, {INGRESS, EGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress", "Egress"],
      "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     "spec.ingress[0].ports[0].protocol", {"x/a"}, {INGRESS, EGRESS}),
    # Without a pod selector, the whole namespace is isolated.
    ({"ingress": [{}]}, "spec.podSelector", {"x/a", "x/b", "x/c"}, {INGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress", "Sideways"],
      "ingress": [{}]}, "spec.policyTypes", {"x/c"}, {INGRESS, EGRESS}),
    ({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"from": {}}]},
     "spec.ingress[0].from", {"x/c"}, {INGRESS}),
]


@pytest.mark.parametrize("spec,field,isolated,directions", INVALID,
                         ids=[case[1] for case in INVALID])
def test_invalid_policies_are_rejected_and_fail_closed(cluster, spec, field, isolated,
                                                       directions):
    allow_b = allow_a_from({"podSelector": {"matchLabels": {"pod": "b"}}})
    r = cluster.compile(netpol("bad", spec), allow_b)
    status = r.status("bad")
    assert not status.valid and status.error.startswith(f"{field}: "), status.error
    assert set(status.selected) == isolated
    assert r.status("allow-a").valid and not r.status("allow-a").error
    for pod in isolated:
        pol = r.policy(pod)
        # (allow-a isolates x/a's ingress in any case)
        assert (pol.ingress_enforced, pol.egress_enforced) == (
            INGRESS in directions or pod == "x/a", EGRESS in directions)
        assert all(e.rule.name != "bad" for e in pol.entries.values())
    # The isolated pods accept nothing but what valid policies allow; others stay open.
    def ingress_ok(s, d):
        if d == "x/a":
            return s == "x/b"  # allow-a, whether or not "bad" isolates x/a too
        return d not in isolated or INGRESS not in directions

    assert_matrix(r, expect(lambda s, d: ingress_ok(s, d)
                            and (s not in isolated or EGRESS not in directions)))


def test_an_invalid_policy_in_another_namespace_isolates_only_there(cluster):
    r = cluster.compile(netpol("bad", {"podSelector": {}, "ingress": [
        {"ports": [{"port": 0}]}]}, ns="z"))
    assert r.status("bad").selected == ["z/a", "z/b", "z/c"]
    assert_matrix(r, expect(lambda s, d: ns_of(d) != "z"))


def test_an_unparseable_pod_selector_isolates_the_whole_namespace(cluster):
    r = cluster.compile(netpol("bad", {"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "Equals", "values": ["a"]}]}, "policyTypes": ["Egress"]}))
    assert r.status("bad").error.startswith("spec.podSelector.matchExpressions[0].operator")
    assert r.status("bad").selected == ["x/a", "x/b", "x/c"]
    assert_matrix(r, expect(lambda s, d: ns_of(s) != "x"))


def test_statuses_cover_every_policy_in_order(cluster):
    r = cluster.compile(netpol("b", {"podSelector": {}}, ns="y"),
                        netpol("a", {"podSelector": {}}, ns="y"),
                        netpol("z", {"podSelector": {"matchLabels": {"pod": "nobody"}}}))
    assert [(s.namespace, s.name, s.valid) for s in r.compiled.statuses] == [
        ("x", "z", True), ("y", "a", True), ("y", "b", True)]
    assert r.status("z").selected == [] and r.status("z").kind == "NetworkPolicy"


# ---------------------------------------------------------------- port ranges as prefixes


def _check_blocks(lo, hi):
    blocks = port_prefixes(lo, hi)
    at = lo
    for value, bits in blocks:
        size = 1 << (16 - bits)
        assert 1 <= bits <= 16 or (bits == 0 and (lo, hi) == (0, 65535))
        assert value == at and value % size == 0, (lo, hi, blocks)
        at += size
    assert at == hi + 1, (lo, hi, blocks)
    # Minimal: merging two neighbours into one aligned block must never be possible.
    for (v1, b1), (_, b2) in zip(blocks, blocks[1:], strict=False):
        assert not (b1 == b2 and v1 % (1 << (17 - b1)) == 0), (lo, hi, blocks)
    return blocks


def test_port_prefixes_cover_small_ranges_exactly():
    for lo in range(1, 130):
        for hi in range(lo, 300):
            _check_blocks(lo, hi)


def test_port_prefixes_cover_random_ranges_exactly():
    rng = random.Random(20240601)
    for _ in range(3000):
        lo = rng.randint(1, 65535)
        hi = rng.choice([lo, rng.randint(lo, 65535), min(65535, lo + rng.randint(0, 300))])
        blocks = _check_blocks(lo, hi)
        assert len(blocks) <= 30
    for lo, hi in [(1, 65535), (65535, 65535), (1, 1), (32768, 65535), (1, 32767),
                   (1024, 2047), (0, 65535)]:
        _check_blocks(lo, hi)
    assert port_prefixes(1024, 2047) == [(1024, 6)]
    assert port_prefixes(80, 80) == [(80, 16)]
    assert port_prefixes(0, 65535) == [(0, 0)]
    assert port_prefixes(8000, 8100) == [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]


def test_entry_keys_cover_exactly_the_range_for_random_ranges():
    rng = random.Random(7)
    for _ in range(40):
        lo = rng.randint(1, 65535)
        hi = rng.randint(lo, min(65535, lo + rng.choice([0, 5, 100, 5000, 65535])))
        keys = [EntryKey(1, 300, TCP, v, b) for v, b in port_prefixes(lo, hi)]
        probes = {lo - 1, lo, hi, hi + 1} | {rng.randint(1, 65535) for _ in range(300)}
        for port in probes:
            if 0 <= port <= 65535:
                hits = [k for k in keys if k.covers(TCP, port)]
                assert len(hits) == (1 if lo <= port <= hi else 0), (lo, hi, port)
                assert not any(k.covers(UDP, port) for k in keys)


# ---------------------------------------------------------------- the datapath's view


def test_entry_prefix_lengths_are_the_headers():
    assert EntryKey(1, 0, ANY, 0, 0).prefixlen == layouts.POLICY_PREFIX_STATIC
    assert EntryKey(1, 5, TCP, 0, 0).prefixlen == layouts.POLICY_PREFIX_PROTO
    assert EntryKey(2, 5, UDP, 53, 16).prefixlen == layouts.POLICY_PREFIX_FULL
    for bits in range(1, 17):
        assert EntryKey(1, 5, SCTP, 0, bits).prefixlen == layouts.POLICY_PREFIX_FULL - 16 + bits
    assert ANY == layouts.IDENTITY_ANY
    assert DIRS == {INGRESS: layouts.POLICY_INGRESS, EGRESS: layouts.POLICY_EGRESS}
    assert (ALLOW, DENY) == (layouts.POLICY_ALLOW, layouts.POLICY_DENY)
    # The prefix lengths are the bit offsets of proto and dport in the key (after
    # its prefixlen member), so a shorter prefix is exactly a wildcard.
    offsets = {name: off for name, off, _ in layouts.PolicyKey.members()}
    base = offsets["ep_id"]
    assert (offsets["proto"] - base) * 8 == layouts.POLICY_PREFIX_STATIC
    assert (offsets["pad1"] - base) * 8 == layouts.POLICY_PREFIX_PROTO
    assert (offsets["dport"] - base) * 8 + 16 == layouts.POLICY_PREFIX_FULL
    assert layouts.PolicyKey.size() * 8 - base * 8 == layouts.POLICY_PREFIX_FULL


def _packed(key: EntryKey, ep_id: int) -> tuple[int, bytes]:
    pk = layouts.PolicyKey(key.prefixlen, ep_id, key.dir, 0, key.identity, key.proto, 0,
                           key.port)
    return key.prefixlen, pk.pack()[4:]


def _lpm_lookup(table, data: bytes):
    """A BPF LPM trie lookup: the longest stored prefix whose bits match `data`."""
    bits = int.from_bytes(data, "big")
    width = len(data) * 8
    best = None
    for (plen, stored), value in table.items():
        mask = ((1 << plen) - 1) << (width - plen) if plen else 0
        if (int.from_bytes(stored, "big") & mask) == (bits & mask):
            if best is None or plen > best[0]:
                best = (plen, value)
    return best[1] if best else None


def _kernel_verdict(table, ep_id, direction, identity, cidr_identity, proto, port):
    """bpf/lib/policy.h's policy_verdict over packed keys (1 allow, 2 deny, 0 none)."""
    result = 0
    for ident in (identity, cidr_identity | layouts.IDENTITY_CIDR_VIEW, ANY):
        lookup = layouts.PolicyKey(96, ep_id, DIRS[direction], 0, ident, proto, 0, port)
        v = _lpm_lookup(table, lookup.pack()[4:])
        if v == DENY:
            return DENY
        if v == ALLOW:
            result = ALLOW
    return result


def test_verdict_agrees_with_an_lpm_lookup_of_the_packed_keys(cluster):
    """verdict() is what `cilia policy trace` shows: it must agree, bit for bit, with
    the kernel's LPM semantics over the keys the agent writes."""
    r = cluster.compile(
        allow_a_from({"podSelector": {"matchLabels": {"pod": "b"}}},
                     {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}},
                     ports=[{"port": 8000, "endPort": 8100}, {"port": "http"},
                            {"protocol": "UDP"}, {"protocol": "SCTP", "port": 99,
                                                  "endPort": 1030}]),
        netpol("more", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}))
    ep = cluster.ep_ids["x/a"]
    pol = r.policy("x/a")
    table = {_packed(k, ep): e.action for k, e in pol.entries.items()}
    assert len(table) == len(pol.entries)
    rng = random.Random(3)
    peers = [cluster.pods[p].ip for p in cluster.pods] + list(EXTERNAL)
    for _ in range(3000):
        ident, cidr = r.ipcache(rng.choice(peers))
        proto = rng.choice([TCP, UDP, SCTP])
        port = rng.choice([80, 81, 99, 1030, 1031, 7999, 8000, 8100, 8101,
                           rng.randint(1, 65535)])
        want = _kernel_verdict(table, ep, INGRESS, ident, cidr, proto, port)
        allowed, _ = verdict(pol, INGRESS, ident, cidr, proto, port)
        assert allowed is (want == ALLOW), (ident, cidr, proto, port)


def test_verdict_semantics_deny_wins_and_longest_prefix_within_an_identity():
    ref = RuleRef("CiliaNetworkPolicy", "x", "p", INGRESS, 0)
    allow, deny = Entry(ALLOW, ref), Entry(DENY, ref)
    d = DIRS[INGRESS]
    pol = EndpointPolicy(ingress_enforced=True, entries={
        EntryKey(d, 300, TCP, 0, 0): allow,                # 300: all of TCP ...
        EntryKey(d, 300, TCP, 8080, 16): deny,             # ... but 8080
        EntryKey(d, 301, ANY, 0, 0): deny,                 # 301: nothing at all
        EntryKey(d, layouts.IDENTITY_CIDR_VIEW | 1 << 24 | 5, TCP, 443, 16): deny,  # a CIDR
        EntryKey(d, ANY, UDP, 53, 16): allow,              # anyone: DNS
        EntryKey(DIRS[EGRESS], 302, ANY, 0, 0): allow,     # another direction
    })
    assert verdict(pol, INGRESS, 300, WORLD, TCP, 80) == (True, allow)
    assert verdict(pol, INGRESS, 300, WORLD, TCP, 8080) == (False, deny)
    assert verdict(pol, INGRESS, 300, WORLD, UDP, 53) == (True, allow)
    assert verdict(pol, INGRESS, 300, WORLD, UDP, 54)[0] is False
    # A deny for the peer's CIDR beats an allow for the peer itself, and ANY's allow.
    assert verdict(pol, INGRESS, 300, 1 << 24 | 5, TCP, 443) == (False, deny)
    assert verdict(pol, INGRESS, 301, WORLD, UDP, 53) == (False, deny)
    assert verdict(pol, INGRESS, 302, WORLD, TCP, 80)[0] is False
    # Not enforced: open, whatever the entries say.
    pol.ingress_enforced = False
    assert verdict(pol, INGRESS, 301, WORLD, UDP, 53) == (True, None)
    assert verdict(pol, EGRESS, 999, WORLD, TCP, 1) == (True, None)
    pol.egress_enforced = True
    assert verdict(pol, EGRESS, 302, WORLD, SCTP, 1)[0] is True
    assert verdict(pol, EGRESS, 300, WORLD, SCTP, 1)[0] is False


def test_entry_key_text():
    assert EntryKey(1, 0, ANY, 0, 0).port_text() == "any"
    assert EntryKey(1, 0, TCP, 0, 0).port_text() == "*/TCP"
    assert EntryKey(1, 0, UDP, 53, 16).port_text() == "53/UDP"
    assert EntryKey(1, 0, SCTP, 8000, 11).port_text() == "8000-8031/SCTP"


def test_egress_named_ports_towards_an_ip_block_resolve_against_the_pods_inside_it(cluster):
    # As kube-network-policies does (issue 14 item 4): the destination pod's own number,
    # whatever peer matched it; an address that is no pod has no names: not allowed.
    r = cluster.compile(netpol("p", {
        "podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.2.0.0/16",
                                        "except": ["10.2.0.2/32"]}}],
                    "ports": [{"port": "http"}]}]}))
    assert r.egress("x/c", "y/a", 80) and not r.egress("x/c", "y/a", 81)  # y: 10.2.0.x
    assert not r.egress("x/c", "y/b", 81)  # y/b is 10.2.0.2: the block's hole
    assert not r.egress("x/c", "x/a", 80) and not r.egress("x/c", "z/a", 80)  # outside
    assert not r.egress("x/c", "10.2.9.9", 80)  # inside, but no pod: no names
    assert r.status("p").valid and "pods inside it" in r.status("p").warnings[0]
