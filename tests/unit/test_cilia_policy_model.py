"""CiliaNetworkPolicy / CiliaClusterwideNetworkPolicy: validation and compile semantics."""

import pytest

from cilia.identity import HOST, WORLD
from cilia.policy import PolicyError
from cilia.policy.cilia_model import parse_cilia_policy
from cilia.policy.compiler import CIDR_VIEW, Compiler, PodView, verdict
from cilia.policy.model import EGRESS, INGRESS

TCP, UDP, ICMP = 6, 17, 1


def cnp(spec, kind="CiliaNetworkPolicy", ns="x", name="p"):
    meta = {"name": name} | ({"namespace": ns} if kind == "CiliaNetworkPolicy" else {})
    return {"apiVersion": "cilia.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


@pytest.mark.parametrize("spec,field", [
    ({}, "spec.endpointSelector"),
    ({"endpointSelector": {}, "ingress": [{"fromEntities": ["moon"]}]},
     "spec.ingress[0].fromEntities[0]"),
    ({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.300/8"]}]},
     "spec.egress[0].toCIDR[0]"),
    ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "70000"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port"),
    ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80",
                                                                   "protocol": "GRE"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ({"endpointSelector": {}, "ingressDeny": [{"icmps": [{"fields": [{"type": 300}]}]}]},
     "spec.ingressDeny[0].icmps[0].fields[0].type"),
    ({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8",
                                                         "except": ["11.0.0.0/8"]}]}]},
     "spec.egress[0].toCIDRSet[0].except[0]"),
    ({"endpointSelector": {}, "ingress": [{"fromNodes": []}]}, "spec.ingress[0]"),
])
def test_invalid_policies_name_the_field(spec, field):
    with pytest.raises(PolicyError) as err:
        parse_cilia_policy(cnp(spec))
    assert err.value.field == field


def pod(ns, name, identity, ip, **labels):
    return PodView(ns, name, labels or {"pod": name}, ip, identity)


PODS = [pod("x", "a", 300, "10.244.1.2"), pod("x", "b", 301, "10.244.1.3"),
        pod("y", "c", 302, "10.244.2.2")]
NAMESPACES = {"x": {"team": "x"}, "y": {"team": "y"}}


def compile_(*policies, local=("a",)):
    by_name = {p.name: p for p in PODS}
    eps = {i + 1: by_name[n] for i, n in enumerate(local)}
    return Compiler().compile([], PODS, NAMESPACES, eps, list(policies)), eps


def test_deny_wins_over_a_more_specific_allow():
    compiled, _ = compile_(cnp({
        "endpointSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
    }))
    pol = compiled.endpoints[1]
    allowed, entry = verdict(pol, INGRESS, 301, WORLD, TCP, 80)
    assert not allowed and entry.rule.direction == "ingressDeny"


def test_selectors_are_namespace_scoped_unless_they_name_the_namespace():
    spec = {"endpointSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"fromEndpoints": [{}]}]}
    pol = compile_(cnp(spec))[0].endpoints[1]
    assert verdict(pol, INGRESS, 301, WORLD, TCP, 80)[0]  # x/b
    assert not verdict(pol, INGRESS, 302, WORLD, TCP, 80)[0]  # y/c
    spec["ingress"] = [{"fromEndpoints": [{"matchLabels": {
        "io.cilia.k8s.namespace.labels.team": "y", "io.kubernetes.pod.namespace": "y"}}]}]
    pol = compile_(cnp(spec))[0].endpoints[1]
    assert verdict(pol, INGRESS, 302, WORLD, TCP, 80)[0]
    assert not verdict(pol, INGRESS, 301, WORLD, TCP, 80)[0]


def test_world_entity_never_matches_a_pod_inside_a_cidr():
    compiled, _ = compile_(cnp({
        "endpointSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"fromEntities": ["world"]}],
        "egress": [{"toCIDR": ["10.244.0.0/16"]}],  # puts a CIDR over the pods
    }))
    pol = compiled.endpoints[1]
    cidr = compiled.cidrs[next(n for n in compiled.cidrs if str(n) == "10.244.0.0/16")]
    assert verdict(pol, INGRESS, WORLD, WORLD, TCP, 80)[0]
    assert verdict(pol, INGRESS, cidr, cidr, TCP, 80)[0]  # an outside address in the CIDR
    assert not verdict(pol, INGRESS, 301, cidr, TCP, 80)[0]  # a pod in it is not the world
    assert not verdict(pol, INGRESS, HOST, WORLD, TCP, 80)[0]
    # ...while the CIDR rule does match the pod (ipBlock semantics), through its CIDR view
    assert verdict(pol, EGRESS, 301, cidr, TCP, 80)[0]
    assert any(k.identity == cidr | CIDR_VIEW for k in pol.entries)


def test_icmp_and_any_protocol_ports():
    compiled, _ = compile_(cnp({
        "endpointSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"icmps": [{"fields": [{"type": 8}]}],
                     "toPorts": [{"ports": [{"port": "53"}]}]}],
    }))
    pol = compiled.endpoints[1]
    assert verdict(pol, INGRESS, 302, WORLD, ICMP, 8)[0]  # any peer: no peer field
    assert not verdict(pol, INGRESS, 302, WORLD, ICMP, 13)[0]
    assert verdict(pol, INGRESS, 302, WORLD, UDP, 53)[0] and verdict(
        pol, INGRESS, 302, WORLD, TCP, 53)[0]
    assert not verdict(pol, INGRESS, 302, WORLD, TCP, 80)[0]


def test_empty_rule_is_default_deny_and_clusterwide_spans_namespaces():
    compiled, _ = compile_(
        cnp({"endpointSelector": {}, "ingress": [{}]}, kind="CiliaClusterwideNetworkPolicy"),
        local=("a", "c"))
    for ep in (1, 2):
        pol = compiled.endpoints[ep]
        assert pol.ingress_enforced and not pol.egress_enforced and not pol.entries


def test_rejected_policy_isolates_what_it_selects():
    compiled, _ = compile_(cnp({"endpointSelector": {"matchLabels": {"pod": "a"}},
                                "egress": [{"toEntities": ["nowhere"]}]}))
    (status,) = compiled.statuses
    assert not status.valid and status.selected == ["x/a"]
    pol = compiled.endpoints[1]
    assert pol.egress_enforced and not pol.ingress_enforced and not pol.entries
