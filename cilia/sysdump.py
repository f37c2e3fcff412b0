"""`cilia sysdump`: one archive with what a bug report needs, from every node: the agent's
own view (status, endpoints, policies, Services, ipcache, counters), the maps as the
kernel holds them (cilia/dumps.py: readable when the agent is down), the agent's log,
the node's links, addresses, routes, rules, neighbours, tc filters, BPF programs and
netfilter rules (the standard tools' own JSON or text), and the versions of everything.

Each item is collected on its own: one that fails (a tool missing, an agent not
answering) is written down as its error in the archive and the rest goes on, so a
sysdump of a broken node is never empty.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cilia import dumps

LOG_TAIL_BYTES = 8 << 20  # the end of an agent's log: where its last hours are


@dataclass
class NodeSource:
    """Where one node's items come from: `wrap` turns a command into one run in the
    node's network namespace (identity for this namespace)."""

    name: str
    socket: str
    bpffs_root: str
    log: str = ""
    wrap: Callable[[list[str]], list[str]] = field(default=lambda argv: argv)


# (file, argv): the node's network state, by the standard tools
COMMANDS = [
    ("links.json", ["ip", "-d", "-j", "link", "show"]),
    ("addresses.json", ["ip", "-j", "address", "show"]),
    ("routes.json", ["ip", "-j", "route", "show", "table", "all"]),
    ("rules.json", ["ip", "-j", "rule", "show"]),
    ("neighbours.json", ["ip", "-j", "neigh", "show"]),
    ("bpf-net.json", ["bpftool", "-j", "net", "show"]),
    ("nftables.txt", ["nft", "list", "ruleset"]),
    ("iptables.txt", ["iptables-save"]),
    ("sysctl-net.txt", ["sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter",
                        "net.core.bpf_jit_enable"]),
]
# once per machine: programs and maps are the kernel's, not a namespace's
MACHINE_COMMANDS = [
    ("bpf-programs.json", ["bpftool", "-j", "prog", "show"]),
    ("bpf-maps.json", ["bpftool", "-j", "map", "show"]),
    ("kernel.txt", ["uname", "-a"]),
    ("clang.txt", ["clang", "--version"]),
    ("bpftool-version.txt", ["bpftool", "version"]),
]


class Archive:
    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w:gz")
        self.root = path.name.split(".")[0]
        self.errors: list[str] = []

    def add(self, name: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        info = tarfile.TarInfo(f"{self.root}/{name}")
        info.size = len(raw)
        info.mtime = int(time.time())
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(raw))

    def item(self, name: str, produce: Callable[[], bytes | str | object]) -> None:
        """Adds what `produce` gives (JSON for anything not text), or its error."""
        try:
            out = produce()
            if not isinstance(out, bytes | str):
                out = json.dumps(out, indent=2, default=str)
            self.add(name, out)
        except Exception as err:  # noqa: BLE001 - written into the archive, then go on
            self.errors.append(f"{name}: {err}")
            self.add(name + ".error", f"{type(err).__name__}: {err}\n")

    def close(self) -> None:
        self.add("errors.txt", "".join(f"{e}\n" for e in self.errors) or "none\n")
        self.tar.close()


def _run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def _agent(socket: str):
    """The agent's answers, as JSON-able dicts; after one "unreachable", every further
    question fails at once with it (a stopped agent must not cost a timeout each)."""
    from google.protobuf.json_format import MessageToDict

    from cilia.client import AgentClient, AgentUnreachable

    client = AgentClient(socket, timeout=5.0)
    down: list[Exception] = []

    def ask(method: str):
        if down:
            raise down[0]
        try:
            result = getattr(client, method)()
        except AgentUnreachable as err:
            down.append(err)
            raise
        if isinstance(result, list):
            return [MessageToDict(m) for m in result]
        return MessageToDict(result)

    return ask


def _log_tail(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
        return f.read()


def collect_node(archive: Archive, node: NodeSource) -> None:
    d = f"nodes/{node.name}"
    ask = _agent(node.socket)
    for name, method in (("status", "status"), ("endpoints", "endpoints"),
                         ("policies", "policies"), ("services", "services"),
                         ("ipcache", "ipcache"), ("metrics", "metrics")):
        archive.item(f"{d}/agent/{name}.json", lambda m=method: ask(m))
    archive.item(f"{d}/maps/conntrack.json", lambda: dumps.conntrack(node.bpffs_root))
    archive.item(f"{d}/maps/endpoints.json", lambda: dumps.endpoints(node.bpffs_root))
    archive.item(f"{d}/maps/policy.json", lambda: {
        e["endpointId"]: dumps.policy(node.bpffs_root, e["endpointId"])
        for e in dumps.endpoints(node.bpffs_root)})
    if node.log:
        archive.item(f"{d}/agent.log", lambda: _log_tail(node.log))
    for name, argv in COMMANDS:
        archive.item(f"{d}/{name}", lambda a=argv: _run(node.wrap(a)))

    def tc_filters() -> dict:
        links = json.loads(_run(node.wrap(["ip", "-j", "link", "show"])))
        return {link["ifname"]: {hook: json.loads(_run(node.wrap(
                    ["tc", "-j", "filter", "show", "dev", link["ifname"], hook])) or "[]")
                for hook in ("ingress", "egress")}
                for link in links if link.get("ifname") != "lo"}

    archive.item(f"{d}/tc-filters.json", tc_filters)


def collect(path: Path, nodes: list[NodeSource], context: dict | None = None) -> Archive:
    """Writes the archive at `path` (a .tar.gz) from `nodes`; answers it, closed."""
    from importlib.metadata import PackageNotFoundError, version

    archive = Archive(path)
    try:
        def versions() -> dict:
            try:
                cilia = version("cilia")
            except PackageNotFoundError:
                cilia = "not installed"
            return {"cilia": cilia, "python": platform.python_version(),
                    "kernel": platform.release(), "machine": platform.machine(),
                    "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **(context or {})}

        archive.item("versions.json", versions)
        for name, argv in MACHINE_COMMANDS:
            archive.item(f"machine/{name}", lambda a=argv: _run(a))
        for node in nodes:
            collect_node(archive, node)
    finally:
        archive.close()
    return archive
