"""What cilia's datapath programs must do with one packet: a model for the differential
fuzz test (test_differential_fuzz.py), written from the documented semantics (the comments
of bpf/include/cilia/*.h and bpf/*.c, the README's datapath sections), not from the C.

The model knows the node it runs on (a `Topology`: endpoints, ipcache, policy, devices,
routes, the prefilter) and keeps what the datapath remembers between packets: the
connections conntrack knows and the ports of fragmented datagrams. For each packet, a
program's function answers with an `Outcome`: the return code, the metric reason and
direction counted, the frame that must come out, the skb mark, and the state the packet
leaves behind (applied by `Model.commit`, so that a packet the test decides not to send
changes nothing).

Where the programs are known to depart from these semantics, the outcome carries the
name of that divergence (`Outcome.known`, a key of KNOWN): the fuzz test does not send such
packets, and a focused test shows each divergence on its own.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from cilia.datapath.layouts import Direction, Reason

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS = 1, 2

ETH_HLEN = 14
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ICMP, TCP, UDP, SCTP = 1, 6, 17, 132
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
IP_MF, IP_OFFSET = 0x2000, 0x1FFF
ICMP_ECHOREPLY, ICMP_ECHO = 0, 8
ICMP_ERRORS = (3, 11, 12)  # destination unreachable, time exceeded, parameter problem
ICMP_TUPLE_TYPE = 0x100  # l4.h: any type but echo is (0, this | type), a flow of its own

HOST, WORLD, REMOTE_NODE = 1, 2, 6  # ipcache.h reserved identities
IDENTITY_MIN_CLUSTER, IDENTITY_CIDR_BASE = 256, 0x1000000
ANY, CIDR_VIEW = 0, 0x80000000  # policy.h: any peer; a peer's CIDR view
INGRESS, EGRESS = 1, 2  # policy.h enum policy_dir
F_INGRESS, F_EGRESS = 1, 2  # endpoint.h ENDPOINT_F_*_ENFORCED
F_AUDIT = 4  # endpoint.h ENDPOINT_F_AUDIT: its policy's refusals pass, counted
ALLOW, DENY = 1, 2
OVERLAY_PORT = 8472  # the VXLAN port (lib/antispoof.h)
MARK_CT_REPLY = 0x200  # conntrack.h
NETDEV_F_UPLINK = 1

IN, OUT = Direction.METRIC_DIR_INGRESS, Direction.METRIC_DIR_EGRESS

# How a connection goes on this node (conntrack.h CT_F_*): between two pods of the node,
# through the node's stack, or past it.
LOCAL, VIA_STACK, BYPASS = "local", "via-stack", "bypass"

# Departures of the programs from these semantics that this fuzz found: name -> (what the
# model expects and the program did instead, fixed). Fixed ones (datapath bugs, corrected
# in bpf/) are fuzzed like everything else and each keeps a regression test of its own;
# open ones (not certainly bugs) are left out of the fuzz and shown, xfail, on their own.
KNOWN: dict[str, tuple[str, bool]] = {
    "overlay_ip_options": (
        "a datagram to the VXLAN port from an address that is no other node must be dropped "
        "(drop_overlay_source) whatever IP options it carries: the kernel accepts IP options "
        "and cilia_vxlan decapsulates it all the same; overlay_spoofed() looks only at "
        "datagrams with ihl == 5, so one NOP option smuggles any inner frame in", True),
    "overlay_nonfirst_fragment": (
        "a non-first fragment carries no UDP header and is no VXLAN datagram (its first "
        "fragment is judged); to_overlay_port() reads its payload as a UDP header and drops "
        "the fragment (drop_overlay_source) when those bytes happen to say 8472", True),
    "ip_options_truncated": (
        "an IPv4 header whose ihl reaches past the frame is a truncated header "
        "(drop_invalid); parse_l4() notices only when it needs an L4 header (TCP, UDP, "
        "ICMP, SCTP, first fragments), so other protocols and non-first fragments pass", True),
    "to_pod_bad_header": (
        "cil_to_pod must drop a malformed IPv4 header (version != 4, ihl < 5) as "
        "cil_from_pod does (drop_invalid: 'truncated or malformed Ethernet/IPv4 header'); it "
        "never checks them, and with ihl < 5 reads its 'ports' from inside the IP header",
        True),
    "tot_len": (
        "the IPv4 total length bounds the datagram: one shorter than its own header, or "
        "longer than the frame (a truncated datagram), is malformed (drop_invalid), and the "
        "L4 header (or an ICMP error's quote) must lie inside it, not in the link layer's "
        "padding after it; the programs never read tot_len and judged whatever bytes "
        "followed (fixed: ipv4_datagram_end() in lib/ipv4.h)", True),
    "sctp_short": (
        "an SCTP common header is 12 bytes ('too short for the header its protocol "
        "promises' is drop_invalid); parse_l4() asked only for the 4 bytes of ports", True),
    "related_way": (
        "an ICMP error belongs to its connection (CT_RELATED) and, as netfilter must see "
        "each connection whole or not at all, takes its way: cil_from_pod sends a pod's "
        "error about a connection past the stack to the stack (where kube-proxy's "
        "`--ctstate INVALID -j DROP` drops it: netfilter never saw the connection), and "
        "cil_from_netdev delivers an error about a connection through the stack past it; "
        "ct_lookup() of the error's own tuple finds no entry, so its flags are 0", True),
    "frag_ports_of_dropped_first": (
        "'when its first fragment passes, its ports are remembered' (README): parse_l4() "
        "remembered them before any verdict, so a later fragment of a datagram whose first "
        "fragment was dropped was judged with those ports (drop_policy, or a conntrack entry "
        "with ports) rather than as a fragment whose first never passed (drop_fragment); "
        "frag_remember() remembers them after the verdict", True),
}


def ip4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


# ----------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Endpoint:
    name: str
    ip: bytes
    ep_id: int
    identity: int
    ifindex: int  # host-side veth (0: no delivery interface)
    flags: int  # F_INGRESS | F_EGRESS | F_AUDIT
    mac: bytes
    node_mac: bytes


@dataclass(frozen=True)
class Rule:
    """A policy entry: (endpoint, direction, peer identity, protocol, port block)."""

    ep_id: int
    dir: int
    identity: int  # a peer identity, ANY, or CIDR_VIEW | a CIDR identity
    proto: int  # 0: any protocol (and any port)
    port: int  # the block's first port (the ICMP type for ICMP)
    bits: int  # 0: any port; 16: one port; else the top `bits` bits fixed
    action: int  # ALLOW or DENY

    def matches(self, proto: int, port: int) -> bool:
        if self.proto == 0:
            return True
        if self.proto != proto:
            return False
        shift = 16 - self.bits
        return self.bits == 0 or (port >> shift) == (self.port >> shift)

    def covers(self, other: Rule) -> bool:
        """Every (protocol, port) `other` matches, this one matches too."""
        if self.proto == 0:
            return True
        if other.proto != self.proto:
            return False
        if self.bits == 0:
            return True
        return other.bits >= self.bits and self.matches(other.proto, other.port)


@dataclass(frozen=True)
class Route:
    net: ipaddress.IPv4Network
    ifindex: int
    gateway: bytes | None = None


@dataclass
class Topology:
    endpoints: list[Endpoint]
    ipcache: dict[str, tuple[int, int]]  # prefix -> (identity, CIDR identity)
    rules: list[Rule]
    devices: dict[int, bytes]  # ifindex -> MAC of the node's devices
    netdevs: dict[int, int]  # devices with cil_from_netdev -> NETDEV_F_*
    routes: list[Route]
    local_addrs: set[bytes]  # the node's own addresses
    neighbours: dict[bytes, bytes]  # resolved next hops -> MAC
    prefilter: dict[str, int]  # denied CIDR (IPv4 or IPv6) -> stats slot
    skb_has_socket: bool = True  # BPF_PROG_TEST_RUN gives every skb a socket


def normalize_rules(rules: list[Rule]) -> list[Rule]:
    """What the agent's compiler guarantees of the map (README, Policy): within one peer
    identity, an allow that a broader deny covers is written as a deny, so that the most
    specific entry never lets an allow undo a deny. Later duplicates win."""
    by_key: dict[tuple, Rule] = {}
    for r in rules:
        by_key[(r.ep_id, r.dir, r.identity, r.proto, r.port, r.bits)] = r
    out = []
    for r in by_key.values():
        if r.action == ALLOW and any(
                d.action == DENY and (d.ep_id, d.dir, d.identity) == (r.ep_id, r.dir, r.identity)
                and d.covers(r) for d in by_key.values()):
            r = Rule(r.ep_id, r.dir, r.identity, r.proto, r.port, r.bits, DENY)
        out.append(r)
    return out


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class L4:
    """What the L4 header says, read within `end` (the frame's, or the datagram's)."""

    truncated: bool = False
    sport: int = 0
    dport: int = 0
    policy_port: int = 0  # the destination port, or the ICMP type
    tcp_flags: int = 0
    icmp_error: tuple | None = None  # the quoted packet's tuple


@dataclass
class Packet:
    frame: bytes
    ethertype: int
    ipv4: bool = False  # an IPv4 ethertype and the 20 bytes of a fixed header
    version: int = 0
    ihl: int = 0
    tot_len: int = 0
    ident: int = 0
    frag: int = 0
    ttl: int = 0
    proto: int = 0
    saddr: bytes = b""
    daddr: bytes = b""
    hdr_fits: bool = False  # the header with its options lies inside the frame
    l4: L4 = field(default_factory=L4)  # read within the datagram (tot_len), if it can be
    l4_frame: L4 = field(default_factory=L4)  # read within the frame, whatever tot_len says

    @property
    def tot_len_ok(self) -> bool:
        """The total length covers the header and no more than the frame holds."""
        return self.ihl * 4 <= self.tot_len <= len(self.frame) - ETH_HLEN

    @property
    def header_ok(self) -> bool:
        """What lib/ipv4.h ipv4_parse() holds an IPv4 header to: version 4, at least the
        fixed 20 bytes, and all of it (options too) within the frame."""
        return self.version == 4 and self.ihl >= 5 and self.hdr_fits

    @property
    def nonfirst(self) -> bool:
        return bool(self.frag & IP_OFFSET)

    @property
    def first_frag(self) -> bool:
        return bool(self.frag & IP_MF) and not self.nonfirst


# What each protocol's header must hold for the datapath to judge it (TCP's 20 bytes;
# UDP's 8; ICMP's first 8, with the echo identifier; SCTP's 12-byte common header).
L4_NEED = {TCP: 20, UDP: 8, ICMP: 8, SCTP: 12}


def _quoted(frame: bytes, off: int, end: int) -> tuple | None:
    """The tuple of the packet an ICMP error quotes (its IPv4 header and 8 bytes)."""
    if off + 20 > end:
        return None
    version, ihl = frame[off] >> 4, frame[off] & 15
    proto = frame[off + 9]
    src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
    inner = off + ihl * 4
    if version != 4 or ihl < 5 or inner > end:  # ipv4_hdr_valid(), as the packet's own
        return None
    if proto in (TCP, UDP, SCTP):
        if inner + 4 > end:
            return None
        sport, dport = struct.unpack_from("!HH", frame, inner)
        return (src, dst, sport, dport, proto)
    if proto == ICMP:
        if inner + 8 > end or frame[inner] not in (ICMP_ECHO, ICMP_ECHOREPLY):
            return None
        ident = struct.unpack_from("!H", frame, inner + 4)[0]
        return (src, dst, ident, ident, proto)
    return None


def parse_l4(frame: bytes, off: int, proto: int, end: int) -> L4:
    need = L4_NEED.get(proto)
    if need is None:
        return L4()  # a protocol without ports
    if off + need > end:
        return L4(truncated=True)
    if proto == ICMP:
        typ = frame[off]
        if typ in (ICMP_ECHO, ICMP_ECHOREPLY):
            ident = struct.unpack_from("!H", frame, off + 4)[0]
            return L4(sport=ident, dport=ident, policy_port=typ)
        quote = _quoted(frame, off + 8, end) if typ in ICMP_ERRORS else None
        return L4(dport=ICMP_TUPLE_TYPE | typ, policy_port=typ, icmp_error=quote)
    sport, dport = struct.unpack_from("!HH", frame, off)
    flags = frame[off + 13] if proto == TCP else 0
    return L4(sport=sport, dport=dport, policy_port=dport, tcp_flags=flags)


def parse(frame: bytes) -> Packet:
    ethertype = struct.unpack_from("!H", frame, 12)[0] if len(frame) >= ETH_HLEN else -1
    p = Packet(frame, ethertype)
    if ethertype != ETH_P_IP or len(frame) < ETH_HLEN + 20:
        return p
    (vi, _tos, p.tot_len, p.ident, p.frag, p.ttl, p.proto, _csum, p.saddr,
     p.daddr) = struct.unpack_from("!BBHHHBBH4s4s", frame, ETH_HLEN)
    p.ipv4 = True
    p.version, p.ihl = vi >> 4, vi & 15
    hdr = p.ihl * 4
    p.hdr_fits = ETH_HLEN + hdr <= len(frame)
    if not p.header_ok or p.nonfirst:
        return p
    off = ETH_HLEN + hdr
    p.l4_frame = parse_l4(frame, off, p.proto, len(frame))
    if p.tot_len_ok:
        p.l4 = parse_l4(frame, off, p.proto, ETH_HLEN + p.tot_len)
    return p


def header_checksum_ok(frame: bytes) -> bool:
    hdr = frame[ETH_HLEN:ETH_HLEN + (frame[ETH_HLEN] & 15) * 4]
    if len(hdr) < 20 or len(hdr) % 2:
        return False
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


# ----------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    retval: int
    reason: int | None = None  # the metric counted (None: nothing counted)
    dir: int = 0
    out: bytes | None = None  # the frame that must come out (None: not checked)
    routed: bool = False  # `out` had its TTL taken down one: its checksum must stay valid
    mark: int | None = None  # skb->mark afterwards (None: not checked)
    known: str | None = None  # a known divergence (KNOWN)
    slot: int | None = None  # prefilter: the denied CIDR's stats slot
    effects: list = field(default_factory=list)
    path: str = ""  # how the model got there (conntrack state, fragment): for reports
    xdp: bool = False
    audit: int | None = None  # also counted: policy_audit in this direction (a new flow
    # that a policy in audit mode refused and that passed; lib/enforce.h emit_passed)

    @property
    def dropped(self) -> bool:
        return self.reason is not None and self.reason >= Reason.DROP_BASE

    def describe(self) -> str:
        names = {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS"} if self.xdp else \
            {TC_ACT_OK: "TC_ACT_OK", TC_ACT_SHOT: "TC_ACT_SHOT", TC_ACT_REDIRECT: "TC_ACT_REDIRECT"}
        ret = names.get(self.retval, str(self.retval))
        why = "nothing counted" if self.reason is None else \
            f"{Reason(self.reason).label}/{Direction(self.dir).label}"
        return f"{ret} ({why})"


def _drop(reason: Reason, d: int, known: str | None = None) -> Outcome:
    return Outcome(TC_ACT_SHOT, reason, d, known=known)


def _audit(f: Flow, effects: list) -> int | None:
    """A new flow that passed (its conntrack entry made) after audit mode let a refusal
    pass: counted as policy_audit in that refusal's direction."""
    return f.audited if any(kind == "ct" for kind, _, _ in effects) else None


def _reverse(t: tuple) -> tuple:
    s, d, sp, dp, proto = t
    return (d, s, dp, sp, proto)


def _path(status: str, f: Flow) -> str:
    return f"{status}, {f.frag}" if f.frag else status


@dataclass
class Flow:
    """The packet as the datapath judges it."""

    tuple: tuple
    policy_port: int
    tcp_flags: int
    nonfirst: bool  # a fragment whose first fragment never passed here
    icmp_error: tuple | None
    known: str | None = None
    frag: str = ""  # "first fragment", "later fragment, ports known", "... first unseen"
    audited: int | None = None  # the direction of the first refusal audit mode let pass


class Model:
    def __init__(self, topo: Topology):
        self.topo = topo
        self.by_ip = {ep.ip: ep for ep in topo.endpoints}
        self.ipcache = sorted(
            ((ipaddress.IPv4Network(p), v) for p, v in topo.ipcache.items()),
            key=lambda e: -e[0].prefixlen)
        self._ident_cache: dict[bytes, tuple[int, int]] = {}
        self.rules: dict[tuple, list[Rule]] = {}
        for r in topo.rules:
            self.rules.setdefault((r.ep_id, r.dir, r.identity), []).append(r)
        self.routes = sorted(topo.routes, key=lambda r: -r.net.prefixlen)
        self.prefilter = sorted(
            ((ipaddress.ip_network(p), slot) for p, slot in topo.prefilter.items()),
            key=lambda e: -e[0].prefixlen)
        self.reset()

    def reset(self) -> None:
        """Forgets what the datapath remembers (the test flushes cilia_ct, cilia_frags)."""
        self.ct: dict[tuple, str] = {}  # tuple in the first packet's direction -> way
        self.frags_passed: dict[tuple, tuple[int, int]] = {}
        self.frags_parsed: dict[tuple, tuple[int, int]] = {}

    def commit(self, o: Outcome) -> None:
        for kind, key, value in o.effects:
            if kind == "ct":
                self.ct[key] = value
            elif kind == "frag_parsed":
                self.frags_parsed[key] = value
            elif kind == "frag" and not o.dropped:
                self.frags_passed[key] = value

    # -- lookups

    def identity(self, addr: bytes) -> tuple[int, int]:
        """(identity, CIDR identity) of an address; everything unknown is the world."""
        v = self._ident_cache.get(addr)
        if v is None:
            a = ipaddress.IPv4Address(addr)
            v = next((val for net, val in self.ipcache if a in net), (WORLD, WORLD))
            self._ident_cache[addr] = v
        return v

    def verdict(self, ep: Endpoint, d: int, peer: int, peer_cidr: int, proto: int,
                port: int) -> int | None:
        """A deny matching the peer, its CIDR view or any peer wins; else an allow."""
        allowed = False
        for ident in (peer, peer_cidr | CIDR_VIEW, ANY):
            for r in self.rules.get((ep.ep_id, d, ident), ()):
                if r.matches(proto, port):
                    if r.action == DENY:
                        return DENY
                    allowed = True
        return ALLOW if allowed else None

    def enforce(self, ep: Endpoint, d: int, peer: int, peer_cidr: int,
                f: Flow) -> Reason | None:
        """None: the new connection may pass `ep`'s policy in direction `d`."""
        if not ep.flags & (F_INGRESS if d == INGRESS else F_EGRESS):
            return None  # no policy selects it in that direction: open
        if f.nonfirst:
            return Reason.DROP_FRAGMENT  # no ports to judge
        v = self.verdict(ep, d, peer, peer_cidr, f.tuple[4], f.policy_port)
        if v == ALLOW:
            return None
        if ep.flags & F_AUDIT:  # audit mode: passes, the first refusal remembered
            if f.audited is None:
                f.audited = IN if d == INGRESS else OUT
            return None
        return Reason.DROP_POLICY_DENY if v == DENY else Reason.DROP_POLICY

    def route(self, addr: bytes) -> Route | None:
        if addr in self.topo.local_addrs:
            return None  # a local destination: not forwarded
        a = ipaddress.IPv4Address(addr)
        return next((r for r in self.routes if a in r.net), None)

    def fib(self, frame: bytes, daddr: bytes, ingress: int, netdev_only: bool,
            o_dir: int) -> Outcome | None:
        """The packet leaves past the stack as the node's routing table says (routed: TTL
        down one), or None: the stack's business (no route, a local destination, a TTL
        expiring, no forwarding from the device it came in on, and with `netdev_only` a
        device out without cil_from_netdev)."""
        ttl = frame[ETH_HLEN + 8]
        r = self.route(daddr)
        if ttl <= 1 or ingress not in self.topo.devices or r is None:
            return None
        if netdev_only and r.ifindex not in self.topo.netdevs:
            return None
        out = bytearray(frame)
        out[ETH_HLEN + 8] = ttl - 1
        nexthop = r.gateway or daddr
        if nexthop in self.topo.neighbours:
            out[0:6] = self.topo.neighbours[nexthop]
            out[6:12] = self.topo.devices[r.ifindex]
        return Outcome(TC_ACT_REDIRECT, Reason.REASON_REDIRECT_NEIGH, o_dir, bytes(out),
                       routed=True)

    def prefilter_slot(self, addr: ipaddress._BaseAddress) -> int | None:
        return next((slot for net, slot in self.prefilter
                     if net.version == addr.version and addr in net), None)

    # -- the parts every program shares

    def flow(self, p: Packet, effects: list) -> Flow:
        """The packet's tuple and policy port. A non-first fragment has the ports its
        datagram's first fragment carried, if that one passed here (cilia_frags)."""
        key = (p.saddr, p.daddr, p.ident, p.proto)
        if p.nonfirst:
            known = None
            if self.frags_parsed.get(key) != self.frags_passed.get(key):
                known = "frag_ports_of_dropped_first"
            ports = self.frags_passed.get(key)
            if ports:
                return Flow((p.saddr, p.daddr, *ports, p.proto), ports[1], 0, False, None,
                            known, "later fragment, ports known")
            return Flow((p.saddr, p.daddr, 0, 0, p.proto), 0, 0, True, None, known,
                        "later fragment, first unseen")
        l4 = p.l4
        if p.first_frag and p.proto in (TCP, UDP, SCTP):
            effects.append(("frag_parsed", key, (l4.sport, l4.dport)))
            effects.append(("frag", key, (l4.sport, l4.dport)))
        return Flow((p.saddr, p.daddr, l4.sport, l4.dport, p.proto), l4.policy_port,
                    l4.tcp_flags, False, l4.icmp_error,
                    frag="first fragment" if p.first_frag else "")

    def malformed(self, p: Packet) -> tuple[bool, str | None]:
        """Whether the IPv4 header (with its options) or the L4 header its protocol
        promises is cut short or malformed; and the known divergence this packet falls
        in, if any. The total length must cover the header and lie inside the frame (a
        truncated datagram is malformed, as the kernel's ip_rcv holds too), and the
        headers must lie inside the datagram, not in the link layer's padding after it."""
        if not p.hdr_fits:
            ports_needed = not p.nonfirst and p.proto in L4_NEED
            return True, None if ports_needed else "ip_options_truncated"
        hdr = p.ihl * 4
        if not p.nonfirst and p.l4_frame.truncated:
            short_sctp = p.proto == SCTP and len(p.frame) - ETH_HLEN - hdr >= 4
            return True, "sctp_short" if short_sctp else None
        if not p.tot_len_ok:
            return True, "tot_len"
        if not p.nonfirst and p.l4 != p.l4_frame:
            return p.l4.truncated, "tot_len"
        return False, None

    def header_known(self, p: Packet) -> str | None:
        """The known divergence an IPv4 header that ipv4_parse() refuses fell in: a
        header of version 4 and ihl >= 5 whose options run past the frame (malformed()
        names it); version or ihl wrong in cil_to_pod (to_pod_bad_header, by its caller)."""
        if p.ipv4 and p.version == 4 and p.ihl >= 5 and not p.hdr_fits:
            return self.malformed(p)[1]
        return None

    def conntrack(self, f: Flow) -> tuple[str, str | None, tuple | None]:
        """('new' | 'established' | 'reply' | 'related', the connection's way, its key).
        A bare SYN opens a connection whatever lingers; an ICMP error about a packet of a
        known connection (either way) is related to it."""
        t = f.tuple
        if not (t[4] == TCP and f.tcp_flags & (SYN | ACK) == SYN):
            if t in self.ct:
                return "established", self.ct[t], t
            if _reverse(t) in self.ct:
                return "reply", self.ct[_reverse(t)], _reverse(t)
        q = f.icmp_error
        for key in (q, _reverse(q)) if q else ():
            if key in self.ct:
                return "related", self.ct[key], key
        return "new", None, None

    def deliver_local(self, frame: bytes, dst: Endpoint, d: int) -> Outcome:
        """Into a pod of this node, past its hooks: routed (TTL down one), from its
        host-side veth's MAC to its own, by bpf_redirect_peer; an expiring TTL goes to the
        stack (which answers time exceeded); an entry without a veth cannot be delivered."""
        if not dst.ifindex:
            return _drop(Reason.DROP_NO_ENDPOINT_IFINDEX, d)
        ttl = frame[ETH_HLEN + 8]
        if ttl <= 1:
            return Outcome(TC_ACT_OK, Reason.REASON_TO_STACK, d, frame)
        out = bytearray(frame)
        out[0:6], out[6:12] = dst.mac, dst.node_mac
        out[ETH_HLEN + 8] = ttl - 1
        return Outcome(TC_ACT_REDIRECT, Reason.REASON_REDIRECT_PEER, d, bytes(out),
                       routed=True)

    # -- the programs

    def from_pod(self, p: Packet, ingress_ifindex: int) -> Outcome:
        """cil_from_pod, tc ingress of a pod's host-side veth: what the pod sends."""
        frame = p.frame
        if p.ethertype != ETH_P_IP:
            return _drop(Reason.DROP_NOT_IPV4, OUT)  # pods never ARP, have no IPv6
        if not p.ipv4 or not p.header_ok:
            return _drop(Reason.DROP_INVALID, OUT, self.header_known(p))
        src = self.by_ip.get(p.saddr)
        if src is None or src.ifindex != ingress_ifindex:
            return _drop(Reason.DROP_SPOOFED_SOURCE, OUT)
        bad, known = self.malformed(p)
        if bad:
            return _drop(Reason.DROP_INVALID, OUT, known)
        effects: list = []
        f = self.flow(p, effects)
        known = known or f.known
        dst = self.by_ip.get(p.daddr)
        status, way, conn = self.conntrack(f)
        o: Outcome | None = None
        if status == "new":
            dst_id, dst_cidr = self.identity(p.daddr)
            if p.proto == UDP and f.tuple[3] == OVERLAY_PORT and dst_id in (HOST, REMOTE_NODE):
                o = _drop(Reason.DROP_TO_OVERLAY_PORT, OUT)  # would leave as its node's
            else:
                why = self.enforce(src, EGRESS, dst_id, dst_cidr, f)
                if why:
                    o = _drop(why, OUT)
                elif dst:
                    why = self.enforce(dst, INGRESS, src.identity, self.identity(p.saddr)[1], f)
                    if why:
                        o = _drop(why, IN)
            if o is None:
                if dst:
                    way = LOCAL
                else:
                    # Past the stack only to a pod on another node, out of a device whose
                    # answers come back through cil_from_netdev; the rest through it.
                    if dst_id >= IDENTITY_MIN_CLUSTER and dst_id < IDENTITY_CIDR_BASE:
                        o = self.fib(frame, p.daddr, ingress_ifindex, True, OUT)
                        if o is None:
                            o = Outcome(TC_ACT_OK, Reason.REASON_TO_STACK_FIB, OUT, frame)
                    way = BYPASS if o and o.retval == TC_ACT_REDIRECT else VIA_STACK
                effects.append(("ct", f.tuple, way))
        elif not dst and way == BYPASS:
            # Past the stack as the connection began, out of a device with
            # cil_from_netdev; an answer out of whatever device. An ICMP error belongs to
            # its connection and takes its way: an answer, unless the pod opened it.
            opener = status == "established" or (status == "related" and conn[0] == p.saddr)
            o = self.fib(frame, p.daddr, ingress_ifindex, opener, OUT)
            if o is None:
                o = Outcome(TC_ACT_OK, Reason.REASON_TO_STACK_FIB, OUT, frame)
            if status == "related":
                known = known or "related_way"
        if o is None:
            o = self.deliver_local(frame, dst, OUT) if dst else \
                Outcome(TC_ACT_OK, Reason.REASON_TO_STACK, OUT, frame)
        if not dst and o.retval == TC_ACT_OK:
            # Answers to connections the other side opened are marked for the masquerade
            # chain to leave alone.
            o.mark = MARK_CT_REPLY if status == "reply" else 0
        elif o.retval != TC_ACT_SHOT:
            o.mark = 0
        o.known = o.known or known
        o.effects = effects
        o.path = _path(status, f)
        o.audit = _audit(f, effects)
        return o

    def to_pod(self, p: Packet, ifindex: int) -> Outcome:
        """cil_to_pod, tc egress of a pod's host-side veth: what the node's stack sends
        into the pod (from the node, other nodes, the outside)."""
        if p.ethertype != ETH_P_IP:
            return _drop(Reason.DROP_NOT_IPV4, IN)
        if not p.ipv4:
            return _drop(Reason.DROP_INVALID, IN)
        if not p.header_ok:
            return _drop(Reason.DROP_INVALID, IN, self.header_known(p) or "to_pod_bad_header")
        bad, known = self.malformed(p)
        if bad:
            return _drop(Reason.DROP_INVALID, IN, known)
        effects: list = []
        f = self.flow(p, effects)
        known = known or f.known
        dst = self.by_ip.get(p.daddr)
        if dst is None or dst.ifindex != (ifindex or 1):
            o = _drop(Reason.DROP_UNKNOWN_ENDPOINT, IN, known)
            o.effects = effects
            return o
        status, _, _ = self.conntrack(f)
        if status == "new":
            src_id, src_cidr = self.identity(p.saddr)
            if src_id == HOST and not self.topo.skb_has_socket:
                src_id = WORLD  # forwarded, SNATed to a node address: from anywhere
            if src_id != HOST:  # the node itself may always reach its pods
                why = self.enforce(dst, INGRESS, src_id, src_cidr, f)
                if why:
                    o = _drop(why, IN, known)
                    o.effects = effects
                    return o
            effects.append(("ct", f.tuple, VIA_STACK))
        return Outcome(TC_ACT_OK, Reason.REASON_TO_POD, IN, p.frame, mark=0, known=known,
                       effects=effects, path=_path(status, f), audit=_audit(f, effects))

    def from_netdev(self, p: Packet, ifindex: int) -> Outcome:
        """cil_from_netdev, tc ingress of the node's uplinks: traffic for a local pod is
        judged and delivered; everything else goes to the stack untouched."""
        frame = p.frame
        untouched = Outcome(TC_ACT_OK, None, 0, frame, mark=0)
        if p.ethertype != ETH_P_IP or not p.ipv4:
            return untouched
        dst = self.by_ip.get(p.daddr)
        if dst is None:
            o = self._overlay_check(p, ifindex)
            if o is not None:
                return o
            # To the stack untouched; its ports were looked at (a NodePort of this node's?),
            # so a first fragment that passes here has them remembered.
            bad, known = self.malformed(p) if p.header_ok else (True, None)
            if p.first_frag and known:
                untouched.known = known
            if not bad:
                self.flow(p, untouched.effects)
            return untouched
        if not p.header_ok:
            return _drop(Reason.DROP_INVALID, IN, self.header_known(p))
        bad, known = self.malformed(p)
        if bad:
            return _drop(Reason.DROP_INVALID, IN, known)
        effects: list = []
        f = self.flow(p, effects)
        known = known or f.known
        status, way, _ = self.conntrack(f)
        o = None
        if status != "new" and way == VIA_STACK:
            # Its other direction passes the stack: so does this one, for netfilter (an
            # ICMP error too: it belongs to its connection).
            o = Outcome(TC_ACT_OK, Reason.REASON_TO_STACK_SYMMETRIC, IN, frame, mark=0)
            if status == "related":
                known = known or "related_way"
        elif status == "new":
            src_id, src_cidr = self.identity(p.saddr)
            r = self.route(p.saddr)
            if IDENTITY_MIN_CLUSTER <= src_id < IDENTITY_CIDR_BASE and \
                    (r is None or r.ifindex != (ifindex or 1)):
                o = _drop(Reason.DROP_REVERSE_PATH, IN)  # strict rp_filter for pods
            else:
                why = self.enforce(dst, INGRESS, src_id, src_cidr, f)
                if why:
                    o = _drop(why, IN)
                else:
                    effects.append(("ct", f.tuple, BYPASS))
        if o is None:
            o = self.deliver_local(frame, dst, IN)
            if o.retval != TC_ACT_SHOT:
                o.mark = 0
        o.known = o.known or known
        o.effects = effects
        o.path = _path(status, f)
        o.audit = _audit(f, effects)
        return o

    def _overlay_check(self, p: Packet, ifindex: int) -> Outcome | None:
        """On an uplink, a VXLAN datagram (UDP to the overlay port: whole, or the first
        fragment, which carries the header) from anything but another node is dropped."""
        flags = self.topo.netdevs.get(ifindex or 1, 0)
        if not flags & NETDEV_F_UPLINK or p.proto != UDP or p.ihl < 5:
            return None
        if self.identity(p.saddr)[0] == REMOTE_NODE:
            return None
        frame = p.frame
        naive = ETH_HLEN + 28 <= len(frame) and \
            struct.unpack_from("!H", frame, ETH_HLEN + 22)[0] == OVERLAY_PORT
        off = ETH_HLEN + p.ihl * 4
        real = not p.nonfirst and off + 8 <= len(frame) and \
            struct.unpack_from("!H", frame, off + 2)[0] == OVERLAY_PORT
        if real:
            return _drop(Reason.DROP_OVERLAY_SOURCE, IN,
                         "overlay_ip_options" if p.ihl != 5 else None)
        if naive and p.ihl == 5:
            o = Outcome(TC_ACT_OK, None, 0, frame, mark=0, known="overlay_nonfirst_fragment")
            return o
        return None

    def xdp(self, frame: bytes) -> Outcome:
        """cil_xdp_prefilter: a source in the deny list is dropped (counted on its CIDR's
        slot); everything else passes untouched."""
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        addr = None
        if ethertype == ETH_P_IP and len(frame) >= ETH_HLEN + 20:
            addr = ipaddress.IPv4Address(frame[ETH_HLEN + 12:ETH_HLEN + 16])
        elif ethertype == ETH_P_IPV6 and len(frame) >= ETH_HLEN + 40:
            addr = ipaddress.IPv6Address(frame[ETH_HLEN + 8:ETH_HLEN + 24])
        slot = self.prefilter_slot(addr) if addr is not None else None
        if slot is None:
            return Outcome(XDP_PASS, None, 0, frame, xdp=True)
        return Outcome(XDP_DROP, Reason.DROP_PREFILTER, IN, slot=slot, xdp=True)
