"""The identity controller: a CiliaIdentity for every distinct security label set in use.

A pod's security labels are its labels and its namespace's (`security_labels`), and the
number is chosen by the same `IdentityAllocator` the agents run (seeded by a hash of the
labels, claimed by an atomic create), so the operator, the agents and the local lab all
agree on it. Pods and namespaces are watched through kopf: a new pod, a label change on
a pod or on its namespace allocates at once; kopf indexes answer "the labels of this
namespace" and "the pods of this namespace" without API calls.

Garbage collection runs in a sweep from fresh API lists (never from the caches alone: a
deletion must not follow a cache that is behind): an identity no pod uses is remembered
as unused, and deleted once it has stayed unused for the grace period, with its
resourceVersion as a precondition. The sweep also allocates what the events missed. The
grace period also covers the race with an agent that has just picked the identity for a
pod the operator has not seen yet; if an identity is deleted under a user anyway, the
next allocation (agent or operator) creates it again, with the same number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import kopf

from cilia.datastore.k8s_identities import KubernetesIdentityStore, labels_of, number_of
from cilia.datastore.kubernetes import IDENTITIES, NAMESPACES, PODS, ApiError, KubeClient
from cilia.identity import IdentityAllocator, SecurityLabels, describe, security_labels

log = logging.getLogger(__name__)


class CountingStore(KubernetesIdentityStore):
    def __init__(self, client: KubeClient, on_create: Callable[[int, SecurityLabels], None]):
        super().__init__(client)
        self.on_create = on_create

    def create(self, number: int, labels: SecurityLabels) -> bool:
        created = super().create(number, labels)
        if created:
            self.on_create(number, labels)
        return created


def _first(store) -> object | None:
    return next(iter(store), None) if store is not None else None


class IdentityController:
    name = "identities"

    def __init__(self, client: KubeClient, metrics, *, grace: float,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.metrics = metrics
        self.grace = grace
        self.clock = clock
        self.store = CountingStore(client, self._created)
        self.allocator = IdentityAllocator(self.store)
        self.unused_since: dict[int, float] = {}
        self._sweep_lock = threading.Lock()

    def _created(self, number: int, labels: SecurityLabels) -> None:
        self.metrics.identity_allocations.inc()

    def ensure(self, labels: SecurityLabels) -> int:
        return self.allocator.allocate(labels)

    # ---- kopf --------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        @kopf.index("namespaces", id="namespace_labels", registry=registry)
        def namespace_labels(name: str, labels: Mapping[str, str], **_) -> dict:
            return {name: dict(labels)}

        @kopf.index("pods", id="pods_by_namespace", registry=registry)
        def pods_by_namespace(name: str, namespace: str, labels: Mapping[str, str],
                              **_) -> dict:
            return {namespace: (name, tuple(sorted(labels.items())))}

        @kopf.on.event("pods", id="identity_of_pod", registry=registry)
        def pod_event(type: str | None, name: str, namespace: str,
                      labels: Mapping[str, str], namespace_labels: kopf.Index, **_) -> None:
            if type == "DELETED":
                return  # the sweep collects what nobody uses any more
            ns_labels = _first(namespace_labels.get(namespace))
            if ns_labels is None:
                return  # its namespace's event allocates for it
            self.ensure(security_labels(dict(labels), namespace, ns_labels))

        @kopf.on.event("namespaces", id="identities_of_namespace", registry=registry)
        def namespace_event(type: str | None, name: str, labels: Mapping[str, str],
                            pods_by_namespace: kopf.Index, **_) -> None:
            if type == "DELETED":
                return
            for _pod, pod_labels in pods_by_namespace.get(name, []):
                self.ensure(security_labels(dict(pod_labels), name, dict(labels)))

    # ---- the sweep ---------------------------------------------------------------------

    def in_use(self) -> set[SecurityLabels]:
        namespaces = {(n.get("metadata") or {}).get("name"):
                      (n.get("metadata") or {}).get("labels") or {}
                      for n in self.client.items(NAMESPACES)}
        out = set()
        for pod in self.client.items(PODS):
            meta = pod.get("metadata") or {}
            ns = meta.get("namespace")
            if ns in namespaces:
                out.add(security_labels(meta.get("labels") or {}, ns, namespaces[ns]))
        return out

    def sweep(self) -> None:
        with self._sweep_lock:
            self._sweep()

    def _sweep(self) -> None:
        # Identities first, users second: a user that appears in between is seen, so
        # nothing it uses is taken for unused.
        objs = self.client.items(IDENTITIES)
        in_use = self.in_use()
        now = self.clock()
        existing: set[SecurityLabels] = set()
        numbers = set()
        for obj in objs:
            n = number_of(obj)
            if n is None:
                continue
            numbers.add(n)
            labels = labels_of(obj)
            if labels in in_use:
                existing.add(labels)
                self.unused_since.pop(n, None)
                continue
            since = self.unused_since.setdefault(n, now)
            if now - since < self.grace:
                continue
            try:
                self.store.delete(n, (obj.get("metadata") or {}).get("resourceVersion"))
            except ApiError as err:
                log.warning("identity %d: not collected (%s); next sweep", n, err)
                continue
            numbers.discard(n)
            self.unused_since.pop(n, None)
            self.metrics.identity_gc.inc()
            log.info("identity %d collected: unused for %.0fs (%s)", n, now - since,
                     describe(n, labels))
        for n in list(self.unused_since):
            if n not in numbers:
                del self.unused_since[n]
        self.allocator.refresh()
        for labels in in_use - existing:
            self.ensure(labels)
        self.metrics.identities.set(len(numbers) + len(in_use - existing))
