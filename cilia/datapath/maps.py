"""Typed access to BPF maps by file descriptor or bpffs pin."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Generic, TypeVar

from cilia.datapath.layouts import CStruct, MapSpec
from cilia.datapath.libbpf import BPF_ANY, LibbpfError, check, ffi, lib

K = TypeVar("K", bound=CStruct)
V = TypeVar("V", bound=CStruct)


class MapFullError(LibbpfError):
    """The map has no room for another entry."""


class BpfMap(Generic[K, V]):
    """One BPF map. Owns its fd (closes it), unless told it borrows one from libbpf."""

    def __init__(self, fd: int, spec: MapSpec, owns_fd: bool = True):
        self.fd = fd
        self.spec = spec
        self.owns_fd = owns_fd
        self._ncpus = lib().libbpf_num_possible_cpus() if spec.percpu else 1
        self._vstride = (spec.value.size() + 7) & ~7 if spec.percpu else spec.value.size()
        self._check_sizes()

    @classmethod
    def open_pinned(cls, root: str, spec: MapSpec) -> BpfMap:
        path = os.path.join(root, spec.name)
        fd = lib().bpf_obj_get(path.encode())
        if fd < 0:
            err = ffi.errno
            raise LibbpfError(
                err,
                f"cannot open pinned map {path}: {os.strerror(err)} "
                "(is the agent for this node running, or has it ever run?)",
            )
        return cls(fd, spec)

    def _check_sizes(self) -> None:
        info = ffi.new("struct bpf_map_info *")
        size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_map_info"))
        check(lib().bpf_obj_get_info_by_fd(self.fd, info, size), f"map info {self.spec.name}")
        if (info.key_size, info.value_size) != (self.spec.key.size(), self.spec.value.size()):
            raise LibbpfError(
                errno.EINVAL,
                f"map {self.spec.name}: kernel has key/value {info.key_size}/{info.value_size} "
                f"bytes, cilia expects {self.spec.key.size()}/{self.spec.value.size()}: "
                "the pinned map is from another cilia version; remove the pin to recreate it",
            )

    @property
    def max_entries(self) -> int:
        info = ffi.new("struct bpf_map_info *")
        size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_map_info"))
        check(lib().bpf_obj_get_info_by_fd(self.fd, info, size), f"map info {self.spec.name}")
        return info.max_entries

    def count(self) -> int:
        """Entries now (walks the keys: a syscall each)."""
        return sum(1 for _ in self.keys())

    def _vbuf(self):
        return ffi.new("char[]", self._vstride * self._ncpus)

    def _decode(self, buf):
        raw = ffi.buffer(buf)[:]
        if not self.spec.percpu:
            return self.spec.value.unpack(raw)
        return [
            self.spec.value.unpack(raw[i * self._vstride : (i + 1) * self._vstride])
            for i in range(self._ncpus)
        ]

    def lookup(self, key: K):
        """The value (a list of per-CPU values for per-CPU maps), or None."""
        buf = self._vbuf()
        ret = lib().bpf_map_lookup_elem(self.fd, key.pack(), buf)
        if ret == -errno.ENOENT:
            return None
        check(ret, f"lookup in {self.spec.name}")
        return self._decode(buf)

    def update(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        """Sets the value; for a per-CPU map, every CPU's copy to the same value."""
        raw = value.pack()
        if self.spec.percpu:
            raw = raw.ljust(self._vstride, b"\0") * self._ncpus
        ret = lib().bpf_map_update_elem(self.fd, key.pack(), raw, flags)
        if ret in (-errno.E2BIG, -errno.ENOSPC):  # a hash says E2BIG, an LPM trie ENOSPC
            raise MapFullError(
                -ret,
                f"map {self.spec.name} is full: raise its size (the agent's --policy-map-max "
                "for cilia_policy, bpf/include/cilia for the others) or remove stale entries",
            )
        check(ret, f"update of {self.spec.name}")

    def delete(self, key: K) -> bool:
        """True if the key was there."""
        ret = lib().bpf_map_delete_elem(self.fd, key.pack())
        if ret == -errno.ENOENT:
            return False
        check(ret, f"delete from {self.spec.name}")
        return True

    def keys(self) -> Iterator[K]:
        size = self.spec.key.size()
        cur, nxt = ffi.NULL, ffi.new("char[]", size)
        while True:
            ret = lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                return
            check(ret, f"iterating {self.spec.name}")
            raw = ffi.buffer(nxt)[:]
            yield self.spec.key.unpack(raw)
            cur = ffi.new("char[]", raw)

    def items(self) -> Iterator[tuple[K, object]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
