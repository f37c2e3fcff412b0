"""Traffic probe run inside the Helm suite's pods (the cilia image's own Python).

    probe.py serve PORT                  TCP echo server, one thread per connection
    probe.py connect HOST PORT [TIMEOUT] one connection, one line echoed: exit 0, else 1
    probe.py stream HOST PORT            one connection kept open, a line every 100 ms
                                         echoed, until stdin closes; then prints
                                         "ok SENT RECEIVED MAX_GAP_MS", or exits 1 on
                                         the first error (the connection broke)
    probe.py dial HOST PORT              a new connection (one echo) every 50 ms until
                                         stdin closes; then prints "ok ATTEMPTS
                                         FAILURES LONGEST_GAP_MS", the gap being the
                                         longest time without a connection that worked
"""

import socket
import sys
import threading
import time


def serve(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print(f"listening on {port}", flush=True)

    def echo(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb", buffering=0) as f:
            for line in f:
                f.write(line)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def connect(host: str, port: int, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ping\n")
            reply = s.makefile("rb").readline()
    except OSError as err:
        print(f"failed: {err}")
        return 1
    if reply != b"ping\n":
        print(f"failed: reply {reply!r}")
        return 1
    print("ok")
    return 0


def stream(host: str, port: int) -> int:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    sent = received = 0
    max_gap = 0.0
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            f = s.makefile("rb")
            print("connected", flush=True)
            last = time.monotonic()
            while not stop.is_set():
                sent += 1
                s.sendall(f"{sent}\n".encode())
                if f.readline() != f"{sent}\n".encode():
                    raise OSError("wrong or no echo")
                received += 1
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                time.sleep(0.1)
    except OSError as err:
        print(f"failed after {received} echoes: {err}", flush=True)
        return 1
    print(f"ok {sent} {received} {max_gap * 1000:.0f}", flush=True)
    return 0


def dial(host: str, port: int) -> int:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    attempts = failures = 0
    print("dialing", flush=True)
    last_ok = time.monotonic()
    longest = 0.0
    while not stop.is_set():
        attempts += 1
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(1)
                s.sendall(b"ping\n")
                if s.makefile("rb").readline() != b"ping\n":
                    raise OSError("wrong or no echo")
            now = time.monotonic()
            longest, last_ok = max(longest, now - last_ok), now
        except OSError:
            failures += 1
        time.sleep(0.05)
    longest = max(longest, time.monotonic() - last_ok)
    print(f"ok {attempts} {failures} {longest * 1000:.0f}", flush=True)
    return 0


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(int(args[0]))
        return 0
    if cmd == "connect":
        return connect(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 2.0)
    if cmd == "stream":
        return stream(args[0], int(args[1]))
    if cmd == "dial":
        return dial(args[0], int(args[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
