"""The plugin's own logic, without an agent: parsing, versions, error objects."""

import json
import subprocess
import sys

import pytest

from cilia.cni.main import run
from cilia.cni.version import shape_result

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}


def conf(**kw):
    return json.dumps({"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
                       "socket": "/run/cilia-test-no-such.sock", **kw}).encode()


def test_version():
    rc, out = run({"CNI_COMMAND": "VERSION"}, conf())
    assert rc == 0
    assert out == {"cniVersion": "1.1.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    rc, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("env,stdin,code,text", [
    (ENV, b"{", 6, "cannot parse the network config"),
    (ENV, conf(cniVersion="2.0.0"), 1, "unsupported cniVersion '2.0.0'"),
    ({**ENV, "CNI_NETNS": ""}, conf(), 4, "CNI_NETNS is not set"),
    ({**ENV, "CNI_IFNAME": ""}, conf(), 4, "CNI_IFNAME is not set"),
    ({**ENV, "CNI_ARGS": "broken"}, conf(), 4, "not KEY=VALUE"),
    ({**ENV, "CNI_COMMAND": "NOPE"}, conf(), 4, "unknown CNI_COMMAND"),
    (ENV, conf(socket="relative.sock"), 7, "must be an absolute path"),
    (ENV, conf(), 11, "agent not reachable at /run/cilia-test-no-such.sock"),
    ({**ENV, "CNI_COMMAND": "STATUS"}, conf(), 50, "is the cilia agent running?"),
    ({**ENV, "CNI_COMMAND": "CHECK"}, conf(cniVersion="0.3.1"), 1, "CHECK needs cniVersion"),
    ({**ENV, "CNI_COMMAND": "GC"}, conf(cniVersion="1.0.0"), 1, "GC needs cniVersion 1.1.0"),
    ({**ENV, "CNI_COMMAND": "GC"}, conf(**{"cni.dev/valid-attachments": "x"}), 7,
     "valid-attachments"),
])
def test_errors_are_spec_error_objects(env, stdin, code, text):
    rc, out = run(env, stdin)
    assert rc == 1
    assert out["code"] == code, out
    assert text in out["msg"] + out.get("details", "")
    assert out["msg"].startswith("cilia-cni: ")
    assert "cniVersion" in out


def test_results_for_old_versions_carry_ip_version():
    r = {"interfaces": [], "ips": [{"address": "10.0.0.2/32", "interface": 0}], "routes": []}
    assert shape_result(r, "0.3.1")["ips"][0]["version"] == "4"
    assert "version" not in shape_result(r, "1.0.0")["ips"][0]


def test_process_prints_error_and_exits_1():
    res = subprocess.run([sys.executable, "-m", "cilia.cni.main"], input=b"{",
                         capture_output=True, env={"CNI_COMMAND": "ADD"})
    assert res.returncode == 1
    assert json.loads(res.stdout)["code"] == 6


def test_plugin_startup_stays_small():
    """The runtime starts the plugin for every pod: VERSION must not import gRPC."""
    code = ("import sys, cilia.cni.main as m; "
            "m.run({'CNI_COMMAND': 'VERSION'}, b''); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('grpc', 'google', "
            "'pyroute2', 'yaml', 'cffi')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
