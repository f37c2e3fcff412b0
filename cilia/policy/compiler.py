"""NetworkPolicy → per-endpoint, per-direction entries of the BPF policy map.

The compiler is a pure function of a snapshot of the cluster (pods with identities and
named ports, namespaces, policies) and of this node's endpoints; the agent writes what
it returns, `cilia policy get` prints it, and the unit tests check it with the same
lookup semantics as the datapath (`verdict` below mirrors bpf/lib/policy.h).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from cilia.identity import (
    CIDR_IDENTITY_BASE,
    HOST,
    INIT,
    NAMESPACE_NAME_LABEL,
    REMOTE_NODE,
    WORLD,
    SecurityLabels,
    split_labels,
)
from cilia.policy import PolicyError, cnp_model
from cilia.policy.cilia_model import (
    CiliaPolicy,
    CRule,
    extended_labels,
    from_network_policy,
    names_namespace,
    parse_cilia_policy,
)
from cilia.policy.cilia_model import declared_types as cilia_declared_types
from cilia.policy.cnp_model import ClusterNetworkPolicy, parse_cluster_network_policy
from cilia.policy.model import (
    EGRESS,
    INGRESS,
    declared_types,
    parse_network_policy,
)
from cilia.policy.selector import Selector

ANY = 0  # peer identity and protocol wildcard (IDENTITY_ANY in bpf/include/cilia/policy.h)
CIDR_VIEW = 0x80000000  # IDENTITY_CIDR_VIEW: keys of CIDR rules, probed with a peer's CIDR
ICMP = 1
L4_PROTOCOLS = (6, 17, 132)  # what "ANY" protocol with a port means: TCP, UDP, SCTP
ALLOW = 1  # enum policy_action; a ClusterNetworkPolicy's Accept
DENY = 2
PASS = 3  # Admin and Baseline tiers: the next tier decides
TIER_NETWORK_POLICY, TIER_ADMIN, TIER_BASELINE = 0, 1, 2  # enum policy_tier
TIER_NAMES = {TIER_NETWORK_POLICY: "NetworkPolicy", TIER_ADMIN: "Admin",
              TIER_BASELINE: "Baseline"}
# A rule's rank (policy_value.rank, 16 bits) is its policy's priority and then its own
# order: a slot per rule the API allows a policy in one direction.
RANK_SLOTS = cnp_model.MAX_RULES


def rank_of(priority: int, index: int) -> int:
    return priority * RANK_SLOTS + index
DIRS = {INGRESS: 1, EGRESS: 2}  # enum policy_dir
WORLD_NET = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ip: str | None
    identity: int
    ports: tuple[tuple[str, int, int], ...] = ()  # (name, IP protocol, number)


@dataclass(frozen=True)
class RuleRef:
    """Which rule of which policy: what a cookie stands for. A ClusterNetworkPolicy's
    rule also says its tier, its policy's priority, its own name and its action."""

    kind: str
    namespace: str
    name: str
    direction: str
    index: int
    tier: str = ""
    priority: int = 0
    rule_name: str = ""
    action: str = ""

    def __str__(self) -> str:
        if self.tier:
            named = f" {self.rule_name!r}" if self.rule_name else ""
            return (f"{self.kind} {self.name} ({self.tier} tier, priority {self.priority}) "
                    f"{self.direction}[{self.index}]{named}: {self.action}")
        return f"{self.kind} {self.namespace}/{self.name} {self.direction}[{self.index}]"


class EntryKey(NamedTuple):
    """One policy map key without the endpoint: proto 0 is any protocol (and any port);
    port_bits 0 is any port, 16 one port, in between a block of a range. A tuple: the
    agent hashes and compares tens of thousands of them at every sync."""

    dir: int
    identity: int
    proto: int
    port: int
    port_bits: int
    tier: int = TIER_NETWORK_POLICY

    @property
    def prefixlen(self) -> int:
        if self.proto == ANY:
            return 64
        return 72 if self.port_bits == 0 else 80 + self.port_bits

    def covers(self, proto: int, port: int) -> bool:
        if self.proto == ANY:
            return True
        if self.proto != proto:
            return False
        shift = 16 - self.port_bits
        return (port >> shift) == (self.port >> shift)

    def port_text(self) -> str:
        if self.proto == ANY:
            return "any"
        name = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}.get(self.proto, str(self.proto))
        if self.port_bits == 0:
            return f"*/{name}"
        lo = self.port
        hi = self.port | ((1 << (16 - self.port_bits)) - 1)
        return f"{lo}/{name}" if lo == hi else f"{lo}-{hi}/{name}"

    def ancestors(self):
        """The keys of the same tier, direction and peer whose prefix contains this one's,
        most specific last: what the longest-prefix match falls back to."""
        if self.proto == ANY:
            return
        yield EntryKey(self.dir, self.identity, ANY, 0, 0, self.tier)
        for bits in range(self.port_bits):
            mask = (0xFFFF << (16 - bits)) & 0xFFFF
            yield EntryKey(self.dir, self.identity, self.proto, self.port & mask, bits,
                           self.tier)


class Entry(NamedTuple):
    """What a key says and which rule said it. A tuple, compared by the ten thousand
    (the agent reuses an endpoint's values while its entries compare equal)."""

    action: int
    rule: RuleRef
    rank: int = 0  # Admin and Baseline tiers: the rule's order in its tier, lower wins


@dataclass
class EndpointPolicy:
    ingress_enforced: bool = False
    egress_enforced: bool = False
    entries: dict[EntryKey, Entry] = field(default_factory=dict)
    # The endpoint has Admin or Baseline tier entries in that direction
    # (ENDPOINT_F_TIERED_*): the datapath looks those tiers up only then.
    tiered_ingress: bool = False
    tiered_egress: bool = False

    def enforced(self, direction: str) -> bool:
        return self.ingress_enforced if direction == INGRESS else self.egress_enforced

    def tiered(self, direction: str) -> bool:
        return self.tiered_ingress if direction == INGRESS else self.tiered_egress


@dataclass
class PolicyStatus:
    kind: str
    namespace: str
    name: str
    valid: bool
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)


@dataclass
class Compiled:
    endpoints: dict[int, EndpointPolicy]
    cidrs: dict[ipaddress.IPv4Network, int]  # ipBlock prefixes and their CIDR identities
    statuses: list[PolicyStatus]

    def entries_by_policy(self) -> dict[tuple[str, str, str], int]:
        """(kind, namespace, name) -> the policy map entries it takes on this node."""
        out: dict[tuple[str, str, str], int] = {}
        for pol in self.endpoints.values():
            for entry in pol.entries.values():
                key = (entry.rule.kind, entry.rule.namespace, entry.rule.name)
                out[key] = out.get(key, 0) + 1
        return out


class CidrIdentities:
    """Node-local identities for ipBlock prefixes, stable for the agent's lifetime so a
    recompile changes only what changed. 0.0.0.0/0 is the world."""

    def __init__(self):
        self._ids: dict[ipaddress.IPv4Network, int] = {WORLD_NET: WORLD}
        self._next = CIDR_IDENTITY_BASE + 1

    def get(self, net: ipaddress.IPv4Network) -> int:
        if net not in self._ids:
            self._ids[net] = self._next
            self._next += 1
        return self._ids[net]

    def prefix_of(self, identity: int) -> ipaddress.IPv4Network | None:
        for net, n in self._ids.items():
            if n == identity:
                return net
        return None


def port_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The smallest set of (value, top bits fixed) blocks covering [lo, hi] exactly."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


class Compiler:
    """Compiles a node's policy whole, but remembers what does not change between
    compiles, so that one changed policy costs about what that policy costs:
    - parsed policies, by the stored object itself (datastores hand out the same object
      until it changes, and objects are never changed in place);
    - the identities each peer selector matches, while the identities (and the ipBlock
      prefixes) are the same;
    - the local endpoints each policy's selector selects, while the local endpoints and
      namespaces' labels are the same;
    - each policy's entries, while it is the same object selecting the same endpoints
      and all of the above, and every pod's address, identity and ports, hold.
    The result is exactly what a fresh Compiler would give (tests/unit/
    test_policy_compiler_cache.py holds it to that over random changes)."""

    def __init__(self, cidr_ids: CidrIdentities | None = None):
        self.cidr_ids = cidr_ids or CidrIdentities()
        # id(obj) -> (obj, model or None, warnings, error); obj kept so the id stays its
        self._parsed: dict[int, tuple[dict, object | None, tuple[str, ...], str]] = {}
        self._peers: dict[tuple, frozenset[int]] = {}
        self._peers_for: tuple | None = None
        self._selected: dict[tuple, tuple[int, ...]] = {}
        self._selected_for: tuple | None = None
        # id(obj) -> (obj, selected endpoints, [(endpoint, key, entry)]): each policy's part
        self._entries: dict[int, tuple] = {}
        self._entries_for: tuple | None = None
        # endpoint -> (the tier entry lists it was resolved from, its resolved entries)
        self._tiers_resolved: dict[int, tuple[list[list], dict]] = {}

    def compile(
        self,
        policies: list[dict],
        pods: list[PodView],
        namespaces: Mapping[str, Mapping[str, str]],
        local: Mapping[int, PodView],
        cilia_policies: Iterable[dict] = (),
        refused: Mapping[tuple[str, str, str], str] | None = None,
        cluster_policies: Iterable[dict] = (),
    ) -> Compiled:
        """`local` maps this node's endpoint ids to their pods; `cilia_policies` are
        CiliaNetworkPolicy and CiliaClusterwideNetworkPolicy objects; `cluster_policies`
        ClusterNetworkPolicy objects (the Admin and Baseline tiers); `refused`: policies
        to treat as invalid, with why (their pods isolated, nothing allowed)."""
        refused = refused or {}
        seen: dict[int, tuple] = {}
        # One model for both families: NetworkPolicy becomes cilia's rule model as it is
        # parsed (cilia_model.from_network_policy), and one compiler serves both.
        parsed = self._parse_all(policies, _parse_network_policy, refused, seen)
        parsed += self._parse_all(cilia_policies, parse_cilia_policy, refused, seen)
        tiered = self._parse_all(cluster_policies, parse_cluster_network_policy, refused,
                                 seen)
        self._parsed = seen  # what was not seen this time is gone: forget it

        prefixes = {WORLD_NET}
        for _, model, _ in parsed + tiered:
            for _, rule in _crules(model):
                for block in rule.cidrs:
                    prefixes.add(block.cidr)
                    prefixes.update(block.excepts)
        # An egress rule's named port is each destination pod's own number, which pods
        # sharing an identity may not share: such entries are keyed by the pod's /32 in
        # the CIDR view, so each pod gets exactly its own number, never its twin's.
        names = _egress_port_names(parsed + tiered)
        prefixes.update(ipaddress.IPv4Network(f"{p.ip}/32") for p in pods
                        if p.ip and any(name in names for name, _, _ in p.ports))
        cidrs = {net: self.cidr_ids.get(net) for net in prefixes}
        self._pod_keys = {str(net.network_address): ident | CIDR_VIEW
                          for net, ident in cidrs.items() if net.prefixlen == 32}
        self._index = PrefixIndex(cidrs)

        identities: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
        for pod in pods:
            ns_labels = {**namespaces.get(pod.namespace, {}),
                         NAMESPACE_NAME_LABEL: pod.namespace}
            identities.setdefault(pod.identity, (dict(pod.labels), ns_labels))
        universe = (_labels_key(identities), frozenset(cidrs.items()))
        if universe != self._peers_for:
            self._peers, self._peers_for = {}, universe
        locals_key = (tuple((ep, pod.namespace, frozenset(pod.labels.items()))
                            for ep, pod in sorted(local.items())),
                      frozenset((ns, frozenset(lb.items())) for ns, lb in namespaces.items()),
                      universe[0])
        if locals_key != self._selected_for:
            self._selected, self._selected_for = {}, locals_key
        # A policy's entries depend on it, the endpoints it selects, and these: while
        # they hold, a policy that is the same object gives the same entries.
        inputs = (universe, locals_key, frozenset((p.ip, p.identity, p.ports) for p in pods),
                  tuple((ep, pod.ip, pod.ports) for ep, pod in sorted(local.items())))
        if inputs != self._entries_for:
            self._entries, self._entries_for = {}, inputs
        kept: dict[int, tuple] = {}

        out = {ep: EndpointPolicy() for ep in local}
        for obj, cpol, status in parsed:
            self._compile(obj, cpol, status, out, local, pods, identities, cidrs, kept)
        for pol in out.values():
            _deny_wins(pol.entries)
        self._compile_tiers(tiered, out, local, pods, identities, cidrs, kept)
        self._entries = kept
        return Compiled(out, cidrs, [s for _, _, s in parsed + tiered])

    def _policy_entries(self, obj: dict, selected: tuple[int, ...], compute, kept: dict
                        ) -> list[tuple[int, EntryKey, Entry]]:
        """A policy's (endpoint, key, entry) list, in the order it is applied: what an
        earlier compile made for this very object and these endpoints, else computed."""
        hit = self._entries.get(id(obj))
        if hit is None or hit[0] is not obj or hit[1] != selected:
            hit = (obj, selected, compute())
        kept[id(obj)] = hit
        return hit[2]

    def _compile(self, obj, cpol, status, out, local, pods, identities, cidrs, kept
                 ) -> None:
        """One policy of either family: the endpoints it selects become enforced in its
        directions (a rejected one's too: fail closed), then its entries."""
        ns = status.namespace

        def extended(pod: PodView) -> dict[str, str]:
            return extended_labels(pod.labels, pod.namespace, identities.get(
                pod.identity, ({}, {}))[1])

        if cpol is None and status.kind == "NetworkPolicy":
            selector, types = _selector_or_all(obj), declared_types(obj)
        elif cpol is None:
            try:
                selector = Selector.parse((obj.get("spec") or {}).get("endpointSelector"),
                                          "spec.endpointSelector")
            except (PolicyError, AttributeError):
                selector = Selector()
            types = cilia_declared_types(obj)
        else:
            selector, types = cpol.endpoint_selector, cpol.types
        selected = _isolate(out, local, status, types, self._selection(
            ("cilia", ns, selector), local, lambda pod: (
                (not ns or pod.namespace == ns) and selector.matches(extended(pod)))))
        if cpol is None:
            return

        def compute():
            made = []
            for (direction, deny), rules in sorted(cpol.rules.items()):
                for index, rule in enumerate(rules):
                    ref = RuleRef(cpol.kind, ns, cpol.name,
                                  direction + ("Deny" if deny else ""), index)
                    peers = self._cilia_peers(rule, ns, identities, cidrs)
                    if deny and (rule.endpoints or "cluster" in rule.entities):
                        # A pod whose identity could not be had is INIT (agent/policy.py):
                        # no allow by labels matches it, and every deny by labels does,
                        # so a pod that cannot be told apart is never let past a deny.
                        peers.add(INIT)
                    entry = Entry(DENY if deny else ALLOW, ref)
                    for ep in selected:
                        made.extend((ep, key, entry) for key in self._cilia_keys(
                            direction, peers, rule, local[ep], pods))
            return made

        for ep, key, entry in self._policy_entries(obj, selected, compute, kept):
            entries = out[ep].entries
            if entry.action == DENY:
                entries[key] = entry
            else:
                entries.setdefault(key, entry)

    def _compile_tiers(self, tiered, out, local, pods, identities, cidrs, kept) -> None:
        """The Admin and Baseline tiers. Each rule's rank is its order in its tier:
        priority, then rule order (rank_of), stable whatever else is stored, so a new
        policy changes no other policy's entries; policies of the same priority may tie,
        as the API allows. Each endpoint's entries carry, per tier, direction and peer
        key, the best rank among the rules whose match contains the key (tier_resolve),
        so the datapath's three longest-prefix lookups per tier find the first matching
        rule (bpf/include/cilia/policy.h); an endpoint whose policies' entries are the
        same objects as at the last compile keeps its resolved entries. A policy cilia
        refuses denies everything its subject does in its directions, at its own
        priority (fail closed)."""
        tiers = {cnp_model.ADMIN: TIER_ADMIN, cnp_model.BASELINE: TIER_BASELINE}
        actions = {cnp_model.ACCEPT: ALLOW, cnp_model.DENY: DENY, cnp_model.PASS: PASS}
        contributions: dict[int, list[list]] = {}
        for obj, model, status in tiered:
            spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
            tier = tiers.get(model.tier if model else spec.get("tier"), TIER_ADMIN)
            priority = model.priority if model else spec.get("priority")
            if not isinstance(priority, int) or not 0 <= priority <= cnp_model.MAX_PRIORITY:
                priority = cnp_model.MAX_PRIORITY
            subject = model.subject if model else cnp_model.subject_of(obj)
            if model is not None:
                rules = model.rules
            else:  # refused: deny all in the directions it has rules in (both if unclear)
                deny_all = cnp_model.TierRule(cnp_model.DENY, "refused",
                                              CRule(entities=frozenset({"all"})))
                named = [d for d in (INGRESS, EGRESS) if spec.get(d)] or [INGRESS, EGRESS]
                rules = {d: (deny_all,) for d in named}
            if subject is None:
                status.selected = []
                continue
            selected = self._selection(("cnp", subject), local, lambda pod, subject=subject:
                                       subject.matches(extended_labels(
                                           pod.labels, pod.namespace, identities.get(
                                               pod.identity, ({}, {}))[1])))
            status.selected = sorted(f"{local[ep].namespace}/{local[ep].name}"
                                     for ep in selected)
            name = (obj.get("metadata") or {}).get("name", "")

            def compute(rules=rules, tier=tier, name=name, priority=priority,
                        selected=selected):
                made: dict[int, list[tuple[EntryKey, Entry]]] = {}
                for direction, drules in rules.items():
                    for index, rule in enumerate(drules):
                        ref = RuleRef(cnp_model.KIND, "", name, direction, index,
                                      TIER_NAMES[tier], priority, rule.name, rule.action)
                        entry = Entry(actions[rule.action], ref, rank_of(priority, index))
                        peers = self._cilia_peers(rule.match, "", identities, cidrs)
                        if rule.action == cnp_model.DENY and rule.match.endpoints:
                            peers.add(INIT)  # a pod with no identity is never let past
                        for ep in selected:
                            made.setdefault(ep, []).extend(
                                (key._replace(tier=tier), entry) for key in self._cilia_keys(
                                    direction, peers, rule.match, local[ep], pods))
                return made

            made = self._policy_entries(obj, selected, compute, kept)
            for ep, entries in made.items():
                contributions.setdefault(ep, []).append(entries)
        resolved = {}
        for ep, lists in contributions.items():
            hit = self._tiers_resolved.get(ep)
            if hit is None or len(hit[0]) != len(lists) or any(
                    a is not b for a, b in zip(hit[0], lists, strict=True)):
                hit = (lists, tier_resolve(e for entries in lists for e in entries))
            resolved[ep] = hit
            pol = out[ep]
            pol.entries.update(hit[1])
            pol.tiered_ingress = any(k.dir == DIRS[INGRESS] for k in hit[1])
            pol.tiered_egress = any(k.dir == DIRS[EGRESS] for k in hit[1])
        self._tiers_resolved = resolved

    def _parse_all(self, objs: Iterable[dict], parse,
                   refused: Mapping[tuple[str, str, str], str], seen: dict[int, tuple]
                   ) -> list[tuple[dict, object | None, PolicyStatus]]:
        """Each policy with its parsed model (None if rejected) and its status.
        `refused`: (kind, namespace, name) -> why, for policies refused before parsing
        (too big). A policy parsed before, as this very object, is not parsed again
        (`seen` collects this compile's)."""
        out = []
        for obj in sorted(objs, key=_policy_sort_key):
            meta = obj.get("metadata") or {}
            kind = obj.get("kind") or "NetworkPolicy"
            ns = ("" if kind in ("CiliaClusterwideNetworkPolicy", cnp_model.KIND)
                  else meta.get("namespace") or "default")
            status = PolicyStatus(kind, ns, meta.get("name", ""), valid=True)
            if (why := refused.get((kind, ns, status.name))) is not None:
                status.valid, status.error = False, str(PolicyError("spec", why))
                out.append((obj, None, status))
                continue
            hit = self._parsed.get(id(obj))
            if hit is None or hit[0] is not obj:
                try:
                    model = parse(obj)
                    hit = (obj, model, tuple(model.warnings), "")
                except PolicyError as err:
                    hit = (obj, None, (), str(err))
            seen[id(obj)] = hit
            _, model, warnings, error = hit
            status.warnings = list(warnings)
            if model is None:
                status.valid, status.error = False, error
            out.append((obj, model, status))
        return out

    def _selection(self, key: tuple, local: Mapping[int, PodView], selects
                   ) -> tuple[int, ...]:
        """The local endpoints `selects` picks, remembered under `key` (what decides
        them: the selector and its namespace) while the local endpoints stay the same."""
        if (hit := self._selected.get(key)) is None:
            hit = self._selected[key] = tuple(ep for ep, pod in local.items() if selects(pod))
        return hit

    def _cilia_peers(self, rule: CRule, ns: str, identities, cidrs) -> set[int]:
        key = ("cilia", rule, ns)
        if (hit := self._peers.get(key)) is None:
            hit = self._peers[key] = frozenset(self._cilia_peers_now(rule, ns, identities,
                                                                     cidrs))
        return set(hit)

    def _cilia_peers_now(self, rule: CRule, ns: str, identities, cidrs) -> set[int]:
        if rule.any_peer:
            return {ANY}
        found: set[int] = set()
        for selector in rule.endpoints:
            scoped = ns and not names_namespace(selector)
            for ident, (pod_labels, ns_labels) in identities.items():
                name = ns_labels.get(NAMESPACE_NAME_LABEL, "")
                if scoped and name != ns:
                    continue
                if selector.matches(extended_labels(pod_labels, name, ns_labels)):
                    found.add(ident)
        for block in rule.cidrs:
            found.update(self._index.block_identities(block))
        for entity in rule.entities:
            if entity == "all":
                found.add(ANY)
            elif entity == "host":
                found.add(HOST)
            elif entity == "remote-node":
                found.add(REMOTE_NODE)
            elif entity == "world":
                found.update(cidrs.values())  # WORLD (0.0.0.0/0) and every CIDR identity
            elif entity == "cluster":
                found.update(identities)
                found.update((HOST, REMOTE_NODE))
        return found

    def _cilia_keys(self, direction, peers, rule: CRule, pod: PodView, pods):
        d = DIRS[direction]
        if rule.ports is None and not rule.icmp_types:
            for ident in peers:
                yield EntryKey(d, ident, ANY, 0, 0)
            return
        for t in rule.icmp_types:
            for ident in peers:
                yield EntryKey(d, ident, ICMP, t, 16)
        for port in rule.ports or ():
            protos = L4_PROTOCOLS if port.proto == ANY else (port.proto,)
            if port.port is None and port.proto == ANY:
                for ident in peers:
                    yield EntryKey(d, ident, ANY, 0, 0)
                continue
            if not isinstance(port.port, str):
                blocks = ([(0, 0)] if port.port is None else
                          port_prefixes(port.port, port.end_port or port.port))
                for ident in peers:
                    for proto in protos:
                        for value, bits in blocks:
                            yield EntryKey(d, ident, proto, value, bits)
                continue
            # named port: this pod's own (ingress) or each destination pod's (egress)
            if direction == INGRESS:
                for name, proto, number in pod.ports:
                    if name == port.port and proto in protos:
                        for ident in peers:
                            yield EntryKey(d, ident, proto, number, 16)
                continue
            for peer_pod in pods:
                if not self._peer_pod(peer_pod, peers):
                    continue
                for name, proto, number in peer_pod.ports:
                    if name == port.port and proto in protos and peer_pod.ip:
                        yield EntryKey(d, self._pod_keys[peer_pod.ip], proto, number, 16)

    def _peer_pod(self, pod: PodView, peers: set[int]) -> bool:
        """Whether a rule's peers take in `pod`, for its named ports: by identity, or by
        address, inside an ipBlock / CIDR peer (its /32 is among the CIDR-view keys the
        block gives), as sig-network's reference implementation resolves an egress named
        port against the destination pod whatever peer matched it."""
        return bool(pod.ip) and (ANY in peers or pod.identity in peers
                                 or self._pod_keys.get(pod.ip) in peers)


def _crules(model) -> Iterable[tuple[str, CRule]]:
    """(direction, match) of every rule of a parsed policy of any family; none for a
    rejected one."""
    if isinstance(model, ClusterNetworkPolicy):
        for direction, rules in model.rules.items():
            for rule in rules:
                yield direction, rule.match
    elif model is not None:
        for (direction, _), rules in model.rules.items():
            for rule in rules:
                yield direction, rule


def _egress_port_names(parsed) -> set[str]:
    """The port names egress rules of valid policies refer to."""
    return {p.port for _, model, _ in parsed for direction, rule in _crules(model)
            if direction == EGRESS for p in rule.ports or () if isinstance(p.port, str)}


def _parse_network_policy(obj: dict) -> CiliaPolicy:
    return from_network_policy(parse_network_policy(obj))


def _labels_key(identities: Mapping[int, tuple[Mapping[str, str], Mapping[str, str]]]
                ) -> frozenset:
    """What the identities are, hashable: whether a cache of matches still holds."""
    return frozenset((ident, frozenset(pod.items()), frozenset(ns.items()))
                     for ident, (pod, ns) in identities.items())


def _isolate(out: dict[int, EndpointPolicy], local: Mapping[int, PodView],
             status: PolicyStatus, types: frozenset[str], selected: tuple[int, ...]
             ) -> tuple[int, ...]:
    """The local endpoints a policy selects, now enforced in the policy's directions."""
    status.selected = sorted(f"{local[ep].namespace}/{local[ep].name}" for ep in selected)
    for ep in selected:
        if INGRESS in types:
            out[ep].ingress_enforced = True
        if EGRESS in types:
            out[ep].egress_enforced = True
    return selected


class PrefixIndex:
    """The known prefixes sorted by address, so the prefixes inside a block are one
    bisected slice: O(log n + k) per block instead of a scan of every prefix (10,000
    ipBlocks took minutes that way)."""

    def __init__(self, cidrs: Mapping[ipaddress.IPv4Network, int]):
        entries = sorted((int(net.network_address), net.prefixlen, ident)
                         for net, ident in cidrs.items())
        self._starts = [e[0] for e in entries]
        self._entries = entries

    def inside(self, net: ipaddress.IPv4Network):
        """(start, prefixlen, identity) of every known prefix within `net`."""
        lo, hi = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_left(self._starts, lo)
        j = bisect.bisect_right(self._starts, hi)
        return [e for e in self._entries[i:j] if e[1] >= net.prefixlen]

    def block_identities(self, block) -> set[int]:
        """The CIDR-view keys of an ipBlock: every known prefix inside it and outside its
        holes (the datapath's longest-prefix match resolves an address to exactly one)."""
        holes = {(start, plen) for e in block.excepts for start, plen, _ in self.inside(e)}
        return {ident | CIDR_VIEW for start, plen, ident in self.inside(block.cidr)
                if (start, plen) not in holes}


def tier_resolve(entries: Iterable[tuple[EntryKey, Entry]]) -> dict[EntryKey, Entry]:
    """Admin and Baseline tier entries as the datapath must find them: each key holds the
    best-ranked entry among those at its key and at every key containing it (its
    ancestors), so the longest-prefix match of a lookup is the first rule, in the tier's
    order, that matches it through that peer key. Only keys of one (tier, direction,
    peer) contain each other: through the protocol wildcard or nested port prefixes.
    Ties (policies of one priority) go to the policy named first."""
    groups: dict[tuple[int, int, int], dict[EntryKey, Entry]] = {}
    for key, entry in entries:
        group = groups.setdefault((key.tier, key.dir, key.identity), {})
        held = group.get(key)
        if held is None or (entry.rank, entry.rule.name) < (held.rank, held.rule.name):
            group[key] = entry
    out: dict[EntryKey, Entry] = {}
    for (tier, d, ident), group in groups.items():
        if len(group) == 1:
            out.update(group)
            continue
        wildcard = group.get(EntryKey(d, ident, ANY, 0, 0, tier))
        per_proto: dict[int, int] = {}
        for key in group:
            per_proto[key.proto] = per_proto.get(key.proto, 0) + 1
        for key, entry in group.items():
            if key.proto != ANY:
                if wildcard is not None and wildcard.rank < entry.rank:
                    entry = wildcard
                if per_proto[key.proto] > 1:
                    for above in key.ancestors():
                        held = group.get(above) if above.proto != ANY else None
                        if held is not None and held.rank < entry.rank:
                            entry = held
            out[key] = entry
    return out


def _deny_wins(entries: dict[EntryKey, Entry]) -> None:
    """An allow inside a deny's prefix would win the longest-prefix match; make it a deny
    (it denies exactly what it allowed), so the datapath's answer is the deny's."""
    denies = [k for k, e in entries.items() if e.action == DENY]
    if not denies:
        return
    for key, entry in list(entries.items()):
        if entry.action != ALLOW or key.tier != TIER_NETWORK_POLICY:
            continue
        for d in denies:
            if d.dir == key.dir and d.identity == key.identity and d.prefixlen <= key.prefixlen \
                    and (d.proto == ANY or (d.proto == key.proto
                                            and d.covers(key.proto, key.port))):
                entries[key] = entries[d]
                break


def _selector_or_all(obj: dict) -> Selector:
    """An invalid policy's pod selector if it parses, else every pod of the namespace."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    try:
        return Selector.parse(spec.get("podSelector"), "spec.podSelector")
    except PolicyError:
        return Selector()


def _policy_sort_key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta.get("name", ""))


def _lookup(policy: EndpointPolicy, tier: int, d: int, ident: int, proto: int, port: int
            ) -> Entry | None:
    """The longest-prefix match of one key, as the trie finds it."""
    best = None
    for key, entry in policy.entries.items():
        if key.tier == tier and key.dir == d and key.identity == ident \
                and key.covers(proto, port):
            if best is None or key.prefixlen > best[0].prefixlen:
                best = (key, entry)
    return best[1] if best else None


def _tier_verdict(policy: EndpointPolicy, tier: int, d: int, identity: int,
                  cidr_identity: int, proto: int, port: int) -> Entry | None:
    found = None
    for ident in (identity, cidr_identity | CIDR_VIEW, ANY):
        entry = _lookup(policy, tier, d, ident, proto, port)
        if entry is not None and (found is None or entry.rank < found.rank):
            found = entry
    return found


def verdict(
    policy: EndpointPolicy, direction: str, identity: int, cidr_identity: int,
    proto: int, port: int,
) -> tuple[bool, Entry | None]:
    """(allowed, deciding entry): the datapath's policy_verdict(), in Python."""
    d = DIRS[direction]
    tiered = policy.tiered(direction)
    if tiered:
        entry = _tier_verdict(policy, TIER_ADMIN, d, identity, cidr_identity, proto, port)
        if entry is not None and entry.action in (ALLOW, DENY):
            return entry.action == ALLOW, entry
    if policy.enforced(direction):
        found: Entry | None = None
        for ident in (identity, cidr_identity | CIDR_VIEW, ANY):
            entry = _lookup(policy, TIER_NETWORK_POLICY, d, ident, proto, port)
            if entry:
                if entry.action == DENY:
                    return False, entry
                found = found or entry
        return (found is not None), found
    if tiered:
        entry = _tier_verdict(policy, TIER_BASELINE, d, identity, cidr_identity, proto, port)
        if entry is not None and entry.action in (ALLOW, DENY):
            return entry.action == ALLOW, entry
    return True, None


def identity_labels_text(labels: SecurityLabels) -> str:
    pod, ns = split_labels(labels)
    name = ns.get(NAMESPACE_NAME_LABEL, "?")
    return f"{name}/{{{','.join(f'{k}={v}' for k, v in sorted(pod.items()))}}}"
