"""Network namespaces and processes, made by the same rules for the lab and the cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def stop(pid: int, marker: str = "", timeout: float = 10.0) -> None:
    """Stops pid (its process group, SIGTERM then SIGKILL) if it is still the process
    we started: its command line names `marker` (any, when empty). Returns once every
    thread of it is gone, so its ports and files are free."""
    if not alive(pid) or marker not in cmdline(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:  # not a group leader: the process alone
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    # A leader thread that has exited shows as a zombie while the process's other
    # threads still run and hold its ports: wait until every thread is gone, or a
    # restart right after finds its address in use.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            if len(os.listdir(f"/proc/{pid}/task")) <= 1 and not alive(pid):
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
