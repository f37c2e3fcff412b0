"""The standalone plugin (PyInstaller, one-folder) that the chart installs on nodes without
Python: built here from packaging/cni, then run as a runtime runs it, against a real agent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from labkit import node_links, sandbox

from cilia.agent.endpoint import host_ifname

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "cni" / "build.sh"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        pytest.skip("pyinstaller is not installed: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("cni-build")
    res = subprocess.run(["bash", str(BUILD), str(out)], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    exe = out / "dist" / "cilia-cni" / "cilia-cni"
    assert exe.is_file() and (exe.parent / "cilia-cni.d").is_dir()
    return exe


def run(exe: Path, command: str, conf: dict | None, **env: str) -> tuple[int, dict]:
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
                "CNI_PATH": str(exe.parent), **env}
    stdin = json.dumps(conf).encode() if conf is not None else b""
    res = subprocess.run([str(exe)], input=stdin, capture_output=True, env=full_env,
                         timeout=120)
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else {})


def test_version(plugin):
    rc, out = run(plugin, "VERSION", None)
    assert rc == 0, out
    assert out == {"cniVersion": "1.1.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_runs_without_python_and_unpacks_nothing(plugin, tmp_path):
    """Installed as the chart installs it (the executable and cilia-cni.d/ in a CNI bin
    directory), with every Python of this machine hidden, and a TMPDIR that stays empty."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (util-linux) to hide Python in a mount namespace")
    bindir = tmp_path / "opt-cni-bin"
    shutil.copytree(plugin.parent, bindir)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    hidden = {p for p in (Path(sys.base_prefix) / "lib" / f"python3.{sys.version_info.minor}",
                          Path(sys.prefix), Path("/usr/lib/python3"),
                          Path("/usr/lib/python3.11"), Path("/usr/local/lib/python3.11"))
              if p.is_dir() and not str(bindir).startswith(str(p))}
    script = "".join(f"mount -t tmpfs none {p} && " for p in sorted(hidden))
    # The control: the machine's own Python no longer works in there.
    script += f'! {sys.executable} -c "import json" 2>/dev/null && '
    script += f'! /usr/bin/python3 -c "import json" 2>/dev/null && exec "{bindir}/cilia-cni"'
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION",
                                  "TMPDIR": str(tmp)}, timeout=60,
    )
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["cniVersion"] == "1.1.0"
    assert list(tmp.iterdir()) == []


def test_agent_not_running_is_a_cni_error(plugin, tmp_path):
    conf = {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
            "socket": str(tmp_path / "none.sock")}
    rc, out = run(plugin, "ADD", conf, CNI_CONTAINERID="c1", CNI_NETNS="/run/netns/x",
                  CNI_IFNAME="eth0")
    assert rc == 1 and out["code"] == 11
    assert "is the cilia agent running?" in out["msg"]
    rc, out = run(plugin, "STATUS", conf)
    assert rc == 1 and out["code"] == 50


def test_add_check_status_del_against_an_agent(plugin, lab):
    node = lab.load().nodes[0]
    conf = {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni", "socket": node.socket}
    cid = secrets.token_hex(32)
    with sandbox(f"{node.netns}-b{cid[:6]}") as ns:
        env = {"CNI_CONTAINERID": cid, "CNI_NETNS": ns, "CNI_IFNAME": "eth0",
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bin"}
        rc, res = run(plugin, "ADD", conf, **env)
        try:
            assert rc == 0, res
            assert res["cniVersion"] == "1.1.0"
            (ip,) = res["ips"]
            addr = ip["address"].split("/")[0]
            out = subprocess.run(["nsenter", f"--net={ns}", "ip", "-j", "-4", "addr", "show",
                                  "eth0"], capture_output=True, text=True, check=True).stdout
            assert addr in [a["local"] for link in json.loads(out)
                            for a in link["addr_info"]]
            assert host_ifname(cid, "eth0") in node_links(node)
            assert run(plugin, "CHECK", conf, **env) == (0, {})
            assert run(plugin, "STATUS", conf) == (0, {})
        finally:
            rc, out = run(plugin, "DEL", conf, **env)
        assert rc == 0, out
        assert host_ifname(cid, "eth0") not in node_links(node)
        assert run(plugin, "DEL", conf, **env)[0] == 0, "DEL is idempotent"
