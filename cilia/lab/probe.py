"""Tiny traffic tools for labs and tests: echo servers and one-shot probes, TCP and UDP.

`python -m cilia.lab.probe serve --tcp 80 --udp 80` answers every TCP connection and UDP
datagram with what it received, prefixed with the server's name; `probe connect` sends
one message and prints the answer, exiting 0 on an answer and 1 on none.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time


def _tcp_server(port: int, name: bytes) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                if data.startswith(b"stream"):  # keep reading, answer each chunk with its size
                    conn.sendall(b"%d\n" % len(data))
                    continue
                conn.sendall(name + b":" + data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _udp_server(port: int, name: bytes) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    while True:
        data, peer = srv.recvfrom(65536)
        srv.sendto(name + b":" + data, peer)


def serve(tcp: list[int], udp: list[int], name: str) -> None:
    threads = [
        threading.Thread(target=_tcp_server, args=(p, name.encode()), daemon=True) for p in tcp
    ] + [threading.Thread(target=_udp_server, args=(p, name.encode()), daemon=True) for p in udp]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def connect(host: str, port: int, proto: str, timeout: float, message: str) -> str | None:
    """The answer to one message, or None if nothing came back in time."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(message.encode())
            return s.recv(65536).decode()
        except OSError:
            return None


def ping(host: str, timeout: float) -> bool:
    """One ICMP echo request (a raw socket: needs root); True if the reply came."""
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"cilia"
    checksum = _inet_checksum(header)
    packet = header[:2] + struct.pack("!H", checksum) + header[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, _ = s.recvfrom(1024)
            except OSError:
                return False
            icmp = data[(data[0] & 0x0F) * 4:]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def stream(host: str, port: int, seconds: float, interval: float = 0.01) -> dict:
    """Keeps one TCP connection busy for `seconds`; reports bytes acknowledged, the longest
    wait for an acknowledgement, and the error that ended it early, if any."""
    chunk = b"stream" + b"x" * 1018
    acked, max_gap, error = 0, 0.0, None
    deadline = time.monotonic() + seconds
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            reader = s.makefile("rb")
            while time.monotonic() < deadline:
                sent = time.monotonic()
                s.sendall(chunk)
                line = reader.readline()
                if not line:
                    raise ConnectionResetError("connection closed by the server")
                acked += int(line)
                max_gap = max(max_gap, time.monotonic() - sent)
                time.sleep(interval)
    except OSError as err:
        error = f"{type(err).__name__}: {err}"
    return {"bytes": acked, "max_gap": round(max_gap, 3), "error": error}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    s.add_argument("--name", default=socket.gethostname())
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--message", default="hello")
    pg = sub.add_parser("ping")
    pg.add_argument("host")
    pg.add_argument("--timeout", type=float, default=2.0)
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.tcp, a.udp, a.name)
    elif a.cmd == "ping":
        ok = ping(a.host, a.timeout)
        print("reply" if ok else f"no reply from {a.host}")
        sys.exit(0 if ok else 1)
    elif a.cmd == "stream":
        report = stream(a.host, a.port, a.seconds)
        print(json.dumps(report))
        sys.exit(1 if report["error"] else 0)
    else:
        answer = connect(a.host, a.port, a.proto, a.timeout, a.message)
        if answer is None:
            print(f"no answer from {a.host}:{a.port}/{a.proto}", file=sys.stderr)
            sys.exit(1)
        print(answer)


if __name__ == "__main__":
    main()
