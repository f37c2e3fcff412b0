"""The policy engine: datastore snapshot + the node's endpoints → identities → compiled
policy → a plan of what the maps are to hold (agent/policy_plan.py).

Every sync compiles the whole node from the datastore's objects as they are (read, not
copied: the compiler remembers what it derived from each object while it stays the same
object, so one changed policy costs about that policy; cilia/policy/compiler.py) and from
a snapshot of the node's endpoints (read-only records the endpoint manager hands out).
The engine holds no map: the policy writer (agent/policy_writer.py) applies each plan,
writing only the difference from what the maps hold, in an order that never lets a packet
see a half-written policy allow something that is denied both before and after (see
there). The server, the monitor, the metrics and policy queries read the engine's results
through a `PolicyView`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

from pyroute2 import IPRoute

from cilia.agent.metrics import POLICY_SYNC
from cilia.agent.policy_plan import EndpointEntries, EndpointState, PolicyPlan, Written
from cilia.agent.policy_writer import POLICY_CRASH_POINTS, PolicyWriter
from cilia.cnispec import TRY_AGAIN_LATER, CNIError
from cilia.datapath import layouts
from cilia.identity import (
    CIDR_IDENTITY_BASE,
    HOST,
    INIT,
    MAX_CLUSTER_IDENTITY,
    REMOTE_NODE,
    RESERVED,
    WORLD,
    IdentityAllocator,
    IdentityExhausted,
    SecurityLabels,
    security_labels,
)
from cilia.policy.compiler import (
    CIDR_VIEW,
    Compiled,
    Compiler,
    EndpointPolicy,
    EntryKey,
    PodView,
    PolicyStatus,
    RuleRef,
    charged_namespace,
    identity_labels_text,
)
from cilia.policy.model import PROTOCOLS

log = logging.getLogger(__name__)

# Where the crash tests kill the agent while a policy is written (the writer's steps).
__all__ = ["POLICY_CRASH_POINTS", "PolicyEngine", "PolicyView"]

# What a sync reads from the datastore (identities through the allocator): a change of
# any other kind (a Service, an EndpointSlice) leaves the compiled policy as it is.
POLICY_KINDS = ("Namespace", "Pod", "NetworkPolicy", "CiliaNetworkPolicy",
                "CiliaClusterwideNetworkPolicy", "ClusterNetworkPolicy", "CiliaNode",
                "CiliaIdentity")
# Policy audit mode for a namespace's pods (on the Namespace) or one pod (on the Pod):
# what their policy would drop passes, reported as AUDIT (endpoint.h ENDPOINT_F_AUDIT).
AUDIT_ANNOTATION = "cilia.io/policy-audit-mode"

class Names:
    """Who an address or identity is, for people: NAMESPACE/POD, reserved:world, a CIDR."""

    def __init__(self, pods: dict[str, str], engine: PolicyEngine):
        self.pods = pods
        self.engine = engine

    def peer(self, ip: str, identity: int) -> str:
        if ip in self.pods:
            return self.pods[ip]
        return self.identity(identity)

    def identity(self, identity: int) -> str:
        if identity == 0:
            return "any"
        if identity & CIDR_VIEW:
            net = self.engine.compiler.cidr_ids.prefix_of(identity & ~CIDR_VIEW)
            return f"ipblock:{net}"
        if identity in RESERVED:
            return RESERVED[identity]
        if identity >= CIDR_IDENTITY_BASE:
            net = self.engine.compiler.cidr_ids.prefix_of(identity)
            return f"cidr:{net}" if net else f"cidr:{identity}"
        labels = self.engine.allocator.labels_of(identity)
        return identity_labels_text(labels) if labels else f"identity:{identity}"


# How often a sync is tried again, with nothing changed, while pods lack an identity.
IDENTITY_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Unidentified:
    """A pod whose security identity could not be had in the last sync, and what that
    did to it: a pod of this node keeps the identity it has (`identity`: its labels'
    change waits) or, with none, is isolated; a pod elsewhere is `reserved:init` here."""

    namespace: str
    name: str
    reason: str
    local: bool
    identity: int  # what it holds now: its kept identity, or INIT

    @property
    def effect(self) -> str:
        if not self.local:
            return ("reserved:init on this node: no rule selecting pods by labels allows "
                    "it, every deny rule selecting pods by labels denies it")
        if self.identity != INIT:
            return (f"keeps identity {self.identity} and is enforced as before the label "
                    "change that needs a new one")
        return "isolated: no identity, nothing allowed in or out"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} has no security identity: {self.reason}; " \
               f"{self.effect}"


TERMINAL_PHASES = ("Succeeded", "Failed")
def node_addresses_of(cilia_nodes: list[dict]) -> set[str]:
    """Every address any CiliaNode names (its InternalIP and any other)."""
    out = set()
    for n in cilia_nodes:
        for a in (n.get("spec") or {}).get("addresses") or []:
            if isinstance(a, dict) and a.get("ip"):
                out.add(str(a["ip"]))
    return out


def pod_address(pod: dict, node_ips: set[str]) -> str | None:
    """The address a stored pod holds in the ipcache, or None when it holds none:
    - not known yet (no status.podIP);
    - a pod in a node's network (spec.hostNetwork: kube-proxy, node daemons, the agent
      itself), or any pod reporting a node's address (`node_ips`): the address is the
      node's, which stays `host` on its own node and `remote-node` elsewhere, so the
      kubelet's probes and every rule about nodes keep working;
    - a pod that has finished (Succeeded, Failed): its address may be another's now."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or spec.get("hostNetwork") or ip in node_ips:
        return None
    if status.get("phase") in TERMINAL_PHASES:
        return None
    return ip


def pod_addresses(pods: dict[tuple[str, str], dict], node_ips: set[str],
                  node_cidrs: dict[str, list[str]], taken: set[str] = frozenset(),
                  ) -> dict[tuple[str, str], str | None]:
    """Each stored pod's ipcache address (pod_address), with clashes resolved so that no
    pod can hold another's identity by reporting its address: when pods claim one
    address, a Running pod on the node whose pod CIDR holds it wins; with no such single
    pod, none of them holds it (the address is `world` until the clash clears).
    `taken`: addresses this node's own endpoints hold (they win over any report)."""
    claims: dict[str, list[tuple[str, str]]] = {}
    for key, pod in pods.items():
        ip = pod_address(pod, node_ips)
        if ip and ip not in taken:
            claims.setdefault(ip, []).append(key)
    out: dict[tuple[str, str], str | None] = dict.fromkeys(pods)
    for ip, keys in claims.items():
        if len(keys) > 1:
            addr = ipaddress.IPv4Address(ip)
            owners = {node for node, cidrs in node_cidrs.items()
                      if any(addr in ipaddress.IPv4Network(c, strict=False) for c in cidrs)}
            keys = [k for k in keys if (pods[k].get("status") or {}).get("phase") == "Running"
                    and (pods[k].get("spec") or {}).get("nodeName") in owners]
            if len(keys) != 1:
                log.warning("address %s is claimed by %d pods and no single one is running "
                            "on the node that owns it: it stays world until that clears",
                            ip, len(claims[ip]))
                continue
        out[keys[0]] = ip
    return out


def node_pod_cidrs(cilia_nodes: list[dict]) -> dict[str, list[str]]:
    """Node name -> its pod CIDRs, from the CiliaNodes."""
    out = {}
    for n in cilia_nodes:
        name = (n.get("metadata") or {}).get("name")
        cidrs = [c for c in ((n.get("spec") or {}).get("podCIDRs") or []) if isinstance(c, str)]
        if name:
            out[name] = cidrs
    return out


def pod_view(pod: dict, identity: int, ip: str | None) -> PodView:
    meta = pod.get("metadata") or {}
    ports = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") and p.get("containerPort"):
                proto = PROTOCOLS.get(p.get("protocol") or "TCP")
                if proto:
                    ports.append((p["name"], proto, int(p["containerPort"])))
    return PodView(meta.get("namespace") or "default", meta.get("name", ""),
                   dict(meta.get("labels") or {}), ip, identity, tuple(ports))


class SyncResult(NamedTuple):
    """One computed sync: the plan for the writer, and what the engine publishes once
    the plan is written."""

    plan: PolicyPlan
    compiled: Compiled
    policies: list[dict]
    names: Names
    unidentified: dict[tuple[str, str], Unidentified]
    revision: tuple


class PolicyEngine:
    """Computes the node's policy (`compute`: a plan, from the datastore and a snapshot
    of the node's endpoints, with no map) and has the writer apply it (`sync`), under
    its own lock: one plan at a time, each computed from what the last one left."""

    def __init__(self, datastore, config, endpoints, remote_addresses: Callable[[], list],
                 writer: PolicyWriter | None, capacity: int | None = None):
        self.datastore = datastore  # local or kubernetes: the same interface
        self.config = config
        self.endpoints = endpoints  # snapshot(): the node's endpoints, read-only records
        self.remote_addresses = remote_addresses  # other nodes' addresses
        self.writer = writer
        self.capacity = capacity if capacity is not None else writer.capacity
        self.allocator = IdentityAllocator(
            self.datastore.identity_store(),
            getattr(config, "identity_max", 0) or MAX_CLUSTER_IDENTITY)
        self.compiler = Compiler()
        # endpoint -> (its compiled entries, their map values) of the last plan
        self._values: dict[int, tuple[Mapping, Mapping[EntryKey, Written]]] = {}
        # id(pod) -> [the stored pod, its namespace's labels, its security labels, its
        # view, whether it asks for audit mode]: what the last sync derived from each
        # pod object, while it is the same
        self._pod_memo: dict[int, list] = {}
        # (the compiler's prefixes, their ipcache entries, address -> CIDR identity,
        # (address, prefix length) -> identity, the lengths longest first)
        self._cidr_entries: tuple = (None, {}, {}, {}, [])
        # Computing and applying a plan: a sync, an ADD's admission (the endpoint
        # manager's lock is taken first, then this one), a query that reads the maps.
        self.lock = threading.RLock()
        self.cookies: dict[RuleRef, int] = {}
        self.rules: dict[int, RuleRef] = {}
        self.compiled: Compiled | None = None
        self.policies: list[dict] = []
        self.names = Names({}, self)
        self.revision: tuple = ()
        self.synced_at = 0.0
        self.sync_count = 0
        # Pods whose identity could not be had in the last sync (shown by `cilia status`);
        # while there are any, the sync is tried again every IDENTITY_RETRY_SECONDS.
        self.unidentified: dict[tuple[str, str], Unidentified] = {}
        self.view = PolicyView(self)

    def cookie(self, ref: RuleRef) -> int:
        if ref not in self.cookies:
            self.cookies[ref] = len(self.cookies) + 1
            self.rules[self.cookies[ref]] = ref
        return self.cookies[ref]

    def in_sync(self) -> bool:
        return self._revision(self.remote_addresses()) == self.revision

    def _revision(self, remote_ips: list[str]) -> tuple:
        """What a sync reads: the datastore's policy kinds, and the other nodes'
        addresses as the routing controller knows them (the ipcache's remote-node
        entries), which change without any policy kind changing: a node back after its
        CiliaNode went away is routed by one reconcile and must reach the ipcache too,
        or its answers are dropped as coming from no node."""
        return (self.datastore.revision(POLICY_KINDS), tuple(sorted(remote_ips)))

    def retry_due(self) -> bool:
        """Pods lack an identity and it is time to try again (an API error may be gone,
        an identity freed), though nothing the sync reads has changed."""
        return bool(self.unidentified) and (
            time.time() - self.synced_at >= IDENTITY_RETRY_SECONDS)

    def _identity(self, labels: SecurityLabels, tried: dict) -> int:
        """The identity of `labels`, or the error of getting it: each label set is tried
        once per sync (a failure is not asked again for every pod that shares it)."""
        if labels not in tried:
            try:
                tried[labels] = self.allocator.allocate(labels)
            except Exception as err:  # noqa: BLE001 - exhaustion, the API, the store
                tried[labels] = err
        if isinstance(tried[labels], Exception):
            raise tried[labels]
        return tried[labels]

    # ---- one sync ----------------------------------------------------------------

    def sync(self, adding: int | None = None) -> None:
        """Computes the plan and has the writer apply it. `adding`: the id of the
        endpoint an ADD is admitting (in the snapshot, without its endpoints map entry
        yet): a failure to give it an identity fails its ADD, and touches nothing."""
        with self.lock, POLICY_SYNC.time():
            result = self.compute(self.endpoints.snapshot(), adding)
            self.writer.apply(result.plan)
            self.compiled = result.compiled
            self.policies = result.policies
            self.names = result.names
            self.unidentified = result.unidentified
            self.revision = result.revision
            self.synced_at = time.time()
            self.sync_count += 1

    def compute(self, endpoints, adding: int | None = None) -> SyncResult:
        """The plan for `endpoints` (records with id, ip, pod_namespace, pod_name, labels,
        identity, flags) and the datastore as it is now; reads no map, writes nothing
        but the engine's caches (identities, the compiler's, rule cookies)."""
        remote_ips = self.remote_addresses()
        revision = self._revision(remote_ips)
        self.allocator.refresh()
        namespaces = {
            (n.get("metadata") or {}).get("name", ""): dict(
                (n.get("metadata") or {}).get("labels") or {})
            for n in self.datastore.objects("Namespace").values()
        }
        audit_namespaces = {
            (n.get("metadata") or {}).get("name", "")
            for n in self.datastore.objects("Namespace").values() if audit_annotated(n)}
        local_ips = {ep.ip for ep in endpoints}
        host_ips = self.node_addresses()
        cilia_nodes = list(self.datastore.objects("CiliaNode").values())
        node_ips = set(host_ips) | set(remote_ips) | node_addresses_of(cilia_nodes)
        node_cidrs = node_pod_cidrs(cilia_nodes)
        if self.config.node_name and self.config.pod_cidr:
            node_cidrs[self.config.node_name] = [self.config.pod_cidr]
        # The stored objects themselves (never changed here): the compiler
        # remembers what it derived from each, while it stays the same object.
        stored = {}
        for pod in self.datastore.objects("Pod").values():
            meta = pod.get("metadata") or {}
            stored[(meta.get("namespace") or "default", meta.get("name", ""))] = pod

        views: list[PodView] = []
        local: dict[int, PodView] = {}
        idents: dict[int, int] = {}
        ep_labels: dict[int, dict[str, str]] = {}  # what each identity stands for
        # An identity that cannot be had harms its own pod only (issue 13 item 8).
        tried: dict[SecurityLabels, int | Exception] = {}
        unidentified: dict[tuple[str, str], Unidentified] = {}
        unresolved: dict[str, str] = {}  # address -> NAMESPACE/NAME: INIT in the ipcache
        isolated: set[int] = set()  # endpoints with no identity at all
        memo: dict[int, list] = {}  # this sync's _pod_memo
        for ep in endpoints:
            pod = stored.get((ep.pod_namespace, ep.pod_name))
            labels = dict((pod.get("metadata") or {}).get("labels") or {}) if pod \
                else ep.labels
            ns = ep.pod_namespace or "default"
            try:
                if pod:
                    ident, view = self._pod_view(pod, ns, namespaces.get(ns, {}), ep.ip,
                                                 tried, memo)
                else:
                    ident = self._identity(
                        security_labels(labels, ns, namespaces.get(ns, {})), tried)
                    view = PodView(ns, ep.pod_name, labels, ep.ip, ident)
            except Exception as err:  # noqa: BLE001 - contained to this pod
                if ep.id == adding:  # its ADD fails; nothing else is touched
                    raise _no_identity(ns, ep.pod_name, err) from err
                # A pod of this node that has an identity keeps it, and the labels
                # it stands for: its policy is compiled (and its peers see it) as
                # before the change that needs the new one. With none: isolated.
                ident = ep.identity or INIT
                unidentified[(ns, ep.pod_name)] = Unidentified(
                    ns, ep.pod_name, _reason(err), True, ident)
                idents[ep.id] = ident
                if ident == INIT:
                    isolated.add(ep.id)
                    unresolved[ep.ip] = f"{ns}/{ep.pod_name}"
                    continue
                labels = ep.labels
                view = replace(pod_view(pod, ident, ep.ip) if pod else PodView(
                    ns, ep.pod_name, labels, ep.ip, ident), labels=dict(labels))
            local[ep.id] = view
            views.append(view)
            idents[ep.id] = ident
            ep_labels[ep.id] = labels
        addresses = pod_addresses(stored, node_ips, node_cidrs, local_ips)
        for (ns, name), pod in stored.items():
            ip = addresses[(ns, name)]
            if not ip:
                continue
            try:
                ident, view = self._pod_view(pod, ns, namespaces.get(ns, {}), ip, tried,
                                             memo)
            except Exception as err:  # noqa: BLE001 - contained to this pod
                unidentified[(ns, name)] = Unidentified(ns, name, _reason(err), False,
                                                        INIT)
                unresolved[ip] = f"{ns}/{name}"
                continue
            views.append(view)
        self._pod_memo = memo

        policies = list(self.datastore.objects("NetworkPolicy").values())
        cilia_policies = (
            list(self.datastore.objects("CiliaNetworkPolicy").values())
            + list(self.datastore.objects("CiliaClusterwideNetworkPolicy").values()))
        cluster_policies = list(self.datastore.objects("ClusterNetworkPolicy").values())
        compiled = self._within_budget(lambda refused: self.compiler.compile(
            policies, views, namespaces, local, cilia_policies, refused,
            cluster_policies))
        for ep_id in isolated:
            compiled.endpoints[ep_id] = EndpointPolicy(True, True)
        self._report(self.compiler.take_renewed())
        self._report_identities(unidentified)

        desired: dict[int, Mapping[EntryKey, Written]] = {}
        written: dict[tuple, Written] = {}  # by (action, id(rule), rank): shared
        values = {}
        for ep_id, pol in compiled.endpoints.items():
            # An endpoint whose compiled entries equal the last sync's (compared in C)
            # hands over the same values: most of a change's endpoints are untouched.
            last = self._values.get(ep_id)
            if last is not None and (last[0] is pol.entries or last[0] == pol.entries):
                values[ep_id] = last
                desired[ep_id] = last[1]
                continue
            mine = {}
            for key, entry in pol.entries.items():
                value = written.get((entry.action, id(entry.rule), entry.rank))
                if value is None:
                    value = written[(entry.action, id(entry.rule), entry.rank)] = \
                        Written(entry.action, self.cookie(entry.rule), entry.rank)
                mine[key] = value
            values[ep_id] = (pol.entries, MappingProxyType(mine))
            desired[ep_id] = values[ep_id][1]
        self._values = values
        ipcache = self._desired_ipcache(views, compiled, host_ips, remote_ips,
                                        unresolved)
        flags = {ep.id: _flags(compiled.endpoints[ep.id]) | (
            layouts.ENDPOINT_F_AUDIT if audit_mode(
                self.config.policy_audit_mode,
                (ep.pod_namespace or "default") in audit_namespaces,
                _audit_annotated(memo, stored.get((ep.pod_namespace or "default",
                                                   ep.pod_name)))) else 0)
            for ep in endpoints}
        before = {ep.id: EndpointState(ep.identity, ep.flags, ep.labels)
                  for ep in endpoints}
        after = {ep.id: EndpointState(idents[ep.id], flags[ep.id],
                                      ep_labels.get(ep.id, ep.labels))
                 for ep in endpoints}
        plan = PolicyPlan(EndpointEntries(MappingProxyType(desired)), MappingProxyType(ipcache),
                          MappingProxyType(before), MappingProxyType(after))
        names = Names({**unresolved, **{v.ip: f"{v.namespace}/{v.name}"
                                        for v in views if v.ip}}, self)
        return SyncResult(plan, compiled, policies + cilia_policies + cluster_policies,
                          names, unidentified, revision)

    def _within_budget(self, compile_with) -> Compiled:
        """Compiles so that the policy map can hold it: a policy that would take more
        than half the map, then in a namespace whose policies together would take more
        than its share (--policy-namespace-share; cluster-wide policies belong to no
        namespace) its largest ones until the rest fit, and then the largest ones while
        all together would not fit, are refused (invalid, with the count in their
        status): the pods they select stay isolated, and everyone else's policy, and
        new pods, keep working. One tenant cannot take the room of the others."""
        capacity = self.capacity
        share = int(capacity * self.config.policy_namespace_share)
        node = self.config.node_name
        refused: dict[tuple[str, str, str], str] = {}
        compiled = compile_with(refused)
        for _ in range(16):
            counts = compiled.entries_by_policy()
            over = {k: (
                f"needs {n} policy map entries on node {node}, and the map holds "
                f"{capacity} for every policy (one may take half; --policy-map-max sizes "
                "it): refused, the pods it selects stay isolated")
                for k, n in counts.items() if n > capacity // 2}
            if not over:
                over = _over_namespace_share(counts, share, capacity, node,
                                             compiled.entries_by_namespace())
            if not over and sum(counts.values()) <= capacity:
                break
            if not over:
                biggest = max(counts, key=lambda k: counts[k])
                over = {biggest: (
                    f"needs {counts[biggest]} policy map entries on node {node}, and the "
                    f"map holds {capacity} for every policy (--policy-map-max sizes it): "
                    "refused, the largest first, the pods it selects stay isolated")}
            refused.update(over)
            compiled = compile_with(refused)
        return compiled

    def _pod_view(self, pod: dict, ns: str, ns_labels: Mapping[str, str], ip: str | None,
                  tried: dict, memo: dict[int, list]) -> tuple[int, PodView]:
        """A stored pod's identity and view; its security labels and view as the last
        sync made them while it is the same object in an unchanged namespace and keeps
        its identity and address (the identity is asked for at every sync: the
        allocator's answer is the truth)."""
        hit = self._pod_memo.get(id(pod))
        if hit is None or hit[0] is not pod or hit[1] != ns_labels:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            hit = [pod, ns_labels, security_labels(labels, ns, ns_labels), None,
                   audit_annotated(pod)]
        memo[id(pod)] = hit
        ident = self._identity(hit[2], tried)
        if hit[3] is None or hit[3].identity != ident or hit[3].ip != ip:
            hit[3] = pod_view(pod, ident, ip)
        return ident, hit[3]

    def _desired_ipcache(self, views: list[PodView], compiled: Compiled,
                         host_ips: list[str], remote_ips: list[str],
                         unresolved: dict[str, str] = {}) -> dict:  # noqa: B006 - read only
        cidr_identity = self._cidr_identity(compiled.cidrs)
        out: dict[str, tuple[int, int]] = dict(self._cidr_entries[1])
        for v in views:
            if v.ip:
                out[f"{v.ip}/32"] = (v.identity, cidr_identity(v.ip))
        # A pod without an identity: INIT, never left to its covering CIDR's identity
        # (the world's, which `world` rules allow).
        for ip in unresolved:
            out[f"{ip}/32"] = (INIT, cidr_identity(ip))
        # Nodes last: a node's address is the node's, whatever a pod reports.
        for ip in remote_ips:
            out[f"{ip}/32"] = (REMOTE_NODE, cidr_identity(ip))
        for ip in host_ips:
            out[f"{ip}/32"] = (HOST, cidr_identity(ip))
        return out

    def _cidr_identity(self, cidrs: Mapping[ipaddress.IPv4Network, int]
                       ) -> Callable[[str], int]:
        """The CIDR identity of an address (the longest prefix holding it, else the
        world's), remembered per address while the prefixes are the same object (the
        compiler hands them over so); the prefixes' own ipcache entries with it."""
        if self._cidr_entries[0] is not cidrs:
            by_prefix = {(int(net.network_address), net.prefixlen): ident
                         for net, ident in cidrs.items()}
            lengths = sorted({plen for _, plen in by_prefix}, reverse=True)
            self._cidr_entries = (cidrs, {str(net): (ident, ident)
                                          for net, ident in cidrs.items()},
                                  {}, by_prefix, lengths)
        _, _, memo, by_prefix, lengths = self._cidr_entries

        def cidr_identity(ip: str) -> int:
            """Longest-prefix match: one dict lookup per prefix length in use."""
            if (found := memo.get(ip)) is not None:
                return found
            addr = int(ipaddress.IPv4Address(ip))
            found = WORLD
            for plen in lengths:
                mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
                if (ident := by_prefix.get((addr & mask, plen))) is not None:
                    found = ident
                    break
            memo[ip] = found
            return found

        return cidr_identity

    def node_addresses(self) -> list[str]:
        with IPRoute() as ipr:
            return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                    if not a.get_attr("IFA_ADDRESS").startswith("127.")]

    def _report(self, renewed: list[tuple[PolicyStatus | None, PolicyStatus]]) -> None:
        """Logs what changed in the statuses the compiler made again (each with the
        one it replaced): a policy newly rejected, or for another reason; a new
        policy's warnings."""
        for before, s in renewed:
            if not s.valid and (before is None or before.error != s.error):
                log.error("%s %s/%s rejected, its pods stay isolated: %s",
                          s.kind, s.namespace, s.name, s.error)
            for w in s.warnings if before is None else ():
                log.warning("%s %s/%s: %s", s.kind, s.namespace, s.name, w)

    def _report_identities(self, unidentified: dict[tuple[str, str], Unidentified]) -> None:
        for key, u in unidentified.items():
            if key not in self.unidentified or self.unidentified[key].reason != u.reason:
                log.error("pod %s", u)
        for key in self.unidentified:
            if key not in unidentified:
                log.info("pod %s/%s: its identity is resolved", *key)

    def endpoint_policy(self, ep_id: int) -> EndpointPolicy | None:
        return self.compiled.endpoints.get(ep_id) if self.compiled else None


class PolicyView:
    """The policy engine's results, read only: what the server, the monitor, the metrics
    and policy queries see. Each is a reference the engine replaces whole at each sync,
    so reading needs no lock; `settled()` waits for a sync being written to finish, for a
    query that reads the maps themselves."""

    def __init__(self, engine: PolicyEngine):
        self._engine = engine
        self.rules: Mapping[int, RuleRef] = MappingProxyType(engine.rules)  # by cookie

    @property
    def names(self) -> Names:
        return self._engine.names

    def rule_of(self, cookie: int) -> RuleRef | None:
        return self.rules.get(cookie)

    def labels_of(self, identity: int):
        return self._engine.allocator.labels_of(identity)

    def statuses(self) -> list[PolicyStatus]:
        compiled = self._engine.compiled
        return compiled.statuses if compiled else []

    def policies(self) -> list[dict]:
        """The policy objects of the last sync, as stored."""
        return self._engine.policies

    def endpoint_policy(self, ep_id: int) -> EndpointPolicy | None:
        return self._engine.endpoint_policy(ep_id)

    def unidentified(self) -> list[Unidentified]:
        return [u for _, u in sorted(self._engine.unidentified.copy().items())]

    def in_sync(self) -> bool:
        return self._engine.in_sync()

    @property
    def sync_count(self) -> int:
        return self._engine.sync_count

    @contextmanager
    def settled(self) -> Iterator[None]:
        with self._engine.lock:
            yield


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


def _no_identity(namespace: str, name: str, err: Exception) -> CNIError:
    """The error of an ADD whose pod cannot be given a security identity."""
    if isinstance(err, IdentityExhausted):
        return CNIError(TRY_AGAIN_LATER, f"pod {namespace}/{name} gets no security "
                        f"identity: {err}", "the pod stays without network; the runtime "
                        "retries the ADD, and it succeeds once an identity is free")
    return CNIError(TRY_AGAIN_LATER, f"pod {namespace}/{name} gets no security identity "
                    f"yet: {_reason(err)}", f"{err!r}; the pod stays without network "
                    "until its identity can be had (the runtime retries the ADD)")


def _over_namespace_share(counts: dict[tuple[str, str, str], int], share: int,
                          capacity: int, node: str, totals: dict[str, int] | None = None,
                          ) -> dict[tuple[str, str, str], str]:
    """The policies to refuse so that no namespace's policies take more than `share`
    entries: in each namespace over it, its largest first until the rest fit (ties by
    kind and name: the same choice at every sync). Cluster-wide policies (no namespace)
    count against no namespace."""
    if totals is None:  # namespace -> its namespaced policies' entries
        totals = {}
        for key, n in counts.items():
            if ns := charged_namespace(key):
                totals[ns] = totals.get(ns, 0) + n
    out = {}
    for ns, total in totals.items():
        if total <= share:
            continue
        keys = [k for k in counts if charged_namespace(k) == ns]
        left = total
        for key in sorted(keys, key=lambda k: (-counts[k], k)):
            if left <= share:
                break
            left -= counts[key]
            out[key] = (
                f"needs {counts[key]} policy map entries on node {node}, and namespace "
                f"{ns}'s policies together need {total}, more than a namespace's share of "
                f"{share} of the map's {capacity} (--policy-namespace-share): refused, the "
                "namespace's largest first, the pods it selects stay isolated")
    return out


def audit_annotated(obj: dict | None) -> bool:
    """The object (a Namespace, a Pod) asks for policy audit mode: its annotation
    cilia.io/policy-audit-mode is "true" (any case, as Kubernetes writes booleans)."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(AUDIT_ANNOTATION, "")).strip().lower() == "true"


def audit_mode(cluster: bool, namespace: bool, pod: dict | bool | None) -> bool:
    """Whether a pod's policy only audits: the agent's --policy-audit-mode, or the
    annotation on its namespace (`namespace`: it has it) or on the pod itself (`pod`:
    the pod, or whether it has it). Any one of them turns it on; none turns it off for
    the others (to enforce some pods of an audited namespace, annotate the pods one by
    one instead)."""
    return cluster or namespace or (pod if isinstance(pod, bool) else audit_annotated(pod))


def _audit_annotated(memo: dict[int, list], pod: dict | None) -> bool:
    """audit_annotated, as the sync's pod memo (PolicyEngine._pod_view) has it."""
    hit = memo.get(id(pod)) if pod is not None else None
    return hit[4] if hit is not None and hit[0] is pod else audit_annotated(pod)


def _flags(pol: EndpointPolicy) -> int:
    return ((layouts.ENDPOINT_F_INGRESS_ENFORCED if pol.ingress_enforced else 0)
            | (layouts.ENDPOINT_F_EGRESS_ENFORCED if pol.egress_enforced else 0)
            | (layouts.ENDPOINT_F_TIERED_INGRESS if pol.tiered_ingress else 0)
            | (layouts.ENDPOINT_F_TIERED_EGRESS if pol.tiered_egress else 0))
