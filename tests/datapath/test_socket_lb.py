"""Socket LB (bpf/bpf_sock.c, agent/socket_lb.py): the node's own processes (its host
network namespace: node daemons, hostNetwork pods) reach Services with no kube-proxy.
A socket that connects or sends to a ClusterIP is given a backend at the socket by
cgroup connect4/sendmsg4 programs, and is shown the ClusterIP again by recvmsg4 and
getpeername4. Each lab agent attaches its own copy to the machine's cgroup v2, acting
only in its node's network namespace: not in the test's own (root) namespace, not in
pods (translated per packet in cil_from_pod), not in any other.

Two nodes, local datastore: backends `near` (node1) and `far` (node2) in namespace slb,
each behind its own Service; `empty` selects nothing; a client pod on node1.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labkit import metric, probe, sandbox, servers, unique_lab_name

from cilia.agent.socket_lb import LINK_DIR, SocketLBError, cgroup2_mounts, check_cgroup2
from cilia.client import AgentClient
from cilia.lab.lab import NETNS_DIR, Lab, in_netns

NEAR_IP = "10.96.110.10"
FAR_IP = "10.96.110.11"
EMPTY_IP = "10.96.110.13"
HOOKS = {"cgroup_inet4_connect": "cil_sock_connect4", "cgroup_udp4_sendmsg": "cil_sock_sendmsg4",
         "cgroup_udp4_recvmsg": "cil_sock_recvmsg4",
         "cgroup_inet4_getpeername": "cil_sock_getpeername4"}

# What a node's process sees of a Service (argv: ClusterIP, TCP port, UDP port): the
# answers and who they come from, over a connected UDP socket, an unconnected one
# (sendto/recvfrom), and TCP; the peer getpeername names for each connected socket.
CLIENT = r"""
import json, socket, sys
host, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
addr = lambda a: "%s:%d" % a
out = {}
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(3)
c.connect((host, udp_port))
out["udp_connected_peer"] = addr(c.getpeername())
c.send(b"hello")
data, src = c.recvfrom(100)
out["udp_connected"] = [data.decode(), addr(src)]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
for i in range(2):  # the same socket twice: the same backend, the same answer
    u.sendto(b"hello", (host, udp_port))
    data, src = u.recvfrom(100)
    out["udp_sendto_%d" % i] = [data.decode(), addr(src)]
t = socket.create_connection((host, tcp_port), timeout=3)
out["tcp_peer"] = addr(t.getpeername())
t.sendall(b"hello")
out["tcp"] = t.recv(100).decode()
print(json.dumps(out))
"""

# How a call to a frontend with no backend ends (argv: ClusterIP): errno name and seconds.
NO_BACKEND = r"""
import errno, json, socket, sys, time
host = sys.argv[1]
out = {}
def attempt(name, fn):
    start = time.monotonic()
    try:
        fn()
        out[name] = ["ok", time.monotonic() - start]
    except OSError as err:
        out[name] = [errno.errorcode.get(err.errno, str(err.errno)), time.monotonic() - start]
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.settimeout(5)
attempt("tcp_connect", lambda: tcp.connect((host, 80)))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_connect", lambda: udp.connect((host, 53)))
udp2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_sendto", lambda: udp2.sendto(b"hello", (host, 53)))
print(json.dumps(out))
"""


def pod(name: str, namespace: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "none"}]}}


def service(name: str, selector: dict, cluster_ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "slb"},
            "spec": {"selector": selector, "clusterIP": cluster_ip, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}}


def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def wait_backends(lab: Lab, frontend: str, backends: set[str]) -> None:
    def current(node) -> set[str]:
        for s in AgentClient(node.socket).services():
            if f"{s.ip}:{s.port}/{s.protocol}" == frontend:
                return {f"{b.ip}:{b.port}" for b in s.backends if not b.terminating}
        return {"?"}

    for node in lab.load().nodes:
        wait_for(lambda n=node: current(n) == backends, f"{frontend} on {node.name}")


def node(lab: Lab, name: str):
    return lab.node(lab.load(), name)


def run_json(lab: Lab, target: str, code: str, *args: str) -> dict:
    res = subprocess.run(lab.exec_argv(target, [sys.executable, "-c", code, *args]),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def cgroup() -> str:
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.skip("no cgroup v2 mounted on this machine: the lab runs without socket LB")
    return mounts[0]


def attached(bpftool: str) -> list[dict]:
    """What `bpftool cgroup show` lists on the cgroup the lab attaches to."""
    out = subprocess.run([bpftool, "-j", "cgroup", "show", cgroup()], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out or "[]")


def map_id(bpftool: str, path: str) -> int:
    out = subprocess.run([bpftool, "-j", "map", "show", "pinned", path], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["id"]


def agents_attachments(bpftool: str, n) -> list[dict]:
    """The cgroup's attachments whose program is this node's agent's: its programs use
    the node's own pinned maps (every agent's programs have the same names)."""
    services = map_id(bpftool, f"{n.bpffs_root}/cilia_lb4_services")
    progs = json.loads(subprocess.run([bpftool, "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    ours = {p["id"] for p in progs if services in p.get("map_ids", [])}
    return [a for a in attached(bpftool) if a["id"] in ours]


def hooks(n) -> dict[str, tuple[int, int]]:
    """hook -> (link id, program id), as the agent's status reports them."""
    st = AgentClient(n.socket).status().socket_lb
    return {h.hook: (h.link_id, h.prog_id) for h in st.hooks}


@pytest.fixture(scope="module")
def slb():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2)
        client = lab.run_pod(pod("client", "slc", {"app": "client"}), "node1")
        near = lab.run_pod(pod("near", "slb", {"app": "backend", "role": "near"}), "node1")
        far = lab.run_pod(pod("far", "slb", {"app": "backend", "role": "far"}), "node2")
        for obj in (service("near", {"role": "near"}, NEAR_IP),
                    service("far", {"role": "far"}, FAR_IP),
                    service("empty", {"app": "nothing"}, EMPTY_IP)):
            lab.datastore.put(obj)
        wait_backends(lab, f"{NEAR_IP}:80/TCP", {f"{near.ip}:8080"})
        wait_backends(lab, f"{FAR_IP}:53/UDP", {f"{far.ip}:5353"})
        wait_backends(lab, f"{EMPTY_IP}:80/TCP", set())
        with servers(lab, "slb/near", [8080, 5353], "near"), \
             servers(lab, "slb/far", [8080, 5353], "far"):
            yield lab, client, near, far
    finally:
        lab.down()


@pytest.mark.parametrize("ip,name", [(NEAR_IP, "near"), (FAR_IP, "far")],
                         ids=["backend-on-the-same-node", "backend-on-another-node"])
def test_node_process_reaches_cluster_ip(slb, ip, name):
    """TCP, connected UDP and sendto/recvfrom UDP from node1's own network namespace;
    every answer, and every peer getpeername names, is the ClusterIP's."""
    lab, *_ = slb
    node1 = node(lab, "node1")
    before = metric(node1, "lb_sock_translated", "egress")
    out = run_json(lab, "node:node1", CLIENT, ip, "80", "53")
    assert out["tcp"] == f"{name}:hello"
    assert out["tcp_peer"] == f"{ip}:80"
    assert out["udp_connected"] == [f"{name}:hello", f"{ip}:53"]
    assert out["udp_connected_peer"] == f"{ip}:53"
    assert out["udp_sendto_0"] == [f"{name}:hello", f"{ip}:53"]  # recvmsg4
    assert out["udp_sendto_1"] == [f"{name}:hello", f"{ip}:53"]
    # connect (UDP), two sendto, connect (TCP)
    assert metric(node1, "lb_sock_translated", "egress") - before >= 4


@pytest.mark.parametrize("proto,port_", [("tcp", 80), ("udp", 53)])
def test_node_probe_through_cluster_ip(slb, proto, port_):
    """The lab's own probe from the node, as `cilia lab exec node:node1` runs it."""
    lab, *_ = slb
    for _ in range(3):
        assert probe(lab, "node:node1", NEAR_IP, port_, proto) == "near:hello"
        assert probe(lab, "node:node1", FAR_IP, port_, proto) == "far:hello"


def test_frontend_without_backend_fails_at_once(slb):
    lab, *_ = slb
    node1 = node(lab, "node1")
    before = metric(node1, "drop_no_service_backend", "egress")
    out = run_json(lab, "node:node1", NO_BACKEND, EMPTY_IP)
    for call in ("tcp_connect", "udp_connect", "udp_sendto"):
        err, seconds = out[call]
        assert err == "EPERM", f"{call}: {out[call]}"
        assert seconds < 0.5, f"{call} took {seconds:.2f}s"
    assert metric(node1, "drop_no_service_backend", "egress") - before >= 3


def test_pods_are_translated_per_packet_not_at_the_socket(slb):
    """A pod's connection is the datapath's (cil_from_pod: its egress policy judges the
    backend); the socket programs leave pods' sockets alone."""
    lab, *_ = slb
    node1 = node(lab, "node1")
    before = (metric(node1, "lb_sock_translated"), metric(node1, "lb_translated", "egress"))
    assert probe(lab, "slc/client", NEAR_IP, 80) == "near:hello"
    assert probe(lab, "slc/client", NEAR_IP, 53, "udp") == "near:hello"
    assert metric(node1, "lb_sock_translated") == before[0]
    assert metric(node1, "lb_translated", "egress") - before[1] >= 2


def _udp_peer_in_kernel(sock: socket.socket) -> str:
    """The connected UDP socket's remote address as the kernel keeps it (/proc/net/udp,
    of the caller's network namespace): not what getpeername4 would show."""
    port = sock.getsockname()[1]
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port:
            rem_ip, rem_port = fields[2].split(":")
            return f"{socket.inet_ntoa(struct.pack('=I', int(rem_ip, 16)))}:{int(rem_port, 16)}"
    raise AssertionError(f"no UDP socket on port {port} in /proc/net/udp")


def test_root_network_namespace_is_not_translated(slb):
    """The test's own namespace (the machine's): a connected UDP socket (connect sends
    nothing) keeps the ClusterIP as its kernel peer, and no agent counts anything."""
    lab, *_ = slb
    nodes = lab.load().nodes
    before = [metric(n, "lb_sock_translated") for n in nodes]
    mine = os.stat("/proc/self/ns/net").st_ino
    assert all(os.stat(NETNS_DIR / n.netns).st_ino != mine for n in nodes)
    for ip in (NEAR_IP, FAR_IP):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 53))
            assert _udp_peer_in_kernel(s) == f"{ip}:53"
    # a frontend with no backend is nothing special here either
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((EMPTY_IP, 53))
    assert [metric(n, "lb_sock_translated") for n in nodes] == before


def test_other_network_namespace_is_not_translated(slb):
    """A namespace of no agent (the test's own): a connection to the ClusterIP's address
    reaches whatever answers there, not a backend."""
    lab, *_ = slb
    name = f"{lab.name}-other"
    with sandbox(name):
        def run(*argv: str) -> None:
            subprocess.run(in_netns(name, list(argv)), check=True, capture_output=True)

        run("ip", "link", "set", "lo", "up")
        run("ip", "addr", "add", f"{NEAR_IP}/32", "dev", "lo")
        argv = in_netns(name, [sys.executable, "-m", "cilia.lab.probe", "serve", "--name",
                               "local", "--tcp", "80", "--udp", "53"])
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            for proto, port_ in (("tcp", 80), ("udp", 53)):
                res = subprocess.run(in_netns(name, [
                    sys.executable, "-m", "cilia.lab.probe", "connect", NEAR_IP, str(port_),
                    "--proto", proto]), capture_output=True, text=True)
                assert res.stdout.strip() == "local:hello", res.stderr
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_status_and_bpftool_show_the_attachments(slb, bpftool):
    lab, *_ = slb
    cg = cgroup()
    listed = {a["id"]: a for a in attached(bpftool)}
    for n in lab.load().nodes:
        st = AgentClient(n.socket).status().socket_lb
        assert st.enabled and st.cgroup == cg and st.netns_cookie
        assert {h.hook for h in st.hooks} == {
            "connect4", "sendmsg4", "recvmsg4", "getpeername4"}
        for h in st.hooks:
            assert h.prog_id in listed, f"{n.name} {h.hook}: prog {h.prog_id} not in {cg}"
            assert listed[h.prog_id]["name"] == h.program
            assert HOOKS[listed[h.prog_id]["attach_type"]] == h.program
            assert Path(n.bpffs_root, LINK_DIR, h.program).exists()
        mine = agents_attachments(bpftool, n)
        assert sorted(a["name"] for a in mine) == sorted(HOOKS.values())
    table = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name, "status"],
                           capture_output=True, text=True, check=True).stdout
    assert f"Socket LB:     on, cgroup {cg}" in table


def test_agent_restart_keeps_one_attachment_per_agent(slb, bpftool):
    """A restarted agent puts its new programs into its pinned links (the same links, no
    second attachment), and Services keep working through the restart."""
    lab, *_ = slb
    node1, node2 = node(lab, "node1"), node(lab, "node2")
    before1, before2 = hooks(node1), hooks(node2)
    for _ in range(2):
        lab.restart_agent("node1")
        after = hooks(node1)
        assert {h: link for h, (link, _) in after.items()} == {
            h: link for h, (link, _) in before1.items()}
        assert all(after[h][1] != before1[h][1] for h in after)  # the new programs
        mine = agents_attachments(bpftool, node1)
        assert sorted(a["name"] for a in mine) == sorted(HOOKS.values())
        assert {a["id"] for a in mine} == {prog for _, prog in after.values()}
        listed = {a["id"] for a in attached(bpftool)}
        assert not listed & {prog for _, prog in before1.values()}  # the old ones: gone
        assert probe(lab, "node:node1", FAR_IP, 80) == "far:hello"
        assert probe(lab, "node:node1", NEAR_IP, 53, "udp") == "near:hello"
        before1 = after
    assert hooks(node2) == before2  # the other agent's untouched


def _run_agent_cleanup(n) -> None:
    subprocess.run(in_netns(n.netns, [
        sys.executable, "-m", "cilia.agent.main", "--cleanup", "--node-name", n.name,
        "--pod-cidr", n.pod_cidr, "--devices", "eth0", "--bpffs-root", n.bpffs_root,
        "--state-dir", n.state_dir]), check=True, capture_output=True, timeout=60)


def test_no_socket_lb_cleanup_and_teardown_leave_nothing_attached(bpftool):
    """--no-socket-lb detaches an agent's links, --cleanup detaches and unpins them, and
    a lab torn down leaves none of its agents' programs on the cgroup."""
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=3)
        nodes = lab.load().nodes
        progs = {n.name: {p for _, p in hooks(n).values()} for n in nodes}
        assert all(len(p) == 4 for p in progs.values())
        assert all(p <= {a["id"] for a in attached(bpftool)} for p in progs.values())

        # node1: restarted with --no-socket-lb
        state = lab.load()
        state.agent_args = ["--no-socket-lb"]
        lab.save(state)
        lab.restart_agent("node1")
        n1 = node(lab, "node1")
        assert not AgentClient(n1.socket).status().socket_lb.enabled
        assert not Path(n1.bpffs_root, LINK_DIR).exists()
        assert not progs["node1"] & {a["id"] for a in attached(bpftool)}

        # node2: its agent stopped, then `cilia-agent --cleanup`
        n2 = lab.stop_agent("node2")
        assert Path(n2.bpffs_root, LINK_DIR, "cil_sock_connect4").exists()
        assert progs["node2"] <= {a["id"] for a in attached(bpftool)}  # outlives the agent
        _run_agent_cleanup(n2)
        assert not Path(n2.bpffs_root).exists()
        assert not progs["node2"] & {a["id"] for a in attached(bpftool)}

        # node3: the lab's down
        n3 = node(lab, "node3")
        assert progs["node3"] <= {a["id"] for a in attached(bpftool)}
    finally:
        lab.down()
    listed = {a["id"] for a in attached(bpftool)}
    assert not set().union(*progs.values()) & listed
    assert not Path(n3.bpffs_root).exists()


def test_not_cgroup2_is_a_clear_error(tmp_path):
    with pytest.raises(SocketLBError) as err:
        check_cgroup2(str(tmp_path))
    assert "--no-socket-lb" in str(err.value) and "--socket-lb-cgroup" in str(err.value)
    with pytest.raises(SocketLBError, match="does not exist"):
        check_cgroup2(str(tmp_path / "missing"))
    check_cgroup2(cgroup())
