"""Policy validation: invalid policies get an Event naming the field, and cilia's own
policies (Valid) and ClusterNetworkPolicies (Accepted) a status condition too. Against
the real API server, which refuses much that the emulator let through: only what its
validation (and the CRDs' schemas and CEL rules) accepts can reach the operator."""

import time

from cpkit import wait_for

from cilia.datastore.kubernetes import (
    CILIA_CLUSTER_POLICIES,
    CILIA_POLICIES,
    CLUSTER_NETWORK_POLICIES,
    NETWORK_POLICIES,
)
from cilia.policy.cilia_model import parse_cilia_policy


def valid_condition(cluster, res, namespace, name):
    obj = cluster.client.get(res, namespace, name) or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Valid"), None), obj


def test_invalid_policies_get_conditions_and_events(cluster):
    cluster.namespace("x")
    x = cluster.ns("x")
    # The API server accepts all of these; cilia cannot enforce the "bad" ones. For a
    # NetworkPolicy that is rare: the API server's own validation refuses an ipBlock
    # whose except is not inside its cidr (which the emulator let through), but accepts
    # an IPv4 address with leading zeros (read as decimal, for compatibility), which
    # cilia's parser (Python's ipaddress) refuses.
    cluster.client.create(NETWORK_POLICIES, {"metadata": {"name": "np-bad", "namespace": x},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
            "cidr": "10.0.0.0/16", "except": ["10.0.001.0/24"]}}]}]}})
    cluster.client.create(NETWORK_POLICIES, {"metadata": {"name": "np-good", "namespace": x},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{}]}})
    cnp = {"metadata": {"name": "cnp-bad", "namespace": x}, "spec": {
        "endpointSelector": {"matchLabels": {"app": "b"}},
        "ingressDeny": [{"fromCIDRSet": [{"cidr": "192.0.2.0/24",
                                          "except": ["198.51.100.0/24"]}]}]}}
    cluster.client.create(CILIA_POLICIES, cnp)
    cluster.client.create(CILIA_POLICIES, {"metadata": {"name": "cnp-good", "namespace": x},
        "spec": {"endpointSelector": {}, "ingressDeny": [
            {"fromEndpoints": [{"matchLabels": {"app": "c"}}]}],
            "egress": [{"toEntities": ["world"], "toPorts": [{"ports": [
                {"port": "443", "protocol": "TCP"}]}]}]}})
    # (An endPort below its port, the emulator's example, is refused by a CEL rule now.)
    cluster.client.create(CILIA_CLUSTER_POLICIES, {"metadata": {"name": "ccnp-bad"}, "spec": {
        "endpointSelector": {}, "egress": [{"toCIDRSet": [
            {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]}]}})
    op = cluster.operator("policies")
    op.wait_ready("leader")

    # NetworkPolicy: an Event naming the field (it has no status).
    ev = wait_for(lambda: cluster.events("np-bad", "x"), what="an event for np-bad")
    assert ev[0]["type"] == "Warning" and ev[0]["reason"] == "InvalidNetworkPolicy"
    assert ev[0]["message"].startswith("spec.ingress[0].from[0].ipBlock.except[0]:")
    assert ev[0]["involvedObject"]["kind"] == "NetworkPolicy"
    assert ev[0]["involvedObject"]["uid"]
    assert not cluster.events("np-good", "x")

    # CiliaNetworkPolicy: a condition and an Event, both naming the field.
    cond, obj = wait_for(lambda: (r := valid_condition(cluster, CILIA_POLICIES, x,
                                                        "cnp-bad"))[0] and r,
                         what="cnp-bad's Valid condition")
    assert cond["status"] == "False" and cond["reason"] == "Invalid"
    assert cond["message"].startswith("spec.ingressDeny[0].fromCIDRSet[0].except[0]:")
    assert cond["observedGeneration"] == obj["metadata"]["generation"]
    ev = wait_for(lambda: cluster.events("cnp-bad", "x"), what="an event for cnp-bad")
    assert ev[0]["reason"] == "InvalidCiliaNetworkPolicy"
    assert ev[0]["message"].startswith("spec.ingressDeny[0].fromCIDRSet[0].except[0]:")

    good, _ = wait_for(lambda: (r := valid_condition(cluster, CILIA_POLICIES, x,
                                                      "cnp-good"))[0] and r,
                       what="cnp-good's Valid condition")
    assert good["status"] == "True"
    assert not cluster.events("cnp-good", "x")

    # Cluster-wide: the condition, and the Event in `default`.
    cond, _ = wait_for(lambda: (r := valid_condition(cluster, CILIA_CLUSTER_POLICIES, None,
                                                      "ccnp-bad"))[0] and r,
                       what="ccnp-bad's Valid condition")
    assert cond["status"] == "False"
    assert cond["message"].startswith("spec.egress[0].toCIDRSet[0].except[0]:")
    wait_for(lambda: cluster.events("ccnp-bad"), what="an event for ccnp-bad")

    # Fixing it turns the condition True, for the new generation; no Event for that.
    cluster.client.patch(CILIA_POLICIES, x, "cnp-bad", {"spec": {"ingressDeny": [
        {"fromCIDRSet": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}]}]}})
    cond, obj = wait_for(lambda: (r := valid_condition(cluster, CILIA_POLICIES, x,
                                                        "cnp-bad"))[0]["status"] == "True"
                         and r, what="cnp-bad valid once fixed")
    assert cond["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert len(cluster.events("cnp-bad", "x")) == 1

    # The operator's own status patch comes back as an event: it must not loop. (The
    # real server bumps resourceVersion on every write that changes the object.)
    version = obj["metadata"]["resourceVersion"]
    time.sleep(1.0)
    assert cluster.client.get(CILIA_POLICIES, x, "cnp-bad")["metadata"][
        "resourceVersion"] == version
    wait_for(lambda: op.metric('cilia_operator_invalid_policies{kind="NetworkPolicy"}') == 1
             and op.metric('cilia_operator_invalid_policies{kind="CiliaNetworkPolicy"}') == 0
             and op.metric(
                 'cilia_operator_invalid_policies{kind="CiliaClusterwideNetworkPolicy"}') == 1,
             what="invalid policy gauges")
    op.assert_no_errors()


def check_cilia_policy(obj: dict):
    return parse_cilia_policy({"kind": "CiliaNetworkPolicy", **obj})


def test_cilia_policy_checks_name_the_field():
    cases = [
        ({}, "spec"),
        ({"spec": {}}, "spec.endpointSelector"),
        ({"spec": {"endpointSelector": {"matchExpressions": [
            {"key": "a", "operator": "In"}]}}},
         "spec.endpointSelector.matchExpressions[0].values"),
        ({"spec": {"endpointSelector": {}, "egress": [{"toEntities": ["moon"]}]}},
         "spec.egress[0].toEntities[0]"),
        ({"spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.300"]}]}},
         "spec.ingress[0].fromCIDR[0]"),
        ({"spec": {"endpointSelector": {}, "egressDeny": [{"toPorts": [{"ports": [
            {"port": "99999"}]}]}]}}, "spec.egressDeny[0].toPorts[0].ports[0].port"),
        ({"spec": {"endpointSelector": {}, "ingress": [{"icmps": [{"fields": [
            {"type": 300}]}]}]}}, "spec.ingress[0].icmps[0].fields[0].type"),
        ({"spec": {"endpointSelector": {}, "ingress": [{"toEndpoints": []}]}},
         "spec.ingress[0]"),
    ]
    from cilia.policy import PolicyError

    for obj, field in cases:
        try:
            check_cilia_policy(obj)
        except PolicyError as err:
            assert err.field == field, (obj, err)
        else:
            raise AssertionError(f"accepted: {obj}")
    check_cilia_policy({"spec": {"endpointSelector": {}, "ingress": [{}],
                                 "egress": [{"toEntities": ["world"], "icmps": [
                                     {"fields": [{"type": 8, "family": "IPv4"}]}]}]}})


def accepted_condition(cluster, name):
    obj = cluster.client.get(CLUSTER_NETWORK_POLICIES, None, name) or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Accepted"), None), obj


def _cnp(name: str, spec: dict) -> dict:
    return {"metadata": {"name": name}, "spec": {
        "tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, **spec}}


def test_cluster_network_policies_get_the_accepted_condition(cluster):
    """ClusterNetworkPolicy: the API's Accepted condition, by the agents' parser: True
    (with the parser's warnings, where cilia fails closed on a part), or False naming
    the field, with a Warning Event; written once per change, never in a loop."""
    good, warned, bad = (f"{cluster.prefix}-{n}" for n in ("good", "warned", "bad"))
    deny_y = [{"name": "deny-y", "action": "Deny", "from": [{"namespaces": {
        "matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]
    cluster.client.create(CLUSTER_NETWORK_POLICIES, _cnp(good, {"ingress": deny_y}))
    cluster.client.create(CLUSTER_NETWORK_POLICIES, _cnp(warned, {
        "tier": "Baseline", "egress": [{"action": "Accept",
                                        "to": [{"networks": ["2001:db8::/32"]}]}]}))
    # The API server accepts any selector operator (the CRD's schema has no enum).
    cluster.client.create(CLUSTER_NETWORK_POLICIES, _cnp(bad, {
        "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
            {"key": "app", "operator": "Near"}]}}}, "ingress": deny_y}))
    op = cluster.operator("policies")
    op.wait_ready("leader")

    def condition(name):
        return wait_for(lambda: (r := accepted_condition(cluster, name))[0] and r,
                        what=f"{name}'s Accepted condition")

    cond, obj = condition(good)
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "True", "Accepted", "cilia enforces the policy")
    assert cond["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert cond["lastTransitionTime"]
    assert not cluster.events(good)

    cond, _ = condition(warned)
    assert cond["status"] == "True" and cond["reason"] == "Accepted"
    assert cond["message"].startswith("cilia enforces the policy, with warnings: "
                                      "spec.egress[0].to[0].networks[0]: IPv6 network")

    cond, obj = condition(bad)
    assert cond["status"] == "False" and cond["reason"] == "Invalid"
    assert cond["message"].startswith(
        "spec.subject.pods.podSelector.matchExpressions[0].operator:")
    assert cond["message"].endswith("the pods it selects are held closed)")
    ev = wait_for(lambda: cluster.events(bad), what=f"an event for {bad}")
    assert ev[0]["type"] == "Warning" and ev[0]["reason"] == "InvalidClusterNetworkPolicy"
    assert ev[0]["involvedObject"]["kind"] == "ClusterNetworkPolicy"
    assert ev[0]["message"].startswith(
        "spec.subject.pods.podSelector.matchExpressions[0].operator:")
    wait_for(lambda: op.metric('cilia_operator_invalid_policies{kind="ClusterNetworkPolicy"}')
             == 1, what="the invalid ClusterNetworkPolicy counted")

    # Fixed: Accepted, for the new generation, a new transition time; no Event for that.
    before = cond["lastTransitionTime"]
    cluster.client.patch(CLUSTER_NETWORK_POLICIES, None, bad, {"spec": {"subject": {
        "pods": {"namespaceSelector": {}, "podSelector": {"matchExpressions": None,
                                                          "matchLabels": {"app": "b"}}}}}})
    cond, obj = wait_for(lambda: (r := accepted_condition(cluster, bad))[0]["status"]
                         == "True" and r, what=f"{bad} accepted once fixed")
    assert cond["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert cond["reason"] == "Accepted" and cond["lastTransitionTime"] >= before
    assert len(cluster.events(bad)) == 1

    # The operator's own status patch comes back as an event: it must not loop.
    version = obj["metadata"]["resourceVersion"]
    time.sleep(1.0)
    assert cluster.client.get(CLUSTER_NETWORK_POLICIES, None, bad)["metadata"][
        "resourceVersion"] == version
    wait_for(lambda: op.metric('cilia_operator_invalid_policies{kind="ClusterNetworkPolicy"}')
             == 0, what="no invalid ClusterNetworkPolicy")
    op.assert_no_errors()
