"""The plugin's commands against a real agent: DEL, CHECK, GC, STATUS, and bad input."""

import json
import secrets
import subprocess
import sys

import pytest
from labkit import cni, leases, node_links, node_routes, sandbox

from cilia.agent.endpoint import host_ifname
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey
from cilia.datapath.maps import BpfMap
from cilia.lab.lab import in_netns


@pytest.fixture
def node(lab):
    return lab.load().nodes[0]


def _cid() -> str:
    return secrets.token_hex(32)


def endpoint_entry(node, ip):
    with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
        return m.lookup(EndpointKey.for_ip(ip))


def pod_addrs(netns_path: str) -> list[str]:
    out = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "-j", "-4", "addr"],
                         capture_output=True, text=True, check=True).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]


def test_add_result_is_spec_shaped(node):
    cid = _cid()
    with sandbox(f"{node.netns}-r{cid[:6]}") as ns:
        rc, res = cni(node, "ADD", cid, ns)
        try:
            assert rc == 0, res
            assert res["cniVersion"] == "1.1.0"
            host, pod = res["interfaces"]
            assert host["name"] == host_ifname(cid, "eth0") and "sandbox" not in host
            assert pod["name"] == "eth0" and pod["sandbox"] == ns and pod["mac"]
            (ip,) = res["ips"]
            assert ip["address"].endswith("/32") and ip["interface"] == 1
            assert ip["gateway"] == "169.254.1.1"
            assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
        finally:
            cni(node, "DEL", cid, ns)


def test_old_cni_version_result_has_ip_version(node):
    cid = _cid()
    conf = {"cniVersion": "0.4.0", "name": "cilia", "type": "cilia-cni", "socket": node.socket}
    with sandbox(f"{node.netns}-o{cid[:6]}") as ns:
        rc, res = cni(node, "ADD", cid, ns, config=conf)
        try:
            assert rc == 0, res
            assert res["cniVersion"] == "0.4.0" and res["ips"][0]["version"] == "4"
        finally:
            cni(node, "DEL", cid, ns, config=conf)


def test_del_removes_everything_and_is_idempotent(node):
    cid = _cid()
    with sandbox(f"{node.netns}-d{cid[:6]}") as ns:
        rc, res = cni(node, "ADD", cid, ns)
        assert rc == 0, res
        ip = res["ips"][0]["address"].split("/")[0]
        veth = host_ifname(cid, "eth0")
        assert veth in node_links(node)
        assert ip in leases(node) and endpoint_entry(node, ip) is not None
        assert ip in pod_addrs(ns)

        rc, res = cni(node, "DEL", cid, ns)
        assert rc == 0, res
        assert veth not in node_links(node)
        assert not [r for r in node_routes(node) if r["dst"] == ip]
        assert ip not in leases(node)
        assert endpoint_entry(node, ip) is None
        assert ip not in pod_addrs(ns)  # the pod's end of the veth is gone with it

        rc, res = cni(node, "DEL", cid, ns)
        assert rc == 0, res
        # DEL after the sandbox is gone, and without CNI_NETNS (both allowed by the spec)
    rc, res = cni(node, "DEL", cid, "", env={"CNI_NETNS": None})
    assert rc == 0, res


def test_check_reports_what_was_removed_behind_its_back(node):
    cid = _cid()
    with sandbox(f"{node.netns}-c{cid[:6]}") as ns:
        rc, res = cni(node, "ADD", cid, ns)
        assert rc == 0, res
        ip = res["ips"][0]["address"].split("/")[0]
        try:
            rc, res = cni(node, "CHECK", cid, ns)
            assert rc == 0, res

            # the pod's default route
            subprocess.run(["nsenter", f"--net={ns}", "ip", "route", "del", "default"],
                           check=True)
            rc, res = cni(node, "CHECK", cid, ns)
            assert rc == 1 and res["code"] == 100, res
            assert "default route" in res["msg"]

            # the node's route to the pod
            subprocess.run(in_netns(node.netns, ["ip", "route", "del", f"{ip}/32"]), check=True)
            rc, res = cni(node, "CHECK", cid, ns)
            assert rc == 1 and f"node route {ip}/32" in res["details"], res

            # the veth itself
            subprocess.run(in_netns(node.netns, ["ip", "link", "del", host_ifname(cid, "eth0")]),
                           check=True)
            rc, res = cni(node, "CHECK", cid, ns)
            assert rc == 1 and "is gone" in res["details"], res
        finally:
            assert cni(node, "DEL", cid, ns)[0] == 0
        rc, res = cni(node, "CHECK", cid, ns)
        assert rc == 1 and res["code"] == 3, res  # unknown container after DEL


def test_gc_removes_attachments_not_in_the_valid_list(node):
    keep, drop = _cid(), _cid()
    with sandbox(f"{node.netns}-k{keep[:6]}") as ns1, sandbox(f"{node.netns}-g{drop[:6]}") as ns2:
        assert cni(node, "ADD", keep, ns1)[0] == 0
        rc, res = cni(node, "ADD", drop, ns2)
        assert rc == 0
        dropped_ip = res["ips"][0]["address"].split("/")[0]
        try:
            conf = {"cniVersion": "1.1.0", "name": "cilia", "type": "cilia-cni",
                    "socket": node.socket,
                    "cni.dev/valid-attachments": [{"containerID": keep, "ifname": "eth0"}]}
            rc, res = cni(node, "GC", "", "", config=conf,
                          env={"CNI_CONTAINERID": None, "CNI_NETNS": None, "CNI_IFNAME": None})
            assert rc == 0, res
            assert host_ifname(drop, "eth0") not in node_links(node)
            assert host_ifname(keep, "eth0") in node_links(node)
            assert dropped_ip not in leases(node)
            assert endpoint_entry(node, dropped_ip) is None
        finally:
            cni(node, "DEL", keep, ns1)
            cni(node, "DEL", drop, ns2)


def test_status_and_add_when_agent_is_down(lab, node):
    rc, res = cni(node, "STATUS", "", "")
    assert rc == 0, res
    lab.stop_agent()
    try:
        rc, res = cni(node, "STATUS", "", "")
        assert rc == 1 and res["code"] == 50, res
        assert "is the cilia agent running?" in res["msg"]
        cid = _cid()
        with sandbox(f"{node.netns}-s{cid[:6]}") as ns:
            rc, res = cni(node, "ADD", cid, ns)
            assert rc == 1 and res["code"] == 11, res
            assert f"agent not reachable at {node.socket}" in res["msg"]
            assert host_ifname(cid, "eth0") not in node_links(node)
    finally:
        lab.start_agent()


BAD = [
    ("unparseable config", {"stdin": b"{not json"}, 6),
    ("config not an object", {"stdin": b"[1, 2]"}, 6),
    ("unsupported cniVersion", {"config": {"cniVersion": "9.9.9", "name": "cilia"}}, 1),
    ("missing cniVersion", {"config": {"name": "cilia"}}, 1),
    ("missing CNI_NETNS", {"env": {"CNI_NETNS": None}}, 4),
    ("missing CNI_CONTAINERID", {"env": {"CNI_CONTAINERID": ""}}, 4),
    ("missing network name", {"config": {"cniVersion": "1.1.0"}}, 7),
    ("netns that does not exist", {"netns": "/run/netns/cilia-no-such-netns"}, 3),
    ("unknown command", {"env": {"CNI_COMMAND": "FROB"}}, 4),
]


@pytest.mark.parametrize("what,kw,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_spec_error_and_leaves_nothing(node, what, kw, code):
    cid = _cid()
    links_before, leases_before = node_links(node), dict(leases(node))
    with sandbox(f"{node.netns}-b{cid[:6]}") as ns:
        config = kw.get("config")
        if config is not None:
            config = {**config, "socket": node.socket}
        rc, res = cni(node, "ADD", cid, kw.get("netns", ns), config=config,
                      stdin=kw.get("stdin"), env=kw.get("env"))
        assert rc == 1, res
        assert res["code"] == code, res
        assert res["msg"].startswith("cilia-cni: ") and "cniVersion" in res
        assert pod_addrs(ns) == ["127.0.0.1"] or pod_addrs(ns) == []
    assert node_links(node) == links_before
    assert leases(node) == leases_before


def test_failed_add_midway_leaves_nothing(node):
    """The interface name is taken in the sandbox: the veth fails after the IP was leased."""
    cid = _cid()
    links_before, leases_before = node_links(node), dict(leases(node))
    with sandbox(f"{node.netns}-f{cid[:6]}") as ns:
        subprocess.run(["nsenter", f"--net={ns}", "ip", "link", "add", "eth0", "type", "veth",
                        "peer", "name", "taken0"],
                       check=True)
        rc, res = cni(node, "ADD", cid, ns)
        assert rc == 1, res
        assert res["code"] == 5 and "File exists" in res["msg"] + res.get("details", ""), res
    assert node_links(node) == links_before
    assert leases(node) == leases_before


def test_agent_socket_is_root_only(node):
    import os
    import stat

    st = os.stat(node.socket)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(node.socket)).st_mode) & 0o077 == 0
    # an unprivileged process cannot even reach it, and the plugin says why
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1]); print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code, node.socket],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "PermissionError", res.stdout + res.stderr
