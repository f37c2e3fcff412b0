"""The endpoint manager: a pod's network, built and torn down.

ADD builds, in order: IPAM lease, veth pair (peer created straight into the pod netns),
the pod's /32 address, its link-local gateway route and permanent neighbour entry, the
node's /32 route and neighbour entry towards the pod, the from-pod tc program, and last
the endpoints map entry that makes the pod reachable through the datapath. Each step
pushes its undo; a failure runs them in reverse, so a failed ADD leaves nothing behind.

The manager is the one owner of the endpoints map and of its records (frozen: a change
replaces a record, so a reader's snapshot never changes under it). Policy reaches them
through `snapshot()` (what the policy engine computes from) and `apply_policy_state()`
(what the policy writer hands back at its steps); everyone else reads an `EndpointsView`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilia.agent.netns import iproute_in, open_netns
from cilia.agent.policy_plan import EndpointState
from cilia.cnispec import (
    ENDPOINT_MISMATCH,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CNIError,
)
from cilia.crashpoints import crash_point
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointInfo, EndpointKey, mac_bytes
from cilia.datapath.loader import Datapath
from cilia.datapath.maps import MapFullError
from cilia.ipam import Ipam, IpamExhausted
from cilia.statefile import read_json, write_json

log = logging.getLogger(__name__)

# The pods' next hop: link-local, the same on every node, answered by a permanent
# neighbour entry naming the host-side veth, so pods never ARP for it.
GATEWAY = "169.254.1.1"
SCOPE_LINK = 253
NUD_PERMANENT = 0x80
IN6_ADDR_GEN_MODE_NONE = 1  # linux/if_link.h: no IPv6 address generated for the link
# endpoint_info.flags bits (bpf/include/cilia/endpoint.h) that make the datapath enforce.
ENFORCEMENT_FLAGS = layouts.ENDPOINT_F_INGRESS_ENFORCED | layouts.ENDPOINT_F_EGRESS_ENFORCED
MAX_ENDPOINT_ID = 0xFFFF
# Where the crash tests kill the agent (cilia/crashpoints.py), in the order ADD and DEL
# reach them.
ADD_CRASH_POINTS = ("add:leased", "add:veth", "add:pod", "add:routed", "add:attached",
                    "add:admitted", "add:mapped", "add:saved")
DEL_CRASH_POINTS = ("del:unmapped", "del:unlinked", "del:released")
# The lease owner of an address whose endpoint entry survived a lost state file.
RECOVERED = "recovered/"


@dataclass(frozen=True)
class Endpoint:
    id: int
    container_id: str
    ifname: str
    netns: str
    network_name: str
    pod_namespace: str
    pod_name: str
    ip: str
    mac: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    mtu: int
    labels: dict[str, str] = field(default_factory=dict)
    identity: int = 0
    flags: int = 0  # ENDPOINT_F_*: the directions its policy enforces

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    @property
    def policy_state(self) -> EndpointState:
        return EndpointState(self.identity, self.flags, self.labels)

    def map_value(self) -> EndpointInfo:
        return EndpointInfo(
            ifindex=self.host_ifindex,
            sec_identity=self.identity,
            ep_id=self.id,
            flags=self.flags,
            mac=mac_bytes(self.mac),
            node_mac=mac_bytes(self.host_mac),
        )


def host_ifname(container_id: str, ifname: str) -> str:
    """`lxc` + 11 hex digits: stable for a (container, interface), within IFNAMSIZ."""
    return "lxc" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def _is_veth(ipr, index: int) -> bool:
    try:
        (link,) = ipr.get_links(index)
    except NetlinkError:  # no such interface
        return False
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"


def _no_ipv6_addresses(ipr, index: int) -> None:
    """No IPv6 link-local address on a pod's veth ends (addrgenmode none): pods here are
    IPv4 only and the datapath drops every other frame (DROP_NOT_IPV4), so the kernel's
    router solicitations and DAD would only be drops to count."""
    ipr.link("set", index=index, IFLA_AF_SPEC={
        "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]})


def _link_mac(ipr: IPRoute, index: int) -> str:
    return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


class Undo:
    """A stack of compensating actions for a multi-step change."""

    def __init__(self):
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self) -> None:
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as err:  # keep undoing the rest
                log.warning("undo %s failed: %s", what, err)


class EndpointManager:
    def __init__(
        self,
        node_name: str,
        datapath: Datapath,
        ipam: Ipam,
        state_path: Path,
        mtu: int,
        labels_for: Callable[[str, str], dict[str, str] | None],
    ):
        # Set by the agent: `admit` gives a new endpoint its identity and policy before
        # its endpoints map entry makes it reachable (through apply_policy_state, while
        # it is in the snapshot as the endpoint being admitted); `changed` follows every
        # add/delete.
        self.admit: Callable[[Endpoint], None] = lambda ep: None
        self.changed: Callable[[Endpoint, bool], None] = lambda ep, added: None
        # Whether the datastore says a pod runs in the node's network (hostNetwork).
        self.host_network: Callable[[str, str], bool] = lambda namespace, name: False
        self.node_name = node_name
        self.dp = datapath
        self.ipam = ipam
        self.state_path = state_path
        self.mtu = mtu
        self.labels_for = labels_for
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        # ADD, DEL, GC, CHECK one at a time (an ADD's admission takes the policy
        # engine's lock inside this one: never the other way round).
        self.lock = threading.RLock()
        # The records, the endpoints map and the state file, held only while they
        # change (a policy writer applying states takes it inside the engine's lock).
        self._state = threading.RLock()
        self._admitting: Endpoint | None = None  # an ADD's, between admit and its entry
        self._add_steps: list[tuple[str, float]] = []  # the running ADD's, for its log line
        self._unmapped: set[tuple[str, str]] = set()  # a DEL removed their entries
        self._emap = datapath.map(layouts.ENDPOINTS)
        self._ct = datapath.map(layouts.CONNTRACK)
        self._last_id = 0  # the last endpoint id given (ids go round, see _next_id)

    # ---- persistence -------------------------------------------------------------

    def save(self) -> None:
        with self._state:
            # vars(): the records' own fields, not asdict's deep copy of each (every
            # ADD and DEL writes them all)
            write_json(self.state_path,
                       {"endpoints": [vars(e) for e in self.endpoints.values()]})

    def restore(self) -> None:
        """Takes back the endpoints of a previous run: re-attaches the freshly loaded
        program (an atomic replace) and rewrites each map entry; nothing is torn down,
        so traffic of running pods never stops. Never weaker than the kernel's state:
        enforcement flags already in the map stay (a crash may have come between writing
        them and saving the state file), and an entry the state file does not know (lost
        or corrupt) stays too while its veth exists: the pod stays as enforced as it was,
        and only an entry whose interface is gone (its pod is gone) is removed."""
        with self.lock, self._state:
            for raw in read_json(self.state_path, {}).get("endpoints", []):
                ep = Endpoint(**raw)
                self.endpoints[ep.key] = ep
            in_map = {key.ip: (key, value) for key, value in self._emap.items()}
            with IPRoute() as ipr:
                for ep in self.endpoints.values():
                    index = _lookup(ipr, ep.host_ifname)
                    if index != ep.host_ifindex:
                        log.warning(
                            "endpoint %s (%s/%s): host veth %s is gone; its pod lost its "
                            "network; the runtime's DEL or GC will remove it",
                            ep.id, ep.pod_namespace, ep.pod_name, ep.host_ifname,
                        )
                        continue
                    self.dp.attach_endpoint(ep.host_ifindex)
                    key = EndpointKey.for_ip(ep.ip)
                    value = ep.map_value()
                    _, old = in_map.get(ep.ip, (None, None))
                    if old is not None and old.ifindex == value.ifindex:
                        value.flags |= old.flags & ENFORCEMENT_FLAGS
                        if not old.flags & layouts.ENDPOINT_F_AUDIT:  # it loosens
                            value.flags &= ~layouts.ENDPOINT_F_AUDIT
                    self._emap.update(key, value)
                known = {ep.ip for ep in self.endpoints.values()}
                for key, value in list(in_map.values()):
                    if key.ip in known:
                        continue
                    if _is_veth(ipr, value.ifindex):
                        log.warning(
                            "endpoints map entry %s (endpoint %d, interface %d) is not in "
                            "the state file (%s lost or damaged?): kept as it is, enforced "
                            "as before; the runtime's DEL removes it with its pod",
                            key.ip, value.ep_id, value.ifindex, self.state_path)
                        continue
                    log.info("removing stale endpoints map entry %s", key.ip)
                    self._emap.delete(key)
                    del in_map[key.ip]
            # Leases must match what the node has, whatever ipam.json said (lost,
            # damaged): an address in use is never handed out again.
            for ep in self.endpoints.values():
                if self.ipam.reserve(ep.ip, ep.owner):
                    log.warning("endpoint %d: lease of %s restored", ep.id, ep.ip)
            for ip in in_map:  # what the map holds now: records and kept entries
                if self.ipam.reserve(ip, f"{RECOVERED}{ip}"):
                    log.warning("lease of %s restored for an endpoint without a record", ip)
            log.info("restored %d endpoints", len(self.endpoints))

    # ---- lookups -----------------------------------------------------------------

    def list(self) -> list[Endpoint]:
        """A snapshot, without the lock: a dict copy is atomic, so status and listings
        answer at once even while a long policy sync holds the lock."""
        return sorted(self.endpoints.copy().values(), key=lambda e: e.id)

    # ---- policy ------------------------------------------------------------------

    def snapshot(self) -> list[Endpoint]:
        """The endpoints policy is computed for: every recorded one but those a DEL has
        unmapped, and the one an ADD is admitting (records: they never change)."""
        with self._state:
            out = [e for k, e in self.endpoints.items() if k not in self._unmapped]
            if self._admitting is not None:
                out.append(self._admitting)
            return out

    def policy_states(self) -> dict[int, EndpointState]:
        """Each endpoint's policy state as it stands (for the writer's fail-closed)."""
        return {e.id: e.policy_state for e in self.snapshot()}

    def apply_policy_state(self, states: Mapping[int, EndpointState]) -> bool:
        """The policy writer's one way in: sets the endpoints' identities, flags and
        labels as `states` says (by endpoint id; others stay), writes the endpoints map
        entries that change and saves the state file. An endpoint being admitted gets
        its state, its entry comes with its ADD; one a DEL unmapped is left alone.
        Answers whether any map entry changed."""
        mapped = recorded = False
        with self._state:
            try:
                if (ep := self._admitting) is not None and ep.id in states:
                    self._admitting = _with_state(ep, states[ep.id])
                for key, ep in list(self.endpoints.items()):
                    state = states.get(ep.id)
                    if state is None or key in self._unmapped or state == ep.policy_state:
                        continue
                    new = _with_state(ep, state)
                    if (new.identity, new.flags) != (ep.identity, ep.flags):
                        self._emap.update(EndpointKey.for_ip(ep.ip), new.map_value())
                        mapped = True
                    self.endpoints[key] = new
                    recorded = True
            finally:
                if recorded:
                    self.save()
        return mapped

    def _next_id(self) -> int:
        """The next free id after the last one given, not the lowest: a new pod should
        not carry the id of one just deleted (conntrack entries name endpoints by id)."""
        used = {e.id for e in self.endpoints.values()}
        last = max(self._last_id, max(used, default=0))
        for step in range(1, MAX_ENDPOINT_ID + 1):
            i = (last + step - 1) % MAX_ENDPOINT_ID + 1
            if i not in used:
                self._last_id = i
                return i
        raise CNIError(TRY_AGAIN_LATER, "no free endpoint id on this node")

    def _purge_conntrack(self, ip: str) -> int:
        """Removes every conntrack entry of an address whose pod is gone, before the
        address can be given again: no later pod may pass on the old pod's verdicts."""
        packed = EndpointKey.for_ip(ip).ip4
        stale = [k for k in self._ct.keys() if packed in (k.saddr, k.daddr)]
        for key in stale:
            self._ct.delete(key)
        return len(stale)

    # ---- ADD ---------------------------------------------------------------------

    def add(
        self, container_id: str, netns: str, ifname: str, network_name: str,
        pod_namespace: str, pod_name: str,
    ) -> Endpoint:
        started = time.monotonic()
        with self.lock:
            self._add_steps = [("", started)]
            existing = self.endpoints.get((container_id, ifname))
            if existing:
                if existing.netns == netns:
                    return existing  # a retried ADD: same answer
                raise CNIError(
                    INVALID_CONFIG,
                    f"container {container_id} already has {ifname} in {existing.netns}",
                    "DEL it first",
                )
            if pod_name and self.host_network(pod_namespace or "default", pod_name):
                # Its netns is the node's: a veth, an address and routes there would
                # take over the node's network, and its address is the node's.
                raise CNIError(
                    INVALID_ENV,
                    f"pod {pod_namespace}/{pod_name} has spec.hostNetwork: it uses the "
                    "node's network and gets no endpoint",
                    "runtimes do not call CNI for hostNetwork pods; check K8S_POD_NAME",
                )
            labels = self.labels_for(pod_namespace, pod_name) if pod_name else None
            if pod_name and labels is None:
                log.warning("pod %s/%s is not in the datastore: no labels", pod_namespace, pod_name)
            try:
                netns_fd = open_netns(netns)
            except OSError as err:
                raise CNIError(
                    UNKNOWN_CONTAINER, str(err), "CNI_NETNS must name the pod's netns"
                ) from err
            undo = Undo()
            try:
                ep = self._build(
                    undo, container_id, netns_fd, netns, ifname, network_name,
                    pod_namespace, pod_name, labels or {},
                )
                self.save()
                self._step("saved")
            except BaseException as err:
                undo.run()
                if isinstance(err, CNIError):
                    raise
                raise _as_cni_error(err, "ADD") from err
            finally:
                os.close(netns_fd)
            log.info(
                "endpoint %d: %s/%s %s on %s (container %s), identity %d, added in %.1f ms "
                "(%s)", ep.id, pod_namespace, pod_name, ep.ip, ep.host_ifname,
                container_id[:12], ep.identity, (time.monotonic() - started) * 1000,
                self._add_timings(),
            )
            self.changed(ep, True)
            return ep

    def _step(self, name: str) -> None:
        """An ADD's step done: where a crash test may stop it (add:NAME), and when, for
        the ADD's log line."""
        crash_point(f"add:{name}")
        self._add_steps.append((name, time.monotonic()))

    def _add_timings(self) -> str:
        """Where an ADD's time went: each step's milliseconds, for the log line (the
        steps are those a crash test can stop at)."""
        steps = self._add_steps
        return ", ".join(f"{name} {(t - steps[i][1]) * 1000:.1f}"
                         for i, (name, t) in enumerate(steps[1:]))

    def _build(
        self, undo: Undo, container_id: str, netns_fd: int, netns: str, ifname: str,
        network_name: str, pod_namespace: str, pod_name: str, labels: dict[str, str],
    ) -> Endpoint:
        owner = f"{container_id}/{ifname}"
        try:
            ip = self.ipam.allocate(owner)
        except IpamExhausted as err:
            raise CNIError(TRY_AGAIN_LATER, str(err)) from err
        undo.push(f"release {ip}", lambda: self.ipam.release(owner))
        self._step("leased")

        hname = host_ifname(container_id, ifname)
        with IPRoute() as ipr:
            if _lookup(ipr, hname) is not None:
                # A veth left by a crashed ADD of this same attachment.
                ipr.link("del", ifname=hname)
            ipr.link(
                "add", ifname=hname, kind="veth", mtu=self.mtu,
                peer={"ifname": ifname, "net_ns_fd": netns_fd, "mtu": self.mtu},
            )
            undo.push(f"delete {hname}", lambda: _delete_link(hname))
            self._step("veth")
            hindex = _lookup(ipr, hname)
            hmac = _link_mac(ipr, hindex)
            _no_ipv6_addresses(ipr, hindex)
            ipr.link("set", index=hindex, state="up")

        with iproute_in(netns_fd) as pod:
            pindex = _lookup(pod, ifname)
            if pindex is None:
                raise CNIError(IO_FAILURE, f"{ifname} did not appear in {netns}")
            pmac = _link_mac(pod, pindex)
            pod.addr("add", index=pindex, address=ip, prefixlen=32)
            _no_ipv6_addresses(pod, pindex)
            pod.link("set", index=pindex, state="up")
            pod.route("add", dst=f"{GATEWAY}/32", oif=pindex, scope=SCOPE_LINK)
            pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=pindex)
            pod.neigh("add", dst=GATEWAY, lladdr=hmac, ifindex=pindex, state=NUD_PERMANENT)
        self._step("pod")

        with IPRoute() as ipr:
            ipr.route("add", dst=f"{ip}/32", oif=hindex, scope=SCOPE_LINK)
            ipr.neigh("add", dst=ip, lladdr=pmac, ifindex=hindex, state=NUD_PERMANENT)
        self._step("routed")
        self.dp.attach_endpoint(hindex)
        self._step("attached")

        ep = Endpoint(
            id=self._next_id(), container_id=container_id, ifname=ifname, netns=netns,
            network_name=network_name, pod_namespace=pod_namespace, pod_name=pod_name,
            ip=ip, mac=pmac, host_ifname=hname, host_ifindex=hindex, host_mac=hmac,
            mtu=self.mtu, labels=labels,
        )
        self._admit(undo, ep)
        self._step("admitted")
        ep = self._map(undo, ep.key)
        self._step("mapped")
        return ep

    def _admit(self, undo: Undo, ep: Endpoint) -> None:
        """Identity and policy first: the pod is never reachable while open by mistake.
        While admitted, the endpoint is in every policy snapshot, so a sync that comes
        before its record exists computes its policy too (and gives it its state)."""
        with self._state:
            self._admitting = ep
        try:
            self.admit(ep)
        except BaseException as err:
            with self._state:
                self._admitting = None
            if isinstance(err, CNIError) or not isinstance(err, Exception):
                raise
            # the datastore (API server) is away, a map is full...
            raise CNIError(
                TRY_AGAIN_LATER,
                f"cannot give pod {ep.pod_namespace}/{ep.pod_name} its identity and "
                "policy yet", f"{err!r}; the pod stays without network until this succeeds",
            ) from err
        undo.push("policy of the endpoint", lambda: self._unadmit(ep))

    def _unadmit(self, ep: Endpoint) -> None:
        with self._state:
            if self._admitting is not None and self._admitting.key == ep.key:
                self._admitting = None
        self.changed(ep, False)

    def _map(self, undo: Undo, key: tuple[str, str]) -> Endpoint:
        """The admitted endpoint, as policy last set it, into the endpoints map (it is
        reachable from now on) and recorded, in one step for the policy writer."""
        with self._state:
            ep = self._admitting
            entry = EndpointKey.for_ip(ep.ip)
            try:
                self._emap.update(entry, ep.map_value())
            except MapFullError as err:
                raise CNIError(TRY_AGAIN_LATER, str(err)) from err
            self.endpoints[key] = ep
            self._admitting = None
        undo.push("endpoints map entry and record", lambda: self._unmap(key, entry))
        return ep

    def _unmap(self, key: tuple[str, str], entry: EndpointKey) -> None:
        with self._state:
            self.endpoints.pop(key, None)
            self._emap.delete(entry)

    # ---- DEL ---------------------------------------------------------------------

    def delete(self, container_id: str, ifname: str) -> Endpoint | None:
        """Removes everything of an attachment; a second call finds nothing and succeeds."""
        with self.lock:
            ep = self.endpoints.get((container_id, ifname))
            ips = {ep.ip} if ep else set()
            # By name too: a crashed ADD, or a restore that lost the state file, may have
            # left a veth (and an endpoints map entry naming it) without a record.
            hname = host_ifname(container_id, ifname)
            with IPRoute() as ipr:
                index = _lookup(ipr, hname)
            if index is not None:
                ips |= {k.ip for k, v in self._emap.items() if v.ifindex == index}
            with self._state:  # and no policy state writes the entry back
                if ep:
                    self._unmapped.add(ep.key)
                for ip in ips:
                    self._emap.delete(EndpointKey.for_ip(ip))
            crash_point("del:unmapped")
            _delete_link(hname)
            crash_point("del:unlinked")
            for ip in ips:
                purged = self._purge_conntrack(ip)
                log.debug("%s: %d conntrack entries removed", ip, purged)
                if self.ipam.owner_of(ip) == f"{RECOVERED}{ip}":
                    self.ipam.release_address(ip)
            self.ipam.release(f"{container_id}/{ifname}")
            crash_point("del:released")
            if ep:
                with self._state:
                    del self.endpoints[ep.key]
                    self._unmapped.discard(ep.key)
                    self.save()
                log.info("endpoint %d deleted (%s/%s)", ep.id, ep.pod_namespace, ep.pod_name)
                self.changed(ep, False)
            return ep

    def gc(self, network_name: str, valid: set[tuple[str, str]]) -> list[Endpoint]:
        """CNI GC: removes this network's endpoints that the runtime no longer knows."""
        with self.lock:
            stale = [
                e for e in self.endpoints.values()
                if e.network_name == network_name
                and e.key not in valid
                and (e.container_id, "") not in valid
            ]
            for e in stale:
                self.delete(e.container_id, e.ifname)
            # Leases whose endpoint is gone (an agent crash between lease and record).
            owners = {e.owner for e in self.endpoints.values()}
            in_map = {k.ip for k in self._emap.keys()}
            for ip, owner in list(self.ipam.leases.items()):
                if owner not in owners and ip not in in_map:
                    log.info("GC: releasing orphaned lease %s (%s)", ip, owner)
                    self.ipam.release(owner)
            return stale

    # ---- CHECK -------------------------------------------------------------------

    def check(self, container_id: str, netns: str, ifname: str) -> None:
        """Compares the endpoint as recorded with what is really there; every difference
        is reported in the error's details."""
        with self.lock:
            ep = self.endpoints.get((container_id, ifname))
            if ep is None:
                raise CNIError(
                    UNKNOWN_CONTAINER,
                    f"no endpoint for container {container_id} interface {ifname}",
                    "ADD was never called, or DEL already ran",
                )
            problems = self._diff(ep, netns)
        if problems:
            raise CNIError(
                ENDPOINT_MISMATCH,
                f"endpoint {ep.id} ({ep.pod_namespace}/{ep.pod_name}) does not match its "
                f"recorded state: {problems[0]}",
                "; ".join(problems),
            )

    def _diff(self, ep: Endpoint, netns: str) -> list[str]:
        problems = []
        if netns and netns != ep.netns:
            problems.append(f"netns is {netns}, recorded {ep.netns}")
        with IPRoute() as ipr:
            if _lookup(ipr, ep.host_ifname) != ep.host_ifindex:
                problems.append(f"host veth {ep.host_ifname} (ifindex {ep.host_ifindex}) is gone")
            elif not any(
                r.get_attr("RTA_OIF") == ep.host_ifindex
                for r in ipr.get_routes(family=socket.AF_INET, dst=ep.ip, dst_len=32)
            ):
                problems.append(f"node route {ep.ip}/32 dev {ep.host_ifname} is missing")
            elif not self.dp.endpoint_attached(ep.host_ifindex):
                problems.append(f"pod programs missing from {ep.host_ifname} tc hooks")
        with self._state:
            ep = self.endpoints.get(ep.key, ep)  # as policy may just have set it
            entry = self._emap.lookup(EndpointKey.for_ip(ep.ip))
        if entry != ep.map_value():
            problems.append(
                f"endpoints map entry for {ep.ip} is {entry}, expected {ep.map_value()}"
            )
        try:
            fd = open_netns(ep.netns)
        except OSError as err:
            problems.append(str(err))
            return problems
        try:
            with iproute_in(fd) as pod:
                index = _lookup(pod, ep.ifname)
                if index is None:
                    problems.append(f"{ep.ifname} is gone from {ep.netns}")
                    return problems
                addrs = {a.get_attr("IFA_ADDRESS") for a in pod.get_addr(index=index)}
                if ep.ip not in addrs:
                    problems.append(f"{ep.ifname} lacks address {ep.ip}/32")
                if not any(
                    r.get_attr("RTA_GATEWAY") == GATEWAY and r["dst_len"] == 0
                    for r in pod.get_routes(family=socket.AF_INET, oif=index)
                ):
                    problems.append(f"default route via {GATEWAY} in {ep.netns} is missing")
        finally:
            os.close(fd)
        return problems


def _with_state(ep: Endpoint, state: EndpointState) -> Endpoint:
    return replace(ep, identity=state.identity, flags=state.flags, labels=dict(state.labels))


class EndpointsView:
    """The node's endpoints, read only (records that never change): what the server,
    the metrics and policy queries see."""

    def __init__(self, manager: EndpointManager):
        self._manager = manager

    def list(self) -> list[Endpoint]:
        return self._manager.list()

    def find(self, namespace: str, name: str) -> Endpoint | None:
        return next((e for e in self.list()
                     if e.pod_namespace == namespace and e.pod_name == name), None)

    def by_ip(self, ip: str) -> Endpoint | None:
        return next((e for e in self.list() if e.ip == ip), None)


def _delete_link(name: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise


def _as_cni_error(err: BaseException, command: str) -> CNIError:
    if isinstance(err, NetlinkError):
        return CNIError(IO_FAILURE, f"{command}: netlink: {os.strerror(err.code)}", str(err))
    if isinstance(err, OSError):
        return CNIError(IO_FAILURE, f"{command}: {err}")
    return CNIError(INTERNAL, f"{command}: {err!r}")

