"""The XDP prefilter's deny list, kept in step with the CiliaPrefilter objects of the
datastore (`cilia prefilter add|delete` writes them):

    apiVersion: cilia.io/v1alpha1
    kind: CiliaPrefilter
    metadata: {name: block-scanners}
    spec:
      deny: ["192.0.2.0/24", "2001:db8::/32"]

Each CIDR has a slot in a per-CPU counter array; a slot is zeroed before it is reused,
so a CIDR's counters start from zero whenever it is (re)added.

The deny list is an LPM trie of fixed size (PREFILTER_MAP_SIZE). Objects are taken oldest
first (creationTimestamp, then name), each whole or not at all: one whose CIDRs do not fit
in what the objects before it left is refused, denies nothing, and is named in `cilia
status` and the log; later objects that fit are still taken. Whole objects, because a
deny list applied in part drops a part nobody chose and lets the rest through; oldest
first, so a new object never displaces what is enforced now (nor flaps on restart). The
other way, refusing the whole update and keeping the previous list, would let one
oversized object freeze every later change, deletions included: a CIDR removed to let
legitimate clients back in would stay dropped.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from cilia.datapath import layouts
from cilia.datapath.layouts import U32, MetricsValue, PrefilterKey, PrefilterValue
from cilia.datapath.loader import Datapath

log = logging.getLogger(__name__)

KIND = "CiliaPrefilter"


@dataclass
class PrefilterEntry:
    cidr: str
    sources: list[str]
    packets: int = 0
    bytes: int = 0


def desired_cidrs(objects: list[dict]) -> dict[str, list[str]]:
    """CIDR -> names of the objects that deny it; invalid CIDRs are logged and skipped."""
    out: dict[str, list[str]] = {}
    for obj in objects:
        name = (obj.get("metadata") or {}).get("name", "?")
        for raw in (obj.get("spec") or {}).get("deny") or []:
            try:
                net = str(ipaddress.ip_network(raw, strict=False))
            except (ValueError, TypeError):
                log.error("CiliaPrefilter %s: %r is not a CIDR; skipped", name, raw)
                continue
            out.setdefault(net, []).append(name)
    return out


def _age(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def fitting_cidrs(objects: list[dict], capacity: int
                  ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What the deny list holds: CIDR -> names of the objects that deny it, and the
    objects refused (name -> why). Oldest first, each object whole or not at all: a
    CIDR an earlier object already denies takes no room."""
    out: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for obj in sorted(objects, key=_age):
        name = (obj.get("metadata") or {}).get("name", "?")
        cidrs = desired_cidrs([obj])
        new = sum(c not in out for c in cidrs)
        if len(out) + new > capacity:
            refused[name] = (
                f"refused, denies nothing: its {len(cidrs)} CIDRs do not fit in the XDP "
                f"prefilter's {capacity} entries ({len(out)} taken by older objects)")
            continue
        for cidr in cidrs:
            out.setdefault(cidr, []).append(name)
    return out, refused


class Prefilter:
    def __init__(self, datapath: Datapath):
        self._map = datapath.map(layouts.PREFILTER)
        self._stats = datapath.map(layouts.PREFILTER_STATS)
        self.capacity = min(self._map.max_entries, self._stats.max_entries)
        self.slots: dict[str, int] = {}
        self.sources: dict[str, list[str]] = {}
        self.refused: dict[str, str] = {}  # CiliaPrefilter name -> why it denies nothing
        for key, value in self._map.items():  # what a previous run left: keep counting
            self.slots[key.prefix] = value.slot

    def sync(self, objects: list[dict]) -> None:
        desired, refused = fitting_cidrs(objects, self.capacity)
        for name, why in sorted(refused.items()):
            if self.refused.get(name) != why:
                log.error("CiliaPrefilter %s %s", name, why)
        for name in sorted(self.refused.keys() - refused.keys()):
            log.info("CiliaPrefilter %s is no longer refused", name)
        self.refused = refused
        gone = [c for c in self.slots if c not in desired]
        for cidr in gone:  # first: their room is what the new ones may need
            self._map.delete(PrefilterKey.for_prefix(cidr))
            del self.slots[cidr]
        new = [c for c in desired if c not in self.slots]
        # Free slots, lowest first (popped from the end): one pass, not one per CIDR.
        free = sorted(set(range(self.capacity)) - set(self.slots.values()),
                      reverse=True) if new else []
        for cidr in new:
            slot = free.pop()
            self._stats.update(U32(slot), MetricsValue(0, 0))  # zeroes every CPU's copy
            self._map.update(PrefilterKey.for_prefix(cidr), PrefilterValue(slot))
            self.slots[cidr] = slot
        if gone or new:
            log.info("prefilter: %d CIDRs denied at XDP (%d added, %d removed)%s",
                     len(self.slots), len(new), len(gone),
                     ": " + ", ".join(new + [f"-{c}" for c in gone])
                     if len(new) + len(gone) <= 10 else "")
        self.sources = desired

    def entries(self) -> list[PrefilterEntry]:
        out = []
        for cidr, slot in sorted(self.slots.items()):
            per_cpu = self._stats.lookup(U32(slot)) or []
            out.append(PrefilterEntry(cidr, self.sources.get(cidr, []),
                                      sum(v.packets for v in per_cpu),
                                      sum(v.bytes for v in per_cpu)))
        return out
