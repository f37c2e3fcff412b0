"""The XDP prefilter's deny list, kept in step with the CiliaPrefilter objects of the
datastore (`cilia prefilter add|delete` writes them):

    apiVersion: cilia.io/v1alpha1
    kind: CiliaPrefilter
    metadata: {name: block-scanners}
    spec:
      deny: ["192.0.2.0/24", "2001:db8::/32"]

Each CIDR has a slot in a per-CPU counter array; a slot is zeroed before it is reused,
so a CIDR's counters start from zero whenever it is (re)added.
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


class Prefilter:
    def __init__(self, datapath: Datapath):
        self._map = datapath.map(layouts.PREFILTER)
        self._stats = datapath.map(layouts.PREFILTER_STATS)
        self.slots: dict[str, int] = {}
        self.sources: dict[str, list[str]] = {}
        for key, value in self._map.items():  # what a previous run left: keep counting
            self.slots[key.prefix] = value.slot

    def sync(self, objects: list[dict]) -> None:
        desired = desired_cidrs(objects)
        for cidr in [c for c in self.slots if c not in desired]:
            self._map.delete(PrefilterKey.for_prefix(cidr))
            del self.slots[cidr]
            log.info("prefilter: %s no longer denied", cidr)
        for cidr in desired:
            if cidr in self.slots:
                continue
            slot = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
            self._stats.update(U32(slot), MetricsValue(0, 0))  # zeroes every CPU's copy
            self._map.update(PrefilterKey.for_prefix(cidr), PrefilterValue(slot))
            self.slots[cidr] = slot
            log.info("prefilter: denying %s at XDP", cidr)
        self.sources = desired

    def entries(self) -> list[PrefilterEntry]:
        out = []
        for cidr, slot in sorted(self.slots.items()):
            per_cpu = self._stats.lookup(U32(slot)) or []
            out.append(PrefilterEntry(cidr, self.sources.get(cidr, []),
                                      sum(v.packets for v in per_cpu),
                                      sum(v.bytes for v in per_cpu)))
        return out
