"""The policy writer: the one owner of the policy and ipcache maps, applying the plans the
policy engine computes (agent/policy_plan.py).

It keeps what those maps hold (read back at start, so a restarted agent writes only
differences) and writes a plan's difference in an order that never lets a packet see a
half-written policy allow something that is denied both before and after the change:

  1. new deny entries              (narrows)
  2. allow entries that went away  (narrows)
  3. ipcache and endpoint identities
  4. new allow entries             (widens towards the new state)
  5. deny entries that went away   (widens towards the new state)
  6. endpoint enforcement flags    (a direction turns enforced once its allows exist,
                                    and open only after everything else)

While 1-2 are in, only what both states allow passes; 4-6 only ever reach the new state.
A Pass entry (the Admin tier handing a packet to NetworkPolicy) goes with the denies: it
may narrow. The endpoints map is the endpoint manager's: at 3 and 6 the writer hands it
the endpoints' states (`apply_policy_state`), and it writes its own entries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from cilia.agent.policy_plan import EndpointState, PolicyPlan, Written
from cilia.crashpoints import crash_point
from cilia.datapath import layouts
from cilia.datapath.conntrack import bump_policy_revision
from cilia.datapath.layouts import IpcacheKey, IpcacheValue, PolicyKey, PolicyValue
from cilia.policy.compiler import ALLOW, EntryKey

log = logging.getLogger(__name__)

# Where the crash tests kill the agent while it writes a policy (cilia/crashpoints.py):
# each only when that step changes something (after its first write).
POLICY_CRASH_POINTS = ("policy:denies", "policy:ipcache", "policy:allows", "policy:removed",
                       "policy:flags")
_TIERED = layouts.ENDPOINT_F_TIERED_INGRESS | layouts.ENDPOINT_F_TIERED_EGRESS


class EndpointStates(Protocol):
    """What the writer needs of the endpoint manager."""

    def policy_states(self) -> dict[int, EndpointState]: ...

    def apply_policy_state(self, states: Mapping[int, EndpointState]) -> bool: ...


class _Flat:
    """What the writer holds, read as (endpoint id, key) -> value."""

    def __init__(self, written: dict[int, dict[EntryKey, Written]]):
        self._written = written

    def __getitem__(self, k: tuple[int, EntryKey]) -> Written:
        return self._written[k[0]][k[1]]

    def __contains__(self, k: tuple[int, EntryKey]) -> bool:
        return k[1] in self._written.get(k[0], ())


class PolicyWriter:
    def __init__(self, datapath, endpoints: EndpointStates):
        self.endpoints = endpoints
        self._pmap = datapath.map(layouts.POLICY)
        self._ipcache = datapath.map(layouts.IPCACHE)
        self._rev = datapath.map(layouts.POLICY_REV)
        self._ct = datapath.map(layouts.CONNTRACK)
        self.capacity = self._pmap.max_entries
        # What the maps hold: read back, so a restarted agent changes only differences.
        # endpoint id -> key -> value: compared per endpoint, whole, at each plan
        self.written: dict[int, dict[EntryKey, Written]] = {}
        # endpoint -> the plan's entries the map was last found to hold exactly: the
        # same object in the next plan needs no comparison (the engine hands over an
        # endpoint's unchanged entries as the same object)
        self._matched: dict[int, Mapping[EntryKey, Written]] = {}
        self.ipcache: dict[str, tuple[int, int]] = {}
        self._read_back()

    def _read_back(self) -> None:
        for key, value in self._pmap.items():
            bits = 0 if key.prefixlen <= 72 else key.prefixlen - 80
            proto = 0 if key.prefixlen < 72 else key.proto
            ek = EntryKey(key.dir, key.identity, proto, key.dport if bits else 0, bits,
                          key.tier)
            self.written.setdefault(key.ep_id, {})[ek] = Written(value.action, value.cookie,
                                                                 value.rank)
        for key, value in self._ipcache.items():
            self.ipcache[key.prefix] = (value.identity, value.cidr_identity)

    def apply(self, plan: PolicyPlan) -> None:
        try:
            self._write(plan)
        except BaseException:
            # The policy is not all written (a full map, say): whatever is to be
            # enforced is enforced now, with what the map holds, so a newly isolated pod
            # is never left open; nothing loses enforcement until a write succeeds.
            current = self.endpoints.policy_states()
            tighter = {}
            for ep_id, state in current.items():
                wanted = plan.after.get(ep_id)
                if wanted is None:
                    continue
                flags = _tighter(state.flags, wanted.flags)
                if flags != state.flags:
                    tighter[ep_id] = state._replace(flags=flags)
                    log.error("endpoint %d: its policy could not be written; enforcing it "
                              "with what the map holds", ep_id)
            self.endpoints.apply_policy_state(tighter)
            self._bump_revision()
            raise

    def _write(self, plan: PolicyPlan) -> None:
        pmap, written, desired = self._pmap, self.written, plan.entries

        def put(k):
            ep_id, key = k
            value = desired[k]
            pmap.update(_policy_key(ep_id, key),
                        PolicyValue(value.action, 0, value.rank, value.cookie))
            written.setdefault(ep_id, {})[key] = value

        def remove(k):
            ep_id, key = k
            pmap.delete(_policy_key(ep_id, key))
            mine = written[ep_id]
            del mine[key]
            if not mine:
                del written[ep_id]

        changed, gone = self._diff(desired.by_endpoint)
        old = _Flat(written)
        for k in changed:                                           # 1
            if desired[k].action != ALLOW:  # a deny, or a Pass: either may narrow
                put(k)
                crash_point("policy:denies")
        for k in gone:                                              # 2
            if old[k].action == ALLOW:  # a Pass goes with the denies: it may narrow
                remove(k)
        ipcache_changed = self._write_ipcache(plan.ipcache)         # 3
        if ipcache_changed:
            crash_point("policy:ipcache")
        # Identities (and the labels they stand for) with the flags still as they are.
        identities = {}
        for ep_id, after in plan.after.items():
            before = plan.before[ep_id]
            if (after.identity, after.labels) != (before.identity, before.labels):
                identities[ep_id] = after._replace(flags=before.flags)
        endpoints_changed = self.endpoints.apply_policy_state(identities)
        for k in changed:                                           # 4
            if desired[k].action == ALLOW:
                put(k)
                crash_point("policy:allows")
        for k in gone:                                              # 5
            if k in old:
                remove(k)
        if gone:
            crash_point("policy:removed")
        flags = {ep_id: after for ep_id, after in plan.after.items()  # 6
                 if after.flags != plan.before[ep_id].flags}
        endpoints_changed |= self.endpoints.apply_policy_state(flags)
        if changed or gone:
            log.info("policy map: %d entries written, %d removed", len(changed), len(gone))
        if endpoints_changed:
            crash_point("policy:flags")
        if changed or gone or ipcache_changed or endpoints_changed:
            self._bump_revision()

    def _diff(self, wanted: Mapping[int, Mapping[EntryKey, Written]]
              ) -> tuple[list[tuple[int, EntryKey]], list[tuple[int, EntryKey]]]:
        """(keys to write, keys to remove): an endpoint whose entries equal what the map
        holds (one comparison, in C) is not looked into."""
        changed, gone = [], []
        matched, self._matched = self._matched, {}
        for ep_id, want in wanted.items():
            if matched.get(ep_id) is want:
                self._matched[ep_id] = want
                continue
            have = self.written.get(ep_id, {})
            if have == want:
                self._matched[ep_id] = want
                continue
            changed += [(ep_id, k) for k, v in want.items() if have.get(k) != v]
            gone += [(ep_id, k) for k in have if k not in want]
        for ep_id, have in self.written.items():
            if ep_id not in wanted:
                gone += [(ep_id, k) for k in have]
        return changed, gone

    def _write_ipcache(self, ipcache: Mapping[str, tuple[int, int]]) -> bool:
        changed = False
        for prefix, value in ipcache.items():
            if self.ipcache.get(prefix) != value:
                self._ipcache.update(IpcacheKey.for_prefix(prefix), IpcacheValue(*value))
                self.ipcache[prefix] = value
                changed = True
        for prefix in [p for p in self.ipcache if p not in ipcache]:
            self._ipcache.delete(IpcacheKey.for_prefix(prefix))
            del self.ipcache[prefix]
            changed = True
        return changed

    def _bump_revision(self) -> None:
        """Established connections are judged again at their next packet (lib/enforce.h
        ct_recheck): after the maps say what the new policy is, never before. The
        revision's low byte never comes back round to a stale entry's (see there)."""
        bump_policy_revision(self._rev, self._ct)


def _tighter(current: int, wanted: int) -> int:
    """Flags never weaker than either: every direction either enforces, and audit mode
    only if both have it (audit mode loosens). The tiers' lookups stay as they are: a
    half-written Admin tier turned on could let its Accepts override what NetworkPolicy
    denies, and one turned off would drop its Denies."""
    audit = current & wanted & layouts.ENDPOINT_F_AUDIT
    enforced = (current | wanted) & ~(layouts.ENDPOINT_F_AUDIT | _TIERED)
    return enforced | audit | (current & _TIERED)


def _policy_key(ep_id: int, key: EntryKey) -> PolicyKey:
    return PolicyKey(key.prefixlen, ep_id, key.dir, key.tier, key.identity, key.proto, 0,
                     key.port)
