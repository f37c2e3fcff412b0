"""Checks of CiliaNetworkPolicy / CiliaClusterwideNetworkPolicy specs (docs/crds.md).

The stand-in until `cilia.policy` has `parse_cilia_policy(obj)` (the compiler's own
parser, which is the authority on what cilia can enforce). These are the schema-level
checks, with what the CRD's OpenAPI schema cannot say (CIDRs that parse, `except` inside
its CIDR, port ranges, selector operators and values), each naming the field in the
PolicyError, like NetworkPolicy's parser does.
"""

from __future__ import annotations

import ipaddress
import re

from cilia.policy import PolicyError
from cilia.policy.selector import Selector

ENTITIES = ("host", "remote-node", "world", "cluster", "all")
PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
FAMILIES = ("IPv4", "IPv6")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
DIRECTIONS = {"ingress": "from", "ingressDeny": "from", "egress": "to", "egressDeny": "to"}


def check_cilia_policy(obj: dict) -> None:
    """Raises PolicyError naming the first field that is wrong."""
    if not isinstance(obj, dict):
        raise PolicyError("<object>", "must be an object")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError("spec", "is required")
    unknown = set(spec) - {"endpointSelector", *DIRECTIONS}
    if unknown:
        raise PolicyError("spec", f"unknown field(s) {', '.join(sorted(unknown))}")
    if "endpointSelector" not in spec:
        raise PolicyError("spec.endpointSelector", "is required ({} selects every pod)")
    Selector.parse(spec["endpointSelector"] or {}, "spec.endpointSelector")
    for direction, peer in DIRECTIONS.items():
        rules = spec.get(direction)
        if rules is None:
            continue
        if not isinstance(rules, list):
            raise PolicyError(f"spec.{direction}", "must be a list of rules")
        for i, rule in enumerate(rules):
            _rule(rule, f"spec.{direction}[{i}]", peer)


def _list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(where, "must be a list")
    return value


def _cidr(value, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str) or "/" not in value:
        raise PolicyError(where, f"{value!r} is not a CIDR (ADDRESS/PREFIX)")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as err:
        raise PolicyError(where, str(err)) from err


def _rule(rule, where: str, peer: str) -> None:
    if not isinstance(rule, dict):
        raise PolicyError(where, "must be an object")
    allowed = {f"{peer}Endpoints", f"{peer}CIDR", f"{peer}CIDRSet", f"{peer}Entities",
               "toPorts", "icmps"}
    unknown = set(rule) - allowed
    if unknown:
        raise PolicyError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    for j, sel in enumerate(_list(rule.get(f"{peer}Endpoints"), f"{where}.{peer}Endpoints")):
        Selector.parse(sel or {}, f"{where}.{peer}Endpoints[{j}]")
    for j, c in enumerate(_list(rule.get(f"{peer}CIDR"), f"{where}.{peer}CIDR")):
        _cidr(c, f"{where}.{peer}CIDR[{j}]")
    for j, s in enumerate(_list(rule.get(f"{peer}CIDRSet"), f"{where}.{peer}CIDRSet")):
        here = f"{where}.{peer}CIDRSet[{j}]"
        if not isinstance(s, dict) or "cidr" not in s:
            raise PolicyError(here, "needs a cidr")
        net = _cidr(s["cidr"], f"{here}.cidr")
        for k, e in enumerate(_list(s.get("except"), f"{here}.except")):
            hole = _cidr(e, f"{here}.except[{k}]")
            if hole.version != net.version or not hole.subnet_of(net) or hole == net:
                raise PolicyError(f"{here}.except[{k}]", f"{e} is not strictly inside {net}")
    for j, e in enumerate(_list(rule.get(f"{peer}Entities"), f"{where}.{peer}Entities")):
        if e not in ENTITIES:
            raise PolicyError(f"{where}.{peer}Entities[{j}]",
                              f"{e!r}: must be one of {', '.join(ENTITIES)}")
    for j, tp in enumerate(_list(rule.get("toPorts"), f"{where}.toPorts")):
        here = f"{where}.toPorts[{j}]"
        if not isinstance(tp, dict):
            raise PolicyError(here, "must be an object (ports)")
        for k, p in enumerate(_list(tp.get("ports"), f"{here}.ports")):
            _port(p, f"{here}.ports[{k}]")
    for j, icmp in enumerate(_list(rule.get("icmps"), f"{where}.icmps")):
        here = f"{where}.icmps[{j}]"
        if not isinstance(icmp, dict):
            raise PolicyError(here, "must be an object (fields)")
        for k, f in enumerate(_list(icmp.get("fields"), f"{here}.fields")):
            at = f"{here}.fields[{k}]"
            if not isinstance(f, dict):
                raise PolicyError(at, "must be an object (type, family)")
            t = f.get("type")
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 255:
                raise PolicyError(f"{at}.type", f"{t!r}: must be a number from 0 to 255")
            if f.get("family", "IPv4") not in FAMILIES:
                raise PolicyError(f"{at}.family", f"{f.get('family')!r}: must be IPv4 or IPv6")


def _port(p, where: str) -> None:
    if not isinstance(p, dict):
        raise PolicyError(where, "must be an object (port, endPort, protocol)")
    proto = p.get("protocol", "ANY")
    if proto not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol", f"{proto!r}: must be {', '.join(PROTOCOLS)}")
    port = p.get("port")
    if not isinstance(port, str) or not port:
        raise PolicyError(f"{where}.port", 'is required: a number as a string ("80") or a '
                                           "port name")
    if port.isdigit():
        number = int(port)
        if not 1 <= number <= 65535:
            raise PolicyError(f"{where}.port", f"{number} is not between 1 and 65535")
    elif len(port) > 15 or not _PORT_NAME.match(port) or "--" in port:
        raise PolicyError(f"{where}.port", f"{port!r} is not a number or a valid port name")
    end = p.get("endPort")
    if end is not None:
        if not isinstance(end, int) or isinstance(end, bool):
            raise PolicyError(f"{where}.endPort", "must be a number")
        if not port.isdigit():
            raise PolicyError(f"{where}.endPort", "needs a numeric port")
        if not int(port) <= end <= 65535:
            raise PolicyError(f"{where}.endPort", f"{end} must be between port ({port}) and "
                                                  "65535")
