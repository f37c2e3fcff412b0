"""tc clsact attach/query/detach through libbpf, in the caller's network namespace.

cilia's programs sit at one fixed (handle, priority) per hook, so attaching again
replaces the program atomically (BPF_TC_F_REPLACE) instead of stacking a second filter:
attaching is idempotent, and an upgraded agent swaps programs without a gap.
"""

from __future__ import annotations

import errno

from cilia.datapath.libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_F_REPLACE,
    BPF_TC_INGRESS,
    check,
    ffi,
    lib,
)

HANDLE = 1
PRIORITY = 1
INGRESS = BPF_TC_INGRESS
EGRESS = BPF_TC_EGRESS


def _hook(ifindex: int, point: int):
    return ffi.new(
        "struct bpf_tc_hook *",
        {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex, "attach_point": point},
    )


def _opts(prog_fd: int = 0, flags: int = 0):
    return ffi.new(
        "struct bpf_tc_opts *",
        {
            "sz": ffi.sizeof("struct bpf_tc_opts"),
            "prog_fd": prog_fd,
            "flags": flags,
            "handle": HANDLE,
            "priority": PRIORITY,
        },
    )


def attach(ifindex: int, prog_fd: int, point: int = INGRESS) -> int:
    """Attach (or replace) cilia's filter on a clsact hook; returns the program id."""
    hook = _hook(ifindex, point)
    ret = lib().bpf_tc_hook_create(hook)
    if ret < 0 and ret != -errno.EEXIST:
        check(ret, f"creating clsact qdisc on ifindex {ifindex}")
    opts = _opts(prog_fd, BPF_TC_F_REPLACE)
    check(lib().bpf_tc_attach(hook, opts), f"attaching tc program on ifindex {ifindex}")
    return int(opts.prog_id)


def query(ifindex: int, point: int = INGRESS) -> int | None:
    """The id of the program at cilia's filter slot, or None if nothing is attached."""
    opts = _opts()
    ret = lib().bpf_tc_query(_hook(ifindex, point), opts)
    if ret in (-errno.ENOENT, -errno.EINVAL, -errno.ENODEV):
        return None
    check(ret, f"querying tc on ifindex {ifindex}")
    return int(opts.prog_id)


def detach(ifindex: int, point: int = INGRESS) -> bool:
    """Remove cilia's filter; True if one was there."""
    ret = lib().bpf_tc_detach(_hook(ifindex, point), _opts())
    if ret in (-errno.ENOENT, -errno.EINVAL, -errno.ENODEV):
        return False
    check(ret, f"detaching tc program on ifindex {ifindex}")
    return True
