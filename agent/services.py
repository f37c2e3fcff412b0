"""The services controller: Service frontends and their backends, into the load
balancer's maps (bpf/include/cilia/services.h), which cil_from_pod translates from before
conntrack and policy (bpf/lib/lb.h).

Where the state comes from:
- the kubernetes datastore: each Service's ClusterIPs (`spec.clusterIPs`, else
  `spec.clusterIP`; IPv4 only) and ports (TCP and UDP), and its EndpointSlices
  (`discovery.k8s.io/v1`, label `kubernetes.io/service-name`): for each Service port,
  the slice port of the same name and protocol gives the target port (the EndpointSlice
  controller has resolved named targetPorts per pod), each endpoint's first address the
  backend. Ready endpoints (`conditions.ready` true, or unset) take new connections;
  terminating ones that still serve keep the connections they have (their backend
  entry stays) but get no new ones.
- the local datastore (`cilia apply -f` a Service): the pods of the Service's namespace
  whose labels match `spec.selector` and that have an address, each a ready backend;
  a named `targetPort` is the pod's container port of that name and protocol. A Service
  without a `clusterIP` gets one from `--service-cidr` (see `assign_cluster_ips`).
Frontends: each ClusterIP, and each of `spec.externalIPs` and
`status.loadBalancer.ingress[].ip` (for pods; from outside the node they are NodePort's
path, not built yet), on every Service port; and for NodePort and LoadBalancer Services,
every node's address (from the CiliaNodes) on each port's `nodePort`, so a pod reaching
any node's NodePort is translated at its own node, before policy, like a ClusterIP (one
frontend per node address and port: the 65,535 service ids bound nodes x NodePorts). A
local datastore's NodePort Service without `nodePort`s gets them from 30000-32767,
deterministically (see `assign_node_ports`). Headless Services (`clusterIP: None`) and
ExternalName Services are left alone. `internalTrafficPolicy: Local` limits the backends
to this node's endpoints. `sessionAffinity: ClientIP` keeps a client on its backend
(bpf/include/cilia/services.h, cilia_lb4_affinity) for
`sessionAffinityConfig.clientIP.timeoutSeconds` (10800 unless set) after its last new
connection, while that backend stays ready.

How it syncs: incrementally. The datastore's feed names the objects that changed (the
kubernetes datastore's informers wake the agent at once); only the Services they touch
(a Service, its EndpointSlices) and the Pods (their hostPorts) are recomputed, each on
its own, reading the informers' objects without copying them, and only their frontends
are compared with what the maps hold (the controller's record of them, rebuilt from the
maps at start, so ids survive restarts and established connections keep their backends).
Everything is recomputed only at start, after a sync that failed, when node addresses
change (NodePorts), and from the local datastore, which cannot say what changed. Only
differences are written, in an order where no packet finds a slot without its backend: backends that
are new, then per service its reverse NAT, its slots, and its entry (a count that shrinks
first, one that grows last), then removed services (entry, slots, reverse NAT), and
unused backends last. `plan()` is that order, pure, and tested on its own.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cilia.datapath import layouts
from cilia.datapath.layouts import (
    U16,
    U32,
    Lb4AffinityMatch,
    Lb4AffinityMatchKey,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    Lb4Slot,
    Lb4SlotKey,
    Lb4SnatSource,
)
from cilia.datastore import ObjectKey

log = logging.getLogger(__name__)

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
PROTOCOLS = {"TCP": 6, "UDP": 17}  # what the datapath translates
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# What the controller reads: a change of one of these wakes it (see ServiceController).
SERVICE_KINDS = ("Service", "EndpointSlice", "Pod", "CiliaNode")
MAX_REV_NAT_ID = 0xFFFF
MAX_BACKEND_ID = 0xFFFFFFFF
MAX_SLOTS = 0xFFFF
NODE_PORT_RANGE = (30000, 32767)  # the API server's default --service-node-port-range
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds: the API server's default
MAX_AFFINITY_TIMEOUT = 86400  # the API server's limit


@dataclass(frozen=True, order=True)
class Frontend:
    ip: str
    port: int
    proto: int
    scope: int = layouts.LB_SCOPE_INTERNAL  # LB_SCOPE_EXTERNAL: from outside, at an uplink

    def __str__(self) -> str:
        out = f"{self.ip}:{self.port}/{PROTOCOL_NAMES.get(self.proto, self.proto)}"
        return out + ("/external" if self.scope == layouts.LB_SCOPE_EXTERNAL else "")


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int
    proto: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServiceEntry:
    """One frontend as the datastore wants it."""

    frontend: Frontend
    service: str = ""  # NAMESPACE/NAME
    port_name: str = ""
    backends: tuple[Backend, ...] = ()  # ready: new connections go to these
    terminating: tuple[Backend, ...] = ()  # kept for their connections only
    flags: int = layouts.LB_F_CLUSTER_IP
    affinity_timeout: int = 0  # ClientIP session affinity: seconds; 0 none


# ---- from the datastore ------------------------------------------------------------


def _name(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def _ipv4(value: object) -> str | None:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return None


def translated(svc: dict) -> bool:
    """A Service whose ClusterIPs cilia translates: not headless, not ExternalName."""
    spec = svc.get("spec") or {}
    return spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None"


def cluster_ips(svc: dict) -> list[str]:
    spec = svc.get("spec") or {}
    if not translated(svc):
        return []
    raw = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in (_ipv4(r) for r in raw) if ip]


def external_ips(svc: dict) -> list[str]:
    """The addresses outside the cluster's that the Service also answers on: its
    `externalIPs` and its load balancer's ingress IPs (IPv4 ones)."""
    if not translated(svc):
        return []
    spec = svc.get("spec") or {}
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    raw = list(spec.get("externalIPs") or []) + [i.get("ip") for i in ingress if i.get("ip")]
    return list(dict.fromkeys(ip for ip in (_ipv4(r) for r in raw) if ip))


def affinity_timeout(svc: dict) -> int:
    """Seconds a client keeps its backend (`sessionAffinity: ClientIP`), else 0."""
    spec = svc.get("spec") or {}
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    client_ip = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    try:
        seconds = int(client_ip.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
    except (TypeError, ValueError):
        seconds = DEFAULT_AFFINITY_TIMEOUT
    return min(max(seconds, 1), MAX_AFFINITY_TIMEOUT)


def assign_cluster_ips(services: list[dict], cidr: str) -> dict[tuple[str, str], str]:
    """The local datastore's ClusterIPs, for Services that name none, as an API server
    would allocate them, but with no API server to remember them: deterministically.
    Each such Service's first choice is the address at offset 2 + (the first 8 bytes of
    sha256("NAMESPACE/NAME") mod (size - 3)) in the CIDR (never its network address,
    the .1 that Kubernetes gives the `kubernetes` Service, or its broadcast); taken
    ones (explicit ClusterIPs, then Services earlier in (namespace, name) order) move
    it on to the next free address. So a Service keeps its address as long as nothing
    takes that address first, and every agent computes the same."""
    net = ipaddress.IPv4Network(cidr)
    size = net.num_addresses
    taken = {ip for s in services for ip in cluster_ips(s)}
    out: dict[tuple[str, str], str] = {}
    if size < 8:
        return out
    for svc in sorted(services, key=_name):
        spec = svc.get("spec") or {}
        if not translated(svc) or spec.get("clusterIP") or spec.get("clusterIPs"):
            continue
        ns, name = _name(svc)
        digest = hashlib.sha256(f"{ns}/{name}".encode()).digest()
        offset = 2 + int.from_bytes(digest[:8], "big") % (size - 3)
        for i in range(size - 3):
            ip = str(net.network_address + 2 + (offset - 2 + i) % (size - 3))
            if ip not in taken:
                taken.add(ip)
                out[(ns, name)] = ip
                break
    return out


def node_port_service(svc: dict) -> bool:
    return translated(svc) and (svc.get("spec") or {}).get("type") in ("NodePort",
                                                                         "LoadBalancer")


def assign_node_ports(services: list[dict]) -> dict[tuple[str, str, str, int], int]:
    """The local datastore's nodePorts, for NodePort ports that name none: (namespace,
    name, port name, port) -> a port of NODE_PORT_RANGE, first choice sha256 of those
    four, the next free one on a collision (explicit ones are taken first, then in
    (namespace, name) order), as assign_cluster_ips does for addresses."""
    low, high = NODE_PORT_RANGE
    size = high - low + 1
    taken = {int(p["nodePort"]) for s in services if node_port_service(s)
             for p in (s.get("spec") or {}).get("ports") or [] if p.get("nodePort")}
    out: dict[tuple[str, str, str, int], int] = {}
    for svc in sorted(services, key=_name):
        if not node_port_service(svc):
            continue
        ns, name = _name(svc)
        for p in (svc.get("spec") or {}).get("ports") or []:
            if p.get("nodePort") or not p.get("port"):
                continue
            key = (ns, name, p.get("name") or "", int(p["port"]))
            digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
            first = int.from_bytes(digest[:8], "big") % size
            for i in range(size):
                candidate = low + (first + i) % size
                if candidate not in taken:
                    taken.add(candidate)
                    out[key] = candidate
                    break
    return out


def _node_ports(svc: dict, assigned: dict | None = None) -> dict[tuple[str, int], int]:
    """(port name, protocol) -> nodePort of a NodePort or LoadBalancer Service."""
    if not node_port_service(svc):
        return {}
    ns, name = _name(svc)
    out = {}
    for p in (svc.get("spec") or {}).get("ports") or []:
        proto = PROTOCOLS.get(p.get("protocol") or "TCP")
        if proto is None or not p.get("port"):
            continue
        port = p.get("nodePort") or (assigned or {}).get(
            (ns, name, p.get("name") or "", int(p["port"])))
        if port:
            out[(p.get("name") or "", proto)] = int(port)
    return out


def _ports(svc: dict) -> list[tuple[str, int, int, object]]:
    """(name, protocol number, port, targetPort) of each translated port."""
    out = []
    for p in (svc.get("spec") or {}).get("ports") or []:
        proto = PROTOCOLS.get(p.get("protocol") or "TCP")
        if proto is None or not p.get("port"):
            continue  # SCTP: left to kube-proxy for now
        out.append((p.get("name") or "", proto, int(p["port"]), p.get("targetPort")))
    return out


@dataclass(frozen=True)
class NodeAddresses:
    """Where NodePorts answer: every node's addresses (for pods, which are translated at
    their own node whichever node they address), and this node's own (for traffic from
    outside, which arrives at the node it is addressed to)."""

    all: tuple[str, ...] = ()
    own: tuple[str, ...] = ()
    external: bool = True  # translate for outside clients (--kube-proxy-replacement)


def _frontends(svc: dict, cluster: list[str], port_name: str, proto: int, port: int,
               nodes: NodeAddresses, node_ports: dict[tuple[str, int], int]
               ) -> list[tuple[Frontend, int, bool]]:
    """(frontend, lb4_service flags, this node's backends only) of one Service port.
    Internal scope: its ClusterIPs (`internalTrafficPolicy: Local`: this node's backends
    only) and external IPs on the port, every node's address on its nodePort (all
    backends: pods are internal clients, whatever address they use). External scope, when
    cilia replaces kube-proxy (`nodes.external`): with `externalTrafficPolicy: Local`, its
    external IPs and this node's addresses on its nodePort, this node's backends only
    (clients keep their source address); with `Cluster`, the same frontends with every
    backend, those on other nodes reached SNATed to this node (LB_F_SNAT)."""
    spec = svc.get("spec") or {}
    affinity = layouts.LB_F_AFFINITY if affinity_timeout(svc) else 0
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    out = [(Frontend(ip, port, proto), layouts.LB_F_CLUSTER_IP | affinity, internal_local)
           for ip in cluster]
    out += [(Frontend(ip, port, proto), layouts.LB_F_EXTERNAL_IP | affinity, False)
            for ip in external_ips(svc) if ip not in cluster]
    node_port = node_ports.get((port_name, proto))
    if node_port:
        out += [(Frontend(ip, node_port, proto), layouts.LB_F_NODEPORT | affinity, False)
                for ip in nodes.all]
    if not nodes.external:
        return out
    ext = layouts.LB_SCOPE_EXTERNAL
    if spec.get("externalTrafficPolicy") == "Local":
        out += [(Frontend(ip, port, proto, ext), layouts.LB_F_EXTERNAL_IP | affinity, True)
                for ip in external_ips(svc) if ip not in cluster]
        if node_port:
            out += [(Frontend(ip, node_port, proto, ext), layouts.LB_F_NODEPORT | affinity,
                     True) for ip in nodes.own]
    else:
        out += [(Frontend(ip, port, proto, ext),
                 layouts.LB_F_EXTERNAL_IP | layouts.LB_F_SNAT | affinity, False)
                for ip in external_ips(svc) if ip not in cluster]
        if node_port:
            out += [(Frontend(ip, node_port, proto, ext),
                     layouts.LB_F_NODEPORT | layouts.LB_F_SNAT | affinity, False)
                    for ip in nodes.own]
    return out


def from_endpoint_slices(services: list[dict], slices: list[dict], node_name: str = "",
                         nodes: NodeAddresses = NodeAddresses()
                         ) -> dict[Frontend, ServiceEntry]:
    """The kubernetes datastore's frontends: Services and their EndpointSlices; a
    frontend limited to this node's backends (`_frontends`) takes the endpoints whose
    `nodeName` is `node_name`."""
    by_service: dict[tuple[str, str], list[dict]] = {}
    for sl in slices:
        if (owner := slice_owner(sl)) is not None:
            by_service.setdefault(owner, []).append(sl)
    out: dict[Frontend, ServiceEntry] = {}
    for svc in services:
        ns, name = _name(svc)
        timeout = affinity_timeout(svc)
        node_ports = _node_ports(svc)
        for port_name, proto, port, _ in _ports(svc):
            for fe, flags, local in _frontends(svc, cluster_ips(svc), port_name, proto, port,
                                               nodes, node_ports):
                ready: set[Backend] = set()
                terminating: set[Backend] = set()
                for sl in by_service.get((ns, name), []):
                    target = _slice_port(sl, port_name, proto)
                    if target is None:
                        continue
                    for ep in sl.get("endpoints") or []:
                        addr = _ipv4(next(iter(ep.get("addresses") or []), ""))
                        if addr is None or (local and ep.get("nodeName") != node_name):
                            continue
                        cond = ep.get("conditions") or {}
                        be = Backend(addr, target, proto)
                        if cond.get("ready") is not False and not cond.get("terminating"):
                            ready.add(be)  # unset means ready (the API's word)
                        elif cond.get("terminating") and cond.get("serving"):
                            terminating.add(be)
                out[fe] = ServiceEntry(fe, f"{ns}/{name}", port_name, tuple(sorted(ready)),
                                       tuple(sorted(terminating - ready)), flags, timeout)
    return out


def slice_owner(sl: dict) -> tuple[str, str] | None:
    """(namespace, name) of the Service an IPv4 EndpointSlice serves; None: not one."""
    owner = ((sl.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not owner or sl.get("addressType", "IPv4") != "IPv4":
        return None
    return _name(sl)[0], owner


def _slice_port(sl: dict, name: str, proto: int) -> int | None:
    for p in sl.get("ports") or []:
        if ((p.get("name") or "") == name and PROTOCOLS.get(p.get("protocol") or "TCP") == proto
                and p.get("port")):
            return int(p["port"])
    return None


def from_pods(services: list[dict], pods: list[dict], service_cidr: str,
              node_name: str = "", nodes: NodeAddresses = NodeAddresses()
              ) -> dict[Frontend, ServiceEntry]:
    """The local datastore's frontends: each Service's selector over the stored pods (a
    frontend limited to this node's backends takes the pods on `node_name`)."""
    assigned = assign_cluster_ips(services, service_cidr)
    assigned_node_ports = assign_node_ports(services)
    out: dict[Frontend, ServiceEntry] = {}
    for svc in services:
        ns, name = _name(svc)
        ips = cluster_ips(svc) or ([assigned[(ns, name)]] if (ns, name) in assigned else [])
        selector = (svc.get("spec") or {}).get("selector") or {}
        members = [p for p in pods if _name(p)[0] == ns and selector and _matches(selector, p)]
        timeout = affinity_timeout(svc)
        node_ports = _node_ports(svc, assigned_node_ports)
        for port_name, proto, port, target in _ports(svc):
            for fe, flags, local in _frontends(svc, ips, port_name, proto, port, nodes,
                                               node_ports):
                ready = set()
                for pod in members:
                    if local and _pod_node(pod) != node_name:
                        continue
                    addr = _pod_address(pod)
                    target_port = _pod_target_port(pod, target, proto, port)
                    if addr and target_port:
                        ready.add(Backend(addr, target_port, proto))
                out[fe] = ServiceEntry(fe, f"{ns}/{name}", port_name, tuple(sorted(ready)),
                                       (), flags, timeout)
    return out


def host_ports(pods: list[dict], node_name: str, nodes: NodeAddresses
               ) -> dict[Frontend, ServiceEntry]:
    """Frontends for the hostPorts of this node's pods (the CNI's job, kube-proxy or not,
    as the portmap plugin does it with iptables): each on this node's addresses, or on its
    `hostIP` when one is given, for pods and the node's own sockets (internal scope) and
    from outside (external; never for a loopback hostIP), the pod's container port the
    one backend. Two pods claiming one (the scheduler prevents it): the first by name."""
    out: dict[Frontend, ServiceEntry] = {}
    for pod in sorted(pods, key=_name):
        if not node_name or _pod_node(pod) != node_name:
            continue
        addr = _pod_address(pod)
        if not addr:
            continue
        ns, name = _name(pod)
        for c in (pod.get("spec") or {}).get("containers") or []:
            for p in c.get("ports") or []:
                proto = PROTOCOLS.get(p.get("protocol") or "TCP")
                if not p.get("hostPort") or not p.get("containerPort") or proto is None:
                    continue
                host_ip = p.get("hostIP") or "0.0.0.0"
                if host_ip == "0.0.0.0":
                    ips = list(nodes.own)
                else:
                    ips = [ip] if (ip := _ipv4(host_ip)) else []
                backend = (Backend(addr, int(p["containerPort"]), proto),)
                for ip in ips:
                    scopes = [layouts.LB_SCOPE_INTERNAL]
                    if not ipaddress.IPv4Address(ip).is_loopback:
                        scopes.append(layouts.LB_SCOPE_EXTERNAL)
                    for scope in scopes:
                        fe = Frontend(ip, int(p["hostPort"]), proto, scope)
                        out.setdefault(fe, ServiceEntry(
                            fe, f"{ns}/{name}", f"hostPort {p['hostPort']}", backend, (),
                            layouts.LB_F_HOSTPORT))
    return out


def node_addresses(cilia_nodes: list[dict], own_name: str, external: bool = True
                   ) -> NodeAddresses:
    """The IPv4 addresses the CiliaNodes name: all of them, and `own_name`'s."""
    every, own = set(), set()
    for node in cilia_nodes:
        for a in (node.get("spec") or {}).get("addresses") or []:
            if isinstance(a, dict) and (ip := _ipv4(a.get("ip") or "")):
                every.add(ip)
                if _name(node)[1] == own_name:
                    own.add(ip)
    return NodeAddresses(tuple(sorted(every)), tuple(sorted(own)), external)


def _pod_node(pod: dict) -> str:
    return ((pod.get("spec") or {}).get("nodeName")
            or (pod.get("status") or {}).get("nodeName") or "")


def _matches(selector: dict, pod: dict) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_address(pod: dict) -> str | None:
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None  # terminating: no new connections
    return _ipv4(status.get("podIP") or "")


def _pod_target_port(pod: dict, target: object, proto: int, port: int) -> int | None:
    if target is None or target == "":
        return port
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and PROTOCOLS.get(p.get("protocol") or "TCP") == proto:
                return int(p["containerPort"]) if p.get("containerPort") else None
    return None  # the pod has no such port: not a backend of this Service port


# ---- what the maps hold, and the plan from there to the desired state -------------------


@dataclass
class LbState:
    """What the load balancer's maps hold, as the controller keeps track of them."""

    services: dict[Frontend, Lb4Service] = field(default_factory=dict)
    slots: dict[int, list[int]] = field(default_factory=dict)  # rev-NAT id -> backend ids
    backends: dict[int, Backend] = field(default_factory=dict)
    revnat: dict[int, Frontend] = field(default_factory=dict)
    # (backend id, rev-NAT id) -> timeout: the ready backends of affinity services
    affinity: dict[tuple[int, int], int] = field(default_factory=dict)
    # backends by backend: built when first asked, then kept in step by apply_to_state
    _ids: dict[Backend, int] | None = field(default=None, compare=False, repr=False)

    def backend_ids(self) -> dict[Backend, int]:
        """Backend -> its id, a copy."""
        return dict(self.id_index())

    def id_index(self) -> dict[Backend, int]:
        """Backend -> its id: the live index, for reading only (plan reads it for a
        handful of backends; copying it would cost every change the whole table)."""
        if self._ids is None:
            self._ids = {b: i for i, b in self.backends.items()}
        return self._ids


@dataclass(frozen=True)
class Op:
    """One map write: `value` None deletes `key` from `table`."""

    table: str  # backend, slot, service, revnat, affinity
    key: object
    value: object = None


class _Ids:
    """Ids to hand out: above the highest in use (so a freed id is not soon reused:
    conntrack entries may still name it), else the lowest free one."""

    def __init__(self, used: Iterable[int], limit: int):
        self.used = set(used)
        self.limit = limit
        self.top = max(self.used, default=0)

    def take(self) -> int:
        if self.top < self.limit:
            self.top += 1
            new = self.top
        else:
            new = next(i for i in range(1, self.limit + 1) if i not in self.used)
        self.used.add(new)
        return new


def _stable_slots(old: list[int], wanted: list[int]) -> list[int]:
    """The new slot list: backends keep their slots, new ones fill the holes, the list is
    compacted from its end; so a change rewrites only the slots that change."""
    keep = set(wanted)
    out: list[int | None] = [b if b in keep else None for b in old]
    new = [b for b in wanted if b not in set(old)]
    for i, b in enumerate(out):
        if b is None and new:
            out[i] = new.pop(0)
    out.extend(new)
    while None in out:
        hole = out.index(None)
        last = out.pop()
        if hole < len(out):
            out[hole] = last
    return [b for b in out if b is not None]


def maglev_table(names: list[str], size: int) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016): `size` (a prime) entries, each
    the index of one of `names`, every name holding about size/len(names) of them. Each
    name's preference list is a permutation of the entries drawn from hashes of the name
    alone, and the names take turns claiming their next preferred free entry; so the table
    depends only on the set of names (not on their order, not on history: every node
    computes the same), and a name joining or leaving moves about size/len(names)
    entries, not all of them."""
    order = sorted(set(names))
    if not order:
        return []
    index = {name: i for i, name in enumerate(names)}
    prefs = []
    for name in order:
        digest = hashlib.sha256(name.encode()).digest()
        offset = int.from_bytes(digest[:8], "big") % size
        skip = int.from_bytes(digest[8:16], "big") % (size - 1) + 1
        prefs.append((offset, skip))
    taken: list[int | None] = [None] * size
    following = [0] * len(order)
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(prefs):
            slot = (offset + following[i] * skip) % size
            while taken[slot] is not None:
                following[i] += 1
                slot = (offset + following[i] * skip) % size
            taken[slot] = index[order[i]]
            following[i] += 1
            filled += 1
            if filled == size:
                return [t for t in taken if t is not None]


def plan(state: LbState, desired: dict[Frontend, ServiceEntry], maglev: int = 0,
         changed: set[Frontend] | None = None, refs: Mapping[Backend, int] | None = None,
         released: Iterable[Backend] = ()) -> list[Op]:
    """The writes that take the maps from `state` to `desired`, in a safe order (module
    docstring). Ids are allocated here; `state` is not changed. `maglev` (a prime, 0:
    off): the slots of external-scope frontends are a Maglev table of that size, so that
    every node picks the same backend for a flow (the datapath's hash of the flow leaves
    out the node's own address), which an outside load balancer spreading one flow's
    packets over several nodes needs. `changed`: the only frontends that may differ
    from `state` (None: any may), so a change costs what it touches; `desired` is still
    the whole of what is wanted (which backends stay named). With `changed`, a caller
    that keeps `refs` (how many of `desired`'s entries name each backend) and the
    backends whose count fell to 0 (`released`) spares the plan every walk over all of
    `desired` and the maps: one EndpointSlice among thousands costs what it touches."""
    ops: list[Op] = []
    known = state.id_index()
    ids: dict[Backend, int] = {}  # the new ones
    if refs is None or changed is None:
        referenced: set[Backend] = set()
        for entry in desired.values():
            referenced.update(entry.backends, entry.terminating)
        refs = dict.fromkeys(referenced, 1)
        released = [b for b in known if b not in referenced]
    frontends = sorted(desired if changed is None else changed & desired.keys())
    gone = sorted((state.services.keys() if changed is None else
                   changed & state.services.keys()) - desired.keys())
    # 1. new backends, before any slot names them
    new_backends = set()
    for fe in frontends:
        new_backends.update(desired[fe].backends, desired[fe].terminating)
    fresh = sorted(b for b in new_backends if b not in known)
    backend_ids = _Ids(state.backends, MAX_BACKEND_ID) if fresh else None
    for be in fresh:
        ids[be] = bid = backend_ids.take()
        ops.append(Op("backend", bid, be))
    # 2. new and changed services
    rev_ids: _Ids | None = None
    affinity: dict[tuple[int, int], int] = {}
    revs_in_scope: set[int] = set()  # whose affinity entries this plan decides
    for fe in frontends:
        entry = desired[fe]
        wanted = [ids[b] if b in ids else known[b] for b in entry.backends][:MAX_SLOTS]
        table = None
        if maglev and fe.scope == layouts.LB_SCOPE_EXTERNAL:
            table = [wanted[i] for i in maglev_table([str(b) for b in entry.backends], maglev)]
        current = state.services.get(fe)
        if current is None:
            if rev_ids is None:
                rev_ids = _Ids(set(state.revnat)
                               | {s.rev_nat_id for s in state.services.values()},
                               MAX_REV_NAT_ID)
            rev = rev_ids.take()
            slots = wanted if table is None else table
            ops.append(Op("revnat", rev, fe))
            ops.extend(Op("slot", (rev, i), b) for i, b in enumerate(slots))
            ops.append(Op("service", fe, Lb4Service(rev, len(slots), entry.flags)))
            if entry.affinity_timeout:
                affinity.update({(b, rev): entry.affinity_timeout for b in wanted})
            continue
        rev = current.rev_nat_id
        revs_in_scope.add(rev)
        if entry.affinity_timeout:
            affinity.update({(b, rev): entry.affinity_timeout for b in wanted})
        old = state.slots.get(rev, [])
        new = _stable_slots(old, wanted) if table is None else table
        value = Lb4Service(rev, len(new), entry.flags)
        writes = [Op("slot", (rev, i), b) for i, b in enumerate(new)
                  if i >= len(old) or old[i] != b]
        removes = [Op("slot", (rev, i)) for i in range(len(new), len(old))]
        if state.revnat.get(rev) != fe:
            ops.append(Op("revnat", rev, fe))
        if value == current:
            ops.extend(writes)
        elif value.count < current.count:  # fewer slots: stop hashing over the old ones first
            ops.append(Op("service", fe, value))
            ops.extend(writes)
        else:  # more slots: fill them before the count reaches them
            ops.extend(writes)
            ops.append(Op("service", fe, value))
        ops.extend(removes)
    # 3. services that went away: entry, slots, reverse NAT
    for fe in gone:
        rev = state.services[fe].rev_nat_id
        revs_in_scope.add(rev)
        ops.append(Op("service", fe))
        ops.extend(Op("slot", (rev, i)) for i in range(len(state.slots.get(rev, []))))
        ops.append(Op("revnat", rev))
    if changed is None:
        for rev in sorted(set(state.revnat) - {s.rev_nat_id for s in state.services.values()}):
            ops.append(Op("revnat", rev))  # orphans (a sync that failed half-way)
    # 4. which backends a client's affinity may still name: no ordering matters here, an
    # entry a moment early or late moves one client's next connection, never a packet
    for key in sorted(set(state.affinity) - set(affinity)):
        if changed is None or key[1] in revs_in_scope:
            ops.append(Op("affinity", key))
    for key, timeout in sorted(affinity.items()):
        if state.affinity.get(key) != timeout:
            ops.append(Op("affinity", key, timeout))
    # 5. backends no longer named by any service
    for bid in sorted(known[be] for be in set(released) if not refs.get(be) and be in known):
        ops.append(Op("backend", bid))
    return ops


def apply_to_state(state: LbState, op: Op) -> None:
    """What `op` does to the record of the maps (after it is written)."""
    if op.table == "backend":
        if op.value is None:
            gone = state.backends.pop(op.key, None)
            if state._ids is not None and gone is not None:
                state._ids.pop(gone, None)
        else:
            state.backends[op.key] = op.value
            if state._ids is not None:
                state._ids[op.value] = op.key
    elif op.table == "revnat":
        if op.value is None:
            state.revnat.pop(op.key, None)
        else:
            state.revnat[op.key] = op.value
    elif op.table == "service":
        if op.value is None:
            state.services.pop(op.key, None)
        else:
            state.services[op.key] = op.value
    elif op.table == "affinity":
        if op.value is None:
            state.affinity.pop(op.key, None)
        else:
            state.affinity[op.key] = op.value
    elif op.table == "slot":
        rev, i = op.key
        slots = state.slots.setdefault(rev, [])
        if op.value is None:
            del slots[i:]
            if not slots:
                state.slots.pop(rev, None)
        else:
            if i < len(slots):
                slots[i] = op.value
            else:
                slots.append(op.value)


# ---- the controller -------------------------------------------------------------------


# Who wants a frontend: ("Service", namespace, name), or ("Pod", namespace, name) for its
# hostPorts.
Source = tuple[str, str, str]


def _precedence(source: Source) -> tuple[bool, str, str]:
    return source[0] != "Service", source[1], source[2]


def _frontend_key(fe: Frontend) -> Lb4Key:
    return Lb4Key(ipaddress.IPv4Address(fe.ip).packed, fe.port, fe.proto, fe.scope)


def _frontend_of(key: Lb4Key) -> Frontend:
    return Frontend(str(ipaddress.IPv4Address(key.address)), key.dport, key.proto, key.scope)


class ServiceController:
    def __init__(self, datapath, datastore, *, source: str = "local", node_name: str = "",
                 service_cidr: str = DEFAULT_SERVICE_CIDR, enabled: bool = True,
                 external: bool = False, maglev: int = 0):
        self.datastore = datastore
        self.node_name = node_name
        self.source = source  # "kubernetes": EndpointSlices; "local": selectors over pods
        self.service_cidr = service_cidr
        self.enabled = enabled
        self.external = external  # from outside too: cilia replaces kube-proxy
        self.maglev = maglev  # Maglev table size for external frontends (0: off)
        self._services = datapath.map(layouts.LB4_SERVICES)
        self._slots = datapath.map(layouts.LB4_SLOTS)
        self._backends = datapath.map(layouts.LB4_BACKENDS)
        self._revnat = datapath.map(layouts.LB4_REVNAT)
        self._affinity_match = datapath.map(layouts.LB4_AFFINITY_MATCH)
        self._snat_source = datapath.map(layouts.LB4_SNAT_SOURCE)
        # What the datastore wants: each frontend from the source that wins it (see
        # _merge), kept from sync to sync and changed only where a source changed.
        self.desired: dict[Frontend, ServiceEntry] = {}
        self._sources: dict[Source, dict[Frontend, ServiceEntry]] = {}
        self._claims: dict[Frontend, set[Source]] = {}
        self._slice_owner: dict[tuple[str, str], tuple[str, str]] = {}  # slice -> Service
        self._slices_of: dict[tuple[str, str], set[str]] = {}  # Service -> its slices
        self._nodes: NodeAddresses | None = None
        self._refs: dict[Backend, int] = {}  # how many wanted entries name each backend
        self._released: set[Backend] = set()  # named by none since the last plan
        self._feed = datastore.subscribe(SERVICE_KINDS)
        self._stale = True  # the next sync reads everything (a failed sync lost its keys)
        self.lock = threading.Lock()  # sync (the reconcile thread) and entries (the API)
        self.state = self._read_maps()
        self.syncs = 0
        self.full_syncs = 0

    def _read_maps(self) -> LbState:
        """What a previous run left in the pinned maps: its ids stay, so connections
        keep their backends across a restart."""
        st = LbState()
        for key, value in self._services.items():
            st.services[_frontend_of(key)] = value
        slots: dict[int, dict[int, int]] = {}
        for key, value in self._slots.items():
            slots.setdefault(key.rev_nat_id, {})[key.slot] = value.backend_id
        for rev, by_slot in slots.items():
            # only the run of slots from 0: anything past a gap is a leftover to remove
            run = []
            while len(run) in by_slot:
                run.append(by_slot[len(run)])
            st.slots[rev] = run
            for i in set(by_slot) - set(range(len(run))):
                self._slots.delete(Lb4SlotKey(rev, i))
        for key, value in self._backends.items():
            st.backends[key.value] = Backend(str(ipaddress.IPv4Address(value.address)),
                                             value.port, value.proto)
        for key, value in self._revnat.items():
            st.revnat[key.value] = Frontend(str(ipaddress.IPv4Address(value.address)),
                                            value.port, 0)
        for key, value in self._affinity_match.items():
            st.affinity[(key.backend_id, key.rev_nat_id)] = value.timeout_s
        # the reverse NAT's record has no protocol: take it from its service
        for fe, svc in st.services.items():
            if st.revnat.get(svc.rev_nat_id) == Frontend(fe.ip, fe.port, 0):
                st.revnat[svc.rev_nat_id] = fe
        return st

    def sync(self) -> None:
        """Brings the maps in step with what changed since the last sync: the Services,
        EndpointSlices and Pods the datastore's feed names are recomputed, each alone,
        and only their frontends are planned; a change of node addresses (NodePorts),
        the local datastore (which cannot say what changed) and a sync after a failed one
        recompute everything."""
        changes = self._feed.take()
        with self.lock:
            full = changes is None or self._stale
            self._stale = True
            if full or any(kind == "CiliaNode" for kind, _, _ in changes):
                nodes = node_addresses(list(self.datastore.objects("CiliaNode").values()),
                                       self.node_name, self.external)
            else:
                nodes = self._nodes
            if nodes != self._nodes:
                self._write_snat_source(nodes)
                full = True
            if full:
                touched = None
                self._recompute_all(nodes)
                self.full_syncs += 1
            else:
                touched = self._recompute(changes, nodes)
            self._nodes = nodes
            ops = plan(self.state, self.desired, self.maglev, touched, self._refs,
                       self._released)
            for op in ops:
                self._write(op)
                apply_to_state(self.state, op)
            self._released = set()
            self.syncs += 1
            self._stale = False
        if ops:
            log.info("services: %d frontends, %d backends (%d map writes)",
                     len(self.state.services), len(self.state.backends), len(ops))

    def _recompute_all(self, nodes: NodeAddresses) -> None:
        """Every source from scratch. Disabled (`--no-services`): none, so the sync
        empties the maps (the controller's own cleanup; `cilia-agent --cleanup` unpins
        them with every other map)."""
        self.desired, self._sources, self._claims = {}, {}, {}
        self._refs, self._released = {}, set()
        self._slice_owner, self._slices_of = {}, {}
        if not self.enabled:
            return
        pods = self.datastore.objects("Pod")
        if self.source == "kubernetes":
            for key, sl in self.datastore.objects("EndpointSlice").items():
                self._index_slice(key, sl)
            for key in self.datastore.objects("Service"):
                self._merge(("Service", *key), self._service_frontends(key, nodes))
        else:
            # Cluster IPs and NodePorts are assigned over all Services at once.
            services = sorted(self.datastore.objects("Service").values(), key=_name)
            by_service: dict[Source, dict[Frontend, ServiceEntry]] = {}
            for fe, entry in from_pods(services, list(pods.values()), self.service_cidr,
                                       self.node_name, nodes).items():
                ns, name = entry.service.split("/", 1)
                by_service.setdefault(("Service", ns, name), {})[fe] = entry
            for source, frontends in by_service.items():
                self._merge(source, frontends)
        for (ns, name), pod in pods.items():
            self._merge(("Pod", ns, name), host_ports([pod], self.node_name, nodes))

    def _recompute(self, changes: set[ObjectKey], nodes: NodeAddresses) -> set[Frontend]:
        """The sources `changes` touch (an EndpointSlice: the Services it belonged to and
        belongs to now), recomputed; answers the frontends that may have changed."""
        services, pods = set(), set()
        for kind, ns, name in changes:
            if kind == "Service":
                services.add((ns, name))
            elif kind == "EndpointSlice":
                if (old := self._slice_owner.get((ns, name))) is not None:
                    services.add(old)
                sl = self.datastore.peek("EndpointSlice", ns, name)
                if (owner := self._index_slice((ns, name), sl)) is not None:
                    services.add(owner)
            elif kind == "Pod":
                pods.add((ns, name))
        touched: set[Frontend] = set()
        for key in services:
            touched |= self._merge(("Service", *key), self._service_frontends(key, nodes))
        for ns, name in pods:
            pod = self.datastore.peek("Pod", ns, name)
            touched |= self._merge(("Pod", ns, name),
                                   host_ports([pod] if pod else [], self.node_name, nodes))
        return touched

    def _index_slice(self, key: tuple[str, str], sl: dict | None) -> tuple[str, str] | None:
        """Records which Service the slice `key` (None: deleted) belongs to now."""
        old = self._slice_owner.pop(key, None)
        if old is not None:
            self._slices_of[old].discard(key[1])
            if not self._slices_of[old]:
                del self._slices_of[old]
        owner = slice_owner(sl) if sl is not None else None
        if owner is not None:
            self._slice_owner[key] = owner
            self._slices_of.setdefault(owner, set()).add(key[1])
        return owner

    def _service_frontends(self, key: tuple[str, str], nodes: NodeAddresses
                           ) -> dict[Frontend, ServiceEntry]:
        svc = self.datastore.peek("Service", *key)
        if svc is None:
            return {}
        slices = [sl for name in sorted(self._slices_of.get(key, ()))
                  if (sl := self.datastore.peek("EndpointSlice", key[0], name)) is not None]
        return from_endpoint_slices([svc], slices, self.node_name, nodes)

    def _merge(self, source: Source, frontends: dict[Frontend, ServiceEntry]
               ) -> set[Frontend]:
        """Makes `frontends` what `source` wants and settles each frontend it had or has:
        a Service's wins over a hostPort's, then the first by namespace and name (two
        Services may name one external IP; the API server does not stop it). Answers
        the frontends settled."""
        old = self._sources.pop(source, {})
        if frontends:
            self._sources[source] = frontends
        for fe in old.keys() - frontends.keys():
            claims = self._claims[fe]
            claims.discard(source)
            if not claims:
                del self._claims[fe]
        for fe in frontends:
            self._claims.setdefault(fe, set()).add(source)
        touched = old.keys() | frontends.keys()
        for fe in touched:
            claims = self._claims.get(fe)
            self._want(fe, self._sources[min(claims, key=_precedence)][fe] if claims
                       else None)
        return touched

    def _want(self, fe: Frontend, entry: ServiceEntry | None) -> None:
        """Sets what `fe` wants, keeping count of the entries naming each backend (the
        ones no entry names any more are `_released`: the plan's candidates to remove)."""
        old = self.desired.get(fe)
        if old is entry:
            return
        if old is not None:
            for be in (*old.backends, *old.terminating):
                if n := self._refs[be] - 1:
                    self._refs[be] = n
                else:
                    del self._refs[be]
                    self._released.add(be)
        if entry is None:
            self.desired.pop(fe, None)
            return
        self.desired[fe] = entry
        for be in (*entry.backends, *entry.terminating):
            self._refs[be] = self._refs.get(be, 0) + 1

    def _write_snat_source(self, nodes: NodeAddresses) -> None:
        """This node's address (its CiliaNode's first), which connections from outside to
        ExternalIPs leave SNATed from when their backend is on another node."""
        own = nodes.own
        address = ipaddress.IPv4Address(own[0]).packed if own and self.external else bytes(4)
        self._snat_source.update(U32(0), Lb4SnatSource(address))

    def _write(self, op: Op) -> None:
        if op.table == "backend":
            key = U32(op.key)
            if op.value is None:
                self._backends.delete(key)
            else:
                be = op.value
                self._backends.update(key, Lb4Backend(ipaddress.IPv4Address(be.ip).packed,
                                                      be.port, be.proto))
        elif op.table == "revnat":
            key16 = U16(op.key)
            if op.value is None:
                self._revnat.delete(key16)
            else:
                fe = op.value
                self._revnat.update(key16, Lb4ReverseNat(ipaddress.IPv4Address(fe.ip).packed,
                                                         fe.port))
        elif op.table == "service":
            if op.value is None:
                self._services.delete(_frontend_key(op.key))
            else:
                self._services.update(_frontend_key(op.key), op.value)
        elif op.table == "affinity":
            key = Lb4AffinityMatchKey(*op.key)
            if op.value is None:
                self._affinity_match.delete(key)
            else:
                self._affinity_match.update(key, Lb4AffinityMatch(op.value))
        elif op.table == "slot":
            rev, i = op.key
            if op.value is None:
                self._slots.delete(Lb4SlotKey(rev, i))
            else:
                self._slots.update(Lb4SlotKey(rev, i), Lb4Slot(op.value))

    def entries(self) -> list[ServiceEntry]:
        """Every frontend in the maps, with its backends as the datapath has them."""
        out = []
        with self.lock:
            items = sorted(self.state.services.items())
            slots = {rev: list(ids) for rev, ids in self.state.slots.items()}
            backends = dict(self.state.backends)
            desired = dict(self.desired)
        for fe, svc in items:
            known = desired.get(fe, ServiceEntry(fe))
            ids = slots.get(svc.rev_nat_id, [])[:svc.count]
            out.append(ServiceEntry(fe, known.service, known.port_name,
                                    tuple(backends[i] for i in ids if i in backends),
                                    known.terminating, svc.flags, known.affinity_timeout))
        return out

    def describe(self, rev_nat_id: int) -> str:
        """"NS/NAME IP:PORT/PROTO" of the frontend a service id stands for ("" unknown)."""
        with self.lock:
            fe = self.state.revnat.get(rev_nat_id)
            entry = self.desired.get(fe) if fe else None
        if fe is None:
            return ""
        return f"{entry.service} {fe}" if entry and entry.service else str(fe)

    def rev_nat_id(self, fe: Frontend) -> int:
        with self.lock:
            svc = self.state.services.get(fe)
        return svc.rev_nat_id if svc else 0
