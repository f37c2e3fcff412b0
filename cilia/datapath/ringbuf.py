"""Reading a BPF ring buffer (the flow events) through libbpf."""

from __future__ import annotations

import os
from collections.abc import Callable

from cilia.datapath.libbpf import LibbpfError, check, check_ptr, ffi, lib


class RingBuffer:
    """Calls `on_record(bytes)` for every record, from `poll()` in the caller's thread."""

    def __init__(self, pinned_path: str, on_record: Callable[[bytes], None]):
        self.fd = lib().bpf_obj_get(pinned_path.encode())
        if self.fd < 0:
            err = ffi.errno
            raise LibbpfError(err, f"cannot open ring buffer {pinned_path}: {os.strerror(err)}")
        self._on_record = on_record

        @ffi.callback("int(void *, void *, size_t)")
        def sample(ctx, data, size):
            try:
                self._on_record(bytes(ffi.buffer(data, size)))
            except Exception:  # a consumer bug must not unwind through C
                pass
            return 0

        self._sample = sample  # keep the callback alive as long as the ring buffer
        self._rb = check_ptr(lib().ring_buffer__new(self.fd, sample, ffi.NULL, ffi.NULL),
                             f"ring buffer on {pinned_path}")

    def consume(self) -> int:
        """Reads every record there is now, without waiting (producers that submit with
        BPF_RB_NO_WAKEUP never wake a poller)."""
        ret = lib().ring_buffer__consume(self._rb)
        return check(ret, "reading the ring buffer")

    def poll(self, timeout_ms: int) -> int:
        ret = lib().ring_buffer__poll(self._rb, timeout_ms)
        if ret == -4:  # EINTR
            return 0
        return check(ret, "polling the ring buffer")

    def close(self) -> None:
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
