"""`cilia-agent --cleanup` removes everything agents set up on a node."""

import json
import subprocess
import sys
import time
from pathlib import Path

from labkit import unique_lab_name

from cilia.client import AgentClient
from cilia.lab.lab import CLUSTER_CIDR, Lab, in_netns


def _out(node, *argv) -> str:
    return subprocess.run(in_netns(node.netns, list(argv)), capture_output=True, text=True,
                          check=True).stdout


def test_cleanup_removes_programs_routes_vxlan_chain_and_maps():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2, routing="vxlan")
        lab.datastore.put({"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaPrefilter",
                           "metadata": {"name": "some"}, "spec": {"deny": ["192.0.2.0/24"]}})
        node = lab.node(lab.load(), "node1")
        AgentClient(node.socket).wait_policy_synced()
        deadline = time.monotonic() + 10  # node1 learns node2 once node2 registers
        while not json.loads(_out(node, "ip", "-j", "route", "show", "proto", "196")):
            assert time.monotonic() < deadline, "node1 never routed to node2"
            time.sleep(0.1)
        # the prefilter is its own controller: policy in sync says nothing about it
        while "xdp" not in _out(node, "ip", "link", "show", "eth0"):
            assert time.monotonic() < deadline, "node1 never attached its prefilter"
            time.sleep(0.1)
        node = lab.stop_agent("node1")
        assert "cil_from_netdev" in _out(node, "tc", "filter", "show", "dev", "eth0", "ingress")
        assert "xdp" in _out(node, "ip", "link", "show", "eth0")
        assert json.loads(_out(node, "ip", "-j", "route", "show", "proto", "196"))
        assert Path(node.bpffs_root, "cilia_policy").exists()

        subprocess.run(in_netns(node.netns, [
            sys.executable, "-m", "cilia.agent.main", "--cleanup", "--node-name", node.name,
            "--pod-cidr", node.pod_cidr, "--devices", "eth0", "--routing", "vxlan",
            "--bpffs-root", node.bpffs_root, "--cluster-cidr", CLUSTER_CIDR,
            "--state-dir", node.state_dir,
        ]), check=True, capture_output=True)

        assert "cil_from_netdev" not in _out(node, "tc", "filter", "show", "dev", "eth0",
                                             "ingress")
        assert "xdp" not in _out(node, "ip", "link", "show", "eth0")
        assert json.loads(_out(node, "ip", "-j", "route", "show", "proto", "196")) == []
        assert "cilia_vxlan" not in _out(node, "ip", "link")
        assert "CILIA-MASQ" not in _out(node, "iptables", "-t", "nat", "-S")
        assert not Path(node.bpffs_root).exists()
        assert not Path(node.state_dir, "ipam.json").exists()
        assert lab.exists()  # the lab's own state (and the datastore) is not the agent's
    finally:
        lab.down()
