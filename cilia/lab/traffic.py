"""Echo servers and one-shot probes in a lab's pods, nodes and outside network (the
probe tool is cilia/lab/probe.py): what `cilia demo` and `cilia connectivity test` send."""

from __future__ import annotations

import subprocess
import sys

from cilia.lab.lab import Lab

PROBE = [sys.executable, "-m", "cilia.lab.probe"]


def start_server(lab: Lab, target: str, port: int, name: str) -> subprocess.Popen:
    """An echo server on TCP and UDP `port` in a pod ("NS/POD"), "node:NAME" or
    "outside", answering `name:MESSAGE`; running once this returns."""
    argv = lab.exec_argv(target, [*PROBE, "serve", "--tcp", str(port), "--udp", str(port),
                                  "--name", name])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"echo server in {target} on port {port} did not start")
    return proc


def stop_servers(servers: list[subprocess.Popen]) -> None:
    for s in servers:
        s.terminate()
    for s in servers:
        try:
            s.wait(timeout=10)
        except subprocess.TimeoutExpired:
            s.kill()
            s.wait()


def probe(lab: Lab, target: str, host: str, port: int, proto: str = "tcp",
          timeout: float = 2.0) -> str | None:
    """The answer `target` gets from host:port, or None."""
    argv = lab.exec_argv(target, [*PROBE, "connect", host, str(port), "--proto", proto,
                                  "--message", "hello", "--timeout", str(timeout)])
    res = subprocess.run(argv, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None
