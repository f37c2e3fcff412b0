"""NetworkPolicy (networking.k8s.io/v1), parsed and validated into a small model.

Validation follows the API server's rules, so what `kubectl apply` accepts parses here,
and says what cilia itself cannot enforce. An error names the field (`spec.ingress[0]
.from[1].ipBlock.except[0]`), becomes the policy's status, and the pods the policy
selects stay isolated in the directions it names: a policy is never dropped open.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from cilia.policy import PolicyError
from cilia.policy.selector import Selector

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
INGRESS = "ingress"
EGRESS = "egress"
# each policy's types as one of four shared sets, not a set of its own per policy
_TYPE_SETS = {t: t for t in (frozenset(), frozenset({INGRESS}), frozenset({EGRESS}),
                             frozenset({INGRESS, EGRESS}))}


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: ipaddress.IPv4Network
    excepts: tuple[ipaddress.IPv4Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """One entry of from/to: pods by selector (in the policy's namespace unless a
    namespaceSelector says which namespaces), or an ipBlock."""

    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class Port:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol
    end_port: int | None = None

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] | None  # None: every peer (an empty or absent from/to)
    ports: tuple[Port, ...] | None  # None: every port and protocol


@dataclass
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset[str]  # INGRESS, EGRESS
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress


_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def port_value(port: object, where: str) -> int | str | None:
    """A policy's `port`, for both policy families: a number 1-65535 (also written as a
    string of digits), a port name by the API's rule for them (IANA_SVC_NAME: at most
    15 of a-z, 0-9 and '-', a letter among them, no '-' at either end or twice in a
    row), or None (every port)."""
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise PolicyError(where, "must be a number or a name")
    if isinstance(port, int) or port.isdigit():
        number = int(port)
        if not 1 <= number <= 65535:
            raise PolicyError(where, f"{number} is not between 1 and 65535")
        return number
    if (len(port) > 15 or not _SVC_NAME.fullmatch(port) or "--" in port
            or not re.search("[a-z]", port)):
        raise PolicyError(where, f"{port!r} is not a valid port name (at most 15 of a-z, "
                          "0-9 and '-', with a letter, no '-' at either end or twice in "
                          "a row)")
    return port


def _port(raw: object, where: str) -> Port:
    if not isinstance(raw, dict):
        raise PolicyError(where, "must be an object (protocol, port, endPort)")
    protocol = raw.get("protocol") or "TCP"
    if protocol not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol", f"{protocol!r}: must be TCP, UDP or SCTP")
    port = port_value(raw.get("port"), f"{where}.port")
    end_port = raw.get("endPort")
    if end_port is not None:
        if not isinstance(end_port, int) or isinstance(end_port, bool):
            raise PolicyError(f"{where}.endPort", "must be a number")
        if not isinstance(port, int):
            raise PolicyError(f"{where}.endPort", "needs a numeric port")
        if not port <= end_port <= 65535:
            raise PolicyError(f"{where}.endPort", f"{end_port} must be >= port ({port})")
    return Port(protocol, port, end_port)


def _ip_block(raw: object, where: str, warnings: list[str]) -> IPBlock | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("cidr"), str):
        raise PolicyError(where, "needs a cidr")
    try:
        cidr = ipaddress.ip_network(raw["cidr"], strict=False)
    except ValueError as err:
        raise PolicyError(f"{where}.cidr", str(err)) from err
    excepts = []
    excepts_raw = [] if raw.get("except") is None else raw["except"]
    if not isinstance(excepts_raw, list):
        raise PolicyError(f"{where}.except", "must be a list of CIDRs")
    for i, e in enumerate(excepts_raw):
        try:
            net = ipaddress.ip_network(e, strict=False)
        except (ValueError, TypeError) as err:
            raise PolicyError(f"{where}.except[{i}]", str(err)) from err
        if net.version != cidr.version or not net.subnet_of(cidr) or net == cidr:
            raise PolicyError(f"{where}.except[{i}]", f"{e} is not strictly inside {cidr}")
        excepts.append(net)
    if cidr.version == 6:
        # Pods have IPv4 only: an IPv6 block can match nothing, and allows nothing.
        warnings.append(f"{where}: IPv6 block {cidr} matches nothing (pods are IPv4-only)")
        return None
    return IPBlock(cidr, tuple(excepts))


def _peer(raw: object, where: str, warnings: list[str]) -> Peer | None:
    if not isinstance(raw, dict):
        raise PolicyError(where, "must be an object")
    unknown = set(raw) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise PolicyError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    # A null field is an absent one, as the API server decodes it.
    raw = {k: v for k, v in raw.items() if v is not None}
    if "ipBlock" in raw:
        if len(raw) > 1:
            raise PolicyError(where, "ipBlock cannot be combined with a selector")
        block = _ip_block(raw["ipBlock"], f"{where}.ipBlock", warnings)
        return Peer(ip_block=block) if block else None
    if not raw:
        raise PolicyError(where, "must name podSelector, namespaceSelector or ipBlock")
    pods = Selector.parse(raw["podSelector"], f"{where}.podSelector") if "podSelector" in raw \
        else None
    nss = Selector.parse(raw["namespaceSelector"], f"{where}.namespaceSelector") \
        if "namespaceSelector" in raw else None
    return Peer(pod_selector=pods, namespace_selector=nss)


def _rules(raw: object, direction: str, warnings: list[str]) -> tuple[Rule, ...]:
    where = f"spec.{direction}"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError(where, "must be a list of rules")
    peer_key = "from" if direction == INGRESS else "to"
    out = []
    for i, r in enumerate(raw):
        here = f"{where}[{i}]"
        if r is None:
            r = {}
        if not isinstance(r, dict):
            raise PolicyError(here, "must be an object")
        unknown = set(r) - {peer_key, "ports"}
        if unknown:
            raise PolicyError(here, f"unknown field(s) {', '.join(sorted(unknown))}")
        # Only null means absent: a malformed `from: {}` must not read as "from anyone".
        peers_raw = [] if r.get(peer_key) is None else r[peer_key]
        ports_raw = [] if r.get("ports") is None else r["ports"]
        if not isinstance(peers_raw, list):
            raise PolicyError(f"{here}.{peer_key}", "must be a list")
        if not isinstance(ports_raw, list):
            raise PolicyError(f"{here}.ports", "must be a list")
        parsed = [_peer(p, f"{here}.{peer_key}[{j}]", warnings) for j, p in enumerate(peers_raw)]
        peers = tuple(p for p in parsed if p is not None)
        ports = tuple(_port(p, f"{here}.ports[{j}]") for j, p in enumerate(ports_raw))
        if peers_raw and not peers:
            # Only IPv6 blocks: the rule matches nothing (never "everything").
            continue
        if direction == EGRESS and any(p.ip_block for p in peers) \
                and any(isinstance(p.port, str) for p in ports):
            # A named port resolves against the destination pod whatever peer matched
            # it (sig-network's kube-network-policies does so): the pods inside the
            # block, each on its own number. Other addresses have no names. Say so.
            warnings.append(f"{here}: named ports towards an ipBlock apply to the pods "
                            "inside it, each on its own port of that name; other "
                            "addresses in the block have no port names and are not "
                            "allowed by it")
        out.append(Rule(peers if peers_raw else None, ports if ports_raw else None))
    return tuple(out)


def parse_network_policy(obj: dict) -> NetworkPolicy:
    """A NetworkPolicy manifest as the model; PolicyError names what is wrong."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    name = meta.get("name", "")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError("spec", "is required")
    if "podSelector" not in spec:
        raise PolicyError("spec.podSelector", "is required ({} selects every pod)")
    selector = Selector.parse(spec["podSelector"], "spec.podSelector")
    warnings: list[str] = []
    types_raw = spec.get("policyTypes")
    if not types_raw and isinstance(types_raw, (list, type(None))):
        # The API server's default: Ingress, and Egress if there are egress rules.
        types = {INGRESS} | ({EGRESS} if spec.get("egress") else set())
    else:
        if not isinstance(types_raw, list):
            raise PolicyError("spec.policyTypes", "must list Ingress and/or Egress")
        types = set()
        for t in types_raw:
            if t not in ("Ingress", "Egress"):
                raise PolicyError("spec.policyTypes", f"{t!r}: must be Ingress or Egress")
            types.add(t.lower())
    ingress = _rules(spec.get("ingress"), INGRESS, warnings)
    egress = _rules(spec.get("egress"), EGRESS, warnings)
    return NetworkPolicy(namespace, name, selector, _TYPE_SETS[frozenset(types)],
                         ingress if INGRESS in types else (),
                         egress if EGRESS in types else (), warnings)


def declared_types(obj: dict) -> frozenset[str]:
    """The directions a (possibly invalid) policy means to isolate; both if unclear."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return frozenset({INGRESS, EGRESS})
    types = spec.get("policyTypes")
    if isinstance(types, list) and types and all(t in ("Ingress", "Egress") for t in types):
        return frozenset(t.lower() for t in types)
    if not types and isinstance(types, (list, type(None))):
        # Defaulted as the API server would: Egress only if there are egress rules.
        return frozenset({INGRESS} | ({EGRESS} if spec.get("egress") else set()))
    return frozenset({INGRESS, EGRESS})
