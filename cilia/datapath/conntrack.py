"""The conntrack table from the agent's side (issue 13 item 10): its size, chosen from the
node's memory; the per-endpoint limit of its live entries and the GC that gives back to
each endpoint what its flows no longer hold (bpf/include/cilia/conntrack.h explains the
two counters and why).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

from cilia.datapath import layouts
from cilia.datapath.libbpf import check, ffi, lib
from cilia.datapath.maps import BpfMap

log = logging.getLogger(__name__)

# Like Cilium's --bpf-map-dynamic-size-ratio: the table may take this share of the
# node's memory. An entry of the LRU hash costs its key (16) and value (24), the
# kernel's element header and LRU node: about 100 bytes; 128 keeps it on the safe side.
CT_MEMORY_RATIO = 0.0025
CT_ENTRY_BYTES = 128
CT_MAP_MIN = 65536  # the size before it was chosen (bpf/include/cilia/conntrack.h)
CT_MAP_MAX = 1 << 22  # 512 MiB at most, whatever the node has
CT_ENDPOINT_SHARE = 8  # by default one endpoint may hold 1/8 of the table
CT_GC_SECONDS = 5.0


def node_memory() -> int:
    """The node's memory in bytes (MemTotal)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, "no MemTotal in /proc/meminfo")


def ct_map_size(memory: int | None = None) -> int:
    """Entries of the conntrack table for a node with `memory` bytes (default: this
    node's): CT_MEMORY_RATIO of it, the power of two at or below, within
    [CT_MAP_MIN, CT_MAP_MAX]. 24 GiB gives 262,144; 4 GiB or less, 65,536."""
    want = int((node_memory() if memory is None else memory) * CT_MEMORY_RATIO
               / CT_ENTRY_BYTES)
    size = 1 << (max(want, 1).bit_length() - 1)
    return min(max(size, CT_MAP_MIN), CT_MAP_MAX)


def default_endpoint_limit(ct_size: int) -> int:
    return max(ct_size // CT_ENDPOINT_SHARE, 1)


def batches(m: BpfMap, chunk: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
    """The whole map, a batch at a time (BPF_MAP_LOOKUP_BATCH: one syscall per `chunk`
    entries, not two per entry): (keys, values, count) as raw bytes."""
    ksize, vsize = m.spec.key.size(), m.spec.value.size()
    in_batch, out_batch = ffi.new("char[]", 64), ffi.new("char[]", 64)
    count = ffi.new("uint32_t *")
    first = True
    while True:
        keys, values = ffi.new("char[]", ksize * chunk), ffi.new("char[]", vsize * chunk)
        count[0] = chunk
        ret = lib().bpf_map_lookup_batch(m.fd, ffi.NULL if first else in_batch, out_batch,
                                         keys, values, count, ffi.NULL)
        if ret == -errno.ENOSPC and count[0] == 0:  # a bucket larger than the chunk
            chunk *= 2
            continue
        if ret < 0 and ret != -errno.ENOENT:
            check(ret, f"batch lookup of {m.spec.name}")
        n = count[0]
        if n:
            yield ffi.buffer(keys, ksize * n)[:], ffi.buffer(values, vsize * n)[:], n
        if ret == -errno.ENOENT:
            return
        ffi.memmove(in_batch, out_batch, 64)
        first = False


# ct_key: saddr, daddr, sport, dport, proto, scope, pad; ct_value: last_seen_ns,
# lifetime_s, src_ep, dst_ep, cookie, flags, policy_rev, rev_nat_id.
_CT_KEY = struct.Struct("=4s4sHHBB2x")
_CT_VALUE = struct.Struct("=QIHHIBBH")
assert _CT_KEY.size == layouts.CtKey.size() and _CT_VALUE.size == layouts.CtValue.size()


def live_entries_by_endpoint(ct: BpfMap, now_ns: int | None = None) -> Counter:
    """Live flow entries by the endpoint the programs counted each for (src_ep, else
    dst_ep); service entries and entries of no local pod are not counted."""
    now = time.monotonic_ns() if now_ns is None else now_ns  # bpf_ktime_get_ns's clock
    out: Counter = Counter()
    for keys, values, _ in batches(ct):
        for k, v in zip(_CT_KEY.iter_unpack(keys), _CT_VALUE.iter_unpack(values),
                        strict=True):
            if k[5] != layouts.CT_SCOPE_FLOW:
                continue
            last_seen, lifetime, src_ep, dst_ep = v[0], v[1], v[2], v[3]
            if now - last_seen > lifetime * 1_000_000_000:
                continue
            ep = src_ep or dst_ep
            if ep:
                out[ep] += 1
    return out


class ConntrackLimit:
    """The per-endpoint limit of live conntrack entries, and the GC that keeps it true:
    every CT_GC_SECONDS, each endpoint is credited with what its flows gave back."""

    def __init__(self, ct: BpfMap, created: BpfMap, credited: BpfMap, limit_map: BpfMap,
                 limit: int):
        self.ct, self.created, self.credited, self.limit_map = ct, created, credited, \
            limit_map
        self.limit = limit
        self.lock = threading.Lock()
        self.live: Counter = Counter()  # at the last GC

    def start(self) -> None:
        """One GC first (counts made while the limit was off, or by an older agent, are
        made true), then the limit in force."""
        self.collect()
        self.limit_map.update(layouts.U32(0), layouts.U32(self.limit))
        log.info("conntrack: %d entries, at most %s live for one endpoint",
                 self.ct.max_entries, self.limit or "any number")

    def collect(self) -> Counter:
        """credited = created (read first) - live, for every endpoint that made any."""
        with self.lock:
            created = {}
            for keys, values, n in batches(self.created):
                ids = struct.unpack(f"={n}I", keys)
                counts = struct.unpack(f"={n}Q", values)
                created.update((i, c) for i, c in zip(ids, counts, strict=True) if c)
            live = live_entries_by_endpoint(self.ct)
            for ep_id, c in created.items():
                credit = max(c - live.get(ep_id, 0), 0)
                old = self.credited.lookup(layouts.U32(ep_id))
                if old is None or old.value != credit:
                    self.credited.update(layouts.U32(ep_id), layouts.U64(credit))
            self.live = live
            return live

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(CT_GC_SECONDS):
            try:
                self.collect()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("conntrack GC failed; retrying")


# ---- the policy revision (issue 13 item 4) ---------------------------------------------

STALE_REV = 0  # the low byte no revision after the first has: "judge again"
_POLICY_REV_OFFSET = next(off for name, off, _ in layouts.CtValue.members()
                          if name == "policy_rev")


def mark_all_stale(ct: BpfMap) -> int:
    """Sets every entry's policy revision to STALE_REV, so each is judged again at its
    next packet. A read-modify-write of each value (there is no update of one byte): a
    refresh of the entry by a program in between may be lost (it expires a little
    sooner), never a verdict: an entry deleted meanwhile stays deleted (BPF_EXIST)."""
    from cilia.datapath.libbpf import BPF_EXIST

    ksize, vsize = ct.spec.key.size(), ct.spec.value.size()
    marked = 0
    for keys, values, n in batches(ct):
        for i in range(n):
            value = bytearray(values[i * vsize:(i + 1) * vsize])
            if value[_POLICY_REV_OFFSET] == STALE_REV:
                continue
            value[_POLICY_REV_OFFSET] = STALE_REV
            marked += lib().bpf_map_update_elem(ct.fd, keys[i * ksize:(i + 1) * ksize],
                                                bytes(value), BPF_EXIST) == 0
    return marked


def bump_policy_revision(rev: BpfMap, ct: BpfMap) -> int:
    """The next policy revision in cilia_policy_rev (after the maps say what the new
    policy is: established connections are judged again at their next packet, lib/
    enforce.h ct_recheck); returns it.

    Entries keep only the revision's low byte, so an entry idle across exactly 256
    revisions would look judged under the one in force. So the low byte never comes
    back round while an older stamp of it may remain: the revision skips every value
    whose low byte is STALE_REV, and before it passes one, every entry is marked stale.
    An entry stamped with low byte b at revision R was then either marked stale at the
    next multiple of 256 (before R + 256 is reached), or stamped during the cycle of
    255 revisions that holds b once, in which case it holds the revision in force.
    Marking costs a walk of the table, once in 255 revisions."""
    cur = rev.lookup(layouts.U32(0))
    new = ((cur.value if cur is not None else 0) + 1) & 0xFFFFFFFF
    if new & 0xFF == STALE_REV:
        marked = mark_all_stale(ct)
        log.info("policy revision %d: %d conntrack entries marked to be judged again "
                 "(the revision's low byte wraps)", new, marked)
        new = (new + 1) & 0xFFFFFFFF
    rev.update(layouts.U32(0), layouts.U32(new))
    return new
