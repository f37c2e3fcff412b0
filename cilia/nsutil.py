"""Network namespaces and processes, made by the same rules for the lab and the cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def run(*cmd: str, error: type[Exception] = RuntimeError, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    """Runs cmd; a failure raises `error` naming the command and what it printed."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise error(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """argv run inside a netns. nsenter, not `ip netns exec`: the latter remounts /sys,
    which hides bpffs and the cgroup hierarchies."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", *argv]


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str, error: type[Exception] = RuntimeError) -> None:
    run("ip", "netns", "add", name, error=error)
    run("ip", "-n", name, "link", "set", "lo", "up", error=error)


def netns_del(name: str) -> None:
    if netns_exists(name):
        run("ip", "netns", "del", name, check=False)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def remove_pins(bpffs_root: str) -> None:
    from cilia.datapath.loader import remove_pins as remove

    remove(bpffs_root)
