"""hostNetwork pods (kube-proxy, node daemons, the agent itself) report their node's
address as their pod IP. They never enter the ipcache as pods: a node's address stays
`host` on that node and `remote-node` on the others, so the kubelet's probes (node to
pod) still pass a default-deny ingress policy. Neither do pods that report a node's
address without saying hostNetwork, nor pods that have finished. `cilia bpf ipcache
list` shows the ipcache decoded, from the kernel's map."""

import json
import subprocess
import sys

import pytest
from labkit import pod_manifest, probe, servers, unique_lab_name
from reachability import netpol

from cilia.client import AgentClient
from cilia.identity import HOST, REMOTE_NODE
from cilia.lab.lab import Lab, LabError

FINISHED_IP = "10.244.1.250"  # inside node1's pod CIDR, never leased in this test


def node_pod(name: str, node, *, host_network: bool = True, phase: str = "Running",
             ip: str | None = None) -> dict:
    """A pod as the API server shows it once the kubelet has run it on `node`."""
    spec: dict = {"nodeName": node.name, "containers": [{"name": "c", "image": "none"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "kube-system",
                     "labels": {"k8s-app": name.rsplit("-", 1)[0]}},
        "spec": spec,
        "status": {"phase": phase, "podIP": ip or node.underlay_ip,
                   "podIPs": [{"ip": ip or node.underlay_ip}], "hostIP": node.underlay_ip},
    }


def cli(lab: Lab, *argv: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def ipcache(lab: Lab, node: str) -> dict[str, dict]:
    return {e["prefix"]: e for e in json.loads(
        cli(lab, "--node", node, "bpf", "ipcache", "list", "-o", "json"))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2)
        state = lab.load()
        node1, node2 = lab.node(state, "node1"), lab.node(state, "node2")
        pod = lab.run_pod(pod_manifest("web", "hn", {"app": "web"}), "node1")
        manifests = [
            node_pod("kube-proxy-node1", node1),
            node_pod("kube-proxy-node2", node2),
            # says nothing of hostNetwork, but its address is node2's
            node_pod("node-exporter-node2", node2, host_network=False),
            # finished: its address may be anyone's by now
            node_pod("job-done-node1", node1, host_network=False, phase="Succeeded",
                     ip=FINISHED_IP),
        ]
        path = tmp_path_factory.mktemp("hostnet") / "pods.yaml"
        path.write_text("---\n".join(json.dumps(m) + "\n" for m in manifests))
        cli(lab, "apply", "-f", str(path))
        lab.datastore.put(netpol("deny-in", "hn", types=["Ingress"]))
        for node in (node1, node2):
            AgentClient(node.socket).wait_policy_synced()
        with servers(lab, "hn/web", [80], "web"):
            yield lab, node1, node2, pod
    finally:
        lab.down()


def test_node_addresses_keep_their_node_identities(cluster):
    lab, node1, node2, _ = cluster
    for me, other in ((node1, node2), (node2, node1)):
        entries = ipcache(lab, me.name)
        own, theirs = entries[f"{me.underlay_ip}/32"], entries[f"{other.underlay_ip}/32"]
        assert (own["identity"], own["name"]) == (HOST, "reserved:host"), (me.name, own)
        assert (theirs["identity"], theirs["name"]) == (
            REMOTE_NODE, "reserved:remote-node"), (me.name, theirs)
        assert own["labels"] == [] and theirs["labels"] == []


def test_no_node_pod_and_no_finished_pod_in_the_ipcache(cluster):
    lab, *_ = cluster
    for node in ("node1", "node2"):
        entries = ipcache(lab, node)
        assert f"{FINISHED_IP}/32" not in entries
        for e in entries.values():
            assert "ns:kubernetes.io/metadata.name=kube-system" not in e["labels"], e


def test_pods_are_in_the_ipcache_with_their_labels(cluster):
    lab, _, _, pod = cluster
    for node in ("node1", "node2"):
        web = ipcache(lab, node)[f"{pod.ip}/32"]
        assert web["identity"] >= 256
        assert "pod:app=web" in web["labels"]
        assert "ns:kubernetes.io/metadata.name=hn" in web["labels"]
        assert web["name"] == "hn/{app=web}"


def test_node_reaches_its_pod_under_default_deny(cluster):
    """The kubelet's probes: from the node's own address, `host`, always allowed."""
    lab, node1, _, pod = cluster
    assert probe(lab, f"node:{node1.name}", pod.ip, 80) == "web:hello"
    assert probe(lab, "outside", pod.ip, 80, timeout=1) is None  # the policy holds


def test_ipcache_list_table(cluster):
    lab, node1, node2, pod = cluster
    out = cli(lab, "--node", "node1", "bpf", "ipcache", "list")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["PREFIX", "IDENTITY", "WHO"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[f"{node1.underlay_ip}/32"][1:3] == ["1", "reserved:host"]
    assert rows[f"{node2.underlay_ip}/32"][1:3] == ["6", "reserved:remote-node"]
    assert rows[f"{pod.ip}/32"][2] == "hn/{app=web}"
    assert rows["0.0.0.0/0"][1:3] == ["2", "reserved:world"]


def test_a_host_network_pod_gets_no_endpoint(cluster):
    lab, node1, *_ = cluster
    manifest = node_pod("hostnet-cni-node1", node1)
    del manifest["status"]
    with pytest.raises(LabError, match="hostNetwork"):
        lab.run_pod(manifest, "node1")
    eps = AgentClient(node1.socket).endpoints()
    assert [e.pod_name for e in eps] == ["web"]
