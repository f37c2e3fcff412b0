"""NetworkPolicy → per-endpoint, per-direction entries of the BPF policy map.

The compiler is a pure function of a snapshot of the cluster (pods with identities and
named ports, namespaces, policies) and of this node's endpoints; the agent writes what
it returns, `cilia policy get` prints it, and the unit tests check it with the same
lookup semantics as the datapath (`verdict` below mirrors bpf/lib/policy.h).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import is_, itemgetter
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
_RULE_OF = itemgetter(1)  # Entry.rule
# One empty frozenset for all: CPython makes a new one (216 bytes) each time, and most
# policies have no prefixes, no egress named ports, no entities (3,600 of them at 1,000
# policies).
_EMPTY: frozenset = frozenset()


_ANY_PEER = frozenset({ANY})


def _frozen(items: Iterable) -> frozenset:
    return frozenset(items) or _EMPTY


@dataclass(frozen=True, slots=True)
class PodView:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ip: str | None
    identity: int
    ports: tuple[tuple[str, int, int], ...] = ()  # (name, IP protocol, number)


class RuleRef(NamedTuple):
    """Which rule of which policy: what a cookie stands for. A ClusterNetworkPolicy's
    rule also says its tier, its policy's priority, its own name and its action. A
    tuple: entries are counted by it (hashed in C) at every assembly."""

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
    # (kind, namespace, name) -> the policy map entries it takes on this node, as the
    # compiler counted them while it assembled each endpoint
    counts: dict[tuple[str, str, str], int]
    # namespace -> the entries its namespaced policies take (charged_namespace)
    namespace_counts: dict[str, int]

    def entries_by_policy(self) -> dict[tuple[str, str, str], int]:
        """(kind, namespace, name) -> the policy map entries it takes on this node."""
        return dict(self.counts)

    def entries_by_namespace(self) -> dict[str, int]:
        """namespace -> the policy map entries its namespaced policies take."""
        return dict(self.namespace_counts)


def charged_namespace(policy: tuple[str, str, str]) -> str:
    """The namespace whose share of the policy map a policy's entries count against
    (kind, namespace, name): its own; none ("") for a cluster-wide one."""
    kind, ns, _ = policy
    return ns if kind != "CiliaClusterwideNetworkPolicy" else ""


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


FAMILY_NETWORK_POLICY, FAMILY_CILIA, FAMILY_TIERED = 0, 1, 2
_PARSERS = {}  # family -> parse function, filled below the parsers' definitions


class _Policy:
    """One stored policy object as compiled on this node: what it selects, what it adds
    to each selected endpoint's entries, and what that depends on (the selection and
    peer sets it read), so that a change elsewhere recomputes it only when it must."""

    __slots__ = ("obj", "family", "kind", "ns", "name", "order", "parsed", "warnings",
                 "error", "refused", "model", "selection", "types", "selected", "ref",
                 "entries", "peer_keys", "named_out", "prefixes",
                 "egress_names", "status")

    def __init__(self, obj: dict, family: int):
        meta = obj.get("metadata") or {}
        self.obj, self.family = obj, family
        self.kind = obj.get("kind") or "NetworkPolicy"
        self.ns = ("" if self.kind in ("CiliaClusterwideNetworkPolicy", cnp_model.KIND)
                   else meta.get("namespace") or "default")
        self.name = meta.get("name", "")
        self.ref = (self.kind, self.ns, self.name)
        # the order policies are applied in: by family, then namespace and name (a
        # CiliaNetworkPolicy before a cluster-wide one of the same name)
        self.order = (family, *_policy_sort_key(obj),
                      self.kind == "CiliaClusterwideNetworkPolicy")
        try:
            self.parsed = _PARSERS[family](obj)
            self.warnings, self.error = tuple(self.parsed.warnings), ""
        except PolicyError as err:
            self.parsed, self.warnings, self.error = None, (), str(err)
        self.refused: str | None = None
        self.model = self.parsed
        rules = list(_crules(self.parsed))
        self.prefixes = _frozen(net for _, rule in rules for block in rule.cidrs
                                for net in (block.cidr, *block.excepts))
        self.egress_names = _frozen(p.port for d, rule in rules if d == EGRESS
                                    for p in rule.ports or () if isinstance(p.port, str))
        self.named_out = bool(self.egress_names)
        self.selection: tuple = ()
        self.types: frozenset[str] = _EMPTY
        self.selected: tuple[int, ...] = ()
        self.entries: dict[int, list[tuple[EntryKey, Entry]]] = {}
        self.peer_keys: tuple = ()
        self.status: PolicyStatus | None = None  # until computed

    def refuse(self, why: str | None) -> None:
        """Treated as invalid (too big for the map), or no longer: its model is what
        was parsed again."""
        self.refused = why
        self.model = None if why is not None else self.parsed


class Compiler:
    """Compiles a node's policy, incrementally: each stored policy object is parsed
    once, and its entries are computed again only when one of their inputs changed:
    - the object itself (a changed object is a new object: datastores hand out the same
      object until it changes, and objects are never changed in place), or whether it
      is refused;
    - the local endpoints its selector selects (a selection cache: each distinct
      selector and its endpoints, updated by the endpoints that changed);
    - the identities a peer selector of its rules matches (a selector cache: each
      distinct rule's peers, updated by the identities that came, went or changed, and
      by the ipBlock prefixes when they change);
    - named ports: the ports of the endpoints it selects (ingress) or of every pod
      (egress).
    Each endpoint's entries are assembled again only when a policy selecting it, or it,
    changed. The result is exactly what a fresh Compiler would give (tests/unit/
    test_policy_compiler_cache.py holds it to that over random changes)."""

    def __init__(self, cidr_ids: CidrIdentities | None = None):
        self.cidr_ids = cidr_ids or CidrIdentities()
        self._states: dict[int, _Policy] = {}  # id(obj) -> its compiled part
        self._named: dict[tuple[str, str, str], set[int]] = {}  # (kind, ns, name) -> ids
        self._refused: Mapping[tuple[str, str, str], str] = {}  # the last compile's
        # the policies in their order, with their order keys and statuses beside
        self._ordered: list[_Policy] = []
        self._order_keys: list[tuple] = []
        self._named_out: set[int] = set()  # policies whose egress rules name ports
        self._prefixes_changed = True  # a prefix came or went: the CIDRs to compute again
        self._prefix_refs: dict[ipaddress.IPv4Network, int] = {}
        self._name_refs: dict[str, int] = {}  # egress port names in use
        self._cidrs: dict[ipaddress.IPv4Network, int] = {}
        self._index = PrefixIndex({})
        self._pod_keys: dict[str, int] = {}
        self._named_pods: frozenset = _EMPTY
        self._identities: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
        # endpoint -> (its pod's view, its labels with its namespace's, the namespace's)
        self._local: dict[int, tuple[PodView, dict[str, str], dict[str, str]]] = {}
        # selection key -> [the local endpoints it selects, users]
        self._selections: dict[tuple, list] = {}
        # (rule, namespace) -> [peers by labels, peers by prefix, fixed peers, users]
        self._peers: dict[tuple, list] = {}
        self._by_endpoint: dict[int, set[int]] = {}  # endpoint -> policies selecting it
        self._out: dict[int, EndpointPolicy] = {}
        self._counts: dict[int, dict[tuple[str, str, str], int]] = {}  # endpoint's
        self._totals: dict[tuple[str, str, str], int] = {}
        self._namespace_totals: dict[str, int] = {}
        self._statuses: list[PolicyStatus | None] = []  # in order
        self._statuses_out: list[PolicyStatus] = []  # the last handed out, a copy
        self._statuses_stale = False
        # (kind, namespace, name) -> (its status before, its status now) for each status
        # made since take_renewed() was last called; `departed`: statuses of policies
        # gone in this compile, the "before" of a policy stored again under its name
        self._renewed: dict[tuple[str, str, str], tuple[PolicyStatus | None,
                                                         PolicyStatus]] = {}
        self._departed: dict[tuple[str, str, str], PolicyStatus] = {}
        # endpoint -> (the tier entry lists it was resolved from, its resolved entries)
        self._tiers_resolved: dict[int, tuple[list[list], dict]] = {}
        # family -> (the objects of the last compile, by id)
        self._given: dict[int, tuple[list[dict], dict[int, dict]]] = {}

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
        dirty: set[int] = set()  # policies to compute again
        endpoints: set[int] = set()  # endpoints to assemble again

        # 1. The policies: new objects parsed, gone ones forgotten. One model for both
        # families: NetworkPolicy becomes cilia's rule model as it is parsed
        # (cilia_model.from_network_policy), and one compiler serves both.
        # A stored object stays the same object until it changes, and the compiler
        # holds each one it knows: an id it knows is that object (set operations, in C,
        # so that 10,000 unchanged policies cost next to nothing).
        given, changed = [], []
        for family, objs in ((FAMILY_NETWORK_POLICY, policies), (FAMILY_CILIA, cilia_policies),
                             (FAMILY_TIERED, cluster_policies)):
            objs = objs if isinstance(objs, list) else list(objs)
            last = self._given.get(family)
            # the same objects as the last compile (compared in C): nothing to look for
            if last is None or len(last[0]) != len(objs) or not all(map(is_, last[0], objs)):
                last = self._given[family] = (objs, {id(obj): obj for obj in objs})
                changed.append((family, last[1]))
            given.append(last[1])
        known = self._states.keys()
        gone = set(known).difference(*given) if changed else ()
        self._departed = {}
        for key in gone:
            st = self._states.pop(key)
            if st.status is not None:
                self._departed[st.ref] = st.status
            if not self._named[st.ref].discard(key) and not self._named[st.ref]:
                del self._named[st.ref]
            self._named_out.discard(key)
            endpoints.update(self._forget(st))
            i = self._position(st)
            del self._ordered[i], self._order_keys[i], self._statuses[i]
            self._statuses_stale = True
        for family, objs in changed:
            for key in objs.keys() - known:
                st = self._states[key] = _Policy(objs[key], family)
                self._named.setdefault(st.ref, set()).add(key)
                if st.named_out:
                    self._named_out.add(key)
                self._count_refs(st, 1)
                i = bisect.bisect_right(self._order_keys, st.order)
                self._ordered.insert(i, st)
                self._order_keys.insert(i, st.order)
                self._statuses.insert(i, None)
                dirty.add(key)
        for ref in self._refused.keys() | refused.keys():
            for key in self._named.get(ref, ()):
                st = self._states[key]
                if (why := refused.get(ref)) != st.refused:
                    st.refuse(why)
                    dirty.add(key)
        self._refused = dict(refused)

        # 2. The prefixes that get CIDR identities: every ipBlock's, and the /32 of each
        # pod with a port an egress rule names. Such a named port is each destination
        # pod's own number, which pods sharing an identity may not share: its entries
        # are keyed by the pod's /32 in the CIDR view, so each pod gets exactly its own
        # number, never its twin's.
        names = self._name_refs
        named_pods = frozenset((p.ip, p.identity, p.ports) for p in pods
                               if p.ip and any(n in names for n, _, _ in p.ports)
                               ) if names else _EMPTY
        cidrs_changed = False
        if self._prefixes_changed or named_pods != self._named_pods:
            prefixes = {WORLD_NET, *self._prefix_refs}
            prefixes.update(ipaddress.IPv4Network(f"{ip}/32") for ip, _, _ in named_pods)
            cidrs_changed = prefixes != self._cidrs.keys()
            self._prefixes_changed = False
        if cidrs_changed:
            self._cidrs = {net: self.cidr_ids.get(net) for net in prefixes}
            self._pod_keys = {str(net.network_address): ident | CIDR_VIEW
                              for net, ident in self._cidrs.items() if net.prefixlen == 32}
            self._index = PrefixIndex(self._cidrs)
        named_changed = cidrs_changed or named_pods != self._named_pods
        self._named_pods = named_pods

        # 3. The identities, and the peer sets that changed with them.
        identities: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
        for pod in pods:
            if pod.identity not in identities:
                identities[pod.identity] = (dict(pod.labels), {
                    **namespaces.get(pod.namespace, {}), NAMESPACE_NAME_LABEL: pod.namespace})
        old = self._identities
        changed_ids = [i for i, v in identities.items() if old.get(i) != v]
        changed_ids += [i for i in old if i not in identities]
        self._identities = identities
        dirty_peers = self._update_peers(changed_ids, cidrs_changed)

        # 4. The local endpoints, and the selections that changed with them.
        changed_eps = self._update_local(local, identities)
        endpoints.update(changed_eps)
        touched_selections = self._update_selections(changed_eps)

        # 5. What must be computed again: whole (the object, its peers, the named ports
        # of its egress rules), or for the endpoints that changed in its selection only
        # (one came or went, a member's labels or ports changed).
        for key in dirty_peers:
            dirty.update(self._peers[key][-1])
        if named_changed:
            dirty.update(self._named_out)
        partly: set[int] = set()
        for key in touched_selections:
            partly.update(self._selections[key][-1])
        partly -= dirty
        for key in dirty:
            endpoints.update(self._compute(self._states[key], local, pods))
        for key in partly:
            endpoints.update(self._compute(self._states[key], local, pods, changed_eps))

        # 6. The endpoints whose entries may have changed, assembled again.
        for ep in endpoints:
            if ep in local:
                self._assemble(ep)
            else:
                self._out.pop(ep, None)
                self._tiers_resolved.pop(ep, None)
                self._recount(ep, {})
        if self._statuses_stale:
            self._statuses_out = list(self._statuses)
            self._statuses_stale = False
        # the prefixes and statuses as the same objects while they are the same:
        # readers may keep what they derive from them
        return Compiled(dict(self._out), self._cidrs, self._statuses_out,
                        dict(self._totals), dict(self._namespace_totals))

    def _position(self, st: _Policy) -> int:
        """Where a policy stands in the order (bisected; policies of one order key,
        which only a caller passing one object twice makes, side by side)."""
        i = bisect.bisect_left(self._order_keys, st.order)
        while self._ordered[i] is not st:
            i += 1
        return i

    def take_renewed(self) -> list[tuple[PolicyStatus | None, PolicyStatus]]:
        """(status before, status now) of each policy whose status was made again since
        the last call, to report what changed without looking at every policy."""
        out, self._renewed = list(self._renewed.values()), {}
        return out

    # ---- what a policy depends on ----------------------------------------------

    def _count_refs(self, st: _Policy, step: int) -> None:
        for refs, keys in ((self._prefix_refs, st.prefixes),
                           (self._name_refs, st.egress_names)):
            for k in keys:
                refs[k] = refs.get(k, 0) + step
                if not refs[k]:
                    del refs[k]
                if refs.get(k, 0) == (1 if step > 0 else 0):  # came or went
                    self._prefixes_changed = True

    def _forget(self, st: _Policy) -> tuple[int, ...]:
        """A policy no longer stored (or replaced): its references dropped; the
        endpoints it selected, to assemble again."""
        selected = st.selected
        self._count_refs(st, -1)
        self._release(st)
        return selected

    def _release(self, st: _Policy) -> None:
        """Drops what a policy's last computation used: its selection and peer sets
        (forgotten with their last user) and its place on its endpoints."""
        self._unref(st.selection, st.peer_keys, id(st.obj))
        for ep in st.selected:
            if (users := self._by_endpoint.get(ep)) is not None:
                users.discard(id(st.obj))
        st.selection, st.peer_keys, st.selected, st.entries = (), (), (), {}

    def _unref(self, selection: tuple, peer_keys, user: int) -> None:
        """`user` no longer uses these selection and peer keys: each is forgotten with
        its last user."""
        for cache, key in ((self._selections, selection),
                           *((self._peers, k) for k in peer_keys)):
            if key in cache:
                users = cache[key][-1]
                users.discard(user)
                if not users:
                    del cache[key]

    def _update_local(self, local: Mapping[int, PodView], identities) -> set[int]:
        """The endpoints that came, went or changed (their pod's view or their
        namespace's labels) since the last compile."""
        changed = {ep for ep in self._local if ep not in local}
        for ep in changed:
            del self._local[ep]
        for ep, pod in local.items():
            ns_labels = identities.get(pod.identity, ({}, {}))[1]
            held = self._local.get(ep)
            if held is None or held[0] != pod or held[2] != ns_labels:
                self._local[ep] = (pod, extended_labels(pod.labels, pod.namespace, ns_labels),
                                   ns_labels)
                changed.add(ep)
        return changed

    def _selects(self, key: tuple, ep: int) -> bool:
        pod, labels, _ = self._local[ep]
        if key[0] == "cnp":
            return key[1].matches(labels)
        _, ns, selector = key
        return (not ns or pod.namespace == ns) and selector.matches(labels)

    def _selection(self, key: tuple, user: int) -> tuple[int, ...]:
        """The local endpoints a selection key picks; `user` (a policy) uses it."""
        if (hit := self._selections.get(key)) is None:
            hit = self._selections[key] = [
                tuple(sorted(ep for ep in self._local if self._selects(key, ep))), set()]
        hit[-1].add(user)
        return hit[0]

    def _update_selections(self, changed: set[int]) -> set[tuple]:
        """Each cached selection again for the endpoints that changed; the keys that
        hold or held any of them (their users' statuses name the endpoints)."""
        touched = set()
        if not changed:
            return touched
        for key, hit in self._selections.items():
            now = {ep for ep in changed if ep in self._local and self._selects(key, ep)}
            if now or not changed.isdisjoint(hit[0]):
                hit[0] = tuple(sorted(set(hit[0]).difference(changed).union(now)))
                touched.add(key)
        return touched

    def _peer_set(self, rule: CRule, ns: str, user: int) -> frozenset[int]:
        """The peers a rule names (its selectors' identities, its blocks' CIDR-view
        keys, its entities), from the selector cache; `user` (a policy) uses it."""
        key = (rule, ns)
        if (hit := self._peers.get(key)) is None:
            labelled = {i for i, (pod, nsl) in self._identities.items()
                        if _label_peer(rule, ns, pod, nsl)}
            hit = self._peers[key] = [labelled, self._cidr_peers(rule),
                                      _fixed_peers(rule), set()]
        hit[-1].add(user)
        return frozenset(hit[0] | hit[1] | hit[2])

    def _cidr_peers(self, rule: CRule) -> frozenset[int]:
        found: set[int] = set()
        if rule.any_peer:
            return _EMPTY
        for block in rule.cidrs:
            found.update(self._index.block_identities(block))
        if "world" in rule.entities:
            found.update(self._cidrs.values())  # WORLD (0.0.0.0/0) and every CIDR identity
        return _frozen(found)

    def _update_peers(self, changed_ids: list[int], cidrs_changed: bool) -> set[tuple]:
        """Each cached peer set again for the identities that came, went or changed
        (and for the prefixes, if they changed); the keys whose set changed."""
        dirty = set()
        if not changed_ids and not cidrs_changed:
            return dirty
        for key, hit in self._peers.items():
            rule, ns = key
            if changed_ids and not rule.any_peer and (rule.endpoints
                                                      or "cluster" in rule.entities):
                labelled = hit[0]
                for i in changed_ids:
                    now = i in self._identities and _label_peer(
                        rule, ns, *self._identities[i])
                    if now != (i in labelled):
                        (labelled.add if now else labelled.discard)(i)
                        dirty.add(key)
            if cidrs_changed and (rule.cidrs or "world" in rule.entities):
                cidr = self._cidr_peers(rule)
                if cidr != hit[1]:
                    hit[1] = cidr
                    dirty.add(key)
        return dirty

    # ---- one policy's part -------------------------------------------------------

    def _compute(self, st: _Policy, local: Mapping[int, PodView], pods: list[PodView],
                 only: set[int] | None = None) -> set[int]:
        """A policy's selection and entries computed again, for every endpoint it
        selects or `only` for those (the others keep theirs); the endpoints whose
        entries may have changed. The caches it reads are taken before the last
        computation's are let go, so a selection or peer set it alone uses is kept,
        not computed again."""
        old_selection, old_peers, before = st.selection, st.peer_keys, set(st.selected)
        kept = {ep: e for ep, e in st.entries.items() if ep not in only} if only else {}
        st.selection, st.peer_keys, st.selected, st.entries = (), (), (), {}
        status = PolicyStatus(st.kind, st.ns, st.name, valid=st.model is not None,
                              warnings=list(st.warnings) if st.model is not None else [])
        if st.refused is not None:
            status.error = str(PolicyError("spec", st.refused))
        elif st.model is None:
            status.error = st.error
        if st.family == FAMILY_TIERED:
            self._compute_tiered(st, local, pods, only, kept)
        else:
            self._compute_rules(st, local, pods, only, kept)
        # what the last computation used and this one does not
        self._unref(() if old_selection == st.selection else old_selection,
                    set(old_peers).difference(st.peer_keys), id(st.obj))
        status.selected = sorted(f"{local[ep].namespace}/{local[ep].name}"
                                 for ep in st.selected)
        before_status = st.status if st.status is not None else self._departed.get(st.ref)
        if (held := self._renewed.get(st.ref)) is not None:
            before_status = held[0]
        self._renewed[st.ref] = (before_status, status)
        st.status = status
        self._statuses[self._position(st)] = status
        self._statuses_stale = True
        after = set(st.selected)
        for ep in before - after:
            if (users := self._by_endpoint.get(ep)) is not None:
                users.discard(id(st.obj))
        for ep in after - before:
            self._by_endpoint.setdefault(ep, set()).add(id(st.obj))
        return before | after if only is None else (before ^ after) | (after & only)

    def _peers_of(self, st: _Policy, rule: CRule, used: list) -> set[int]:
        used.append((rule, st.ns))
        return set(self._peer_set(rule, st.ns, id(st.obj)))

    def _compute_rules(self, st: _Policy, local, pods, only, kept) -> None:
        """A policy of either family: the endpoints it selects become enforced in its
        directions (a rejected one's too: fail closed), then its entries."""
        cpol, obj, ns = st.model, st.obj, st.ns
        if cpol is None and st.family == FAMILY_NETWORK_POLICY:
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
        st.selection, st.types = ("cilia", ns, selector), types
        st.selected = selected = self._selection(st.selection, id(st.obj))
        if cpol is None:
            return
        used: list = []
        made: dict[int, list[tuple[EntryKey, Entry]]] = {
            ep: kept[ep] for ep in selected if ep in kept}
        targets = [ep for ep in selected if only is None or ep in only]
        for (direction, deny), rules in sorted(cpol.rules.items()):
            for index, rule in enumerate(rules):
                ref = RuleRef(cpol.kind, ns, cpol.name,
                              direction + ("Deny" if deny else ""), index)
                peers = self._peers_of(st, rule, used)
                if deny and (rule.endpoints or "cluster" in rule.entities):
                    # A pod whose identity could not be had is INIT (agent/policy.py):
                    # no allow by labels matches it, and every deny by labels does,
                    # so a pod that cannot be told apart is never let past a deny.
                    peers.add(INIT)
                entry = Entry(DENY if deny else ALLOW, ref)
                # each endpoint's (allows, denies), each in the policy's order
                self._add_keys(targets, direction, peers, rule, local, pods,
                               lambda key, entry=entry: (key, entry),
                               lambda ep, deny=deny: made.setdefault(ep, ([], []))[deny])
        st.entries, st.peer_keys = made, tuple(used)

    def _compute_tiered(self, st: _Policy, local, pods, only, kept) -> None:
        """A ClusterNetworkPolicy (the Admin and Baseline tiers). Each rule's rank is its
        order in its tier: priority, then rule order (rank_of), stable whatever else is
        stored, so a new policy changes no other policy's entries; policies of the same
        priority may tie, as the API allows. A policy cilia refuses denies everything
        its subject does in its directions, at its own priority (fail closed)."""
        model, obj = st.model, st.obj
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        tier = _TIERS.get(model.tier if model else spec.get("tier"), TIER_ADMIN)
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
            return
        st.selection = ("cnp", subject)
        st.selected = selected = self._selection(st.selection, id(st.obj))
        used: list = []
        made: dict[int, list[tuple[EntryKey, Entry]]] = {
            ep: kept[ep] for ep in selected if ep in kept}
        targets = [ep for ep in selected if only is None or ep in only]
        for direction, drules in rules.items():
            for index, rule in enumerate(drules):
                ref = RuleRef(cnp_model.KIND, "", st.name, direction, index,
                              TIER_NAMES[tier], priority, rule.name, rule.action)
                entry = Entry(_ACTIONS[rule.action], ref, rank_of(priority, index))
                peers = self._peers_of(st, rule.match, used)
                if rule.action == cnp_model.DENY and rule.match.endpoints:
                    peers.add(INIT)  # a pod with no identity is never let past
                self._add_keys(targets, direction, peers, rule.match, local, pods,
                               lambda key, entry=entry: (key._replace(tier=tier), entry),
                               lambda ep: made.setdefault(ep, []))
        st.entries, st.peer_keys = made, tuple(used)

    def _add_keys(self, targets: list[int], direction: str, peers: set[int],
                  rule: CRule, local, pods, pair, into) -> None:
        """A rule's keys, each made into an (key, entry) pair by `pair`, added to each
        target endpoint's list (`into`): made once for all of them unless the rule names
        an ingress port, which each endpoint resolves against its own ports."""
        if not targets:
            return
        if direction == INGRESS and any(isinstance(p.port, str) for p in rule.ports or ()):
            for ep in targets:
                into(ep).extend(pair(key) for key in self._cilia_keys(
                    direction, peers, rule, local[ep], pods))
            return
        pairs = [pair(key) for key in self._cilia_keys(direction, peers, rule,
                                                        local[targets[0]], pods)]
        for ep in targets:
            into(ep).extend(pairs)

    # ---- one endpoint's entries --------------------------------------------------

    def _assemble(self, ep: int) -> None:
        """An endpoint's entries from the policies selecting it, in their order: a deny
        wins over an allow of the same key, an allow inside a deny's prefix becomes the
        deny; then the tiers, resolved (tier_resolve) so the datapath's three
        longest-prefix lookups per tier find the first matching rule
        (bpf/include/cilia/policy.h). Its resolved tier entries are kept while the
        lists they came from are the same objects."""
        pol = EndpointPolicy()
        lists, rules = [], []
        states = sorted((self._states[k] for k in self._by_endpoint.get(ep, ())),
                        key=lambda st: st.order)
        for st in states:
            if st.family == FAMILY_TIERED:
                if ep in st.entries:
                    lists.append(st.entries[ep])
                continue
            if INGRESS in st.types:
                pol.ingress_enforced = True
            if EGRESS in st.types:
                pol.egress_enforced = True
            if ep in st.entries:
                rules.append(st.entries[ep])
        # The first allow of a key wins (dict updates in reverse order, in C), and the
        # last deny over any allow.
        for allows, _ in reversed(rules):
            pol.entries.update(reversed(allows))
        denies: dict[EntryKey, Entry] = {}
        for _, deny in rules:
            denies.update(deny)
        if denies:
            pol.entries.update(denies)
            _deny_wins(pol.entries, list(denies))
        if lists:
            hit = self._tiers_resolved.get(ep)
            if hit is None or len(hit[0]) != len(lists) or any(
                    a is not b for a, b in zip(hit[0], lists, strict=True)):
                hit = (lists, tier_resolve(e for entries in lists for e in entries))
            self._tiers_resolved[ep] = hit
            pol.entries.update(hit[1])
            pol.tiered_ingress = any(k.dir == DIRS[INGRESS] for k in hit[1])
            pol.tiered_egress = any(k.dir == DIRS[EGRESS] for k in hit[1])
        else:
            self._tiers_resolved.pop(ep, None)
        held = self._out.get(ep)
        if held != pol:
            self._out[ep] = pol
        counts: dict[tuple[str, str, str], int] = {}
        for ref, n in Counter(map(_RULE_OF, pol.entries.values())).items():
            key = (ref.kind, ref.namespace, ref.name)
            counts[key] = counts.get(key, 0) + n
        self._recount(ep, counts)

    def _recount(self, ep: int, counts: dict[tuple[str, str, str], int]) -> None:
        """The running count of each policy's entries on this node, by endpoint."""
        totals, by_ns = self._totals, self._namespace_totals
        for key, n in self._counts.pop(ep, {}).items():
            totals[key] -= n
            if not totals[key]:
                del totals[key]
            if ns := charged_namespace(key):
                by_ns[ns] -= n
                if not by_ns[ns]:
                    del by_ns[ns]
        for key, n in counts.items():
            totals[key] = totals.get(key, 0) + n
            if ns := charged_namespace(key):
                by_ns[ns] = by_ns.get(ns, 0) + n
        if counts:
            self._counts[ep] = counts

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


def _parse_network_policy(obj: dict) -> CiliaPolicy:
    return from_network_policy(parse_network_policy(obj))


_PARSERS.update({FAMILY_NETWORK_POLICY: _parse_network_policy,
                 FAMILY_CILIA: parse_cilia_policy,
                 FAMILY_TIERED: parse_cluster_network_policy})


_TIERS = {cnp_model.ADMIN: TIER_ADMIN, cnp_model.BASELINE: TIER_BASELINE}
_ACTIONS = {cnp_model.ACCEPT: ALLOW, cnp_model.DENY: DENY, cnp_model.PASS: PASS}


def _label_peer(rule: CRule, ns: str, pod_labels: Mapping[str, str],
                ns_labels: Mapping[str, str]) -> bool:
    """Whether an identity (its pod's and its namespace's labels) is among a rule's
    peers by labels: one of its endpoint selectors matches it (a namespaced policy's
    selector only in its own namespace unless it names one), or the rule names the
    `cluster` entity."""
    if rule.any_peer:
        return False
    if "cluster" in rule.entities:
        return True
    name = ns_labels.get(NAMESPACE_NAME_LABEL, "")
    labels = None
    for selector in rule.endpoints:
        if ns and name != ns and not names_namespace(selector):
            continue
        if labels is None:
            labels = extended_labels(pod_labels, name, ns_labels)
        if selector.matches(labels):
            return True
    return False


def _fixed_peers(rule: CRule) -> frozenset[int]:
    """The peers a rule names whatever the identities and prefixes: its entities."""
    if rule.any_peer:
        return _ANY_PEER
    fixed = {"all": (ANY,), "host": (HOST,), "remote-node": (REMOTE_NODE,),
             "cluster": (HOST, REMOTE_NODE)}
    return _frozen(p for entity in rule.entities for p in fixed.get(entity, ()))


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


def _deny_wins(entries: dict[EntryKey, Entry], denies: list[EntryKey]) -> None:
    """An allow inside a deny's prefix would win the longest-prefix match; make it a deny
    (it denies exactly what it allowed), so the datapath's answer is the deny's.
    `denies`: the deny keys of `entries`."""
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


def policy_verdict(lookup, tiered: bool, enforced: bool, identity: int,
                   cidr_identity: int) -> tuple[int, object, list[int]]:
    """bpf/lib/policy.h's policy_verdict(), in Python, over any store of entries (the
    compiled ones, the kernel's map): `lookup(tier, peer key)` gives the longest-prefix
    match for the packet's protocol and port as (action, rank, what) or None. Each tier
    probes the peer's identity, its CIDR view and ANY; the Admin tier's best-ranked
    Accept or Deny is final, Pass or nothing hands over to NetworkPolicy if the
    endpoint is isolated (a deny from any probe wins, else any allow, else dropped),
    then to the Baseline tier, then allowed. Returns (action, or 0 when isolated and
    nothing allowed; the deciding entry's `what`, or None; the tiers looked up)."""
    probes = (identity, cidr_identity | CIDR_VIEW, ANY)
    seen: list[int] = []

    def best(tier: int):
        found = None
        for ident in probes:
            hit = lookup(tier, ident)
            if hit is not None and (found is None or hit[1] < found[1]):
                found = hit
        return found

    if tiered:
        seen.append(TIER_ADMIN)
        if (hit := best(TIER_ADMIN)) is not None and hit[0] in (ALLOW, DENY):
            return hit[0], hit[2], seen
    if enforced:
        seen.append(TIER_NETWORK_POLICY)
        allowed = None
        for ident in probes:
            hit = lookup(TIER_NETWORK_POLICY, ident)
            if hit is None:
                continue
            if hit[0] == DENY:
                return DENY, hit[2], seen
            allowed = allowed or hit
        return (ALLOW, allowed[2], seen) if allowed else (0, None, seen)
    if tiered:
        seen.append(TIER_BASELINE)
        if (hit := best(TIER_BASELINE)) is not None and hit[0] in (ALLOW, DENY):
            return hit[0], hit[2], seen
    return ALLOW, None, seen


def verdict(
    policy: EndpointPolicy, direction: str, identity: int, cidr_identity: int,
    proto: int, port: int,
) -> tuple[bool, Entry | None]:
    """(allowed, deciding entry): the datapath's policy_verdict() over compiled entries."""
    d = DIRS[direction]

    def lookup(tier: int, ident: int):
        entry = _lookup(policy, tier, d, ident, proto, port)
        return None if entry is None else (entry.action, entry.rank, entry)

    action, entry, _ = policy_verdict(lookup, policy.tiered(direction),
                                      policy.enforced(direction), identity, cidr_identity)
    return action == ALLOW, entry


def identity_labels_text(labels: SecurityLabels) -> str:
    pod, ns = split_labels(labels)
    name = ns.get(NAMESPACE_NAME_LABEL, "?")
    return f"{name}/{{{','.join(f'{k}={v}' for k, v in sorted(pod.items()))}}}"
