"""The datapath's maps as the kernel holds them, decoded (issue 15: `cilia bpf ct list|
flush`, `cilia bpf endpoint list`, `cilia bpf policy get`, `cilia identity list|get`) and
`cilia sysdump`, on a real lab: real BPF maps, pods made by the CNI plugin, real traffic.
The dumps read the pinned maps, so they answer with the agent stopped too."""

import json
import subprocess
import sys
import tarfile

import pytest
from labkit import pod_manifest, probe, servers
from reachability import netpol

from cilia.client import AgentClient
from cilia.identity import security_labels


def cli(lab, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, *argv],
                         capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def as_json(lab, *argv: str):
    return json.loads(cli(lab, *argv, "-o", "json").stdout)


@pytest.fixture(scope="module")
def pods(lab):
    a = lab.run_pod(pod_manifest("a", "dump", {"app": "a"}))
    b = lab.run_pod(pod_manifest("b", "dump", {"app": "b"}))
    lab.datastore.put(netpol("b-from-a", "dump", {"matchLabels": {"app": "b"}}, types=["Ingress"],
                             ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                       "ports": [{"port": 80, "protocol": "TCP"}]}]))
    AgentClient(lab.load().nodes[0].socket).wait_policy_synced()
    with servers(lab, "dump/b", [80], "b"):
        yield a, b


def test_conntrack_shows_the_flow_decoded_and_flush_removes_it(lab, pods):
    a, b = pods
    assert probe(lab, "dump/a", b.ip, 80, proto="udp") is None  # no UDP rule: denied
    assert probe(lab, "dump/a", b.ip, 80) == "b:hello"
    flows = [e for e in as_json(lab, "bpf", "ct", "list")
             if e["source"].startswith(f"{a.ip}:") and e["destination"] == f"{b.ip}:80"]
    assert len(flows) == 1, flows
    flow = flows[0]
    assert flow["protocol"] == "TCP" and flow["scope"] == "flow"
    assert flow["sourceName"] == "dump/a" and flow["destinationName"] == "dump/b"
    assert "reply-seen" in flow["flags"] and flow["ruleCookie"] > 0
    assert 0 < flow["expiresInSeconds"] <= 21600
    table = cli(lab, "bpf", "ct", "list").stdout
    assert f"{b.ip}:80 (dump/b)" in table

    out = cli(lab, "bpf", "ct", "flush", "--address", b.ip).stdout
    assert "removed" in out and int(out.split()[1]) >= 1
    assert not [e for e in as_json(lab, "bpf", "ct", "list")
                if b.ip in (e["source"].split(":")[0], e["destination"].split(":")[0])]
    assert probe(lab, "dump/a", b.ip, 80) == "b:hello"  # judged again: still allowed


def test_endpoints_and_an_endpoints_policy_entries(lab, pods):
    a, b = pods
    eps = {e["ip"]: e for e in as_json(lab, "bpf", "endpoint", "list")}
    assert eps[b.ip]["pod"] == "dump/b" and eps[b.ip]["flags"] == ["ingress-enforced"]
    assert eps[a.ip]["flags"] == []
    entries = as_json(lab, "bpf", "policy", "get", "dump/b")
    a_identity = eps[a.ip]["identity"]
    allowed = [e for e in entries if e["identity"] == a_identity]
    assert allowed == [{"direction": "ingress", "identity": a_identity,
                        "peer": allowed[0]["peer"], "cidrView": False, "port": "80/TCP",
                        "action": "allow", "ruleCookie": allowed[0]["ruleCookie"]}]
    assert "pod:app=a" in allowed[0]["peer"] and allowed[0]["ruleCookie"] > 0
    # by endpoint id too, and the same
    assert as_json(lab, "bpf", "policy", "get", str(eps[b.ip]["endpointId"])) == entries


def test_identities_with_their_labels(lab, pods):
    ids = {e["identity"]: e for e in as_json(lab, "identity", "list")}
    assert ids[1]["name"] == "reserved:host" and ids[2]["name"] == "reserved:world"
    want = sorted(security_labels({"app": "a"}, "dump", {}))
    number = next(n for n, e in ids.items() if e["labels"] == want)
    assert as_json(lab, "identity", "get", str(number))["labels"] == want
    res = cli(lab, "identity", "get", "65000", check=False)
    assert res.returncode != 0 and "not allocated" in res.stderr


def test_sysdump_holds_every_part_and_dumps_the_maps_with_the_agent_stopped(
        lab, pods, tmp_path):
    node = lab.load().nodes[0]
    up = tmp_path / "up.tar.gz"
    cli(lab, "sysdump", "--output", str(up))
    with tarfile.open(up) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        base = f"nodes/{node.name}"
        for part in ("agent/status.json", "agent/endpoints.json", "maps/conntrack.json",
                     "maps/policy.json", "links.json", "routes.json", "tc-filters.json",
                     "agent.log", "versions.json", "machine/bpf-programs.json"):
            assert part in names or f"{base}/{part}" in names, part
        root = up.name.split(".")[0]
        tc = json.load(tar.extractfile(f"{root}/{base}/tc-filters.json"))
        # the pods' host-side veths carry cilia's programs, as tc shows them
        assert any(f.get("options", {}).get("bpf_name", "").startswith("cil_from_pod")
                   for hooks in tc.values() for f in hooks["ingress"])

    lab.stop_agent(node.name)
    try:
        eps = as_json(lab, "bpf", "endpoint", "list")  # from the pins, no agent
        assert {e["ip"] for e in eps} >= {pods[0].ip, pods[1].ip}
        assert all(e["pod"] == "" for e in eps)  # nobody to name them: numbers only
        down = tmp_path / "down.tar.gz"
        out = cli(lab, "sysdump", "--output", str(down)).stdout
        assert "could not be collected" in out
        with tarfile.open(down) as tar:
            root = down.name.split(".")[0]
            names = {m.name for m in tar.getmembers()}
            assert f"{root}/nodes/{node.name}/agent/status.json.error" in names
            maps = json.load(tar.extractfile(f"{root}/nodes/{node.name}/maps/endpoints.json"))
            assert {e["ip"] for e in maps} >= {pods[0].ip, pods[1].ip}
    finally:
        lab.start_agent(node.name)
