"""Loads cilia's BPF objects with every map pinned under one bpffs root.

Maps are pinned before load, so a second load (an agent restart, an upgrade) reuses the
pinned maps and the pods' state in them instead of starting empty; programs already
attached keep running on those same maps while the agent is away.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from cilia.datapath import tc
from cilia.datapath.layouts import ALL_MAPS, MapSpec
from cilia.datapath.libbpf import LibbpfError, check, check_ptr, ffi, lib
from cilia.datapath.maps import BpfMap

log = logging.getLogger(__name__)

BPFFS = "/sys/fs/bpf"
LXC_OBJECT = "bpf_lxc.o"
HOST_OBJECT = "bpf_host.o"
XDP_OBJECT = "bpf_xdp.o"
SOCK_OBJECT = "bpf_sock.o"
FROM_NETDEV_PROGRAM = "cil_from_netdev"
FROM_VXLAN_PROGRAM = "cil_from_vxlan"  # cilia_vxlan's ingress and egress
TO_VXLAN_PROGRAM = "cil_to_vxlan"
XDP_PROGRAM = "cil_xdp_prefilter"
FROM_POD_PROGRAM = "cil_from_pod"
TO_POD_PROGRAM = "cil_to_pod"
# bpf_sock.o: its programs by name (their cgroup hooks come from their sections), and
# the section of the one global the agent sets before load (lib/sock_lb.h).
SOCK_PROGRAMS = ("cil_sock_connect4", "cil_sock_sendmsg4", "cil_sock_recvmsg4",
                 "cil_sock_getpeername4")
SOCK_NETNS_SECTION = ".rodata.sock_lb"
# Maps whose pinned copy may be of another size than the one asked for: set aside before
# load, their entries copied into the new one after (an agent restarted with another
# --ct-map-max, or on a node with more memory, keeps its connections). Any other map of
# another size stops the load, naming it.
RESIZABLE = ("cilia_ct",)
RESIZING = "__resizing_"  # bpffs refuses names with a dot


def default_bpf_dir() -> Path:
    """Where the compiled objects are: $CILIA_BPF_DIR, the source tree, or the image."""
    if env := os.environ.get("CILIA_BPF_DIR"):
        return Path(env)
    source = Path(__file__).resolve().parents[2] / "bpf" / "build"
    if source.is_dir():
        return source
    return Path("/usr/lib/cilia/bpf")


def ensure_bpffs(root: str) -> None:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there, then create `root`."""
    if not os.path.realpath(root).startswith(BPFFS + "/"):
        raise ValueError(f"bpffs root {root} must be below {BPFFS}")
    mounted = any(
        line.split()[1] == BPFFS and line.split()[2] == "bpf"
        for line in Path("/proc/mounts").read_text().splitlines()
    )
    if not mounted:
        subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)
    os.makedirs(root, mode=0o700, exist_ok=True)


class BpfObject:
    """One loaded .o: its programs by name, its maps pinned under `pin_root`.

    `rodata`: initial contents of read-only data sections by section name (a
    `const volatile` global set before load, as a libbpf skeleton would)."""

    def __init__(self, path: Path, pin_root: str, sizes: dict[str, int] | None = None,
                 rodata: dict[str, bytes] | None = None):
        if not path.is_file():
            raise FileNotFoundError(
                errno.ENOENT,
                f"BPF object {path} not found: build it with `make -C bpf` "
                "(or set CILIA_BPF_DIR)",
            )
        self.path = path
        self._obj = check_ptr(
            lib().bpf_object__open_file(str(path).encode(), ffi.NULL), f"opening {path}"
        )
        try:
            m = lib().bpf_object__next_map(self._obj, ffi.NULL)
            while m != ffi.NULL:
                name = ffi.string(lib().bpf_map__name(m)).decode()
                if not name.startswith("."):  # .rodata/.bss are per object, never pinned
                    pin = os.path.join(pin_root, name).encode()
                    check(lib().bpf_map__set_pin_path(m, pin), f"pin path for {name}")
                if sizes and name in sizes:
                    check(lib().bpf_map__set_max_entries(m, sizes[name]),
                          f"size of {name}")
                m = lib().bpf_object__next_map(self._obj, m)
            for section, data in (rodata or {}).items():
                self._set_rodata(section, data)
            check(lib().bpf_object__load(self._obj), f"loading {path} (see the verifier log)")
        except BaseException:
            self.close()
            raise

    def _set_rodata(self, section: str, data: bytes) -> None:
        m = lib().bpf_object__find_map_by_name(self._obj, section.encode())
        if m == ffi.NULL:
            raise LibbpfError(errno.ENOENT, f"no section {section} in {self.path}")
        size = ffi.new("size_t *")
        if lib().bpf_map__initial_value(m, size) == ffi.NULL or size[0] != len(data):
            raise LibbpfError(errno.EINVAL, f"section {section} of {self.path} is "
                              f"{size[0]} bytes, not {len(data)}: rebuild with make -C bpf")
        check(lib().bpf_map__set_initial_value(m, data, len(data)), f"setting {section}")

    def program_fd(self, name: str) -> int:
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == ffi.NULL:
            raise LibbpfError(errno.ENOENT, f"no program {name} in {self.path}")
        return check(lib().bpf_program__fd(prog), f"fd of program {name}")

    def attach(self, name: str):
        """Attaches a program where its section says (tp_btf/kfree_skb): a struct
        bpf_link held by this process, for bpf_link__destroy (or its exit) to undo."""
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == ffi.NULL:
            raise LibbpfError(errno.ENOENT, f"no program {name} in {self.path}")
        return check_ptr(lib().bpf_program__attach(prog), f"attaching {name}")

    def close(self) -> None:
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None


class Datapath:
    """A node's datapath: loaded programs and open maps, all pinned under `bpffs_root`."""

    def __init__(self, bpffs_root: str, bpf_dir: Path | None = None,
                 sizes: dict[str, int] | None = None):
        """`sizes`: max_entries of maps by name, for all objects alike (a pinned map of
        another size is not reused: loading fails, naming it)."""
        self.bpffs_root = bpffs_root
        self.bpf_dir = bpf_dir or default_bpf_dir()
        ensure_bpffs(bpffs_root)
        self.sizes = sizes = _sizes_for_pins(bpffs_root, sizes or {})
        self.maps: dict[str, BpfMap] = {}
        self.sock: BpfObject | None = None
        try:
            self.lxc = BpfObject(self.bpf_dir / LXC_OBJECT, bpffs_root, sizes)
            self.from_pod_fd = self.lxc.program_fd(FROM_POD_PROGRAM)
            self.to_pod_fd = self.lxc.program_fd(TO_POD_PROGRAM)
            self.host = BpfObject(self.bpf_dir / HOST_OBJECT, bpffs_root, sizes)
            self.from_netdev_fd = self.host.program_fd(FROM_NETDEV_PROGRAM)
            self.from_vxlan_fd = self.host.program_fd(FROM_VXLAN_PROGRAM)
            self.to_vxlan_fd = self.host.program_fd(TO_VXLAN_PROGRAM)
            self.xdp = BpfObject(self.bpf_dir / XDP_OBJECT, bpffs_root, sizes)
            self.xdp_fd = self.xdp.program_fd(XDP_PROGRAM)
            for spec in ALL_MAPS:
                self.maps[spec.name] = BpfMap.open_pinned(bpffs_root, spec)
            _copy_resized(bpffs_root, self.maps)
        except BaseException:
            self.close()
            raise

    def map(self, spec: MapSpec) -> BpfMap:
        return self.maps[spec.name]

    def load_sock(self, netns_cookie: int) -> dict[str, int]:
        """Loads bpf_sock.o (socket LB) for the network namespace whose cookie is given,
        on this node's pinned maps (its own reverse map pinned beside them); replaces a
        copy loaded before. Returns its programs' fds by name, for agent/socket_lb.py to
        attach. Only on demand: a kernel without the cgroup hooks still runs the rest."""
        sock = BpfObject(self.bpf_dir / SOCK_OBJECT, self.bpffs_root, self.sizes,
                         {SOCK_NETNS_SECTION: netns_cookie.to_bytes(8, sys.byteorder)})
        if self.sock is not None:
            self.sock.close()
        self.sock = sock
        return {name: sock.program_fd(name) for name in SOCK_PROGRAMS}

    def attach_endpoint(self, host_ifindex: int) -> None:
        """Both pod programs on a pod's host-side veth (replacing older ones)."""
        tc.attach(host_ifindex, self.from_pod_fd, tc.INGRESS)
        tc.attach(host_ifindex, self.to_pod_fd, tc.EGRESS)

    def endpoint_attached(self, host_ifindex: int) -> bool:
        return (tc.query(host_ifindex, tc.INGRESS) is not None
                and tc.query(host_ifindex, tc.EGRESS) is not None)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for name in ("lxc", "host", "xdp", "sock"):
            if (obj := getattr(self, name, None)) is not None:
                obj.close()


def _pinned_max_entries(path: str) -> int | None:
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        info = ffi.new("struct bpf_map_info *")
        size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_map_info"))
        check(lib().bpf_obj_get_info_by_fd(fd, info, size), f"map info of {path}")
        return info.max_entries
    finally:
        os.close(fd)


def _sizes_for_pins(bpffs_root: str, sizes: dict[str, int]) -> dict[str, int]:
    """The sizes to load with, given the pinned maps: a resizable map pinned with
    another size is set aside (RESIZING) for _copy_resized, and one no size is asked for
    keeps its pinned size; any other map pinned with another size than asked for is an
    error that says what to do."""
    out = dict(sizes)
    for name, want in sizes.items():
        have = _pinned_max_entries(os.path.join(bpffs_root, name))
        if name not in RESIZABLE and have is not None and have != want:
            raise LibbpfError(
                errno.EEXIST,
                f"pinned map {os.path.join(bpffs_root, name)} holds {have} entries, not "
                f"the {want} asked for: remove it first (cilia-agent --cleanup, or rm the "
                "pin; its entries are written again), or ask for its size")
    for name in RESIZABLE:
        pin = os.path.join(bpffs_root, name)
        have = _pinned_max_entries(pin)
        if have is None:
            continue
        want = sizes.get(name)
        if want is None:
            out[name] = have
        elif want != have:
            log.info("%s: %d entries pinned, %d asked for: copying it to a new one",
                     name, have, want)
            os.rename(pin, f"{pin}{RESIZING}{os.getpid()}")
    return out


def _copy_resized(bpffs_root: str, maps: dict[str, BpfMap]) -> None:
    """Copies the entries of maps set aside by _sizes_for_pins (or by a load that died
    before it was done) into their new maps, then forgets the old ones. Entries made by
    programs still attached to the old map meanwhile are lost: the agent re-attaches
    every program at once."""
    from cilia.datapath.conntrack import batches

    for path in sorted(Path(bpffs_root).glob(f"*{RESIZING}*")):
        name = path.name.split(RESIZING)[0]
        new = maps.get(name)
        if name not in RESIZABLE or new is None:
            continue
        ksize, vsize = new.spec.key.size(), new.spec.value.size()
        copied = 0
        with BpfMap.open_pinned(bpffs_root, replace(new.spec, name=path.name)) as old:
            for keys, values, n in batches(old):
                for i in range(n):
                    ret = lib().bpf_map_update_elem(
                        new.fd, keys[i * ksize:(i + 1) * ksize],
                        values[i * vsize:(i + 1) * vsize], 0)
                    copied += ret == 0
        path.unlink()
        log.info("%s: %d entries copied to the new table of %d", name, copied,
                 new.max_entries)


def remove_pins(bpffs_root: str) -> None:
    """Unpin every map under a root (the datapath forgets this node's state)."""
    root = Path(bpffs_root)
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    root.rmdir()
