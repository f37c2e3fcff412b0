"""Python mirrors of the C layouts in bpf/include/cilia.

Each mirror names its C struct and lists its members in order with a `struct` format.
tests/unit/test_layouts.py checks every mirror against the BTF of the compiled objects
(member names, offsets, sizes, total size), so a change on one side cannot silently
break the other.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import astuple, dataclass, fields
from typing import ClassVar, Self


class CStruct:
    """Base for a mirrored C struct. A member's format is a `struct` code in native byte
    order, or prefixed with ">" for a field the C side keeps in network order (__be16).
    No implicit padding: the C side pads explicitly for exactly that reason."""

    C_NAME: ClassVar[str]
    LAYOUT: ClassVar[tuple[tuple[str, str], ...]]
    _fields: ClassVar[tuple[struct.Struct, ...]]
    _whole: ClassVar[struct.Struct | None]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(
            struct.Struct(fmt if fmt[0] in "<>!=" else "=" + fmt) for _, fmt in cls.LAYOUT
        )
        mixed = any(fmt[0] in "<>!" for _, fmt in cls.LAYOUT)
        cls._whole = None if mixed else struct.Struct("=" + "".join(f for _, f in cls.LAYOUT))

    @classmethod
    def size(cls) -> int:
        return sum(f.size for f in cls._fields)

    @classmethod
    def members(cls) -> list[tuple[str, int, int]]:
        """(name, byte offset, byte size) of every member, as BTF describes them."""
        out, offset = [], 0
        for (name, _), f in zip(cls.LAYOUT, cls._fields, strict=True):
            out.append((name, offset, f.size))
            offset += f.size
        return out

    def pack(self) -> bytes:
        values = astuple(self)  # type: ignore[call-overload]
        if self._whole is not None:
            return self._whole.pack(*values)
        return b"".join(f.pack(v) for f, v in zip(self._fields, values, strict=True))

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        data = bytes(data)
        if cls._whole is not None:
            return cls(*cls._whole.unpack(data[: cls._whole.size]))
        values, offset = [], 0
        for f in cls._fields:
            values.append(f.unpack_from(data, offset)[0])
            offset += f.size
        return cls(*values)

    def __post_init__(self):
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        assert names == [n for n, _ in self.LAYOUT], f"{type(self).__name__} out of step"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass
class EndpointKey(CStruct):
    C_NAME = "endpoint_key"
    LAYOUT = (("ip4", "4s"),)
    ip4: bytes

    @classmethod
    def for_ip(cls, ip: str) -> EndpointKey:
        return cls(ipaddress.IPv4Address(ip).packed)

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Address(self.ip4))


@dataclass
class EndpointInfo(CStruct):
    C_NAME = "endpoint_info"
    LAYOUT = (
        ("ifindex", "I"),
        ("sec_identity", "I"),
        ("ep_id", "H"),
        ("flags", "H"),
        ("mac", "6s"),
        ("node_mac", "6s"),
    )
    ifindex: int
    sec_identity: int
    ep_id: int
    flags: int
    mac: bytes
    node_mac: bytes


@dataclass
class MetricsKey(CStruct):
    C_NAME = "metrics_key"
    LAYOUT = (("reason", "B"), ("dir", "B"), ("pad", "H"))
    reason: int
    dir: int
    pad: int = 0


@dataclass
class MetricsValue(CStruct):
    C_NAME = "metrics_value"
    LAYOUT = (("packets", "Q"), ("bytes", "Q"))
    packets: int
    bytes: int


MARK_CT_REPLY = 0x200  # conntrack.h: skb->mark on replies of inbound connections
CT_F_REPLY_SEEN = 1  # conntrack.h: ct_value.flags
CT_F_CLOSING = 2
CT_F_VIA_STACK = 4  # the connection passes the node's stack (netfilter), both ways
CT_F_BYPASS_STACK = 8  # the connection goes past the node's stack, both ways
CT_F_FROM_NODE = 16  # opened by the node itself: exempt from its pod's ingress policy
CT_SCOPE_FLOW = 0  # conntrack.h: ct_key.scope
CT_SCOPE_SERVICE = 1
ENDPOINT_F_INGRESS_ENFORCED = 1
ENDPOINT_F_EGRESS_ENFORCED = 2
ENDPOINT_F_AUDIT = 4  # policy audit mode: what its policy refuses passes, reported
ENDPOINT_F_TIERED_INGRESS = 8  # ClusterNetworkPolicy tiers are looked up in a direction
ENDPOINT_F_TIERED_EGRESS = 16


IDENTITY_MIN_CLUSTER = 256  # ipcache.h: identities of label sets (pods) from here
IDENTITY_CIDR_BASE = 0x1000000  # ipcache.h: CIDR identities from here
NETDEV_F_UPLINK = 1  # netdev.h: netdev_info.flags
NETDEV_F_OVERLAY = 2
TUNNEL_VNI = 2  # tunnel.h: the overlay's VXLAN network identifier


@dataclass
class NetdevInfo(CStruct):
    """A device with cil_from_netdev, in cilia_netdevs (key: its ifindex, a U32)."""

    C_NAME = "netdev_info"
    LAYOUT = (("flags", "I"),)
    flags: int


@dataclass
class IpcacheKey(CStruct):
    C_NAME = "ipcache_key"
    LAYOUT = (("prefixlen", "I"), ("ip4", "4s"))
    prefixlen: int
    ip4: bytes

    @classmethod
    def for_prefix(cls, prefix: str) -> IpcacheKey:
        net = ipaddress.IPv4Network(prefix)
        return cls(net.prefixlen, net.network_address.packed)

    @property
    def prefix(self) -> str:
        return f"{ipaddress.IPv4Address(self.ip4)}/{self.prefixlen}"


@dataclass
class TunnelEndpoint(CStruct):
    """cilia_tunnel's value (key: an IpcacheKey, another node's pod CIDR or address):
    that node's address, where its traffic is tunnelled and the only outer source
    accepted for frames claiming its addresses; and this node's, the outer source."""

    C_NAME = "tunnel_endpoint"
    LAYOUT = (("remote", "4s"), ("local", "4s"))
    remote: bytes
    local: bytes

    @classmethod
    def for_ips(cls, remote: str, local: str) -> TunnelEndpoint:
        return cls(ipaddress.IPv4Address(remote).packed, ipaddress.IPv4Address(local).packed)


@dataclass
class IpcacheValue(CStruct):
    C_NAME = "ipcache_value"
    LAYOUT = (("identity", "I"), ("cidr_identity", "I"))
    identity: int
    cidr_identity: int


POLICY_INGRESS = 1
POLICY_EGRESS = 2
POLICY_ALLOW = 1
POLICY_DENY = 2
POLICY_PASS = 3  # Admin and Baseline tiers: the next tier decides
POLICY_TIER_NETWORK_POLICY = 0
POLICY_TIER_ADMIN = 1
POLICY_TIER_BASELINE = 2
POLICY_PREFIX_STATIC = 64
POLICY_PREFIX_PROTO = 72
POLICY_PREFIX_FULL = 96
IDENTITY_ANY = 0
IDENTITY_CIDR_VIEW = 0x80000000


@dataclass
class PolicyKey(CStruct):
    C_NAME = "policy_key"
    LAYOUT = (
        ("prefixlen", "I"),
        ("ep_id", "H"),
        ("dir", "B"),
        ("tier", "B"),
        ("identity", "I"),
        ("proto", "B"),
        ("pad1", "B"),
        ("dport", ">H"),
    )
    prefixlen: int
    ep_id: int
    dir: int
    tier: int
    identity: int
    proto: int
    pad1: int
    dport: int


@dataclass
class PolicyValue(CStruct):
    C_NAME = "policy_value"
    LAYOUT = (("action", "B"), ("pad", "B"), ("rank", "H"), ("cookie", "I"))
    action: int
    pad: int
    rank: int
    cookie: int


@dataclass
class CtKey(CStruct):
    C_NAME = "ct_key"
    LAYOUT = (
        ("saddr", "4s"),
        ("daddr", "4s"),
        ("sport", ">H"),
        ("dport", ">H"),
        ("proto", "B"),
        ("scope", "B"),
        ("pad", "2s"),
    )
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    proto: int
    scope: int = 0  # CT_SCOPE_FLOW, or CT_SCOPE_SERVICE: a translated flow's backend
    pad: bytes = b"\0\0"


@dataclass
class CtValue(CStruct):
    C_NAME = "ct_value"
    LAYOUT = (
        ("last_seen_ns", "Q"),
        ("lifetime_s", "I"),
        ("src_ep", "H"),
        ("dst_ep", "H"),
        ("cookie", "I"),
        ("flags", "B"),
        ("policy_rev", "B"),
        ("rev_nat_id", "H"),
    )
    last_seen_ns: int
    lifetime_s: int
    src_ep: int
    dst_ep: int
    cookie: int  # a service entry (CT_SCOPE_SERVICE): the backend id
    flags: int
    policy_rev: int  # the low byte of cilia_policy_rev it was judged under
    rev_nat_id: int  # a translated flow: its service's reverse-NAT id


@dataclass
class FragKey(CStruct):
    C_NAME = "frag_key"
    LAYOUT = (("saddr", "4s"), ("daddr", "4s"), ("id", ">H"), ("proto", "B"), ("pad", "5s"))
    saddr: bytes
    daddr: bytes
    id: int
    proto: int
    pad: bytes = b"\0" * 5


@dataclass
class FragPorts(CStruct):
    C_NAME = "frag_ports"
    LAYOUT = (("sport", ">H"), ("dport", ">H"))
    sport: int
    dport: int


@dataclass
class FlowEvent(CStruct):
    C_NAME = "flow_event"
    LAYOUT = (
        ("ts_ns", "Q"),
        ("saddr", "4s"),
        ("daddr", "4s"),
        ("src_identity", "I"),
        ("dst_identity", "I"),
        ("cookie", "I"),
        ("ifindex", "I"),
        ("sport", ">H"),
        ("dport", ">H"),
        ("src_ep", "H"),
        ("dst_ep", "H"),
        ("proto", "B"),
        ("verdict", "B"),
        ("reason", "B"),
        ("dir", "B"),
        ("rev_nat_id", "H"),
        ("tcp_flags", "B"),
        ("pad", "B"),
    )
    ts_ns: int
    saddr: bytes
    daddr: bytes
    src_identity: int
    dst_identity: int
    cookie: int
    ifindex: int
    sport: int
    dport: int
    src_ep: int
    dst_ep: int
    proto: int
    verdict: int
    reason: int
    dir: int
    rev_nat_id: int
    tcp_flags: int
    pad: int


PREFILTER_AF_INET = 4
PREFILTER_AF_INET6 = 6
PREFILTER_PREFIX_STATIC = 32


@dataclass
class PrefilterKey(CStruct):
    C_NAME = "prefilter_key"
    LAYOUT = (("prefixlen", "I"), ("family", "B"), ("pad", "3s"), ("addr", "16s"))
    prefixlen: int
    family: int
    pad: bytes
    addr: bytes

    @classmethod
    def for_prefix(cls, prefix: str) -> PrefilterKey:
        net = ipaddress.ip_network(prefix, strict=False)
        family = PREFILTER_AF_INET if net.version == 4 else PREFILTER_AF_INET6
        addr = net.network_address.packed.ljust(16, b"\0")
        return cls(PREFILTER_PREFIX_STATIC + net.prefixlen, family, b"\0\0\0", addr)

    @property
    def prefix(self) -> str:
        bits = self.prefixlen - PREFILTER_PREFIX_STATIC
        if self.family == PREFILTER_AF_INET:
            return f"{ipaddress.IPv4Address(self.addr[:4])}/{bits}"
        return f"{ipaddress.IPv6Address(self.addr)}/{bits}"


@dataclass
class PrefilterValue(CStruct):
    C_NAME = "prefilter_value"
    LAYOUT = (("slot", "I"),)
    slot: int


@dataclass
class U32(CStruct):
    C_NAME = "__u32"
    LAYOUT = (("value", "I"),)
    value: int


@dataclass
class U64(CStruct):
    C_NAME = "__u64"
    LAYOUT = (("value", "Q"),)
    value: int


@dataclass
class U16(CStruct):
    C_NAME = "__u16"
    LAYOUT = (("value", "H"),)
    value: int


# services.h: the load balancer's maps (Service frontends -> backends, reverse NAT)
LB_F_CLUSTER_IP = 1  # lb4_service.flags
LB_F_AFFINITY = 2
LB_F_EXTERNAL_IP = 4
LB_F_NODEPORT = 8
LB_F_SNAT = 16
LB_F_HOSTPORT = 32
SNAT_PORT_MIN, SNAT_PORT_MAX = 61000, 65535  # services.h: NodePort SNAT source ports
LB_SCOPE_INTERNAL = 0  # lb4_key.scope: pods, the node's own sockets
LB_SCOPE_EXTERNAL = 1  # from outside, at an uplink
LB_SERVICES_MAP_SIZE = 65536
LB_BACKENDS_MAP_SIZE = 65536
LB_SLOTS_MAP_SIZE = 262144
LB_REVNAT_MAP_SIZE = 65536


@dataclass
class Lb4Key(CStruct):
    """A frontend: (address, port, protocol), as in the packet."""

    C_NAME = "lb4_key"
    LAYOUT = (("address", "4s"), ("dport", ">H"), ("proto", "B"), ("scope", "B"))
    address: bytes
    dport: int
    proto: int
    scope: int = 0  # LB_SCOPE_INTERNAL


@dataclass
class Lb4Service(CStruct):
    C_NAME = "lb4_service"
    LAYOUT = (("rev_nat_id", "H"), ("count", "H"), ("flags", "H"), ("pad", "H"))
    rev_nat_id: int
    count: int
    flags: int
    pad: int = 0


@dataclass
class Lb4SlotKey(CStruct):
    C_NAME = "lb4_slot_key"
    LAYOUT = (("rev_nat_id", "H"), ("slot", "H"))
    rev_nat_id: int
    slot: int


@dataclass
class Lb4Slot(CStruct):
    C_NAME = "lb4_slot"
    LAYOUT = (("backend_id", "I"),)
    backend_id: int


@dataclass
class Lb4Backend(CStruct):
    """A backend (key: its id, a U32)."""

    C_NAME = "lb4_backend"
    LAYOUT = (("address", "4s"), ("port", ">H"), ("proto", "B"), ("flags", "B"))
    address: bytes
    port: int
    proto: int
    flags: int = 0


@dataclass
class Lb4ReverseNat(CStruct):
    """What a translated flow's replies carry as source (key: the rev-NAT id, a U16)."""

    C_NAME = "lb4_reverse_nat"
    LAYOUT = (("address", "4s"), ("port", ">H"), ("pad", "H"))
    address: bytes
    port: int
    pad: int = 0


@dataclass
class Lb4AffinityKey(CStruct):
    C_NAME = "lb4_affinity_key"
    LAYOUT = (("client", "4s"), ("rev_nat_id", "H"), ("pad", "H"))
    client: bytes
    rev_nat_id: int
    pad: int = 0


@dataclass
class Lb4Affinity(CStruct):
    C_NAME = "lb4_affinity"
    LAYOUT = (("last_used_ns", "Q"), ("backend_id", "I"), ("pad", "I"))
    last_used_ns: int
    backend_id: int
    pad: int = 0


@dataclass
class Lb4AffinityMatchKey(CStruct):
    C_NAME = "lb4_affinity_match_key"
    LAYOUT = (("backend_id", "I"), ("rev_nat_id", "H"), ("pad", "H"))
    backend_id: int
    rev_nat_id: int
    pad: int = 0


@dataclass
class Lb4AffinityMatch(CStruct):
    C_NAME = "lb4_affinity_match"
    LAYOUT = (("timeout_s", "I"),)
    timeout_s: int


# sock_lb.h: socket LB (bpf/bpf_sock.c): what a node socket's backend stands for
LB_REVERSE_SK_MAP_SIZE = 65536


@dataclass
class Lb4SockRevKey(CStruct):
    """A socket (its cookie) and the backend it was given."""

    C_NAME = "lb4_sock_rev_key"
    LAYOUT = (("cookie", "Q"), ("address", "4s"), ("port", ">H"), ("pad", "H"))
    cookie: int
    address: bytes
    port: int
    pad: int = 0


@dataclass
class Lb4SockRevValue(CStruct):
    """The frontend that backend stands for, and its service's id."""

    C_NAME = "lb4_sock_rev_value"
    LAYOUT = (("address", "4s"), ("port", ">H"), ("rev_nat_id", "H"))
    address: bytes
    port: int
    rev_nat_id: int


@dataclass
class Snat4Key(CStruct):
    """A NodePort SNAT answer's tuple (services.h)."""

    C_NAME = "snat4_key"
    LAYOUT = (("backend", "4s"), ("node", "4s"), ("backend_port", ">H"), ("node_port", ">H"),
              ("proto", "B"), ("pad", "3s"))
    backend: bytes
    node: bytes
    backend_port: int
    node_port: int
    proto: int
    pad: bytes = b"\0\0\0"


@dataclass
class Lb4SnatSource(CStruct):
    """cilia_lb4_snat_source's one value (key: U32 0): this node's SNAT address."""

    C_NAME = "lb4_snat_source"
    LAYOUT = (("address", "4s"),)
    address: bytes


@dataclass
class Snat4Entry(CStruct):
    C_NAME = "snat4_entry"
    LAYOUT = (("client", "4s"), ("frontend", "4s"), ("client_port", ">H"),
              ("frontend_port", ">H"))
    client: bytes
    frontend: bytes
    client_port: int
    frontend_port: int


VERDICT_FORWARDED = 1
VERDICT_DROPPED = 2
VERDICT_AUDIT = 3  # a policy in audit mode refused it; it passed
VERDICTS = {VERDICT_FORWARDED: "forwarded", VERDICT_DROPPED: "dropped",
            VERDICT_AUDIT: "audit"}  # as flows, metrics and filters name them


class Reason(enum.IntEnum):
    """enum metric_reason in bpf/include/cilia/metrics.h."""

    REASON_UNSPEC = 0
    REASON_REDIRECT_PEER = 1
    REASON_TO_STACK = 2
    REASON_TO_POD = 3
    REASON_TO_STACK_NAT = 4
    REASON_REDIRECT_NEIGH = 5
    REASON_TO_STACK_SYMMETRIC = 6
    REASON_TO_STACK_FIB = 7
    REASON_LB_TRANSLATED = 8
    REASON_LB_REV_NAT = 9
    REASON_LB_REJECTED = 10
    REASON_LB_SOCK_TRANSLATED = 11
    REASON_POLICY_AUDIT = 12
    DROP_BASE = 128
    DROP_INVALID = 130
    DROP_SPOOFED_SOURCE = 131
    DROP_NO_ENDPOINT_IFINDEX = 132
    DROP_POLICY = 133
    DROP_POLICY_DENY = 134
    DROP_FRAGMENT = 135
    DROP_PREFILTER = 136
    DROP_NO_SERVICE_BACKEND = 137
    DROP_NOT_IPV4 = 138
    DROP_UNKNOWN_ENDPOINT = 139
    DROP_OVERLAY_SOURCE = 140
    DROP_TO_OVERLAY_PORT = 141
    DROP_REVERSE_PATH = 142
    DROP_NO_SNAT_PORT = 143
    DROP_NO_ROUTE = 144
    DROP_OVERLAY_INNER_SOURCE = 145
    DROP_NO_TUNNEL = 146
    DROP_CT_ENDPOINT_LIMIT = 150
    DROP_KERNEL = 151  # the stack's own drop: cookie is the kernel's reason (kernel_drops)

    @property
    def is_drop(self) -> bool:
        return self >= Reason.DROP_BASE

    @property
    def label(self) -> str:
        """The name a person reads: `redirect_peer`, `to_stack`, `drop_spoofed_source`."""
        name = self.name.lower()
        return name.removeprefix("reason_")


class Direction(enum.IntEnum):
    """enum metric_dir in bpf/include/cilia/metrics.h."""

    METRIC_DIR_UNSPEC = 0
    METRIC_DIR_INGRESS = 1
    METRIC_DIR_EGRESS = 2

    @property
    def label(self) -> str:
        return self.name.lower().removeprefix("metric_dir_")


@dataclass(frozen=True)
class MapSpec:
    """A pinned map: its name in the objects (and its pin file), its key and value."""

    name: str
    key: type[CStruct]
    value: type[CStruct]
    percpu: bool = False


ENDPOINTS = MapSpec("cilia_endpoints", EndpointKey, EndpointInfo)
METRICS = MapSpec("cilia_metrics", MetricsKey, MetricsValue, percpu=True)
IPCACHE = MapSpec("cilia_ipcache", IpcacheKey, IpcacheValue)
POLICY = MapSpec("cilia_policy", PolicyKey, PolicyValue)
CONNTRACK = MapSpec("cilia_ct", CtKey, CtValue)
CT_CREATED = MapSpec("cilia_ct_created", U32, U64)  # conntrack.h: by endpoint id
CT_CREDITED = MapSpec("cilia_ct_credited", U32, U64)
CT_LIMIT = MapSpec("cilia_ct_limit", U32, U32)
PREFILTER = MapSpec("cilia_prefilter", PrefilterKey, PrefilterValue)
PREFILTER_STATS = MapSpec("cilia_prefilter_stats", U32, MetricsValue, percpu=True)
NETDEVS = MapSpec("cilia_netdevs", U32, NetdevInfo)
LB4_SERVICES = MapSpec("cilia_lb4_services", Lb4Key, Lb4Service)
LB4_SLOTS = MapSpec("cilia_lb4_slots", Lb4SlotKey, Lb4Slot)
LB4_BACKENDS = MapSpec("cilia_lb4_backends", U32, Lb4Backend)
LB4_REVNAT = MapSpec("cilia_lb4_revnat", U16, Lb4ReverseNat)
LB4_AFFINITY = MapSpec("cilia_lb4_affinity", Lb4AffinityKey, Lb4Affinity)
LB4_AFFINITY_MATCH = MapSpec("cilia_lb4_affinity_match", Lb4AffinityMatchKey, Lb4AffinityMatch)
SNAT4 = MapSpec("cilia_snat4", Snat4Key, Snat4Entry)
LB4_SNAT_SOURCE = MapSpec("cilia_lb4_snat_source", U32, Lb4SnatSource)
POLICY_REV = MapSpec("cilia_policy_rev", U32, U32)
FRAGS = MapSpec("cilia_frags", FragKey, FragPorts)
TUNNEL = MapSpec("cilia_tunnel", IpcacheKey, TunnelEndpoint)
ALL_MAPS = (ENDPOINTS, METRICS, IPCACHE, POLICY, CONNTRACK, PREFILTER, PREFILTER_STATS,
            NETDEVS, LB4_SERVICES, LB4_SLOTS, LB4_BACKENDS, LB4_REVNAT, POLICY_REV, FRAGS,
            LB4_AFFINITY, LB4_AFFINITY_MATCH, SNAT4, LB4_SNAT_SOURCE, TUNNEL, CT_CREATED,
            CT_CREDITED, CT_LIMIT)
# Pinned only where the agent runs with --socket-lb (bpf_sock.o is loaded on demand), so
# not in ALL_MAPS, which every datapath opens.
LB4_REVERSE_SK = MapSpec("cilia_lb4_reverse_sk", Lb4SockRevKey, Lb4SockRevValue)
SOCK_MAPS = (LB4_REVERSE_SK,)
# Pinned by bpf_trace.o (cilia/datapath/kernel_drops.py), where the kernel has it: this
# node's network namespaces by inode (bpf/lib/kernel_drop.h).
KDROP_NETNS = MapSpec("cilia_kdrop_netns", U32, U32)
TRACE_MAPS = (KDROP_NETNS,)
EVENTS_RINGBUF_SIZE = 1 << 20
EVENTS_MAP = "cilia_events"  # a ring buffer: read with cilia.datapath.ringbuf
