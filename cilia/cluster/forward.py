"""A TCP forwarder from the root network namespace into a cluster's namespace.

The control plane lives in the cluster's own network namespace, where the nodes reach
it; a person's kubectl runs in the root namespace. This process binds a listening
socket on loopback in the root namespace, then moves itself into the cluster's
namespace (a socket keeps the namespace it was made in), so every connection it makes
from then on is made there. No address, route or rule is added to the root namespace.

    python -m cilia.cluster.forward NETNS_PATH LISTEN_HOST:PORT TARGET_HOST:PORT PORT_FILE
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copies src to dst until either ends, then shuts both down so the other direction's
    copy ends too."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(conn: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)
    threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
    pipe(conn, upstream)
    conn.close()
    upstream.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    netns, listen, target, port_file = argv or sys.argv[1:]
    server = socket.create_server(_addr(listen))
    setns(netns)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.getsockname()[1]))
    os.replace(tmp, port_file)
    dest = _addr(target)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn, dest), daemon=True).start()


if __name__ == "__main__":
    main()
