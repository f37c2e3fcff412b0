"""Security identities: one number for each distinct set of security-relevant labels.

A pod's security labels are its own labels (`pod:KEY=VALUE`) and its namespace's labels
(`ns:KEY=VALUE`, always including `ns:kubernetes.io/metadata.name=NAMESPACE`). Policy
selects identities, not addresses, so a new pod with an existing label set changes no
policy entry anywhere.

The allocator is shared by the agent (local datastore) and the operator (cluster): both
start from a hash of the labels, so the same labels get the same number wherever they
are first seen, and claim it with an atomic create in the store, so two allocators can
never hand one number to two label sets.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol

log = logging.getLogger(__name__)

# Reserved identities, as Cilium numbers them (bpf/include/cilia/ipcache.h).
HOST = 1
WORLD = 2
# A pod whose identity cannot be had (the identity space is exhausted, the API refused
# the create): its address is this in the ipcache, so no allow rule that selects pods
# by labels matches it, and every deny rule that does matches it (fail closed).
INIT = 5
REMOTE_NODE = 6
RESERVED = {HOST: "reserved:host", WORLD: "reserved:world", INIT: "reserved:init",
            REMOTE_NODE: "reserved:remote-node"}

MIN_CLUSTER_IDENTITY = 256
MAX_CLUSTER_IDENTITY = 65535
# CIDR identities are node-local (each agent numbers the ipBlock CIDRs it knows).
CIDR_IDENTITY_BASE = 1 << 24

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

SecurityLabels = frozenset[str]


def security_labels(
    pod_labels: Mapping[str, str], namespace: str, namespace_labels: Mapping[str, str]
) -> SecurityLabels:
    ns = {**namespace_labels, NAMESPACE_NAME_LABEL: namespace}
    return frozenset(
        [f"pod:{k}={v}" for k, v in pod_labels.items()] + [f"ns:{k}={v}" for k, v in ns.items()]
    )


def split_labels(labels: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(pod labels, namespace labels) of a security label set."""
    pod, ns = {}, {}
    for item in labels:
        source, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        (pod if source == "pod" else ns)[key] = value
    return pod, ns


def describe(identity: int, labels: Iterable[str] | None = None) -> str:
    if identity in RESERVED:
        return RESERVED[identity]
    if identity >= CIDR_IDENTITY_BASE:
        return f"cidr:{identity - CIDR_IDENTITY_BASE}"
    return ",".join(sorted(labels)) if labels else str(identity)


class IdentityStore(Protocol):
    def identities(self) -> dict[int, SecurityLabels]: ...

    def create(self, number: int, labels: SecurityLabels) -> bool:
        """Claims `number` for `labels` atomically; False if the number is taken."""
        ...


class IdentityExhausted(RuntimeError):
    pass


class IdentityAllocator:
    def __init__(self, store: IdentityStore, max_identity: int = MAX_CLUSTER_IDENTITY):
        """`max_identity`: the highest number given (a smaller space, for tests)."""
        if not MIN_CLUSTER_IDENTITY <= max_identity <= MAX_CLUSTER_IDENTITY:
            raise ValueError(f"max_identity {max_identity}: must be between "
                             f"{MIN_CLUSTER_IDENTITY} and {MAX_CLUSTER_IDENTITY}")
        self.store = store
        self.max_identity = max_identity
        self._lock = threading.Lock()
        self._by_labels: dict[SecurityLabels, int] = {}
        self._by_number: dict[int, SecurityLabels] = {}

    def refresh(self) -> None:
        self._by_number = dict(self.store.identities())
        self._by_labels = {labels: n for n, labels in self._by_number.items()}

    def labels_of(self, number: int) -> SecurityLabels | None:
        return self._by_number.get(number)

    def lookup(self, labels: SecurityLabels) -> int | None:
        return self._by_labels.get(labels)

    def allocate(self, labels: SecurityLabels) -> int:
        with self._lock:
            if (n := self._by_labels.get(labels)) is not None:
                return n
            self.refresh()
            if (n := self._by_labels.get(labels)) is not None:
                return n
            size = self.max_identity - MIN_CLUSTER_IDENTITY + 1
            in_range = sum(MIN_CLUSTER_IDENTITY <= n <= self.max_identity
                           for n in self._by_number)
            if in_range >= size:  # at once, not after a walk through every number
                raise self._exhausted(size)
            digest = hashlib.sha256("\n".join(sorted(labels)).encode()).digest()
            start = int.from_bytes(digest[:8], "big") % size
            for i in range(size):
                n = MIN_CLUSTER_IDENTITY + (start + i) % size
                if n in self._by_number:
                    continue
                if self.store.create(n, labels):
                    self._by_number[n] = labels
                    self._by_labels[labels] = n
                    log.info("identity %d allocated for %s", n, describe(n, labels))
                    return n
                # Someone else claimed it: perhaps for these very labels.
                self.refresh()
                if (n := self._by_labels.get(labels)) is not None:
                    return n
            raise self._exhausted(size)

    def _exhausted(self, size: int) -> IdentityExhausted:
        return IdentityExhausted(
            f"identity space exhausted: all {size} cluster identities "
            f"({MIN_CLUSTER_IDENTITY}-{self.max_identity}) are in use, one for each "
            "distinct set of pod and namespace labels: remove unused label sets (delete "
            "the pods, or CiliaIdentity objects no pod uses; in a cluster the operator "
            "removes unused ones after its grace period)")
