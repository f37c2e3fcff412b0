"""`cilia observe` on a two-node lab (issue 15 item 1): each agent keeps its flow history,
with both ends named as they were (namespace, pod, labels, identity), the verdict and
its reason or rule, and the TCP flags; one query merges both nodes' flows in time order,
filtered, and `--follow` streams the new ones."""

import json
import subprocess
import sys
import time

import pytest
from labkit import pod_manifest, probe, servers, unique_lab_name
from reachability import netpol

from cilia.client import AgentClient
from cilia.lab.lab import Lab


@pytest.fixture(scope="module")
def lab2():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2)
        pods = {
            "a": lab.run_pod(pod_manifest("a", "obs", {"app": "a"}), "node1"),
            "c": lab.run_pod(pod_manifest("c", "obs", {"app": "c"}), "node1"),
            "b": lab.run_pod(pod_manifest("b", "obs", {"app": "b", "tier": "web"}), "node2"),
        }
        lab.datastore.put(netpol("b-from-a", "obs", {"matchLabels": {"app": "b"}},
                                 types=["Ingress"], ingress=[{"from": [
                                     {"podSelector": {"matchLabels": {"app": "a"}}}]}]))
        for node in lab.load().nodes:
            AgentClient(node.socket).wait_policy_synced()
        with servers(lab, "obs/b", [80], "b"):
            yield lab, pods
    finally:
        lab.down()


def observe(lab, *argv: str, node: str | None = None) -> list[dict]:
    where = ["--node", node] if node else []
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, *where,
                          "observe", *argv, "-o", "jsonl"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_history_of_both_nodes_merged_named_and_filtered(lab2):
    lab, pods = lab2
    start = time.time()
    assert probe(lab, "obs/a", pods["b"].ip, 80) == "b:hello"
    assert probe(lab, "obs/c", pods["b"].ip, 80, timeout=1) is None
    flows = observe(lab, "--since", str(start))
    assert [f["time"] for f in flows] == sorted(f["time"] for f in flows)
    allowed = [f for f in flows if f.get("src_pod") == "a" and f.get("dst_pod") == "b"
               and f["verdict"] == "forwarded"]
    assert {f["node"] for f in allowed} == {"node1", "node2"}  # egress there, ingress here
    first = allowed[0]
    assert first["src_namespace"] == first["dst_namespace"] == "obs"
    assert first["src_labels"] == ["app=a"] and first["dst_labels"] == ["app=b", "tier=web"]
    assert first["tcp_flags"] == "SYN" and first["dst_port"] == 80
    denied = [f for f in flows if f.get("src_pod") == "c" and f["verdict"] == "dropped"]
    assert denied and all(f["node"] == "node2" and f["reason"] == "drop_policy"
                          for f in denied), json.dumps(denied)

    # filters: one end, either end, labels, verdict, port, protocol
    only_c = observe(lab, "--since", str(start), "--from-pod", "obs/c")
    assert only_c and {f["src_pod"] for f in only_c} == {"c"}
    assert {f["verdict"] for f in observe(lab, "--since", str(start), "--verdict",
                                          "dropped", "--namespace", "obs")} == {"dropped"}
    web = observe(lab, "--since", str(start), "--to-label", "tier=web,app in (b)")
    assert web and all(f["dst_pod"] == "b" for f in web)
    assert not observe(lab, "--since", str(start), "--to-port", "81")
    assert not observe(lab, "--since", str(start), "--protocol", "UDP")
    assert len(observe(lab, "--since", str(start), "--last", "1")) == 1
    # one node only
    assert {f["node"] for f in observe(lab, "--since", str(start), node="node2")} == {"node2"}
    # the table and compact forms say the same, readably
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "observe",
                          "--since", str(start), "--from-pod", "obs/c", "-o", "compact"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "obs/c" in res.stdout and "DROPPED (drop_policy, ingress)" in res.stdout


def test_follow_streams_new_flows_from_every_node(lab2):
    lab, pods = lab2
    proc = subprocess.Popen([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "observe",
                             "--follow", "--to-pod", "obs/b", "--protocol", "UDP", "-o",
                             "jsonl"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the streams are open
        probe(lab, "obs/a", pods["b"].ip, 80, proto="udp")
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and {f["node"] for f in seen} != {"node1",
                                                                            "node2"}:
            line = proc.stdout.readline()
            if line:
                seen.append(json.loads(line))
        assert {f["node"] for f in seen} == {"node1", "node2"}, seen
        assert all(f["protocol"] == "UDP" and f["dst_pod"] == "b" for f in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
