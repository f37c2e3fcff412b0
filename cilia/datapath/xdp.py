"""XDP attach/query/detach through libbpf: native (driver) mode where the driver has it,
generic (skb) mode otherwise, and which one is in use."""

from __future__ import annotations

import errno

from cilia.datapath.libbpf import (
    XDP_ATTACHED_DRV,
    XDP_ATTACHED_SKB,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    LibbpfError,
    check,
    ffi,
    lib,
)

NATIVE = "native"
GENERIC = "generic"


def attach(ifindex: int, prog_fd: int) -> str:
    """Attaches (or replaces) the program; returns the mode it runs in."""
    ret = lib().bpf_xdp_attach(ifindex, prog_fd, XDP_FLAGS_DRV_MODE, ffi.NULL)
    if ret == 0:
        return NATIVE
    native_err = -ret
    # The driver has no native XDP: the kernel's generic hook works on every device.
    ret = lib().bpf_xdp_attach(ifindex, prog_fd, XDP_FLAGS_SKB_MODE, ffi.NULL)
    if ret < 0:
        raise LibbpfError(
            -ret,
            f"XDP attach on ifindex {ifindex} failed in native mode "
            f"({errno.errorcode.get(native_err, native_err)}) and generic mode "
            f"({errno.errorcode.get(-ret, -ret)})",
        )
    return GENERIC


def query(ifindex: int) -> tuple[int, str] | None:
    """(program id, mode) of the XDP program on a device, or None."""
    opts = ffi.new("struct bpf_xdp_query_opts *", {"sz": ffi.sizeof("struct bpf_xdp_query_opts")})
    check(lib().bpf_xdp_query(ifindex, 0, opts), f"XDP query on ifindex {ifindex}")
    if opts.attach_mode == XDP_ATTACHED_DRV:
        return int(opts.drv_prog_id), NATIVE
    if opts.attach_mode == XDP_ATTACHED_SKB:
        return int(opts.skb_prog_id), GENERIC
    return None


def detach(ifindex: int) -> None:
    for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
        lib().bpf_xdp_detach(ifindex, flags, ffi.NULL)
