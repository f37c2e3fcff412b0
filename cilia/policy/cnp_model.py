"""ClusterNetworkPolicy (policy.networking.k8s.io, sig-network's admin policy API),
parsed and validated into cilia's rule model.

A ClusterNetworkPolicy sits in a tier (Admin before NetworkPolicy, Baseline after it), has
a priority in it (0-1000, lower first) and ordered rules whose first match decides:
Accept, Deny, or Pass (no decision here: the next tier decides). Each rule's peers and
ports become a `CRule`, so the compiler's peer and port expansion serves this family as
it serves NetworkPolicy and cilia's own; what is new is the order, which the compiler
folds into the entries it writes (cilia/policy/compiler.py, bpf/include/cilia/policy.h).

Where the API says to fail closed (a peer cilia cannot resolve), an Accept rule matches
nothing and a Deny or Pass rule denies every peer, as the API's own comments ask.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cilia.policy import PolicyError
from cilia.policy.cilia_model import (
    ANY_NAMESPACE,
    ANY_PROTOCOL,
    NAMESPACE_LABELS_PREFIX,
    CPort,
    CRule,
    as_list,
)
from cilia.policy.model import EGRESS, INGRESS, PROTOCOLS, IPBlock, port_value
from cilia.policy.selector import Requirement, Selector

KIND = "ClusterNetworkPolicy"
GROUP = "policy.networking.k8s.io"
# The release of sigs.k8s.io/network-policy-api whose CRD (standard channel) the chart
# ships, verbatim: charts/cilia/crds/network-policy-api-<version>-standard-*.yaml
NETWORK_POLICY_API_VERSION = "v0.3.1"
API_VERSIONS = (f"{GROUP}/v1beta1", f"{GROUP}/v1alpha2")  # same schema; v1beta1 stored
ADMIN = "Admin"
BASELINE = "Baseline"
TIERS = (ADMIN, BASELINE)
ACCEPT, DENY, PASS = "Accept", "Deny", "Pass"
ACTIONS = (ACCEPT, DENY, PASS)
MAX_PRIORITY = 1000
MAX_RULES = 25


@dataclass(frozen=True, slots=True)
class TierRule:
    """One rule: its action, its name (for trace and flows) and what it matches."""

    action: str
    name: str
    match: CRule


@dataclass
class ClusterNetworkPolicy:
    name: str
    tier: str
    priority: int
    subject: Selector  # over a pod's extended labels (cilia_model.extended_labels)
    rules: dict[str, tuple[TierRule, ...]]  # direction -> rules, first match decides
    warnings: list[str] = field(default_factory=list)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(d for d, rules in self.rules.items() if rules)


def _obj(raw, where: str, required: bool = False) -> dict:
    if raw is None and not required:
        return {}
    if not isinstance(raw, dict):
        raise PolicyError(where, "must be an object" + (" (it is required)" if raw is None
                                                        else ""))
    return raw


def _one_of(raw: dict, allowed: tuple[str, ...], where: str) -> str:
    """The one field of an object the API says must have exactly one."""
    unknown = set(raw) - set(allowed)
    if unknown:
        raise PolicyError(where, f"unknown field(s) {', '.join(sorted(unknown))} "
                          f"(cilia knows {', '.join(allowed)}): an API newer than this "
                          "cilia? Upgrade cilia")
    present = [k for k in allowed if raw.get(k) is not None]
    if len(present) != 1:
        raise PolicyError(where, f"needs exactly one of {', '.join(allowed)}")
    return present[0]


def _namespace_selector(raw, where: str) -> list[Requirement]:
    """A namespace selector as requirements over a pod's namespace labels, in any
    namespace."""
    sel = Selector.parse(raw if raw is not None else {}, where)
    return [Requirement(NAMESPACE_LABELS_PREFIX + r.key, r.operator, r.values)
            for r in sel.requirements] + [ANY_NAMESPACE]


def _pods_selector(raw, where: str) -> Selector:
    pods = _obj(raw, where, required=True)
    reqs = _namespace_selector(pods.get("namespaceSelector"), f"{where}.namespaceSelector")
    if "podSelector" not in pods:
        raise PolicyError(f"{where}.podSelector", "is required ({} selects every pod)")
    reqs += Selector.parse(pods["podSelector"], f"{where}.podSelector").requirements
    return Selector(tuple(reqs))


def _subject(raw, where: str) -> Selector:
    subject = _obj(raw, where, required=True)
    which = _one_of(subject, ("namespaces", "pods"), where)
    if which == "namespaces":
        return Selector(tuple(_namespace_selector(subject["namespaces"],
                                                  f"{where}.namespaces")))
    return _pods_selector(subject["pods"], f"{where}.pods")


def _port(raw, where: str) -> tuple[int | None, int | None]:
    port = _obj(raw, where, required=True)
    which = _one_of(port, ("number", "range"), where)
    if which == "number":
        number = port_value(port["number"], f"{where}.number")
        if not isinstance(number, int) or isinstance(port["number"], str):
            raise PolicyError(f"{where}.number", "must be a number 1-65535")
        return number, None
    rng = _obj(port["range"], f"{where}.range", required=True)
    start, end = rng.get("start"), rng.get("end")
    for key, value in (("start", start), ("end", end)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise PolicyError(f"{where}.range.{key}", f"{value!r}: a port is 1-65535")
    if start >= end:
        raise PolicyError(f"{where}.range", f"start {start} must be less than end {end}")
    return start, end


def _protocols(raw, where: str) -> tuple[CPort, ...] | None:
    entries = as_list(raw, where)
    if not entries:
        return None
    out = []
    for i, entry in enumerate(entries):
        here = f"{where}[{i}]"
        entry = _obj(entry, here, required=True)
        which = _one_of(entry, ("tcp", "udp", "sctp", "destinationNamedPort"), here)
        if which == "destinationNamedPort":
            name = port_value(entry[which], f"{here}.destinationNamedPort")
            if not isinstance(name, str):
                raise PolicyError(f"{here}.destinationNamedPort", "must be a port name")
            # A named port is the container port of that name, whatever its protocol.
            out.append(CPort(ANY_PROTOCOL, name))
            continue
        body = _obj(entry[which], f"{here}.{which}", required=True)
        proto = PROTOCOLS[which.upper()]
        if body.get("destinationPort") is None:
            unknown = set(body) - {"destinationPort"}
            raise PolicyError(f"{here}.{which}", "needs destinationPort" + (
                f" (unknown field(s) {', '.join(sorted(unknown))})" if unknown else ""))
        number, end = _port(body["destinationPort"], f"{here}.{which}.destinationPort")
        out.append(CPort(proto, number, end))
    return tuple(out)


def _cidr(raw, where: str, warnings: list[str]) -> IPBlock | None:
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except (ValueError, TypeError) as err:
        raise PolicyError(where, f"{raw!r} is not a CIDR in its masked form "
                          "(10.0.0.0/8, fd00::/8)") from err
    if net.version == 6:
        warnings.append(f"{where}: IPv6 network {net} matches nothing (pods are IPv4-only)")
        return None
    return IPBlock(net)


def _rule(raw, where: str, direction: str, warnings: list[str]) -> TierRule:
    rule = _obj(raw, where, required=True)
    side = "from" if direction == INGRESS else "to"
    unknown = set(rule) - {"name", "action", side, "protocols"}
    if unknown:
        raise PolicyError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    action = rule.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"{where}.action", f"{action!r}: one of {', '.join(ACTIONS)}")
    name = rule.get("name") or ""
    if not isinstance(name, str) or len(name) > 100:
        raise PolicyError(f"{where}.name", "must be a string of at most 100 characters")
    peers = as_list(rule.get(side), f"{where}.{side}")
    if not peers:
        raise PolicyError(f"{where}.{side}", "needs at least one peer")
    ports = _protocols(rule.get("protocols"), f"{where}.protocols")
    kinds = ("namespaces", "pods") if direction == INGRESS else (
        "namespaces", "pods", "nodes", "networks", "domainNames")
    selectors, cidrs, entities = [], [], set()
    unresolved = []
    for i, peer in enumerate(peers):
        here = f"{where}.{side}[{i}]"
        which = _one_of(_obj(peer, here, required=True), kinds, here)
        if which == "namespaces":
            selectors.append(Selector(tuple(_namespace_selector(peer[which],
                                                                f"{here}.namespaces"))))
        elif which == "pods":
            selectors.append(_pods_selector(peer[which], f"{here}.pods"))
        elif which == "networks":
            nets = as_list(peer[which], f"{here}.networks")
            if not nets:
                raise PolicyError(f"{here}.networks", "needs at least one CIDR")
            cidrs += [b for j, c in enumerate(nets)
                      if (b := _cidr(c, f"{here}.networks[{j}]", warnings))]
        elif which == "nodes":
            sel = Selector.parse(peer[which], f"{here}.nodes")
            if sel.empty:
                entities.update(("host", "remote-node"))  # every node's addresses
            else:
                unresolved.append(f"{here}.nodes: nodes by label are not supported yet")
        else:
            unresolved.append(f"{here}.domainNames: domain names are not supported")
    if ports and (cidrs or entities) and any(isinstance(p.port, str) for p in ports):
        raise PolicyError(f"{where}.protocols", "a named port cannot be used with "
                          "networks or nodes peers: they have no named ports")
    for why in unresolved:
        # fail closed as the API asks: Accept matches nothing there, Deny and Pass all
        warnings.append(f"{why}; " + ("that peer matches nothing" if action == ACCEPT
                                      else "the rule denies every peer instead"))
    if unresolved and action != ACCEPT:
        return TierRule(DENY, name, CRule(entities=frozenset({"all"})))
    return TierRule(action, name, CRule(tuple(selectors), tuple(cidrs), frozenset(entities),
                                        ports))


def parse_cluster_network_policy(obj: dict) -> ClusterNetworkPolicy:
    """A stored ClusterNetworkPolicy, validated as the CRD's schema does, or PolicyError
    naming the field."""
    if obj.get("kind") != KIND:
        raise PolicyError("kind", f"{obj.get('kind')!r} is not {KIND}")
    api = obj.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise PolicyError("apiVersion", f"{api!r}: cilia reads {', '.join(API_VERSIONS)}")
    meta = obj.get("metadata") or {}
    spec = _obj(obj.get("spec"), "spec", required=True)
    unknown = set(spec) - {"tier", "priority", "subject", "ingress", "egress"}
    if unknown:
        raise PolicyError("spec", f"unknown field(s) {', '.join(sorted(unknown))}")
    tier = spec.get("tier")
    if tier not in TIERS:
        raise PolicyError("spec.tier", f"{tier!r}: {ADMIN} or {BASELINE}")
    priority = spec.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) \
            or not 0 <= priority <= MAX_PRIORITY:
        raise PolicyError("spec.priority", f"{priority!r}: a number 0-{MAX_PRIORITY}")
    subject = _subject(spec.get("subject"), "spec.subject")
    warnings: list[str] = []
    rules = {}
    for direction in (INGRESS, EGRESS):
        raw = as_list(spec.get(direction), f"spec.{direction}")
        if len(raw) > MAX_RULES:
            raise PolicyError(f"spec.{direction}", f"{len(raw)} rules: at most {MAX_RULES}")
        rules[direction] = tuple(_rule(r, f"spec.{direction}[{i}]", direction, warnings)
                                 for i, r in enumerate(raw))
    return ClusterNetworkPolicy(meta.get("name", ""), tier, priority, subject, rules,
                                warnings)


def subject_of(obj: dict) -> Selector | None:
    """An invalid policy's subject if it parses (its pods are then held closed), else
    None."""
    try:
        return _subject((obj.get("spec") or {}).get("subject"), "spec.subject")
    except (PolicyError, AttributeError):
        return None
