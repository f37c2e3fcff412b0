"""Leader election on a coordination.k8s.io/v1 Lease: many replicas, one active.

The algorithm of client-go's leaderelection, small:

- A replica takes the Lease if nobody holds it, or if the holder's record has not
  changed for leaseDurationSeconds *as observed by this replica's own clock* (no clock
  agreement between machines is needed). Taking and renewing are PUTs carrying the
  resourceVersion read just before: of two replicas racing, the API server lets one win
  and answers the other 409.
- The leader renews every retry period; if it has not managed to renew for the renew
  deadline (shorter than the lease duration), it stops leading before anyone else may
  take over.
- On a clean shutdown the leader releases the Lease (empty holder), so a standby takes
  over at once instead of after the lease duration.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable

from cilia.datastore.kubernetes import LEASES, ApiError, Conflict, KubeClient

log = logging.getLogger(__name__)


def micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, *,
                 lease_duration: float, renew_deadline: float, retry_period: float,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.leading = False
        self.holder: str | None = None
        self.last_renew = 0.0  # clock() of the last successful acquire or renew
        self.last_contact = 0.0  # clock() of the last answer from the API server
        self._observed: tuple | None = None
        self._observed_at = 0.0

    # ---- one attempt (blocking; run in a thread) --------------------------------------

    def try_acquire_or_renew(self) -> bool:
        try:
            lease = self.client.get(LEASES, self.namespace, self.name)
            self.last_contact = self.clock()
            if lease is None:
                return self._create()
            spec = lease.get("spec") or {}
            record = (spec.get("holderIdentity"), spec.get("renewTime"),
                      (lease.get("metadata") or {}).get("resourceVersion"))
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            holder = spec.get("holderIdentity") or None
            self.holder = holder
            if holder and holder != self.identity:
                duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
                if self.clock() - self._observed_at < duration:
                    return False
                log.info("the lease of %s expired (not renewed for %.0fs): taking over",
                         holder, duration)
            now = micro_time()
            ours = holder == self.identity
            lease["spec"] = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(round(self.lease_duration)),
                "acquireTime": spec.get("acquireTime") if ours else now,
                "renewTime": now,
                "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if ours else 1),
            }
            updated = self.client.replace(LEASES, lease)
        except Conflict:
            return False  # another replica wrote it first
        except ApiError as err:
            log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            return False
        self._took(updated)
        return True

    def _create(self) -> bool:
        now = micro_time()
        try:
            created = self.client.create(LEASES, {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity,
                         "leaseDurationSeconds": int(round(self.lease_duration)),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            })
        except Conflict:
            return False
        self._took(created)
        return True

    def _took(self, lease: dict) -> None:
        spec = lease.get("spec") or {}
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"),
                          (lease.get("metadata") or {}).get("resourceVersion"))
        self._observed_at = self.last_renew = self.last_contact = self.clock()
        self.holder = self.identity

    def release(self) -> None:
        """Gives the Lease up (if still ours), so a standby need not wait it out."""
        try:
            lease = self.client.get(LEASES, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": None,
                             "leaseDurationSeconds": 1, "renewTime": micro_time()}
            self.client.replace(LEASES, lease)
            log.info("lease %s/%s released", self.namespace, self.name)
        except ApiError as err:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, err)
        finally:
            self.leading = False

    # ---- the loops (async) -------------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Waits until this replica leads (True) or `stop` is set (False)."""
        logged = False
        while not stop.is_set():
            if await asyncio.to_thread(self.try_acquire_or_renew):
                self.leading = True
                log.info("leading: lease %s/%s acquired by %s", self.namespace, self.name,
                         self.identity)
                return True
            if not logged and self.holder:
                log.info("standing by: %s holds lease %s/%s", self.holder, self.namespace,
                         self.name)
                logged = True
            await _wait(stop, self.retry_period)
        return False

    async def keep(self, stop: asyncio.Event) -> None:
        """Renews until `stop` is set; returns early when leadership is lost."""
        while not stop.is_set():
            await _wait(stop, self.retry_period)
            if stop.is_set():
                return
            if await asyncio.to_thread(self.try_acquire_or_renew):
                continue
            if self.holder not in (None, self.identity):
                log.error("lost the lease to %s", self.holder)
                self.leading = False
                return
            if self.clock() - self.last_renew > self.renew_deadline:
                log.error("could not renew the lease for %.0fs: stepping down",
                          self.clock() - self.last_renew)
                self.leading = False
                return


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
