"""The kernel's own drop reasons in the flow stream (issue 15 item 6): a datagram from a
pod to another pod's closed port is delivered (policy allows it) and dropped by the
receiving stack, SKB_DROP_REASON_NO_SOCKET; `cilia observe` shows it as dropped by the
kernel (kernel:NO_SOCKET) beside the datapath's policy drop. Each drop once: cilia's own
tc drops (which the kernel frees as TC_INGRESS) are not reported again, and of the lab's
two nodes on one kernel only the one in whose namespaces it happened reports it (the
sender's node has the sending pod's address too). Again after an agent restart."""

import json
import subprocess
import sys
import time

import pytest
from labkit import metric, pod_manifest, probe, unique_lab_name
from reachability import netpol

from cilia.client import AgentClient
from cilia.lab.lab import Lab

CLOSED = 9999  # no socket in pod b listens here


@pytest.fixture(scope="module")
def lab1():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2)
        pods = {name: lab.run_pod(pod_manifest(name, "kd", {"app": name}), node)
                for name, node in (("a", "node1"), ("c", "node1"), ("b", "node2"),
                                   ("d", "node2"))}
        lab.datastore.put(netpol("b-from-a-d", "kd", {"matchLabels": {"app": "b"}},
                                 types=["Ingress"], ingress=[{"from": [{"podSelector": {
                                     "matchExpressions": [{"key": "app", "operator": "In",
                                                           "values": ["a", "d"]}]}}]}]))
        for node in lab.load().nodes:
            AgentClient(node.socket).wait_policy_synced()
        yield lab, pods
    finally:
        lab.down()


def observe(lab, *argv: str) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "observe",
                          *argv, "-o", "jsonl"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def drops_after(lab, start: float, want: int = 3) -> list[dict]:
    """The dropped flows since `start`, once `want` of them are there (the agent drains
    its ring every 50 ms)."""
    deadline = time.monotonic() + 10
    while True:
        flows = observe(lab, "--since", str(start), "--verdict", "dropped", "--namespace",
                        "kd")
        if len(flows) >= want or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


def check_both_drops(lab, pods) -> None:
    start = time.time()
    for src in ("kd/a", "kd/d", "kd/c"):  # other node, same node, refused by policy
        assert probe(lab, src, pods["b"].ip, CLOSED, proto="udp", timeout=1) is None
    flows = drops_after(lab, start)
    kernel = [f for f in flows if f["reason"].startswith("kernel:")]
    policy = [f for f in flows if f["reason"] == "drop_policy"]
    # a -> b, d -> b: allowed, delivered, dropped by b's stack: no socket on that port.
    # Each once, by node2 (where b's namespace is), though node1 has a's address.
    assert sorted(f["src_pod"] for f in kernel) == ["a", "d"], json.dumps(flows)
    for k in kernel:
        assert k["reason"] == "kernel:NO_SOCKET"
        assert (k["dst_pod"], k["protocol"], k["dst_port"]) == ("b", "UDP", CLOSED)
        assert k["direction"] == "ingress" and k["node"] == "node2" and not k.get("rule")
        assert k["src_identity"] >= 256 and k["dst_identity"] >= 256  # both pods'
    # c -> b: refused by b's policy, reported by the datapath only (the kernel frees it
    # as TC_INGRESS: not a second report), in the same stream, after the kernel's
    assert len(policy) == 1 and policy[0]["src_pod"] == "c", json.dumps(flows)
    assert policy[0]["node"] == "node2"
    assert max(k["time"] for k in kernel) < policy[0]["time"]


def test_kernel_drop_beside_policy_drop(lab1):
    lab, pods = lab1
    check_both_drops(lab, pods)
    node1, node2 = lab.load().nodes
    assert metric(node2, "drop_kernel", "ingress") >= 2  # the datapath's counters too
    assert metric(node1, "drop_kernel") == 0
    assert "kernel drop reasons on: cil_kfree_skb on skb:kfree_skb" in open(node2.log).read()
    # the compact form reads "dropped by the kernel: NO_SOCKET"
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "observe",
                          "--last", "5", "--reason", "kernel:NO_SOCKET", "-o", "compact"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "kd/a" in res.stdout and "DROPPED (kernel:NO_SOCKET, ingress)" in res.stdout, \
        res.stdout


def test_after_agent_restart_reported_once(lab1):
    lab, pods = lab1
    lab.restart_agent("node2")  # the old agent's program went with it; the new one's is on
    for node in lab.load().nodes:
        AgentClient(node.socket).wait_policy_synced()
    check_both_drops(lab, pods)


def test_off_on_demand():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=1, agent_args=["--no-kernel-drop-reasons"])
        pods = {name: lab.run_pod(pod_manifest(name, "kd", {"app": name}), "node1")
                for name in ("a", "b")}
        start = time.time()
        assert probe(lab, "kd/a", pods["b"].ip, CLOSED, proto="udp", timeout=1) is None
        time.sleep(0.5)  # the agent drains its ring every 50 ms
        assert not observe(lab, "--since", str(start), "--verdict", "dropped")
        node = lab.load().nodes[0]
        assert "kernel drop reasons off (--no-kernel-drop-reasons)" in open(node.log).read()
    finally:
        lab.down()
