"""The policy engine: datastore snapshot → identities → compiled policy → BPF maps.

Every sync compiles the whole node from the datastore's objects as they are (read, not
copied: the compiler remembers what it derived from each object while it stays the same
object, so one changed policy costs about that policy; cilia/policy/compiler.py) and
writes only the difference from what the maps hold, in an order
that never lets a packet see a half-written policy allow something that is denied both
before and after the change:

  1. new deny entries              (narrows)
  2. allow entries that went away  (narrows)
  3. ipcache and endpoint identities
  4. new allow entries             (widens towards the new state)
  5. deny entries that went away   (widens towards the new state)
  6. endpoint enforcement flags    (a direction turns enforced once its allows exist,
                                    and open only after everything else)

While 1-2 are in, only what both states allow passes; 4-6 only ever reach the new state.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

from pyroute2 import IPRoute

from cilia.agent.metrics import POLICY_SYNC
from cilia.cnispec import TRY_AGAIN_LATER, CNIError
from cilia.crashpoints import crash_point
from cilia.datapath import layouts
from cilia.datapath.conntrack import bump_policy_revision
from cilia.datapath.layouts import IpcacheKey, IpcacheValue, PolicyKey, PolicyValue
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
    ALLOW,
    CIDR_VIEW,
    DENY,
    Compiled,
    Compiler,
    EndpointPolicy,
    EntryKey,
    PodView,
    RuleRef,
    identity_labels_text,
)
from cilia.policy.model import PROTOCOLS

log = logging.getLogger(__name__)

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


class Written(NamedTuple):
    """A policy map value as the engine keeps track of it (a tuple: compared by the
    ten thousand at each sync)."""

    action: int
    cookie: int
    rank: int = 0  # Admin and Baseline tiers (struct policy_value)


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
# Where the crash tests kill the agent while it writes a policy (cilia/crashpoints.py):
# each only when that step changes something (after its first write).
POLICY_CRASH_POINTS = ("policy:denies", "policy:ipcache", "policy:allows", "policy:removed",
                       "policy:flags")


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


class PolicyEngine:
    def __init__(self, agent):
        self.agent = agent
        self.datastore = agent.datastore  # local or kubernetes: the same interface
        self.allocator = IdentityAllocator(
            self.datastore.identity_store(),
            getattr(agent.config, "identity_max", 0) or MAX_CLUSTER_IDENTITY)
        self.compiler = Compiler()
        self.lock = agent.endpoints.lock  # one lock for endpoints and policy state
        self._pmap = agent.datapath.map(layouts.POLICY)
        self._ipcache = agent.datapath.map(layouts.IPCACHE)
        self._emap = agent.datapath.map(layouts.ENDPOINTS)
        self._rev = agent.datapath.map(layouts.POLICY_REV)
        self._pmap_capacity = self._pmap.max_entries
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
        # What the maps hold: read back, so a restarted agent changes only differences.
        self.written: dict[tuple[int, EntryKey], Written] = {}
        self.ipcache: dict[str, tuple[int, int]] = {}
        self._read_back()

    # ---- state of the maps ---------------------------------------------------------

    def _read_back(self) -> None:
        for key, value in self._pmap.items():
            bits = 0 if key.prefixlen <= 72 else key.prefixlen - 80
            proto = 0 if key.prefixlen < 72 else key.proto
            ek = EntryKey(key.dir, key.identity, proto, key.dport if bits else 0, bits,
                          key.tier)
            self.written[(key.ep_id, ek)] = Written(value.action, value.cookie, value.rank)
        for key, value in self._ipcache.items():
            self.ipcache[key.prefix] = (value.identity, value.cidr_identity)

    def cookie(self, ref: RuleRef) -> int:
        if ref not in self.cookies:
            self.cookies[ref] = len(self.cookies) + 1
            self.rules[self.cookies[ref]] = ref
        return self.cookies[ref]

    def in_sync(self) -> bool:
        return self.datastore.revision(POLICY_KINDS) == self.revision

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

    def sync(self, extra=None) -> None:
        """Compiles and writes everything; `extra` is an endpoint being added, whose
        identity and flags are set here before its endpoints map entry exists."""
        with self.lock, POLICY_SYNC.time():
            revision = self.datastore.revision(POLICY_KINDS)
            self.allocator.refresh()
            namespaces = {
                (n.get("metadata") or {}).get("name", ""): dict(
                    (n.get("metadata") or {}).get("labels") or {})
                for n in self.datastore.objects("Namespace").values()
            }
            audit_namespaces = {
                (n.get("metadata") or {}).get("name", "")
                for n in self.datastore.objects("Namespace").values() if audit_annotated(n)}
            endpoints = list(self.agent.endpoints.endpoints.values())
            if extra is not None:
                endpoints.append(extra)
            local_ips = {ep.ip for ep in endpoints}
            host_ips = self.node_addresses()
            remote_ips = self.agent.routes.remote_addresses()
            cilia_nodes = list(self.datastore.objects("CiliaNode").values())
            node_ips = set(host_ips) | set(remote_ips) | node_addresses_of(cilia_nodes)
            node_cidrs = node_pod_cidrs(cilia_nodes)
            if self.agent.config.node_name and self.agent.config.pod_cidr:
                node_cidrs[self.agent.config.node_name] = [self.agent.config.pod_cidr]
            # The stored objects themselves (never changed here): the compiler
            # remembers what it derived from each, while it stays the same object.
            stored = {}
            for pod in self.datastore.objects("Pod").values():
                meta = pod.get("metadata") or {}
                stored[(meta.get("namespace") or "default", meta.get("name", ""))] = pod

            views: list[PodView] = []
            local: dict[int, PodView] = {}
            idents: dict[int, int] = {}
            # An identity that cannot be had harms its own pod only (issue 13 item 8).
            tried: dict[SecurityLabels, int | Exception] = {}
            unidentified: dict[tuple[str, str], Unidentified] = {}
            unresolved: dict[str, str] = {}  # address -> NAMESPACE/NAME: INIT in the ipcache
            isolated: set[int] = set()  # endpoints with no identity at all
            for ep in endpoints:
                pod = stored.get((ep.pod_namespace, ep.pod_name))
                labels = dict((pod.get("metadata") or {}).get("labels") or {}) if pod \
                    else ep.labels
                ns = ep.pod_namespace or "default"
                try:
                    ident = self._identity(
                        security_labels(labels, ns, namespaces.get(ns, {})), tried)
                except Exception as err:  # noqa: BLE001 - contained to this pod
                    if ep is extra:  # its ADD fails; nothing else is touched
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
                view = pod_view(pod, ident, ep.ip) if pod else PodView(
                    ns, ep.pod_name, labels, ep.ip, ident)
                view = replace(view, labels=dict(labels))
                local[ep.id] = view
                views.append(view)
                idents[ep.id] = ident
                ep.labels = labels
            addresses = pod_addresses(stored, node_ips, node_cidrs, local_ips)
            for (ns, name), pod in stored.items():
                ip = addresses[(ns, name)]
                if not ip:
                    continue
                labels = dict((pod.get("metadata") or {}).get("labels") or {})
                try:
                    ident = self._identity(
                        security_labels(labels, ns, namespaces.get(ns, {})), tried)
                except Exception as err:  # noqa: BLE001 - contained to this pod
                    unidentified[(ns, name)] = Unidentified(ns, name, _reason(err), False,
                                                            INIT)
                    unresolved[ip] = f"{ns}/{name}"
                    continue
                views.append(pod_view(pod, ident, ip))

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
            self._report(compiled)
            self._report_identities(unidentified)

            desired: dict[tuple[int, EntryKey], Written] = {}
            written: dict[tuple, Written] = {}  # by (action, id(rule), rank): shared
            for ep_id, pol in compiled.endpoints.items():
                for key, entry in pol.entries.items():
                    value = written.get((entry.action, id(entry.rule), entry.rank))
                    if value is None:
                        value = written[(entry.action, id(entry.rule), entry.rank)] = \
                            Written(entry.action, self.cookie(entry.rule), entry.rank)
                    desired[(ep_id, key)] = value
            ipcache = self._desired_ipcache(views, compiled, host_ips, remote_ips,
                                            unresolved)
            flags = {ep.id: _flags(compiled.endpoints[ep.id]) | (
                layouts.ENDPOINT_F_AUDIT if audit_mode(
                    self.agent.config.policy_audit_mode,
                    (ep.pod_namespace or "default") in audit_namespaces,
                    stored.get((ep.pod_namespace or "default", ep.pod_name))) else 0)
                for ep in endpoints}

            self._apply(desired, ipcache, endpoints, idents, flags, extra)
            self.compiled = compiled
            self.policies = policies + cilia_policies + cluster_policies
            self.names = Names({**unresolved, **{v.ip: f"{v.namespace}/{v.name}"
                                                 for v in views if v.ip}}, self)
            self.unidentified = unidentified
            self.revision = revision
            self.synced_at = time.time()
            self.sync_count += 1

    def _within_budget(self, compile_with) -> Compiled:
        """Compiles so that the policy map can hold it: a policy that would take more
        than half the map, then in a namespace whose policies together would take more
        than its share (--policy-namespace-share; cluster-wide policies belong to no
        namespace) its largest ones until the rest fit, and then the largest ones while
        all together would not fit, are refused (invalid, with the count in their
        status): the pods they select stay isolated, and everyone else's policy, and
        new pods, keep working. One tenant cannot take the room of the others."""
        capacity = self._pmap_capacity
        share = int(capacity * self.agent.config.policy_namespace_share)
        node = self.agent.config.node_name
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
                over = _over_namespace_share(counts, share, capacity, node)
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

    def _desired_ipcache(self, views: list[PodView], compiled: Compiled,
                         host_ips: list[str], remote_ips: list[str],
                         unresolved: dict[str, str] = {}) -> dict:  # noqa: B006 - read only
        by_prefix = {(int(net.network_address), net.prefixlen): ident
                     for net, ident in compiled.cidrs.items()}
        lengths = sorted({plen for _, plen in by_prefix}, reverse=True)

        def cidr_identity(ip: str) -> int:
            """Longest-prefix match: one dict lookup per prefix length in use."""
            addr = int(ipaddress.IPv4Address(ip))
            for plen in lengths:
                mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
                if (ident := by_prefix.get((addr & mask, plen))) is not None:
                    return ident
            return WORLD

        out: dict[str, tuple[int, int]] = {}
        for net, ident in compiled.cidrs.items():
            out[str(net)] = (ident, ident)
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

    def node_addresses(self) -> list[str]:
        with IPRoute() as ipr:
            return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                    if not a.get_attr("IFA_ADDRESS").startswith("127.")]

    def _apply(self, desired, ipcache, endpoints, idents, flags, extra) -> None:
        try:
            self._write(desired, ipcache, endpoints, idents, flags, extra)
        except BaseException:
            # The policy is not all written (a full map, say): whatever is to be
            # enforced is enforced now, with what the map holds, so a newly isolated pod
            # is never left open; nothing loses enforcement until a write succeeds.
            for ep in endpoints:
                tighter = _tighter(ep.flags, flags[ep.id])
                if ep is not extra and tighter != ep.flags:
                    ep.flags = tighter
                    self._emap.update(layouts.EndpointKey.for_ip(ep.ip), ep.map_value())
                    log.error("endpoint %d (%s/%s): its policy could not be written; "
                              "enforcing it with what the map holds", ep.id,
                              ep.pod_namespace, ep.pod_name)
            self._bump_revision()
            raise

    def _write(self, desired, ipcache, endpoints, idents, flags, extra) -> None:
        pmap, old = self._pmap, self.written

        def put(k):
            ep_id, key = k
            value = desired[k]
            self._pmap.update(_policy_key(ep_id, key),
                              PolicyValue(value.action, 0, value.rank, value.cookie))
            old[k] = value

        def remove(k):
            pmap.delete(_policy_key(*k))
            del old[k]

        changed = [k for k, v in desired.items() if old.get(k) != v]
        gone = [k for k in old if k not in desired]
        for k in changed:                                           # 1
            if desired[k].action == DENY:
                put(k)
                crash_point("policy:denies")
        for k in gone:                                              # 2
            if old[k].action == ALLOW:  # a Pass goes with the denies: it may narrow
                remove(k)
        ipcache_changed = endpoints_changed = False
        for prefix, value in ipcache.items():                       # 3
            if self.ipcache.get(prefix) != value:
                self._ipcache.update(IpcacheKey.for_prefix(prefix), IpcacheValue(*value))
                self.ipcache[prefix] = value
                ipcache_changed = True
        for prefix in [p for p in self.ipcache if p not in ipcache]:
            self._ipcache.delete(IpcacheKey.for_prefix(prefix))
            del self.ipcache[prefix]
            ipcache_changed = True
        if ipcache_changed:
            crash_point("policy:ipcache")
        for ep in endpoints:
            if ep.identity != idents[ep.id]:
                endpoints_changed = True
                ep.identity = idents[ep.id]
                if ep is not extra:
                    self._emap.update(layouts.EndpointKey.for_ip(ep.ip), ep.map_value())
        for k in changed:                                           # 4
            if desired[k].action == ALLOW:
                put(k)
                crash_point("policy:allows")
        for k in gone:                                              # 5
            if k in old:
                remove(k)
        if gone:
            crash_point("policy:removed")
        for ep in endpoints:                                        # 6
            if ep.flags != flags[ep.id]:
                endpoints_changed = True
                ep.flags = flags[ep.id]
                if ep is not extra:
                    self._emap.update(layouts.EndpointKey.for_ip(ep.ip), ep.map_value())
        if changed or gone:
            log.info("policy map: %d entries written, %d removed", len(changed), len(gone))
        if endpoints_changed:
            crash_point("policy:flags")
        self.agent.endpoints.save()
        if changed or gone or ipcache_changed or endpoints_changed:
            self._bump_revision()

    def _bump_revision(self) -> None:
        """Established connections are judged again at their next packet (lib/enforce.h
        ct_recheck): after the maps say what the new policy is, never before. The
        revision's low byte never comes back round to a stale entry's (see there)."""
        bump_policy_revision(self._rev, self.agent.datapath.map(layouts.CONNTRACK))

    def _report(self, compiled: Compiled) -> None:
        before = {(s.kind, s.namespace, s.name): s.error
                  for s in (self.compiled.statuses if self.compiled else [])}
        for s in compiled.statuses:
            if not s.valid and before.get((s.kind, s.namespace, s.name)) != s.error:
                log.error("%s %s/%s rejected, its pods stay isolated: %s",
                          s.kind, s.namespace, s.name, s.error)
            for w in s.warnings:
                if (s.kind, s.namespace, s.name) not in before:
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
                          capacity: int, node: str) -> dict[tuple[str, str, str], str]:
    """The policies to refuse so that no namespace's policies take more than `share`
    entries: in each namespace over it, its largest first until the rest fit (ties by
    kind and name: the same choice at every sync). Cluster-wide policies (no namespace)
    count against no namespace."""
    by_ns: dict[str, list[tuple[str, str, str]]] = {}
    for key in counts:
        if key[1] and key[0] != "CiliaClusterwideNetworkPolicy":
            by_ns.setdefault(key[1], []).append(key)
    out = {}
    for ns, keys in by_ns.items():
        total = sum(counts[k] for k in keys)
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


def audit_mode(cluster: bool, namespace: bool, pod: dict | None) -> bool:
    """Whether a pod's policy only audits: the agent's --policy-audit-mode, or the
    annotation on its namespace (`namespace`: it has it) or on the pod itself. Any one of
    them turns it on; none turns it off for the others (to enforce some pods of an
    audited namespace, annotate the pods one by one instead)."""
    return cluster or namespace or audit_annotated(pod)


_TIERED = layouts.ENDPOINT_F_TIERED_INGRESS | layouts.ENDPOINT_F_TIERED_EGRESS


def _tighter(current: int, wanted: int) -> int:
    """Flags never weaker than either: every direction either enforces, and audit mode
    only if both have it (audit mode loosens). The tiers' lookups stay as they are: a
    half-written Admin tier turned on could let its Accepts override what NetworkPolicy
    denies, and one turned off would drop its Denies."""
    audit = current & wanted & layouts.ENDPOINT_F_AUDIT
    enforced = (current | wanted) & ~(layouts.ENDPOINT_F_AUDIT | _TIERED)
    return enforced | audit | (current & _TIERED)


def _flags(pol: EndpointPolicy) -> int:
    return ((layouts.ENDPOINT_F_INGRESS_ENFORCED if pol.ingress_enforced else 0)
            | (layouts.ENDPOINT_F_EGRESS_ENFORCED if pol.egress_enforced else 0)
            | (layouts.ENDPOINT_F_TIERED_INGRESS if pol.tiered_ingress else 0)
            | (layouts.ENDPOINT_F_TIERED_EGRESS if pol.tiered_egress else 0))


def _policy_key(ep_id: int, key: EntryKey) -> PolicyKey:
    return PolicyKey(key.prefixlen, ep_id, key.dir, key.tier, key.identity, key.proto, 0,
                     key.port)
