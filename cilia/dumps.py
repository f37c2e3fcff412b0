"""The datapath's maps as the kernel holds them, decoded: what `cilia bpf ct|endpoint|
policy` and `cilia identity` print, and what `cilia sysdump` archives.

The maps are read from their pins (bpffs), not through the agent, so these answer when
the agent does not (crash-looping, stuck, not yet started): the moment they matter most.
Names (which pod an address is, which labels an identity has) come from the agent when it
answers and from the datastore; without them the dump is still complete, in numbers.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cilia.datapath import layouts
from cilia.datapath.maps import BpfMap
from cilia.identity import RESERVED, describe

PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
CT_FLAGS = {layouts.CT_F_REPLY_SEEN: "reply-seen", layouts.CT_F_CLOSING: "closing",
            layouts.CT_F_VIA_STACK: "via-stack", layouts.CT_F_BYPASS_STACK: "bypass-stack",
            layouts.CT_F_FROM_NODE: "from-node"}
ENDPOINT_FLAGS = {layouts.ENDPOINT_F_INGRESS_ENFORCED: "ingress-enforced",
                  layouts.ENDPOINT_F_EGRESS_ENFORCED: "egress-enforced",
                  layouts.ENDPOINT_F_AUDIT: "policy-audit"}
DIRECTIONS = {layouts.POLICY_INGRESS: "ingress", layouts.POLICY_EGRESS: "egress"}
ACTIONS = {layouts.POLICY_ALLOW: "allow", layouts.POLICY_DENY: "deny"}

# Who an address or identity is, when something can tell: "" when nothing can.
Namer = Callable[[str], str]


class DumpError(RuntimeError):
    """A map that cannot be read, with what to do."""


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def _flags(value: int, names: dict[int, str]) -> list[str]:
    return [name for bit, name in names.items() if value & bit]


def _open(root: str, spec: layouts.MapSpec) -> BpfMap:
    pin = Path(root) / spec.name
    if not pin.exists():
        raise DumpError(f"no map pinned at {pin}: is an agent running with --bpffs-root "
                        f"{root}? (pass --bpffs-root, or --node for a lab node)")
    return BpfMap.open_pinned(root, spec)


def conntrack(root: str, who: Namer = lambda ip: "") -> list[dict]:
    """Every conntrack entry: the flow (as its first packet had it; scope `service`: a
    Service flow's frontend tuple, which names its backend), its state and what decided
    it (the rule's cookie, the endpoints), and the seconds until it expires unless
    another packet comes (the kernel's monotonic clock, as bpf_ktime_get_ns)."""
    now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    out = []
    with _open(root, layouts.CONNTRACK) as m:
        for key, value in m.items():
            src, dst = _ip(key.saddr), _ip(key.daddr)
            left = value.last_seen_ns + value.lifetime_s * 1_000_000_000 - now_ns
            out.append({
                "protocol": PROTOCOLS.get(key.proto, str(key.proto)),
                "source": f"{src}:{key.sport}", "destination": f"{dst}:{key.dport}",
                "sourceName": who(src), "destinationName": who(dst),
                "scope": "service" if key.scope == layouts.CT_SCOPE_SERVICE else "flow",
                "flags": _flags(value.flags, CT_FLAGS),
                "expiresInSeconds": max(0, round(left / 1e9)),
                "sourceEndpoint": value.src_ep, "destinationEndpoint": value.dst_ep,
                "ruleCookie": value.cookie, "policyRevision": value.policy_rev,
                "serviceId": value.rev_nat_id,
            })
    out.sort(key=lambda e: (e["scope"], e["protocol"], e["source"], e["destination"]))
    return out


def flush_conntrack(root: str, address: str | None = None) -> int:
    """Deletes every conntrack entry (or those with `address` at either end); answers how
    many. The next packet of each such connection is judged as a new flow: by policy as
    it is now, and for a Service by a fresh backend choice."""
    want = ipaddress.IPv4Address(address).packed if address else None
    removed = 0
    with _open(root, layouts.CONNTRACK) as m:
        for key, _ in list(m.items()):
            if want is None or want in (key.saddr, key.daddr):
                removed += m.delete(key)
    return removed


def endpoints(root: str, who: Namer = lambda ip: "") -> list[dict]:
    out = []
    with _open(root, layouts.ENDPOINTS) as m:
        for key, value in m.items():
            out.append({"ip": key.ip, "pod": who(key.ip), "endpointId": value.ep_id,
                        "identity": value.sec_identity, "ifindex": value.ifindex,
                        "flags": _flags(value.flags, ENDPOINT_FLAGS),
                        "mac": layouts.mac_str(value.mac)})
    return sorted(out, key=lambda e: e["endpointId"])


def _port(key: layouts.PolicyKey) -> str:
    """The port part of an entry, from how much of the key its prefix covers."""
    if key.prefixlen <= layouts.POLICY_PREFIX_STATIC:
        return "any"
    proto = PROTOCOLS.get(key.proto, str(key.proto))
    if key.prefixlen <= layouts.POLICY_PREFIX_PROTO:
        return f"any/{proto}"
    bits = key.prefixlen - (layouts.POLICY_PREFIX_FULL - 16)  # the port's top bits
    if bits >= 16:
        return f"{key.dport}/{proto}"
    span = 1 << (16 - bits)
    return f"{key.dport}-{key.dport + span - 1}/{proto}"


def policy(root: str, endpoint_id: int, identity_name: Callable[[int], str] = describe
           ) -> list[dict]:
    """An endpoint's entries in the policy map: direction, peer identity (0: any), port
    (a prefix of the key: any, a protocol, a port, an aligned range) and the action."""
    out = []
    with _open(root, layouts.POLICY) as m:
        for key, value in m.items():
            if key.ep_id != endpoint_id:
                continue
            ident = key.identity
            cidr_view = bool(ident & layouts.IDENTITY_CIDR_VIEW)
            ident &= ~layouts.IDENTITY_CIDR_VIEW
            out.append({
                "direction": DIRECTIONS.get(key.dir, str(key.dir)),
                "identity": ident, "peer": "any" if ident == layouts.IDENTITY_ANY and
                not cidr_view else identity_name(ident),
                "cidrView": cidr_view, "port": _port(key),
                "action": ACTIONS.get(value.action, str(value.action)),
                "ruleCookie": value.cookie,
            })
    return sorted(out, key=lambda e: (e["direction"], e["identity"], e["port"]))


def identities(stored: dict[int, Iterable[str]]) -> list[dict]:
    """Every identity: the reserved ones and the stored (CiliaIdentity) ones, with labels."""
    out = [{"identity": n, "name": name, "labels": []} for n, name in RESERVED.items()]
    out += [{"identity": n, "name": describe(n, labels), "labels": sorted(labels)}
            for n, labels in stored.items()]
    return sorted(out, key=lambda e: e["identity"])
