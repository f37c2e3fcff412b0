"""ClusterNetworkPolicy in the compiler, judged against the API's own definition: the
verdict the compiled entries give when looked up as the datapath does (compiler.verdict,
the mirror of bpf/lib/policy.h) equals walking the rules in order — Admin tier by
priority, then policy name, then rule order, the first match deciding (Pass: the next
tier), NetworkPolicy, then the Baseline tier, then allowed. Random policies, every pod,
peer, protocol and port of the reachability model (tests/unit/test_policy_compiler.py).
"""

import ipaddress
import random

import pytest
from test_policy_compiler import EXTERNAL, TCP, UDP, Cluster, Result

from cilia.policy.compiler import ALLOW, DENY, PASS, TIER_ADMIN, Compiler, verdict
from cilia.policy.model import EGRESS, INGRESS

NETWORKS = ("10.1.0.0/16", "10.2.0.1/32", "10.0.0.0/8", "0.0.0.0/0", "192.168.0.0/16",
            "10.3.0.2/31")
NS_SELECTORS = ({"matchLabels": {"ns": "x"}}, {"matchLabels": {"team": "blue"}}, {},
                {"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]})
POD_SELECTORS = ({"matchLabels": {"pod": "a"}}, {"matchLabels": {"tier": "db"}}, {})
PORTS = (79, 80, 81, 1000)


def _protocols(rng, named_ok: bool):
    if rng.random() < 0.35:
        return None
    choices = [{"tcp": {"destinationPort": {"number": 80}}},
               {"tcp": {"destinationPort": {"range": {"start": 79, "end": 81}}}},
               {"udp": {"destinationPort": {"number": 81}}},
               {"tcp": {"destinationPort": {"range": {"start": 1, "end": 1000}}}}]
    if named_ok:
        choices.append({"destinationNamedPort": "http"})
    return rng.sample(choices, rng.randint(1, 2))


def _peer(rng, egress: bool):
    kind = rng.choice(("namespaces", "pods", "networks") if egress else ("namespaces", "pods"))
    if kind == "namespaces":
        return {"namespaces": rng.choice(NS_SELECTORS)}
    if kind == "pods":
        return {"pods": {"namespaceSelector": rng.choice(NS_SELECTORS),
                         "podSelector": rng.choice(POD_SELECTORS)}}
    return {"networks": rng.sample(NETWORKS, rng.randint(1, 2))}


def random_cnp(rng, i: int) -> dict:
    # distinct priorities: where two policies of one priority match, the API lets the
    # implementation pick either (test_same_priority_is_decided_by_either)
    spec = {"tier": rng.choice(("Admin", "Baseline")), "priority": 10 * i + rng.randint(0, 9),
            "subject": rng.choice(({"namespaces": rng.choice(NS_SELECTORS)},
                                   {"pods": {"namespaceSelector": rng.choice(NS_SELECTORS),
                                             "podSelector": rng.choice(POD_SELECTORS)}}))}
    for direction in (INGRESS, EGRESS):
        rules = []
        for _ in range(rng.randint(0, 3)):
            peers = [_peer(rng, direction == EGRESS) for _ in range(rng.randint(1, 2))]
            named_ok = not any("networks" in p for p in peers)
            action = rng.choice(("Accept", "Deny", "Pass"))
            if spec["tier"] == "Baseline" and action == "Pass":
                action = "Deny"
            rule = {"action": action, "from" if direction == INGRESS else "to": peers,
                    "name": f"r{len(rules)}"}
            if (protocols := _protocols(rng, named_ok)) is not None:
                rule["protocols"] = protocols
            rules.append(rule)
        spec[direction] = rules
    return {"apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": f"p{i}"}, "spec": spec}


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for req in selector.get("matchExpressions") or ():
        if req["operator"] == "DoesNotExist" and req["key"] in labels:
            return False
    return True


class Reference:
    """The API's definition, written plainly: no identities, no keys, no prefixes."""

    def __init__(self, cluster: Cluster, cnps: list[dict], isolated: set[tuple[str, str]]):
        self.cluster, self.isolated = cluster, isolated
        self.order = sorted(cnps, key=lambda p: (p["spec"]["priority"], p["metadata"]["name"]))

    def _pod_matches(self, sel: dict, pod) -> bool:
        ns_labels = self.cluster.namespaces[pod.namespace]
        if "namespaces" in sel:
            return _selects(sel["namespaces"], ns_labels)
        pods = sel["pods"]
        return _selects(pods["namespaceSelector"], ns_labels) and \
            _selects(pods["podSelector"], pod.labels)

    def _peer_matches(self, peer: dict, peer_pod, peer_ip: str) -> bool:
        if "networks" in peer:
            return any(ipaddress.IPv4Address(peer_ip) in ipaddress.IPv4Network(n)
                       for n in peer["networks"])
        return peer_pod is not None and self._pod_matches(peer, peer_pod)

    def _port_matches(self, rule: dict, dst_pod, proto: int, port: int) -> bool:
        if "protocols" not in rule:
            return True
        for p in rule["protocols"]:
            if "destinationNamedPort" in p:
                if dst_pod is not None and any(
                        name == p["destinationNamedPort"] and pr == proto and n == port
                        for name, pr, n in dst_pod.ports):
                    return True
                continue
            ((which, body),) = p.items()
            if {"tcp": TCP, "udp": UDP}[which] != proto:
                continue
            dp = body["destinationPort"]
            lo, hi = ((dp["number"], dp["number"]) if "number" in dp
                      else (dp["range"]["start"], dp["range"]["end"]))
            if lo <= port <= hi:
                return True
        return False

    def _tier(self, tier, pod, direction, peer_pod, peer_ip, proto, port):
        for pol in self.order:
            spec = pol["spec"]
            if spec["tier"] != tier or not self._pod_matches(spec["subject"], pod):
                continue
            for rule in spec.get(direction) or ():
                peers = rule["from" if direction == INGRESS else "to"]
                dst = pod if direction == INGRESS else peer_pod
                if any(self._peer_matches(p, peer_pod, peer_ip) for p in peers) and \
                        self._port_matches(rule, dst, proto, port):
                    return rule["action"], (pol["metadata"]["name"], rule["name"])
        return None, None

    def allowed(self, pod, direction, peer_pod, peer_ip, proto, port):
        action, who = self._tier("Admin", pod, direction, peer_pod, peer_ip, proto, port)
        if action in ("Accept", "Deny"):
            return action == "Accept", who
        if (pod.namespace, direction) in self.isolated:
            return False, None
        action, who = self._tier("Baseline", pod, direction, peer_pod, peer_ip, proto, port)
        if action in ("Accept", "Deny"):
            return action == "Accept", who
        return True, None


def deny_all(namespace: str, direction: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"deny-{direction}", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": [direction.capitalize()]}}


@pytest.mark.parametrize("seed", range(12))
def test_compiled_tiers_equal_walking_the_rules(seed):
    rng = random.Random(seed)
    cluster = Cluster()
    cnps = [random_cnp(rng, i) for i in range(rng.randint(1, 6))]
    isolated = set(rng.sample([(ns, d) for ns in ("x", "y", "z") for d in (INGRESS, EGRESS)],
                              rng.randint(0, 2)))
    nps = [deny_all(ns, d) for ns, d in isolated]
    local = {ep: cluster.pods[name] for name, ep in cluster.ep_ids.items()}
    compiled = Compiler().compile(nps, list(cluster.pods.values()), cluster.namespaces,
                                  local, cluster_policies=cnps)
    assert all(s.valid for s in compiled.statuses), [s.error for s in compiled.statuses]
    result = Result(cluster, compiled)
    ref = Reference(cluster, cnps, isolated)
    peers = [(p, p.ip) for p in cluster.pods.values()] + [(None, ip) for ip in EXTERNAL]
    wrong = []
    for name, pod in cluster.pods.items():
        pol = result.policy(name)
        for direction in (INGRESS, EGRESS):
            for peer_pod, peer_ip in peers:
                if peer_pod is pod:
                    continue
                ident, cidr = result.ipcache(peer_ip)
                for proto in (TCP, UDP):
                    for port in PORTS:
                        want, who = ref.allowed(pod, direction, peer_pod, peer_ip, proto, port)
                        got, entry = verdict(pol, direction, ident, cidr, proto, port)
                        if got != want or (who and entry and (
                                entry.rule.name, entry.rule.rule_name) != who):
                            wrong.append((name, direction, peer_ip, proto, port, want, who,
                                          got, entry and str(entry.rule)))
    assert not wrong, f"{len(wrong)} verdicts differ, e.g. {wrong[:5]}\n{cnps}"


def test_a_better_priority_wildcard_is_written_into_a_worse_specific_key():
    """The datapath's longest-prefix match would find the port-80 Accept; the compiler
    writes the Deny (any port, better priority) into that key too."""
    cluster = Cluster()
    cnps = [{"kind": "ClusterNetworkPolicy", "metadata": {"name": name},
             "spec": {"tier": "Admin", "priority": prio,
                      "subject": {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                           "podSelector": {"matchLabels": {"pod": "a"}}}},
                      "ingress": [rule]}}
            for name, prio, rule in (
                ("deny-any", 1, {"action": "Deny", "from": [{"namespaces": {}}]}),
                ("accept-80", 2, {"action": "Accept", "from": [{"namespaces": {}}],
                                  "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}))]
    local = {ep: cluster.pods[name] for name, ep in cluster.ep_ids.items()}
    compiled = Compiler().compile([], list(cluster.pods.values()), cluster.namespaces, local,
                                  cluster_policies=cnps)
    pol = compiled.endpoints[cluster.ep_ids["x/a"]]
    assert pol.tiered_ingress and not pol.tiered_egress and not pol.ingress_enforced
    tiered = {k: e for k, e in pol.entries.items() if k.tier == TIER_ADMIN}
    assert tiered and {e.action for e in tiered.values()} == {DENY}
    assert {e.rule.name for e in tiered.values()} == {"deny-any"}
    assert ALLOW != PASS  # the actions the datapath knows are distinct


def test_same_priority_is_decided_by_either_and_the_rest_still_applies():
    """Two Admin policies of one priority: where their rules disagree the API lets the
    implementation choose; where only one matches, that one decides."""
    cluster = Cluster()
    subject = {"namespaces": {"matchLabels": {"ns": "x"}}}
    cnps = [{"kind": "ClusterNetworkPolicy", "metadata": {"name": name},
             "spec": {"tier": "Admin", "priority": 7, "subject": subject, "ingress": rules}}
            for name, rules in (
                ("a-deny-y", [{"action": "Deny", "from": [
                    {"namespaces": {"matchLabels": {"ns": "y"}}}]}]),
                ("b-accept-y-and-z", [{"action": "Accept", "from": [
                    {"namespaces": {"matchLabels": {"ns": "y"}}},
                    {"namespaces": {"matchLabels": {"ns": "z"}}}]}]))]
    local = {ep: cluster.pods[name] for name, ep in cluster.ep_ids.items()}
    compiled = Compiler().compile(
        [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "deny-all", "namespace": "x"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}],
        list(cluster.pods.values()), cluster.namespaces, local, cluster_policies=cnps)
    result = Result(cluster, compiled)
    assert result.ingress("x/a", "z/b")  # only the Accept matches: it decides
    assert not result.ingress("x/a", "x/b")  # neither: NetworkPolicy's default deny
    allowed, entry = verdict(result.policy("x/a"), INGRESS, cluster.pods["y/b"].identity,
                             result.cidr_identity(cluster.pods["y/b"].ip), TCP, 80)
    assert entry is not None and entry.rule.name in ("a-deny-y", "b-accept-y-and-z")
    assert allowed == (entry.rule.name == "b-accept-y-and-z")


def test_a_new_policy_changes_no_other_policys_entries():
    """Ranks come from the priority, not from the position among the stored policies, so
    adding one writes its own entries and leaves every other value as it was (a change is
    a few map writes, not tens of thousands); an endpoint it does not select keeps its
    resolved entries without resolving again."""
    cluster = Cluster()

    def deny_from(name, prio, ns, subject_ns="x"):
        return {"kind": "ClusterNetworkPolicy", "metadata": {"name": name},
                "spec": {"tier": "Admin", "priority": prio,
                         "subject": {"namespaces": {"matchLabels": {"ns": subject_ns}}},
                         "ingress": [{"action": "Deny", "from": [
                             {"namespaces": {"matchLabels": {"ns": ns}}}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}}

    local = {ep: cluster.pods[name] for name, ep in cluster.ep_ids.items()}
    compiler = Compiler()
    base = [deny_from(f"p{i}", 100 + i, "y") for i in range(5)]
    before = compiler.compile([], list(cluster.pods.values()), cluster.namespaces, local,
                              cluster_policies=base)
    old = {(ep, k): e for ep, pol in before.endpoints.items() for k, e in pol.entries.items()}
    resolved_z = compiler._tiers_resolved.get(cluster.ep_ids["z/a"])
    resolved_x = compiler._tiers_resolved[cluster.ep_ids["x/a"]]
    after = compiler.compile([], list(cluster.pods.values()), cluster.namespaces, local,
                             cluster_policies=[*base, deny_from("new", 50, "y", "y"),
                                               deny_from("n2", 50, "x", "z")])
    new = {(ep, k): e for ep, pol in after.endpoints.items() for k, e in pol.entries.items()}
    changed = {k for k in new if k in old and new[k] != old[k]}
    assert not changed and set(old) <= set(new)
    assert {e.rule.name for k, e in new.items() if k not in old} == {"new", "n2"}
    assert compiler._tiers_resolved[cluster.ep_ids["x/a"]] is resolved_x  # not resolved again
    assert resolved_z is None and compiler._tiers_resolved[cluster.ep_ids["z/a"]]
