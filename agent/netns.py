"""Netlink sockets inside a pod's network namespace, without forking.

A netlink socket belongs to the namespace its creating thread was in; so the calling
thread enters the target namespace just long enough to open the socket, then returns.
(pyroute2's own netns support forks a helper, which a threaded gRPC server must avoid.)
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot enter network namespace {what}: {os.strerror(err)}")


def open_netns(path: str) -> int:
    """An fd for a netns path; a clear error if it is not one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise FileNotFoundError(err.errno, f"network namespace {path} does not exist") from err


@contextmanager
def entered(netns_fd: int, what: str = "of the pod"):
    """The calling thread inside the namespace behind `netns_fd` for the block, and back in
    its own afterwards, also when the block fails."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd, what)
        try:
            yield
        finally:
            _setns(home, "of the agent")
    finally:
        os.close(home)


@contextmanager
def iproute_in(netns_fd: int, what: str = "of the pod"):
    """An IPRoute bound to the namespace behind `netns_fd`."""
    with entered(netns_fd, what):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()
