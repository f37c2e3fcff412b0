"""What a loaded BPF program is, by id: its name tells cilia's programs (cil_*) apart."""

from __future__ import annotations

import os

from cilia.datapath.libbpf import ffi, lib

CILIA_PREFIX = "cil_"


def program_name(prog_id: int) -> str:
    """The program's name, or "" if it is gone."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = ffi.new("struct bpf_prog_info_head *")
        size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_prog_info_head"))
        if lib().bpf_obj_get_info_by_fd(fd, info, size) < 0:
            return ""
        return ffi.string(info.name).decode(errors="replace")
    finally:
        os.close(fd)


def program_id(prog_fd: int) -> int:
    info = ffi.new("struct bpf_prog_info_head *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_prog_info_head"))
    if lib().bpf_obj_get_info_by_fd(prog_fd, info, size) < 0:
        return 0
    return int(info.id)


def is_cilias(prog_id: int | None) -> bool:
    return bool(prog_id) and program_name(prog_id).startswith(CILIA_PREFIX)
