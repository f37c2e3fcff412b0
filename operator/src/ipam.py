"""Cluster-pool IPAM: a pod CIDR for every node, written to its CiliaNode.

The state is the CiliaNode objects themselves (spec.podCIDRs): nothing is kept in the
operator, so a restarted or failed-over operator keeps every allocation. A node that
already has a CIDR keeps it; a new node gets the first block of the pool that overlaps
no other node's; a deleted node's CiliaNode is deleted, which frees its block. All
allocations run under one lock and read the CiliaNodes from the API, never from a cache,
so two nodes can never be given one block. The sweep repairs what events missed: nodes
without a CIDR, CiliaNodes whose Node is gone, and overlaps (the later node is moved).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
from collections.abc import Iterable, Mapping

import kopf

from cilia.datastore.kubernetes import CILIA_NODES, NODES, ApiError, Conflict, KubeClient
from cilia.operator.events import WARNING, EventPoster, plain

log = logging.getLogger(__name__)


class PoolExhausted(RuntimeError):
    pass


class CidrPool:
    """Blocks of `mask` bits from `pool`, handed out lowest first."""

    def __init__(self, pool: str, mask: int):
        self.pool = ipaddress.IPv4Network(pool)
        if not self.pool.prefixlen <= mask <= 32:
            raise ValueError(f"node mask /{mask} does not fit the pool {self.pool}")
        self.mask = mask

    @property
    def size(self) -> int:
        return 1 << (self.mask - self.pool.prefixlen)

    def contains(self, cidr: ipaddress.IPv4Network) -> bool:
        return cidr.prefixlen == self.mask and cidr.subnet_of(self.pool)

    def first_free(self, used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        used = sorted(set(used), key=lambda n: (int(n.network_address), n.prefixlen))
        for block in self.pool.subnets(new_prefix=self.mask):
            if not any(block.overlaps(u) for u in used):
                return block
        raise PoolExhausted(f"the cluster pool {self.pool} has no free /{self.mask} left "
                            f"({self.size} blocks): widen --cluster-pool or remove nodes")


def node_cidrs(cn: dict) -> list[ipaddress.IPv4Network]:
    out = []
    for raw in (cn.get("spec") or {}).get("podCIDRs") or []:
        try:
            out.append(ipaddress.IPv4Network(raw, strict=False))
        except ValueError:
            continue
    return out


def _created(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


class IpamController:
    name = "ipam"

    def __init__(self, client: KubeClient, metrics, events: EventPoster, *, pool: str,
                 mask: int):
        self.client = client
        self.metrics = metrics
        self.events = events
        self.pool = CidrPool(pool, mask)
        self.lock = threading.Lock()
        self.waiting: set[str] = set()  # nodes told that the pool is exhausted

    # ---- allocation --------------------------------------------------------------------

    def ensure(self, node: str, uid: str | None = None) -> str:
        """The node's pod CIDR, allocated if it has none."""
        with self.lock:
            for _ in range(5):
                cn = self.client.get(CILIA_NODES, None, node)
                if cn is not None and node_cidrs(cn):
                    return str(node_cidrs(cn)[0])
                others = [c for c in self.client.items(CILIA_NODES)
                          if (c.get("metadata") or {}).get("name") != node]
                block = self.pool.first_free(n for c in others for n in node_cidrs(c))
                try:
                    self._write(node, uid, cn, str(block))
                except Conflict:
                    continue  # its agent created or changed it meanwhile: look again
                self.metrics.pod_cidr_allocations.inc()
                log.info("node %s: pod CIDR %s", node, block)
                return str(block)
            raise RuntimeError(f"node {node}: its CiliaNode keeps changing; retrying later")

    def _write(self, node: str, uid: str | None, cn: dict | None, block: str) -> None:
        if cn is None:
            meta: dict = {"name": node}
            if uid:
                # Kubernetes' garbage collector deletes it with its Node, even without us.
                meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node,
                                            "uid": uid}]
            self.client.create(CILIA_NODES, {"metadata": meta, "spec": {"podCIDRs": [block]}})
        else:
            rv = (cn.get("metadata") or {}).get("resourceVersion")
            self.client.patch(CILIA_NODES, None, node, {
                "metadata": {"resourceVersion": rv}, "spec": {"podCIDRs": [block]}})

    def release(self, node: str) -> None:
        with self.lock:
            cn = self.client.get(CILIA_NODES, None, node)
            if cn is None:
                return
            self.client.delete(CILIA_NODES, None, node,
                               uid=(cn.get("metadata") or {}).get("uid"))
            self.metrics.pod_cidr_releases.inc()
            log.info("node %s is gone: pod CIDR %s released", node,
                     ", ".join(map(str, node_cidrs(cn))) or "(none)")

    # ---- kopf --------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        @kopf.on.event("nodes", id="pod_cidr_of_node", registry=registry)
        def node_event(type: str | None, name: str, uid: str, body: kopf.Body, **_) -> None:
            if type == "DELETED":
                self.release(name)
                self.waiting.discard(name)
            else:
                self.ensure_or_report(name, uid, body)

    def ensure_or_report(self, name: str, uid: str | None, node: Mapping) -> None:
        """`ensure`; an exhausted pool is reported once per node (log, Event on the
        Node), and the node gets the next block that frees up (the sweep retries)."""
        try:
            self.ensure(name, uid)
        except PoolExhausted as err:
            if name not in self.waiting:
                self.waiting.add(name)
                log.warning("node %s: no pod CIDR: %s", name, err)
                self.events.post(plain(node), WARNING, "PodCIDRPoolExhausted", str(err))
            return
        self.waiting.discard(name)

    # ---- the sweep ---------------------------------------------------------------------

    def sweep(self) -> None:
        nodes = {(n.get("metadata") or {}).get("name"): n for n in self.client.items(NODES)}
        with self.lock:
            cns = sorted(self.client.items(CILIA_NODES), key=_created)
            taken: list[ipaddress.IPv4Network] = []
            for cn in cns:
                name = (cn.get("metadata") or {}).get("name")
                if name not in nodes:
                    continue  # the node GC's business
                cidrs = node_cidrs(cn)
                if cidrs and any(c.overlaps(t) for c in cidrs for t in taken):
                    self._move(cn, taken)
                    cidrs = node_cidrs(self.client.get(CILIA_NODES, None, name) or {})
                taken.extend(cidrs)
        for name, node in nodes.items():
            if not any((c.get("metadata") or {}).get("name") == name and node_cidrs(c)
                       for c in cns):
                self.ensure_or_report(name, (node.get("metadata") or {}).get("uid"), node)
        in_pool = [c for c in taken if c.subnet_of(self.pool.pool)]
        self.metrics.pod_cidrs.set(len(in_pool))
        self.metrics.pod_cidrs_free.set(self.pool.size - len(in_pool))

    def _move(self, cn: dict, taken: list) -> None:
        name = cn["metadata"]["name"]
        old = ", ".join(map(str, node_cidrs(cn)))
        others = [n for c in self.client.items(CILIA_NODES)
                  if c["metadata"]["name"] != name for n in node_cidrs(c)]
        block = self.pool.first_free([*taken, *others])
        try:
            self._write(name, None, cn, str(block))
        except ApiError as err:
            log.warning("node %s: cannot move its overlapping pod CIDR: %s", name, err)
            return
        log.warning("node %s: pod CIDR %s overlapped an older node's; moved to %s",
                    name, old, block)
        self.events.post(cn, WARNING, "PodCIDROverlap",
                         f"spec.podCIDRs: {old} overlapped another node's pod CIDR; "
                         f"moved to {block}")


class NodeGcController:
    """State left by deleted nodes: their CiliaNode (and with it the pod CIDR)."""

    name = "nodegc"

    def __init__(self, client: KubeClient, metrics, *, grace: float):
        self.client = client
        self.metrics = metrics
        self.grace = grace

    def register(self, registry: kopf.OperatorRegistry) -> None:
        pass  # the IPAM controller releases on the Node's DELETED event; this is the sweep

    def sweep(self) -> None:
        cns = self.client.items(CILIA_NODES)
        nodes = {(n.get("metadata") or {}).get("name") for n in self.client.items(NODES)}
        now = datetime.datetime.now(datetime.UTC)
        for cn in cns:
            meta = cn.get("metadata") or {}
            if meta.get("name") in nodes:
                continue
            # An agent may register its CiliaNode a moment before the kubelet registers
            # the Node: only CiliaNodes older than the grace period are orphans.
            try:
                created = datetime.datetime.fromisoformat(
                    meta.get("creationTimestamp", "").replace("Z", "+00:00"))
            except ValueError:
                created = now
            if (now - created).total_seconds() < self.grace:
                continue
            # Read again right before deleting: the sweep's lists are not one snapshot.
            if self.client.get(NODES, None, meta["name"]) is not None:
                continue
            try:
                if self.client.delete(CILIA_NODES, None, meta["name"], uid=meta.get("uid")):
                    self.metrics.pod_cidr_releases.inc()
                    log.info("CiliaNode %s collected: its Node is gone (pod CIDR %s freed)",
                             meta["name"], ", ".join(map(str, node_cidrs(cn))) or "none")
            except ApiError as err:
                log.warning("CiliaNode %s: not collected (%s)", meta["name"], err)
