"""files/node-cleanup.sh (the chart's uninstall hook) against a real node: a one-node lab
with a running pod, its agent stopped, the script run in the node's network namespace as
the hook's pod runs it in the host's. Afterwards nothing of cilia's is left there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from chartkit import CHART

SCRIPT = CHART / "files" / "node-cleanup.sh"
REPO = CHART.parents[1]


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not (REPO / "bpf" / "build" / "bpf_lxc.o").exists():
        missing.append("the BPF objects (make -C bpf)")
    for tool in ("nsenter", "ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}")


def in_node(node, script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=120)


def leftovers(node) -> list[str]:
    left = []
    links = json.loads(in_node(node, "ip -j -d link show").stdout)
    for link in links:
        name = link["ifname"]
        if name.startswith(("lxc", "cilia_")):
            left.append(f"link {name}")
        if "cil_" in json.dumps(link.get("xdp", {})):
            left.append(f"xdp on {name}")
        for hook in ("ingress", "egress"):
            out = in_node(node, f"tc filter show dev {name} {hook}").stdout
            if " cil_" in out:
                left.append(f"tc {hook} on {name}")
    if in_node(node, "ip route show proto 196").stdout.strip():
        left.append("routes proto 196")
    masq = in_node(node, "iptables -w -t nat -S CILIA-MASQ") if shutil.which("iptables") else None
    if masq is not None and masq.returncode == 0:
        left.append("iptables CILIA-MASQ")
    for path in (node.bpffs_root, node.state_dir, os.path.dirname(node.socket)):
        if Path(path).exists():
            left.append(f"path {path}")
    return left


def test_node_cleanup_removes_everything(tmp_path):
    from labkit import pod_manifest, unique_lab_name

    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up()
        lab.run_pod(pod_manifest("cleanme"))
        node = lab.load().nodes[0]
        before = leftovers(node)
        assert any(x.startswith("link lxc") for x in before), before
        assert any(x.startswith("tc ") for x in before), before
        cni_bin, cni_conf = tmp_path / "bin", tmp_path / "net.d"
        (cni_bin / "cilia-cni.d").mkdir(parents=True)
        (cni_bin / "cilia-cni").write_text("plugin")
        (cni_bin / "bridge").write_text("another plugin")
        cni_conf.mkdir()
        (cni_conf / "05-cilia.conflist").write_text("{}")
        (cni_conf / "10-other.conflist").write_text("{}")

        lab.stop_agent()
        env = {"PATH": os.environ["PATH"], "CNI_BIN_DIR": str(cni_bin),
               "CNI_CONF_DIR": str(cni_conf), "CNI_CONF_FILE": "05-cilia.conflist",
               "BPFFS_ROOT": node.bpffs_root, "STATE_DIR": node.state_dir,
               "SOCKET": node.socket}
        res = in_node(node, f"sh {SCRIPT}", env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "node-cleanup: done" in res.stdout
        assert leftovers(node) == [], res.stdout
        assert sorted(p.name for p in cni_bin.iterdir()) == ["bridge"]
        assert sorted(p.name for p in cni_conf.iterdir()) == ["10-other.conflist"]
        again = in_node(node, f"sh {SCRIPT}", env)
        assert again.returncode == 0 and "removed" not in again.stdout, "idempotent"
    finally:
        lab.down()
