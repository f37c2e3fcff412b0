"""The kernel's own drop reasons in the flow stream (issue 15 item 6): bpf_trace.o's
cil_kfree_skb on the skb:kfree_skb tracepoint reports each packet from or to one of this
node's pods that the network stack drops (bpf/lib/kernel_drop.h), as a flow event with
reason DROP_KERNEL and the kernel's enum skb_drop_reason in its cookie; this names them
as the kernel does (kernel:NO_SOCKET).

A drop is reported where it happened in one of this node's network namespaces (its
own and its pods', by inode number in cilia_kdrop_netns, kept here from the endpoints):
one kernel may hold several nodes (the lab) and other namespaces that use the same pod
addresses.

The names come from the tracepoint's format file (its __print_symbolic list, which is
how `perf` and the kernel's own trace output name them), else from the kernel's BTF
(enum skb_drop_reason), else the number. The attachment is a link this process holds:
it goes with the agent (a restart attaches anew, --cleanup has nothing to remove), so
the lab's agents, each on its own bpffs root and endpoints map, each report their own.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from cilia.datapath.layouts import KDROP_NETNS as NETNS
from cilia.datapath.layouts import U32
from cilia.datapath.libbpf import LibbpfError, ffi, lib
from cilia.datapath.maps import BpfMap

log = logging.getLogger(__name__)

TRACE_OBJECT = "bpf_trace.o"
PROGRAM = "cil_kfree_skb"
PREFIX = "kernel:"  # the reason a flow shows: kernel:NO_SOCKET
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
FORMAT = "events/skb/kfree_skb/format"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
ENUM_NAME = "skb_drop_reason"
ENUM_PREFIX = "SKB_DROP_REASON_"
BTF_KIND_ENUM = 6

_SYMBOLIC = re.compile(r"__print_symbolic\(\s*REC->reason\s*,")
_PAIR = re.compile(r"\{\s*(0x[0-9a-fA-F]+|\d+)\s*,\s*\"([^\"]*)\"\s*\}")

_names: dict[int, str] = {}


def parse_format(text: str) -> dict[int, str]:
    """{reason: name} from a kfree_skb format file: the pairs of the __print_symbolic
    over REC->reason in its print fmt ({ 2, "NOT_SPECIFIED" }, ...). Pairs whose value
    is still a symbol (no TRACE_DEFINE_ENUM for it) are skipped."""
    m = _SYMBOLIC.search(text)
    if m is None:
        return {}
    out, depth, i = {}, 1, m.end()
    end = len(text)
    for j in range(m.end(), len(text)):  # the call's closing parenthesis
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            end = j
            break
    for value, name in _PAIR.findall(text[i:end]):
        out[int(value, 0)] = name
    return out


def _from_tracefs() -> dict[int, str]:
    for root in TRACEFS:
        try:
            return parse_format(Path(root, FORMAT).read_text())
        except OSError:
            continue
    return {}


def _from_btf() -> dict[int, str]:
    """enum skb_drop_reason from the kernel's BTF, SKB_DROP_REASON_NO_SOCKET -> NO_SOCKET
    (tracefs is not always mounted; BTF is there wherever the program can load)."""
    try:
        btf = lib().btf__load_vmlinux_btf()
    except LibbpfError:
        return {}
    if btf == ffi.NULL:
        return {}
    try:
        type_id = lib().btf__find_by_name_kind(btf, ENUM_NAME.encode(), BTF_KIND_ENUM)
        if type_id < 0:
            return {}
        t = lib().btf__type_by_id(btf, type_id)
        members = ffi.cast("struct btf_enum *", t + 1)
        out = {}
        for i in range(t.info & 0xffff):
            name = ffi.string(lib().btf__name_by_offset(btf, members[i].name_off)).decode()
            # as the format file names them: SKB_DROP_REASON_SKB_CSUM is SKB_CSUM,
            # SKB_CONSUMED is CONSUMED
            out[members[i].val & 0xffffffff] = (name[len(ENUM_PREFIX):]
                                                if name.startswith(ENUM_PREFIX)
                                                else name.removeprefix("SKB_"))
        return out
    finally:
        lib().btf__free(btf)


def load_names() -> dict[int, str]:
    """Reads the running kernel's reason names once (the agent's start)."""
    global _names
    _names = _from_tracefs() or _from_btf()
    return _names


def label(reason: int) -> str:
    """kernel:NO_SOCKET, or kernel:<number> for a reason this kernel did not name."""
    return PREFIX + _names.get(reason, str(reason))


def missing_feature() -> str:
    """Why this kernel cannot report its drop reasons, or "" if it can."""
    if not os.path.exists(VMLINUX_BTF):
        return (f"the kernel has no BTF ({VMLINUX_BTF}, CONFIG_DEBUG_INFO_BTF), which the "
                "tp_btf/kfree_skb program needs")
    if not _from_btf():
        return (f"the kernel has no enum {ENUM_NAME}: its skb:kfree_skb tracepoint carries "
                "no drop reason (Linux 5.17 or later has it)")
    return ""


def netns_inode(path: str) -> int | None:
    """The namespace's inode number (net->ns.inum), or None if it is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class KernelDrops:
    """bpf_trace.o loaded on the node's pinned maps and cil_kfree_skb attached, for as
    long as this object lives (close() detaches it); the node's namespaces in its map,
    given with `node_netns` and `endpoint_changed`."""

    def __init__(self, datapath, node_netns: str = "/proc/self/ns/net"):
        from cilia.datapath.loader import BpfObject

        self.obj = BpfObject(datapath.bpf_dir / TRACE_OBJECT, datapath.bpffs_root,
                             datapath.sizes)
        self.netns: dict[str, int] = {}  # path -> inode, to remove once the path is gone
        self.map = self.link = None
        try:
            self.map = BpfMap.open_pinned(datapath.bpffs_root, NETNS)
            for key in list(self.map.keys()):  # an older agent's: written again
                self.map.delete(key)
            self.add_netns(node_netns)
            self.link = self.obj.attach(PROGRAM)
        except BaseException:
            self.close()
            raise

    def add_netns(self, path: str) -> None:
        if (inode := netns_inode(path)) is not None:
            self.netns[path] = inode
            self.map.update(U32(inode), U32(1))

    def remove_netns(self, path: str) -> None:
        inode = self.netns.pop(path, None)
        if inode is not None and inode not in self.netns.values():
            self.map.delete(U32(inode))

    def endpoint_changed(self, ep, added: bool) -> None:
        """EndpointManager.changed: a pod's namespace comes and goes with it."""
        if added:
            self.add_netns(ep.netns)
        else:
            self.remove_netns(ep.netns)

    def close(self) -> None:
        if self.link is not None:
            lib().bpf_link__destroy(self.link)
            self.link = None
        if self.map is not None:
            self.map.close()
            self.map = None
        self.obj.close()


def start(datapath, endpoints=(), enabled: bool = True) -> KernelDrops | None:
    """Attaches the program where the kernel allows it; never raises: what is missing
    is logged, naming it, and the agent runs on without kernel drop reasons."""
    if not enabled:
        log.info("kernel drop reasons off (--no-kernel-drop-reasons)")
        return None
    if why := missing_feature():
        log.warning("kernel drop reasons off: %s", why)
        return None
    names = load_names()
    try:
        drops = KernelDrops(datapath)
    except (OSError, LibbpfError) as err:
        log.warning("kernel drop reasons off: cannot attach %s to skb:kfree_skb: %s",
                    PROGRAM, err)
        return None
    for ep in endpoints:
        drops.add_netns(ep.netns)
    log.info("kernel drop reasons on: %s on skb:kfree_skb, %d reasons named", PROGRAM,
             len(names))
    return drops

