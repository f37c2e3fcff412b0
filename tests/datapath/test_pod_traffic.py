"""Pods made through the real plugin talk over the real datapath."""

import json
import re
import subprocess
import sys

import pytest
from dashboardkit import dashboard_metric_names
from labkit import metric, pod_manifest, probe, redirect_peer_packets, servers

from cilia.client import AgentClient


@pytest.fixture(scope="module")
def pods(lab):
    a = lab.run_pod(pod_manifest("a", labels={"app": "a"}))
    b = lab.run_pod(pod_manifest("b", labels={"app": "b"}))
    return a, b


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_to_pod_both_ways(lab, pods, proto):
    a, b = pods
    with servers(lab, "default/a", [80], "a"), servers(lab, "default/b", [80], "b"):
        assert probe(lab, "default/a", b.ip, 80, proto) == "b:hello"
        assert probe(lab, "default/b", a.ip, 80, proto) == "a:hello"


def test_pod_to_node_and_outside(lab, pods):
    a, _ = pods
    node = lab.load().nodes[0]
    with servers(lab, f"node:{node.name}", [9090], "node"), \
         servers(lab, "outside", [9000], "outside"):
        assert probe(lab, "default/a", node.underlay_ip, 9090) == "node:hello"
        assert probe(lab, "default/a", "172.30.0.1", 9000) == "outside:hello"
        assert probe(lab, "default/a", "172.30.0.1", 9000, "udp") == "outside:hello"


def test_outside_reaches_pod(lab, pods):
    _, b = pods
    with servers(lab, "default/b", [8080], "b"):
        assert probe(lab, "outside", b.ip, 8080) == "b:hello"


def test_pod_to_pod_is_delivered_by_redirect_peer_not_the_stack(lab, pods):
    """100 datagrams each way: every one goes through bpf_redirect_peer, none to the stack."""
    a, b = pods
    node = lab.load().nodes[0]
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2)\n"
        f"n=0\nfor i in range(100):\n  s.sendto(b'x',('{b.ip}',80));s.recvfrom(100);n+=1\n"
        "print(n)\n"
    )
    with servers(lab, "default/b", [80], "b"):
        before_peer = redirect_peer_packets(node)
        before_stack = metric(node, "to_stack")
        out = subprocess.run(lab.exec_argv("default/a", [sys.executable, "-c", script]),
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "100", out.stderr
        peer = redirect_peer_packets(node) - before_peer
        stack = metric(node, "to_stack") - before_stack
    assert peer >= 200, f"only {peer} of 200 packets went through bpf_redirect_peer"
    # The stack sees only unrelated background (IPv6 router solicitations and the like).
    assert stack < 20, f"{stack} packets went to the stack"


def test_pod_to_pod_decrements_ttl(lab, pods):
    a, b = pods
    # The reply's TTL as the client sees it: 64 minus one routing hop.
    script = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2)\n"
        "s.setsockopt(socket.IPPROTO_IP, 12, 1)\n"  # IP_RECVTTL
        f"s.sendto(b'x',('{b.ip}',80))\n"
        "data, anc, flags, addr = s.recvmsg(100, 64)\n"
        "print(int.from_bytes(anc[0][2], 'little'))\n"
    )
    with servers(lab, "default/b", [80], "b"):
        out = subprocess.run(lab.exec_argv("default/a", [sys.executable, "-c", script]),
                             capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "63", out.stderr


def test_endpoint_list_json(lab, pods):
    a, b = pods
    out = subprocess.run(
        ["cilia", "--lab", lab.name, "endpoint", "list", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    eps = {e["pod"]: e for e in json.loads(out)}
    assert eps["a"]["ip"] == a.ip and eps["b"]["ip"] == b.ip
    for key in ("namespace", "pod", "containerID", "netns", "ip", "interface", "id", "node"):
        assert key in eps["a"]
    assert eps["a"]["labels"] == {"app": "a"}  # taken from the datastore
    assert eps["a"]["node"] == "node1" and eps["a"]["interface"] == "eth0"
    assert len({e["id"] for e in eps.values()}) == 2
    status = AgentClient(lab.load().nodes[0].socket).status()
    assert status.ready and status.endpoints == 2


def test_prometheus_metrics(lab, pods):
    node = lab.load().nodes[0]
    code = ("import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:9962/metrics').read().decode())")
    out = subprocess.run(lab.exec_argv(f"node:{node.name}", [sys.executable, "-c", code]),
                         capture_output=True, text=True, check=True).stdout
    assert 'cilia_datapath_packets_total{direction="egress",drop="false",' \
           'reason="redirect_peer"}' in out
    assert "cilia_endpoints 2.0" in out
    # How full the tables are: the two pods' entries, out of the compiled sizes.
    assert 'cilia_map_entries{map="cilia_endpoints"} 2.0' in out
    # the conntrack table is sized from the node's memory (cilia/datapath/conntrack.py)
    from cilia.datapath.conntrack import ct_map_size

    assert f'cilia_map_capacity{{map="cilia_ct"}} {float(ct_map_size())}' in out
    ct = [line for line in out.splitlines() if line.startswith('cilia_map_entries{map="cilia_ct"}')]
    assert ct and float(ct[0].split()[-1]) > 0, "the pods' connections are in conntrack"


def test_metrics_dashboards_are_built_from(lab, pods):
    """Flows counted as they come, latencies observed, sync errors by controller, the
    agent's memory; and every metric the chart's Grafana dashboard queries is on a real
    agent's /metrics."""
    node = lab.load().nodes[0]
    a, b = pods
    with servers(lab, "default/b", [8081], "b"):
        assert probe(lab, "default/a", b.ip, 8081) == "b:hello"  # a new flow, forwarded
    code = ("import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:9962/metrics').read().decode())")

    def scrape() -> str:
        return subprocess.run(lab.exec_argv(f"node:{node.name}", [sys.executable, "-c", code]),
                              capture_output=True, text=True, check=True).stdout

    out = scrape()
    flows = [line for line in out.splitlines() if line.startswith("cilia_flows_total{")]
    assert flows and any('verdict="forwarded"' in f and float(f.split()[-1]) > 0
                         for f in flows), flows
    adds = [line for line in out.splitlines()
            if line.startswith('cilia_endpoint_regeneration_seconds_count{outcome="success"}')]
    assert adds and float(adds[0].split()[-1]) >= 2, "the two pods' ADDs"
    assert re.search(r"^cilia_policy_sync_seconds_count [1-9]", out, re.M)
    assert re.search(r"^process_resident_memory_bytes [1-9]", out, re.M)
    present = set(re.findall(r"^([a-z_]+)(?:\{| )", out, re.M))
    missing = dashboard_metric_names() - present
    # labelled families with no sample yet show only their HELP/TYPE lines
    typed = set(re.findall(r"^# TYPE ([a-z_]+) ", out, re.M))
    missing = {m for m in missing if m not in typed and m.removesuffix("_bucket")
               .removesuffix("_sum").removesuffix("_count") not in typed}
    assert not missing, f"the dashboard queries metrics this agent does not export: {missing}"
