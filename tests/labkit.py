"""Helpers for tests that drive a real lab: pods through the real plugin, real traffic."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cilia.client import AgentClient
from cilia.lab.lab import NETNS_DIR, Lab, Node, Pod, cni_plugin_argv, in_netns

PROBE = [sys.executable, "-m", "cilia.lab.probe"]


def unique_lab_name() -> str:
    return f"t{secrets.token_hex(3)}"


def pod_manifest(name: str, namespace: str = "default", labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"pod": name}},
        "spec": {"containers": [{"name": "c", "image": "none"}]},
    }


@contextmanager
def servers(lab: Lab, target: str, ports: list[int], name: str) -> Iterator[subprocess.Popen]:
    """Echo servers on TCP and UDP `ports` in a pod/node/outside, stopped afterwards."""
    argv = [*PROBE, "serve", "--name", name]
    for p in ports:
        argv += ["--tcp", str(p), "--udp", str(p)]
    proc = subprocess.Popen(lab.exec_argv(target, argv), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", f"server in {target} did not start"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def probe(lab: Lab, src: str, host: str, port: int, proto: str = "tcp",
          timeout: float = 2.0) -> str | None:
    """The answer `src` gets from host:port, or None."""
    argv = [*PROBE, "connect", host, str(port), "--proto", proto, "--timeout", str(timeout)]
    res = subprocess.run(lab.exec_argv(src, argv), capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def cni(node: Node, command: str, container_id: str, netns: str, ifname: str = "eth0",
        config: dict | None = None, stdin: bytes | None = None,
        env: dict[str, str] | None = None, pod: tuple[str, str] = ("default", "p")
        ) -> tuple[int, dict]:
    """Runs the real plugin as a runtime would; returns (exit status, stdout JSON)."""
    conf = config or {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
                      "socket": node.socket}
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}",
    }
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    res = subprocess.run(cni_plugin_argv(), input=stdin if stdin is not None else
                         json.dumps(conf).encode(), capture_output=True, env=full_env)
    out = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, out


def leases(node: Node) -> dict[str, str]:
    """The node's IPAM leases, address -> owner ({} before the first)."""
    path = os.path.join(node.state_dir, "ipam.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["leases"]


def endpoint_list(node: Node) -> list[dict]:
    """`cilia endpoint list -o json` of the node's agent."""
    out = subprocess.run([sys.executable, "-m", "cilia.cli", "--socket", node.socket,
                          "endpoint", "list", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def node_links(node: Node) -> set[str]:
    out = subprocess.run(in_netns(node.netns, ["ip", "-j", "link"]), capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def node_routes(node: Node) -> list[dict]:
    out = subprocess.run(in_netns(node.netns, ["ip", "-j", "route"]), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def redirect_peer_packets(node: Node) -> int:
    return metric(node, "redirect_peer")


def metric(node: Node, reason: str, direction: str | None = None) -> int:
    return sum(m.packets for m in AgentClient(node.socket).metrics()
               if m.reason == reason and direction in (None, m.direction))


@contextmanager
def sandbox(name: str) -> Iterator[str]:
    """A bare network namespace (a pod sandbox without a pod), always removed."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield str(NETNS_DIR / name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


__all__ = ["Lab", "Pod", "Node"]


# Run in a pod with .format(host=, port=): opens a TCP connection and a UDP flow to an
# echo server, asks once on each, waits for a line on stdin (the test changes policy or
# audit mode meanwhile), asks again; prints each answer ("none": nothing came back).
OPEN_FLOWS = """
import socket, sys
host, port = "{host}", {port}
tcp = socket.create_connection((host, port), timeout=1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(1)
udp.connect((host, port))

def ask(s, what):
    try:
        s.send(what)
        return s.recv(100).decode().strip() or "closed"
    except OSError as err:
        return "none"

print(ask(tcp, b"t1"), ask(udp, b"u1"), flush=True)
sys.stdin.readline()          # the test changes something in between
print(ask(tcp, b"t2"), ask(udp, b"u2"), flush=True)
"""
