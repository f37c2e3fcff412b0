"""The NetworkPolicy model: label selectors, parsing, and validation as the API server
does it (an error names the field path a user has to fix)."""

import copy
import ipaddress

import pytest

from cilia.policy import PolicyError
from cilia.policy.model import (
    EGRESS,
    INGRESS,
    IPBlock,
    Port,
    declared_types,
    parse_network_policy,
)
from cilia.policy.selector import Requirement, Selector


def netpol(spec, name="p", ns="x"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ingress_from(*peers, ports=None):
    rule = {"from": list(peers)}
    if ports is not None:
        rule["ports"] = ports
    return netpol({"podSelector": {}, "ingress": [rule]})


def ingress_ports(*ports):
    return netpol({"podSelector": {}, "ingress": [{"ports": list(ports)}]})


# ---------------------------------------------------------------- selectors


LABELS = {"app": "web", "tier": "front", "env": "prod"}


@pytest.mark.parametrize("raw,matches", [
    (None, True),
    ({}, True),
    ({"matchLabels": {}}, True),
    ({"matchLabels": {"app": "web"}}, True),
    ({"matchLabels": {"app": "web", "tier": "front"}}, True),
    ({"matchLabels": {"app": "web", "tier": "back"}}, False),
    ({"matchLabels": {"missing": "x"}}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, False),
    ({"matchExpressions": [{"key": "nope", "operator": "In", "values": ["web"]}]}, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, False),
    # NotIn matches a pod without the key at all, as in Kubernetes.
    ({"matchExpressions": [{"key": "nope", "operator": "NotIn", "values": ["web"]}]}, True),
    ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "nope", "operator": "Exists"}]}, False),
    ({"matchExpressions": [{"key": "nope", "operator": "DoesNotExist"}]}, True),
    ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, False),
    # matchLabels and every expression must all hold.
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]},
                           {"key": "tier", "operator": "NotIn", "values": ["back"]}]}, True),
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, False),
])
def test_selector_matches_like_kubernetes(raw, matches):
    assert Selector.parse(raw, "sel").matches(LABELS) is matches


def test_empty_selector_matches_everything_including_no_labels():
    sel = Selector.parse({}, "sel")
    assert sel.empty and sel.matches({}) and sel.matches(LABELS)
    assert not Selector.parse({"matchLabels": {"a": "b"}}, "sel").empty


def test_match_labels_become_in_requirements():
    sel = Selector.parse({"matchLabels": {"app": "web"}}, "sel")
    assert sel.requirements == (Requirement("app", "In", frozenset({"web"})),)


@pytest.mark.parametrize("raw,field", [
    ("app=web", "sel"),
    ({"matchLabel": {"a": "b"}}, "sel"),
    ({"matchLabels": ["a"]}, "sel.matchLabels"),
    ({"matchLabels": {"a": 1}}, "sel.matchLabels"),
    ({"matchExpressions": {"key": "a"}}, "sel.matchExpressions"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "sel.matchExpressions[0]"),
    ({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]},
     "sel.matchExpressions[0].operator"),
    ({"matchExpressions": [{"key": "a", "operator": "in", "values": ["b"]}]},
     "sel.matchExpressions[0].operator"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"},
                           {"key": "a", "operator": "In"}]}, "sel.matchExpressions[1].values"),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
     "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
     "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["b"]}]},
     "sel.matchExpressions[0].values"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": "b"}]},
     "sel.matchExpressions[0].values"),
])
def test_invalid_selectors_name_the_field(raw, field):
    with pytest.raises(PolicyError) as err:
        Selector.parse(raw, "sel")
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


# ---------------------------------------------------------------- policyTypes


@pytest.mark.parametrize("spec,types", [
    # Without policyTypes: Ingress always, Egress when there are egress rules.
    ({"podSelector": {}}, {INGRESS}),
    ({"podSelector": {}, "ingress": [{}]}, {INGRESS}),
    ({"podSelector": {}, "egress": [{}]}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]},
     {INGRESS, EGRESS}),
    # The API server defaults on len(egress) != 0: an empty list is no egress rules.
    ({"podSelector": {}, "egress": []}, {INGRESS}),
    ({"podSelector": {}, "egress": None}, {INGRESS}),
    # An empty policyTypes is defaulted the same way, not rejected.
    ({"podSelector": {}, "policyTypes": []}, {INGRESS}),
    ({"podSelector": {}, "policyTypes": [], "egress": [{}]}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Ingress"]}, {INGRESS}),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, {EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}, {EGRESS}),
])
def test_policy_types_and_their_defaults(spec, types):
    pol = parse_network_policy(netpol(spec))
    assert pol.types == types
    # The directions an invalid copy of it would isolate are the same ones.
    assert declared_types(netpol(spec)) == types


def test_rules_of_an_undeclared_direction_are_ignored():
    pol = parse_network_policy(netpol({"podSelector": {}, "policyTypes": ["Egress"],
                                       "ingress": [{}], "egress": [{}]}))
    assert pol.ingress == () and len(pol.egress) == 1
    pol = parse_network_policy(netpol({"podSelector": {}, "policyTypes": ["Ingress"],
                                       "egress": [{}]}))
    assert pol.egress == () and pol.types == {INGRESS}


@pytest.mark.parametrize("spec,types", [
    ("nonsense", {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Sideways"]}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": "Ingress"}, {INGRESS, EGRESS}),
    ({"podSelector": {}, "policyTypes": ["Egress"], "ingress": "bad"}, {EGRESS}),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, {INGRESS}),
    ({"podSelector": {}, "egress": "bad"}, {INGRESS, EGRESS}),
])
def test_declared_types_of_invalid_policies_fail_closed(spec, types):
    assert declared_types(netpol(spec)) == types


# ---------------------------------------------------------------- a full policy


def test_a_complete_policy_parses_into_the_model():
    pol = parse_network_policy(netpol({
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {"from": [
                {"podSelector": {"matchLabels": {"app": "web"}}},
                {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "x"}}},
                {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
            ],
             "ports": [{"port": 5432}, {"protocol": "UDP", "port": "dns"},
                       {"protocol": "SCTP", "port": 3000, "endPort": 3100},
                       {"protocol": "UDP"}]},
        ],
        "egress": [{}],
    }, name="db", ns="prod"))
    assert (pol.namespace, pol.name, pol.ref) == ("prod", "db", "prod/db")
    assert pol.pod_selector.matches({"app": "db"}) and not pol.pod_selector.matches({})
    (rule,) = pol.ingress
    pods, nss, both, block = rule.peers
    assert pods.namespace_selector is None and pods.pod_selector.matches({"app": "web"})
    assert nss.pod_selector is None and nss.namespace_selector.matches({"team": "a"})
    assert both.namespace_selector.empty and both.pod_selector.matches({"role": "x"})
    assert block.ip_block == IPBlock(ipaddress.ip_network("172.17.0.0/16"),
                                     (ipaddress.ip_network("172.17.1.0/24"),))
    assert rule.ports == (Port("TCP", 5432), Port("UDP", "dns"), Port("SCTP", 3000, 3100),
                          Port("UDP", None))
    assert [p.proto_number for p in rule.ports] == [6, 17, 132, 17]
    # An empty egress rule: every peer, every port.
    assert pol.egress[0].peers is None and pol.egress[0].ports is None
    assert pol.warnings == []


def test_namespace_defaults_to_default():
    obj = netpol({"podSelector": {}})
    del obj["metadata"]["namespace"]
    assert parse_network_policy(obj).namespace == "default"


@pytest.mark.parametrize("rule", [
    {}, None, {"from": []}, {"from": None}, {"ports": []}, {"from": [], "ports": None},
])
def test_empty_from_and_ports_mean_everything(rule):
    pol = parse_network_policy(netpol({"podSelector": {}, "ingress": [rule]}))
    assert pol.ingress[0].peers is None and pol.ingress[0].ports is None


def test_empty_ingress_list_is_default_deny():
    pol = parse_network_policy(netpol({"podSelector": {}, "ingress": []}))
    assert pol.types == {INGRESS} and pol.ingress == ()


@pytest.mark.parametrize("raw,port", [
    ({}, Port("TCP", None)),
    ({"protocol": None, "port": 80}, Port("TCP", 80)),
    ({"port": 1}, Port("TCP", 1)),
    ({"port": 65535}, Port("TCP", 65535)),
    ({"port": 80, "endPort": 80}, Port("TCP", 80, 80)),
    ({"port": 1, "endPort": 65535}, Port("TCP", 1, 65535)),
    ({"port": "http"}, Port("TCP", "http")),
    ({"port": "h2c-8080"}, Port("TCP", "h2c-8080")),
    ({"port": "a23456789012345"}, Port("TCP", "a23456789012345")),
    ({"protocol": "UDP", "port": 53}, Port("UDP", 53)),
    ({"protocol": "SCTP"}, Port("SCTP", None)),
])
def test_ports(raw, port):
    (parsed,) = parse_network_policy(ingress_ports(raw)).ingress[0].ports
    assert parsed == port


# ---------------------------------------------------------------- errors


def _error(obj) -> PolicyError:
    with pytest.raises(PolicyError) as err:
        parse_network_policy(obj)
    return err.value


@pytest.mark.parametrize("obj,field", [
    # The spec itself.
    ({"metadata": {"name": "p"}}, "spec"),
    (netpol("everything"), "spec"),
    (netpol({"ingress": [{}]}), "spec.podSelector"),
    (netpol({"podSelector": {"matchLabels": {"a": "b"}, "matchFields": {}}}), "spec.podSelector"),
    (netpol({"podSelector": {}, "policyTypes": ["ingress"]}), "spec.policyTypes"),
    (netpol({"podSelector": {}, "policyTypes": "Ingress"}), "spec.policyTypes"),
    (netpol({"podSelector": {}, "ingress": {"from": []}}), "spec.ingress"),
    (netpol({"podSelector": {}, "ingress": ["all"]}), "spec.ingress[0]"),
    (netpol({"podSelector": {}, "ingress": [{"to": []}]}), "spec.ingress[0]"),
    (netpol({"podSelector": {}, "egress": [{"from": []}]}), "spec.egress[0]"),
    (netpol({"podSelector": {}, "ingress": [{"from": {}}]}), "spec.ingress[0].from"),
    (netpol({"podSelector": {}, "ingress": [{"ports": 80}]}), "spec.ingress[0].ports"),
    # Malformed but empty is not "absent": none of these may read as "everything".
    (netpol({"podSelector": {}, "ingress": [{"from": ""}]}), "spec.ingress[0].from"),
    (netpol({"podSelector": {}, "egress": [{"to": {}}]}), "spec.egress[0].to"),
    (netpol({"podSelector": {}, "ingress": [{"ports": {}}]}), "spec.ingress[0].ports"),
    (netpol({"podSelector": {"matchLabels": []}}), "spec.podSelector.matchLabels"),
    (netpol({"podSelector": {"matchExpressions": {}}}), "spec.podSelector.matchExpressions"),
    (ingress_from({"podSelector": {"matchLabels": ""}}),
     "spec.ingress[0].from[0].podSelector.matchLabels"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": {}}}),
     "spec.ingress[0].from[0].ipBlock.except"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}}),
     "spec.ingress[0].from[0].ipBlock.except"),
    # Selectors, down to the operator.
    (netpol({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}}),
     "spec.podSelector.matchExpressions[0].operator"),
    (ingress_from({"podSelector": {}},
                  {"namespaceSelector": {"matchExpressions": [
                      {"key": "a", "operator": "Exists"},
                      {"key": "b", "operator": "Within", "values": ["c"]}]}}),
     "spec.ingress[0].from[1].namespaceSelector.matchExpressions[1].operator"),
    (netpol({"podSelector": {}, "egress": [{"to": [{"podSelector": {
        "matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}]}]}),
     "spec.egress[0].to[0].podSelector.matchExpressions[0].values"),
    # Peers.
    (ingress_from({}), "spec.ingress[0].from[0]"),
    (ingress_from({"podSelector": None}), "spec.ingress[0].from[0]"),
    (ingress_from("app=web"), "spec.ingress[0].from[0]"),
    (ingress_from({"serviceAccount": "x"}), "spec.ingress[0].from[0]"),
    (ingress_from({"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}),
     "spec.ingress[0].from[0]"),
    (ingress_from({"ipBlock": None}), "spec.ingress[0].from[0]"),
    (ingress_from({"ipBlock": {}}), "spec.ingress[0].from[0].ipBlock"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/33"}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (ingress_from({"ipBlock": {"cidr": ""}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (ingress_from({"ipBlock": {"cidr": "ten/8"}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    # except entries must lie strictly inside the cidr.
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}),
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24", "10.0.0.0/8"]}}),
     "spec.ingress[0].from[0].ipBlock.except[1]"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}),
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}),
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["bogus"]}}),
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": [None]}}),
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    # Ports.
    (ingress_ports("http"), "spec.ingress[0].ports[0]"),
    (ingress_ports({"port": 80}, {"protocol": "ICMP"}), "spec.ingress[0].ports[1].protocol"),
    (ingress_ports({"protocol": "tcp", "port": 80}), "spec.ingress[0].ports[0].protocol"),
    (ingress_ports({"port": 0}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": 65536}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": -1}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": True}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": 80.5}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "HTTP"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": ""}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "-http"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "http-"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "ht--tp"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "http_alt"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "a234567890123456"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": "0"}), "spec.ingress[0].ports[0].port"),
    (ingress_ports({"port": 443, "endPort": 80}), "spec.ingress[0].ports[0].endPort"),
    (ingress_ports({"port": 80, "endPort": 65536}), "spec.ingress[0].ports[0].endPort"),
    (ingress_ports({"port": "http", "endPort": 8080}), "spec.ingress[0].ports[0].endPort"),
    (ingress_ports({"endPort": 8080}), "spec.ingress[0].ports[0].endPort"),
    (ingress_ports({"port": 80, "endPort": "90"}), "spec.ingress[0].ports[0].endPort"),
    (netpol({"podSelector": {}, "egress": [{"ports": [{"port": 1}, {"port": 9, "endPort": 8}]}]}),
     "spec.egress[0].ports[1].endPort"),
])
def test_invalid_policies_name_the_field(obj, field):
    err = _error(obj)
    assert err.field == field, str(err)
    assert str(err).startswith(f"{field}: ") and err.msg


def test_error_messages_say_what_is_wrong():
    assert "not one of In, NotIn, Exists, DoesNotExist" in str(_error(netpol(
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}})))
    assert "must be TCP, UDP or SCTP" in str(_error(ingress_ports({"protocol": "ICMP"})))
    assert "10.1.0.0/24 is not strictly inside 10.0.0.0/16" in str(_error(ingress_from(
        {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}})))
    assert ">= port (443)" in str(_error(ingress_ports({"port": 443, "endPort": 80})))


def test_the_first_error_is_reported_and_the_input_is_not_modified():
    obj = ingress_ports({"port": 0}, {"protocol": "ICMP"})
    before = copy.deepcopy(obj)
    assert _error(obj).field == "spec.ingress[0].ports[0].port"
    assert obj == before


# ---------------------------------------------------------------- ipBlock


def test_ip_block_normalises_host_bits():
    pol = parse_network_policy(ingress_from({"ipBlock": {"cidr": "10.1.2.3/16",
                                                         "except": ["10.1.2.3/24"]}}))
    block = pol.ingress[0].peers[0].ip_block
    assert str(block.cidr) == "10.1.0.0/16" and [str(e) for e in block.excepts] == ["10.1.2.0/24"]


def test_ipv6_block_warns_and_allows_nothing():
    pol = parse_network_policy(ingress_from({"ipBlock": {"cidr": "fd00::/8",
                                                         "except": ["fd00:1::/32"]}}))
    # Still a valid policy isolating ingress, with no rule that could match anything.
    assert pol.types == {INGRESS} and pol.ingress == ()
    (warning,) = pol.warnings
    assert "spec.ingress[0].from[0].ipBlock" in warning and "IPv6" in warning


def test_ipv6_block_beside_other_peers_keeps_the_others():
    pol = parse_network_policy(ingress_from(
        {"ipBlock": {"cidr": "::/0"}}, {"podSelector": {"matchLabels": {"a": "b"}}},
        ports=[{"port": 80}]))
    (rule,) = pol.ingress
    assert len(rule.peers) == 1 and rule.peers[0].pod_selector.matches({"a": "b"})
    assert rule.ports == (Port("TCP", 80),)
    assert "spec.ingress[0].from[0].ipBlock" in pol.warnings[0]


def test_null_peer_fields_are_absent_ones():
    # The API server decodes `podSelector: null` as no podSelector at all.
    pol = parse_network_policy(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8"},
                                             "podSelector": None}))
    assert pol.ingress[0].peers[0].ip_block.cidr == ipaddress.ip_network("10.0.0.0/8")
    pol = parse_network_policy(ingress_from({"namespaceSelector": {}, "podSelector": None}))
    peer = pol.ingress[0].peers[0]
    assert peer.pod_selector is None and peer.namespace_selector.empty


def test_ports_of_a_rule_with_only_ipv6_peers_are_still_validated():
    err = _error(ingress_from({"ipBlock": {"cidr": "fd00::/8"}}, ports=[{"port": 0}]))
    assert err.field == "spec.ingress[0].ports[0].port"


def test_egress_named_ports_with_ip_block_peers_warn():
    pol = parse_network_policy(netpol({"podSelector": {}, "egress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": "http"}]},
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]},
        {"to": [{"podSelector": {}}], "ports": [{"port": "http"}]}]}))
    (warning,) = pol.warnings
    assert warning.startswith("spec.egress[0]: named ports towards an ipBlock apply to the pods")


@pytest.mark.parametrize("port, valid", [
    ("http", True), ("h2c", True), ("web-8080", True), ("8080", True), (8080, True),
    ("a--b", False), ("12-3", False), ("-a", False), ("a-", False), ("Http", False),
    ("abcdefghijklmnop", False), ("65536", False), ("", False)])
def test_both_policy_families_take_the_same_ports(port, valid):
    """One validator (model.port_value) for NetworkPolicy and CiliaNetworkPolicy: they
    had drifted, the cilia kind taking 'a--b' and '12-3' that the API's rule refuses."""
    from cilia.policy.cilia_model import parse_cilia_policy

    np = {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
          "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}}
    cnp = {"kind": "CiliaNetworkPolicy", "metadata": {"name": "p", "namespace": "x"},
           "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [
               {"port": port, "protocol": "TCP"}]}]}]}}
    for obj, parse in ((np, parse_network_policy), (cnp, parse_cilia_policy)):
        if valid:
            parse(obj)
        else:
            with pytest.raises(PolicyError, match="port"):
                parse(obj)
