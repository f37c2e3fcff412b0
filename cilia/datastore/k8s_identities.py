"""CiliaIdentity objects in the API server: the identity allocator's store in a cluster.

The object's name is the number, so claiming a number is a create, and the API server
answers 409 if another allocator (an operator replica, an agent) won it: atomic across
every process, with no lock and no leader. The same `IdentityAllocator` runs on top of
this store and of the local datastore's, so the numbers agree (both start from a hash
of the labels).

After a lost claim the allocator re-reads the store to learn who won. A store reading a
watch cache may not have the winner yet, and the allocator would then move on and claim
a second number for the same labels; so the winner, read from the API right after the
409, is remembered until the cache has it.
"""

from __future__ import annotations

import logging
import time

from cilia.datastore.identities import identity_object
from cilia.datastore.kubernetes import IDENTITIES, Conflict, KubeClient
from cilia.identity import SecurityLabels

log = logging.getLogger(__name__)

# How long a number learned from the API outside the cache is trusted without the cache.
LEARNED_SECONDS = 60.0


def labels_of(obj: dict) -> SecurityLabels:
    return frozenset(obj.get("securityLabels") or [])


def number_of(obj: dict) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("name"))
    except (TypeError, ValueError):
        return None


class KubernetesIdentityStore:
    def __init__(self, client: KubeClient, cache=None):
        """`cache`: anything with `list("CiliaIdentity")` (the agent's datastore); without
        it every read is a LIST from the API (the operator's case: consistent reads)."""
        self.client = client
        self.cache = cache
        self._learned: dict[int, tuple[SecurityLabels, float]] = {}

    def identities(self) -> dict[int, SecurityLabels]:
        objs = (self.cache.list("CiliaIdentity") if self.cache is not None
                else self.client.items(IDENTITIES))
        out = {}
        for obj in objs:
            if (n := number_of(obj)) is not None:
                out[n] = labels_of(obj)
        now = time.monotonic()
        for n, (labels, since) in list(self._learned.items()):
            if n in out or now - since > LEARNED_SECONDS:
                del self._learned[n]
            else:
                out[n] = labels
        return out

    def create(self, number: int, labels: SecurityLabels) -> bool:
        """Claims `number` for `labels`; False (409) if it is taken."""
        try:
            self.client.create(IDENTITIES, identity_object(number, labels))
        except Conflict:
            winner = self.client.get(IDENTITIES, None, str(number))
            if winner is not None:
                self._learned[number] = (labels_of(winner), time.monotonic())
            return False
        self._learned[number] = (frozenset(labels), time.monotonic())
        return True

    def delete(self, number: int, resource_version: str | None = None) -> bool:
        self._learned.pop(number, None)
        return self.client.delete(IDENTITIES, None, str(number),
                                  resource_version=resource_version)
