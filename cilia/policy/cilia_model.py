"""CiliaNetworkPolicy and CiliaClusterwideNetworkPolicy (cilia.io/v1alpha1), parsed and
validated: what NetworkPolicy cannot say (docs/crds.md). Errors name the field, as for
NetworkPolicy; the compiler keeps the pods a rejected policy selects isolated."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cilia.policy import PolicyError
from cilia.policy.model import EGRESS, INGRESS, PROTOCOLS, IPBlock, NetworkPolicy, port_value
from cilia.policy.selector import Requirement, Selector

KINDS = ("CiliaNetworkPolicy", "CiliaClusterwideNetworkPolicy")
ENTITIES = ("host", "remote-node", "world", "cluster", "all")
NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilia.k8s.namespace.labels."
ICMP = 1
ANY_PROTOCOL = 0


@dataclass(frozen=True, slots=True)
class CPort:
    proto: int  # ANY_PROTOCOL or an IP protocol number
    port: int | str | None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class CRule:
    endpoints: tuple[Selector, ...] = ()
    cidrs: tuple[IPBlock, ...] = ()
    entities: frozenset[str] = frozenset()
    ports: tuple[CPort, ...] | None = None  # None: every port and protocol
    icmp_types: tuple[int, ...] = ()
    any_peer: bool = False  # no peer field, but ports/ICMP: applies to every peer


@dataclass
class CiliaPolicy:
    kind: str
    namespace: str  # "" for cluster-wide
    name: str
    endpoint_selector: Selector
    rules: dict[tuple[str, bool], tuple[CRule, ...]]  # (direction, deny) -> rules
    warnings: list[str] = field(default_factory=list)
    # The directions a NetworkPolicy isolates (policyTypes), rules or none: a
    # CiliaNetworkPolicy's are those it has rules for.
    declared: frozenset[str] | None = None

    @property
    def types(self) -> frozenset[str]:
        if self.declared is not None:
            return self.declared
        return frozenset(d for (d, _), rules in self.rules.items() if rules)


def extended_labels(pod_labels, namespace: str, namespace_labels) -> dict[str, str]:
    """A pod's labels as cilia policy selectors see them."""
    out = dict(pod_labels)
    out[NAMESPACE_KEY] = namespace
    for k, v in namespace_labels.items():
        out[NAMESPACE_LABELS_PREFIX + k] = v
    return out


def names_namespace(selector: Selector) -> bool:
    return any(r.key == NAMESPACE_KEY for r in selector.requirements)


# "In any namespace": a requirement every pod meets, which makes a peer selector name
# namespaces (so it is not confined to the policy's own).
ANY_NAMESPACE = Requirement(NAMESPACE_KEY, "Exists", frozenset())


def from_network_policy(np: NetworkPolicy) -> CiliaPolicy:
    """A NetworkPolicy in cilia's own rule model, so one compiler serves both families
    (as Cilium turns NetworkPolicy into its rule type): a podSelector peer is an endpoint
    selector confined to the policy's namespace; a namespaceSelector (with or without a
    podSelector) one over the namespace's labels, in whatever namespace; an ipBlock a
    CIDR with its holes; ports keep their protocol (TCP unless said), named ports their
    name; a rule with no peers applies to every peer. NetworkPolicy only allows."""
    rules: dict[tuple[str, bool], tuple[CRule, ...]] = {}
    for direction in (INGRESS, EGRESS):
        if direction not in np.types:
            continue
        out = []
        for rule in np.rules(direction):
            ports = None if rule.ports is None else tuple(
                CPort(PROTOCOLS[p.protocol], p.port, p.end_port) for p in rule.ports)
            if rule.peers is None:
                out.append(CRule(ports=ports, any_peer=True))
                continue
            selectors = []
            for peer in rule.peers:
                if peer.ip_block is not None:
                    continue
                reqs = list(peer.pod_selector.requirements) if peer.pod_selector else []
                if peer.namespace_selector is not None:
                    reqs += [Requirement(NAMESPACE_LABELS_PREFIX + r.key, r.operator,
                                         r.values)
                             for r in peer.namespace_selector.requirements]
                    reqs.append(ANY_NAMESPACE)
                selectors.append(Selector(tuple(reqs)))
            out.append(CRule(tuple(selectors),
                             tuple(p.ip_block for p in rule.peers if p.ip_block), ports=ports))
        rules[(direction, False)] = tuple(out)
    return CiliaPolicy("NetworkPolicy", np.namespace, np.name, np.pod_selector, rules,
                       list(np.warnings), declared=np.types)


def as_list(raw, where: str) -> list:
    """A list field (absent: empty), or PolicyError naming it."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PolicyError(where, "must be a list")
    return raw


def _cidr(raw, where: str, warnings: list[str]) -> IPBlock | None:
    if not isinstance(raw, str) or "/" not in raw:
        # As the CRD's schema says (format: cidr): a bare address is a mistake to flag,
        # not a /32 to guess.
        raise PolicyError(where, f"{raw!r} is not a CIDR (give a prefix: 192.0.2.1/32)")
    try:
        net = ipaddress.ip_network(raw, strict=False)
    except (ValueError, TypeError) as err:
        raise PolicyError(where, f"{raw!r} is not a CIDR") from err
    if net.version == 6:
        warnings.append(f"{where}: IPv6 CIDR {net} matches nothing (pods are IPv4-only)")
        return None
    return IPBlock(net)


def _cidr_set(raw, where: str, warnings: list[str]) -> IPBlock | None:
    if not isinstance(raw, dict) or "cidr" not in raw:
        raise PolicyError(where, "needs a cidr")
    block = _cidr(raw["cidr"], f"{where}.cidr", warnings)
    excepts = []
    for i, e in enumerate(as_list(raw.get("except"), f"{where}.except")):
        try:
            net = ipaddress.ip_network(e, strict=False)
        except (ValueError, TypeError) as err:
            raise PolicyError(f"{where}.except[{i}]", f"{e!r} is not a CIDR") from err
        if block and (net.version != 4 or not net.subnet_of(block.cidr) or net == block.cidr):
            raise PolicyError(f"{where}.except[{i}]", f"{e} is not strictly inside {block.cidr}")
        excepts.append(net)
    return IPBlock(block.cidr, tuple(excepts)) if block else None


def _ports(raw, where: str) -> tuple[CPort, ...] | None:
    entries = as_list(raw, where)
    if not entries:
        return None
    out = []
    for i, tp in enumerate(entries):
        here = f"{where}[{i}]"
        if not isinstance(tp, dict):
            raise PolicyError(here, "must be an object with ports")
        for j, p in enumerate(as_list(tp.get("ports"), f"{here}.ports")):
            at = f"{here}.ports[{j}]"
            if not isinstance(p, dict):
                raise PolicyError(at, "must be an object (port, protocol, endPort)")
            proto_name = p.get("protocol") or "ANY"
            if proto_name != "ANY" and proto_name not in PROTOCOLS:
                raise PolicyError(f"{at}.protocol", f"{proto_name!r}: TCP, UDP, SCTP or ANY")
            proto = ANY_PROTOCOL if proto_name == "ANY" else PROTOCOLS[proto_name]
            port = p.get("port")
            # "0" (Cilium's spelling of every port) as no port; the rest by the one rule
            number = None if port in ("0", 0) else port_value(port, f"{at}.port")
            end = p.get("endPort")
            if end is not None:
                if not isinstance(number, int) or not isinstance(end, int) or end < number \
                        or end > 65535:
                    raise PolicyError(f"{at}.endPort", "needs a numeric port <= endPort <= 65535")
            out.append(CPort(proto, number, end))
    return tuple(out)


def _icmps(raw, where: str, warnings: list[str]) -> tuple[int, ...]:
    out = []
    for i, entry in enumerate(as_list(raw, where)):
        if not isinstance(entry, dict):
            raise PolicyError(f"{where}[{i}]", "must be an object with fields")
        for j, f in enumerate(as_list(entry.get("fields"), f"{where}[{i}].fields")):
            at = f"{where}[{i}].fields[{j}]"
            if not isinstance(f, dict):
                raise PolicyError(at, "must be an object (type, family)")
            t = f.get("type")
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 255:
                raise PolicyError(f"{at}.type", f"{t!r}: an ICMP type is 0-255")
            family = f.get("family") or "IPv4"
            if family not in ("IPv4", "IPv6"):
                raise PolicyError(f"{at}.family", f"{family!r}: IPv4 or IPv6")
            if family == "IPv6":
                warnings.append(f"{at}: ICMPv6 matches nothing (pods are IPv4-only)")
                continue
            out.append(t)
    return tuple(out)


def _rule(raw, where: str, direction: str, warnings: list[str]) -> CRule:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(where, "must be an object")
    side = "from" if direction == INGRESS else "to"
    known = {f"{side}Endpoints", f"{side}CIDR", f"{side}CIDRSet", f"{side}Entities",
             "toPorts", "icmps"}
    unknown = set(raw) - known
    if unknown:
        raise PolicyError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    endpoints = tuple(Selector.parse(s, f"{where}.{side}Endpoints[{i}]")
                      for i, s in enumerate(as_list(raw.get(f"{side}Endpoints"),
                                                  f"{where}.{side}Endpoints")))
    cidrs = [_cidr(c, f"{where}.{side}CIDR[{i}]", warnings)
             for i, c in enumerate(as_list(raw.get(f"{side}CIDR"), f"{where}.{side}CIDR"))]
    cidrs += [_cidr_set(c, f"{where}.{side}CIDRSet[{i}]", warnings)
              for i, c in enumerate(as_list(raw.get(f"{side}CIDRSet"), f"{where}.{side}CIDRSet"))]
    entities = as_list(raw.get(f"{side}Entities"), f"{where}.{side}Entities")
    for i, e in enumerate(entities):
        if e not in ENTITIES:
            raise PolicyError(f"{where}.{side}Entities[{i}]",
                              f"{e!r}: one of {', '.join(ENTITIES)}")
    ports = _ports(raw.get("toPorts"), f"{where}.toPorts")
    icmps = _icmps(raw.get("icmps"), f"{where}.icmps", warnings)
    has_peer = any(raw.get(k) for k in (f"{side}Endpoints", f"{side}CIDR", f"{side}CIDRSet",
                                        f"{side}Entities"))
    return CRule(endpoints, tuple(c for c in cidrs if c), frozenset(entities), ports, icmps,
                 any_peer=not has_peer and (ports is not None or bool(icmps)))


def parse_cilia_policy(obj: dict) -> CiliaPolicy:
    kind = obj.get("kind")
    if kind not in KINDS:
        raise PolicyError("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    meta = obj.get("metadata") or {}
    namespace = (meta.get("namespace") or "default") if kind == KINDS[0] else ""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError("spec", "is required")
    if "endpointSelector" not in spec:
        raise PolicyError("spec.endpointSelector", "is required ({} selects every pod)")
    selector = Selector.parse(spec["endpointSelector"], "spec.endpointSelector")
    unknown = set(spec) - {"endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny"}
    if unknown:
        raise PolicyError("spec", f"unknown field(s) {', '.join(sorted(unknown))}")
    warnings: list[str] = []
    rules = {}
    for field_name, direction, deny in (("ingress", INGRESS, False), ("ingressDeny", INGRESS, True),
                                        ("egress", EGRESS, False), ("egressDeny", EGRESS, True)):
        raw = as_list(spec.get(field_name), f"spec.{field_name}")
        rules[(direction, deny)] = tuple(
            _rule(r, f"spec.{field_name}[{i}]", direction, warnings) for i, r in enumerate(raw))
    return CiliaPolicy(kind, namespace, meta.get("name", ""), selector, rules, warnings)


def declared_types(obj: dict) -> frozenset[str]:
    """The directions a (possibly invalid) cilia policy has rules in; both if unclear."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return frozenset({INGRESS, EGRESS})
    out = set()
    if spec.get("ingress") or spec.get("ingressDeny"):
        out.add(INGRESS)
    if spec.get("egress") or spec.get("egressDeny"):
        out.add(EGRESS)
    return frozenset(out or {INGRESS, EGRESS})
