"""Socket LB: Services for the node's own processes (its host network namespace: node
daemons, hostNetwork pods), which no cil_from_pod sees and, without kube-proxy, nothing
else would translate. bpf/bpf_sock.c's cgroup programs give a socket that connects or
sends to a frontend one of its backends, and show the frontend again in recvmsg and
getpeername.

One job here: attach, detach, status.

- The programs hang on a cgroup v2 (`--socket-lb-cgroup`, the hierarchy's root by
  default), so they run for every process of the machine, in every network namespace.
  Each agent loads its own copy of bpf_sock.o with the cookie of its own network
  namespace set in it before load (SO_NETNS_COOKIE), and that copy acts only on sockets
  of that namespace: pods are translated per packet in cil_from_pod instead, and other
  agents on the machine (the lab's nodes) serve their own namespaces.
- Attached by bpf_links (cgroup links are multi-attach, so the agents' copies coexist),
  pinned under the agent's bpffs root (`socket_lb/<program>`), so they outlive the agent
  like the maps do. A restarted agent swaps its new programs into its own pinned links
  (BPF_LINK_UPDATE, atomic), so each agent has exactly one attachment per hook, ever.
- `--no-socket-lb` and `--cleanup` detach and unpin the agent's own links; removing the
  bpffs root (the lab's `down`) releases them too.

`bpftool cgroup show CGROUP` lists the attachments (names cil_sock_*);
`bpftool link show pinned ROOT/socket_lb/cil_sock_connect4` one agent's link.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cilia.datapath.libbpf import (
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_UDP4_RECVMSG,
    BPF_CGROUP_UDP4_SENDMSG,
    BPF_LINK_TYPE_CGROUP,
    LibbpfError,
    check,
    ffi,
    lib,
)
from cilia.datapath.loader import SOCK_PROGRAMS, Datapath

log = logging.getLogger(__name__)

DEFAULT_CGROUP = "/sys/fs/cgroup"
LINK_DIR = "socket_lb"  # under the agent's bpffs root: one pinned link per program
SO_NETNS_COOKIE = 71  # asm-generic/socket.h (Linux 5.14+)
# program (bpf/bpf_sock.c) -> (hook, as bpftool names it; attach type)
HOOKS: dict[str, tuple[str, int]] = {
    "cil_sock_connect4": ("connect4", BPF_CGROUP_INET4_CONNECT),
    "cil_sock_sendmsg4": ("sendmsg4", BPF_CGROUP_UDP4_SENDMSG),
    "cil_sock_recvmsg4": ("recvmsg4", BPF_CGROUP_UDP4_RECVMSG),
    "cil_sock_getpeername4": ("getpeername4", BPF_CGROUP_INET4_GETPEERNAME),
}
assert set(HOOKS) == set(SOCK_PROGRAMS), "agent/socket_lb.py and the loader out of step"
OFF_HINT = "or run the agent with --no-socket-lb"


class SocketLBError(RuntimeError):
    """Socket LB cannot be set up here; the message says why and what to do."""


@dataclass
class Hook:
    """One attachment: the hook, its pinned link and the program in it."""

    hook: str
    program: str
    link_id: int
    prog_id: int


@dataclass
class SocketLBStatus:
    enabled: bool
    cgroup: str = ""
    netns_cookie: int = 0
    hooks: list[Hook] = field(default_factory=list)


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (the one bpf_get_netns_cookie
    returns for its sockets)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as err:
        raise SocketLBError(f"socket LB: cannot read this network namespace's cookie "
                            f"(SO_NETNS_COOKIE, Linux 5.14+): {err.strerror}; "
                            f"{OFF_HINT}") from err
    return int.from_bytes(raw, sys.byteorder)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, in /proc/mounts order."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def cgroup2_mounts() -> list[str]:
    """Where cgroup v2 is mounted, /sys/fs/cgroup first if it is one of them (a machine
    with cgroup v1 controllers has v2 beside them, at /sys/fs/cgroup/unified)."""
    found = [point for point, fstype in _mounts() if fstype == "cgroup2"]
    return sorted(dict.fromkeys(found), key=lambda p: p != DEFAULT_CGROUP)


def check_cgroup2(path: str) -> None:
    """Raises SocketLBError, naming the problem and the way out, unless `path` is a
    directory of a cgroup v2 hierarchy."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise SocketLBError(f"socket LB: cgroup {path} does not exist: give the cgroup v2 "
                            f"mount with --socket-lb-cgroup, {OFF_HINT}")
    covering = [(point, fstype) for point, fstype in _mounts()
                if real == point or real.startswith(point.rstrip("/") + "/")]
    point, fstype = max(covering, key=lambda m: len(m[0])) if covering else ("/", "?")
    if fstype == "cgroup2":
        return
    elsewhere = cgroup2_mounts()
    where = (f"cgroup v2 is mounted at {', '.join(elsewhere)}: pass --socket-lb-cgroup "
             f"{elsewhere[0]}" if elsewhere else
             "no cgroup v2 is mounted on this machine (mount -t cgroup2 none "
             "/sys/fs/cgroup/unified), then pass --socket-lb-cgroup")
    raise SocketLBError(f"socket LB: {path} is no cgroup v2 directory (it is on {point}, "
                        f"a {fstype} mount); {where}, {OFF_HINT}")


def _link_info(fd: int):
    info = ffi.new("struct bpf_link_info_cgroup *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_link_info_cgroup"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, size), "link info")
    return info


def _open_pinned(path: Path) -> int | None:
    """An fd of the pinned object at `path`, or None if there is none."""
    if not path.exists():
        return None
    fd = lib().bpf_obj_get(str(path).encode())
    return fd if fd >= 0 else None


def _attach_one(program: str, prog_fd: int, cgroup_fd: int, cgroup_id: int,
                pin: Path) -> None:
    """Puts `prog_fd` on the cgroup's hook through the link pinned at `pin`: the link
    there already (this agent's, from an earlier run) gets the new program in place;
    a link for another cgroup or hook, or something else pinned there, is detached and
    replaced; with none, a new link is made and pinned."""
    _, attach_type = HOOKS[program]
    fd = _open_pinned(pin)
    if fd is not None:
        try:
            try:
                info = _link_info(fd)
                ours = (info.type == BPF_LINK_TYPE_CGROUP and info.attach_type == attach_type
                        and info.cgroup_id == cgroup_id)
            except LibbpfError:
                ours = False
            if ours:
                check(lib().bpf_link_update(fd, prog_fd, ffi.NULL),
                      f"replacing the program of link {pin}")
                return
            lib().bpf_link_detach(fd)
        finally:
            os.close(fd)
        pin.unlink()
        log.info("socket LB: replaced link %s (another cgroup or hook)", pin)
    fd = check(lib().bpf_link_create(prog_fd, cgroup_fd, attach_type, ffi.NULL),
               f"attaching {program} to the cgroup")
    try:
        check(lib().bpf_obj_pin(fd, str(pin).encode()), f"pinning link {pin}")
    except BaseException:
        lib().bpf_link_detach(fd)
        raise
    finally:
        os.close(fd)  # the pin holds the link now (closing it unpinned would detach)


def detach_pinned(bpffs_root: str) -> list[str]:
    """Detaches and unpins the socket LB links pinned under an agent's bpffs root (only
    that agent's: other agents' links stay); returns the programs it detached."""
    directory = Path(bpffs_root, LINK_DIR)
    if not directory.is_dir():
        return []
    removed = []
    for pin in sorted(directory.iterdir()):
        fd = _open_pinned(pin)
        if fd is not None:
            try:
                lib().bpf_link_detach(fd)  # now, even if someone else holds the link
            finally:
                os.close(fd)
        pin.unlink()
        removed.append(pin.name)
    directory.rmdir()
    return removed


def pinned_hooks(bpffs_root: str) -> list[Hook]:
    """The agent's attachments as the kernel has them (its pinned links)."""
    out = []
    for program, (hook, _) in HOOKS.items():
        fd = _open_pinned(Path(bpffs_root, LINK_DIR, program))
        if fd is None:
            continue
        try:
            info = _link_info(fd)
            out.append(Hook(hook, program, int(info.id), int(info.prog_id)))
        except LibbpfError:
            continue
        finally:
            os.close(fd)
    return out


class SocketLB:
    """The agent's socket LB: on (`enabled`: attached to `cgroup`) or off (its own
    links, if any from an earlier run, detached)."""

    def __init__(self, datapath: Datapath, cgroup: str = DEFAULT_CGROUP,
                 enabled: bool = False):
        self.datapath = datapath
        self.cgroup = cgroup
        self.enabled = enabled
        self.netns_cookie = 0

    def setup(self) -> None:
        """Attaches (enabled) or detaches (disabled); idempotent, and what an agent
        restart calls."""
        if self.enabled:
            self.attach()
        elif removed := detach_pinned(self.datapath.bpffs_root):
            log.info("socket LB off: detached %s", ", ".join(removed))

    def attach(self) -> None:
        check_cgroup2(self.cgroup)
        cookie = netns_cookie()
        try:
            progs = self.datapath.load_sock(cookie)
        except LibbpfError as err:
            raise SocketLBError(
                f"socket LB: the kernel refused the cgroup connect4/sendmsg4/recvmsg4/"
                f"getpeername4 programs ({err}): a kernel with CONFIG_CGROUP_BPF (5.8+) is "
                f"needed, {OFF_HINT}") from err
        links = Path(self.datapath.bpffs_root, LINK_DIR)
        links.mkdir(mode=0o700, exist_ok=True)
        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            cgroup_id = os.fstat(cgroup_fd).st_ino  # a cgroup v2 directory's id
            for program in SOCK_PROGRAMS:
                try:
                    _attach_one(program, progs[program], cgroup_fd, cgroup_id,
                                links / program)
                except LibbpfError as err:
                    hint = (" (the kernel has no such cgroup hook)"
                            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP) else "")
                    raise SocketLBError(f"socket LB: {err}{hint}; {OFF_HINT}") from err
        finally:
            os.close(cgroup_fd)
        self.netns_cookie = cookie
        log.info("socket LB: %s attached to %s for network namespace cookie %d",
                 ", ".join(h for h, _ in HOOKS.values()), self.cgroup, cookie)

    def status(self) -> SocketLBStatus:
        if not self.enabled:
            return SocketLBStatus(enabled=False)
        return SocketLBStatus(enabled=True, cgroup=self.cgroup,
                              netns_cookie=self.netns_cookie,
                              hooks=pinned_hooks(self.datapath.bpffs_root))
