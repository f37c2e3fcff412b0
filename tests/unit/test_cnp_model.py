"""ClusterNetworkPolicy parsing: what the CRD's schema accepts parses, errors name the
field, and peers the API says to fail closed on do."""

import pytest

from cilia.policy import PolicyError
from cilia.policy.cnp_model import ACCEPT, DENY, parse_cluster_network_policy


def cnp(spec: dict, name: str = "p") -> dict:
    return {"apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


BASE = {"tier": "Admin", "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"team": "a"}}}}


def test_rules_peers_and_ports():
    pol = parse_cluster_network_policy(cnp({**BASE, "ingress": [
        {"name": "r0", "action": "Deny", "from": [{"pods": {
            "namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}}}],
         "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                       {"udp": {"destinationPort": {"range": {"start": 53, "end": 60}}}},
                       {"destinationNamedPort": "http"}]}],
        "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8", "fd00::/8"]}]}]}))
    assert pol.tier == "Admin" and pol.priority == 10
    (r0,) = pol.rules["ingress"]
    assert r0.action == DENY and r0.name == "r0"
    assert [(p.proto, p.port, p.end_port) for p in r0.match.ports] == [
        (6, 80, None), (17, 53, 60), (0, "http", None)]
    (e0,) = pol.rules["egress"]
    assert e0.action == ACCEPT and [str(b.cidr) for b in e0.match.cidrs] == ["10.0.0.0/8"]
    assert any("IPv6" in w for w in pol.warnings)
    assert pol.subject.matches({"io.kubernetes.pod.namespace": "n",
                                "io.cilia.k8s.namespace.labels.team": "a"})
    assert not pol.subject.matches({"io.kubernetes.pod.namespace": "n"})


@pytest.mark.parametrize("spec, field", [
    ({**BASE, "tier": "Middle"}, "spec.tier"),
    ({**BASE, "priority": 1001}, "spec.priority"),
    ({**BASE, "subject": {}}, "spec.subject"),
    ({**BASE, "subject": {"namespaces": {}, "pods": {"podSelector": {}}}}, "spec.subject"),
    ({**BASE, "ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]},
     "spec.ingress[0].action"),
    ({**BASE, "ingress": [{"action": "Deny", "from": []}]}, "spec.ingress[0].from"),
    ({**BASE, "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.1/8"]}]}]},
     "spec.egress[0].to[0].networks[0]"),
    ({**BASE, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [
        {"tcp": {"destinationPort": {"range": {"start": 90, "end": 80}}}}]}]},
     "spec.ingress[0].protocols[0].tcp.destinationPort.range"),
    ({**BASE, "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}],
                          "protocols": [{"destinationNamedPort": "http"}]}]},
     "spec.egress[0].protocols"),
])
def test_errors_name_the_field(spec, field):
    with pytest.raises(PolicyError) as err:
        parse_cluster_network_policy(cnp(spec))
    assert str(err.value).startswith(field), str(err.value)


def test_unresolvable_peer_fails_closed():
    """Node peers by label are not resolved yet: an Accept rule matches nothing there, a
    Deny or Pass rule denies every peer (the API's own fail-closed rule)."""
    peer = [{"nodes": {"matchLabels": {"zone": "a"}}}]
    deny = parse_cluster_network_policy(cnp({**BASE, "egress": [
        {"action": "Pass", "to": peer}]})).rules["egress"][0]
    assert deny.action == DENY and deny.match.entities == {"all"}
    accept = parse_cluster_network_policy(cnp({**BASE, "egress": [
        {"action": "Accept", "to": peer}]})).rules["egress"][0]
    assert accept.action == ACCEPT and not accept.match.endpoints \
        and not accept.match.entities and not accept.match.cidrs
