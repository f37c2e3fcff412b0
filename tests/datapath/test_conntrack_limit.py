"""One pod cannot evict the others' connections (issue 13 item 10): the conntrack table
is sized from the node's memory (a restart with another size copies it), and each
endpoint may hold a bounded number of live entries (--ct-endpoint-max)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest
from labkit import metric, pod_manifest, unique_lab_name

from cilia.datapath import layouts
from cilia.datapath.libbpf import LibbpfError
from cilia.datapath.loader import Datapath, remove_pins

pytestmark = pytest.mark.root


def _ct_key(i: int) -> layouts.CtKey:
    return layouts.CtKey(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1000 + i, 80, 6, 0, b"\0\0")


def test_a_restart_with_another_size_keeps_the_table():
    """The table pinned at one size, a load asking for another: a new table of that
    size, with the old one's entries; a load asking for none keeps the pinned size; a
    map that cannot be copied (the policy map) pinned at another size stops the load,
    saying which and what to do."""
    root = f"/sys/fs/bpf/cilia-ctsize-{secrets.token_hex(4)}"
    try:
        dp = Datapath(root, sizes={"cilia_ct": 1024})
        try:
            assert dp.maps["cilia_ct"].max_entries == 1024
            for i in range(10):
                dp.maps["cilia_ct"].update(_ct_key(i), layouts.CtValue(
                    time.monotonic_ns(), 21600, 1, 2, 0, 1, 0, 0))
        finally:
            dp.close()
        dp = Datapath(root, sizes={"cilia_ct": 4096})
        try:
            ct = dp.maps["cilia_ct"]
            assert ct.max_entries == 4096
            assert all(ct.lookup(_ct_key(i)) is not None for i in range(10)), \
                "entries lost in the resize"
        finally:
            dp.close()
        dp = Datapath(root)
        try:
            assert dp.maps["cilia_ct"].max_entries == 4096
        finally:
            dp.close()
        assert not [n for n in os.listdir(root) if "resizing" in n], "old table left pinned"
        with pytest.raises(LibbpfError, match="cilia_policy holds 262144 entries, not "
                                              "the 64 asked for: remove it first"):
            Datapath(root, sizes={"cilia_policy": 64})
    finally:
        remove_pins(root)


# The victim (default-deny ingress) opened a TCP connection to the server, which answers,
# then stays idle; the server speaks first after the flood: if the victim's entry had
# been evicted, the server's packet would be a new connection into the victim, denied.
SERVER = """
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 9000))
ls.listen()
print("ready", flush=True)
c, _ = ls.accept()
c.recv(100)
c.send(b"hi")
sys.stdin.readline()
c.send(b"push")
"""
VICTIM = """
import socket
s = socket.create_connection(("{host}", 9000), timeout=5)
s.send(b"hello")
print(s.recv(100).decode(), flush=True)
s.settimeout(5)
try:
    print(s.recv(100).decode() or "closed", flush=True)
except OSError:
    print("none", flush=True)
"""
FLOOD = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20000 + {n}):
    for _ in range(3):  # a flow the LRU has seen again is as recent as the victim's
        try:
            s.sendto(b"x", ("{host}", port))
        except OSError:
            pass
"""


def test_a_flooding_pod_does_not_evict_an_idle_connection():
    """A table of 2,048 entries, at most 256 live for one endpoint. A pod sends UDP to
    5,000 ports (5,000 new flows): it is held at its limit (drop_ct_endpoint_limit), and
    another pod's idle TCP connection, which only its entry lets the server's next
    packet into that default-deny pod, survives and works. Before, the flood evicted
    it from the shared LRU and the server's packet was dropped as a new connection."""
    from cilia.client import AgentClient
    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up(agent_args=["--ct-map-max", "2048", "--ct-endpoint-max", "256"])
        server = lab.run_pod(pod_manifest("server", labels={"app": "server"}))
        lab.run_pod(pod_manifest("victim", labels={"app": "victim"}))
        lab.run_pod(pod_manifest("flooder", labels={"app": "flooder"}))
        node = lab.load().nodes[0]
        lab.datastore.put({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "victim-deny-in", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "victim"}},
                     "policyTypes": ["Ingress"]}})
        AgentClient(node.socket).wait_policy_synced()
        srv = subprocess.Popen(lab.exec_argv("default/server", [sys.executable, "-c", SERVER]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        victim = None
        try:
            assert srv.stdout.readline().strip() == "ready"
            victim = subprocess.Popen(
                lab.exec_argv("default/victim", [sys.executable, "-c",
                                                 VICTIM.format(host=server.ip)]),
                stdout=subprocess.PIPE, text=True)
            assert victim.stdout.readline().strip() == "hi"
            before = metric(node, "drop_ct_endpoint_limit", "egress")
            subprocess.run(lab.exec_argv("default/flooder", [
                sys.executable, "-c", FLOOD.format(host=server.ip, n=5000)]), check=True,
                timeout=60)
            limited = metric(node, "drop_ct_endpoint_limit", "egress") - before
            srv.stdin.write("go\n")
            srv.stdin.flush()
            got = victim.stdout.readline().strip()
        finally:
            srv.kill()
            if victim is not None:
                victim.kill()
        assert got == "push", f"the idle connection did not survive the flood: {got}"
        assert limited >= 3 * (5000 - 256), f"the flooder was not limited: {limited} drops"
    finally:
        lab.down()
