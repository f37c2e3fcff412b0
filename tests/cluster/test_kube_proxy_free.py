"""cilia replacing kube-proxy on a real Kubernetes (`cilia cluster up --kube-proxy none`):
no kube-proxy on any node, so every Service path a user depends on is cilia's own: pods to
ClusterIPs and to the `kubernetes` Service (CoreDNS, which lists through it, answers
names), pods to NodePorts on every node's address, the node's own processes (hostNetwork
pods) to ClusterIPs by socket LB, and a Service without endpoints refusing at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from clusterkit import Kube, client_pod, namespace, server_pod, service, unique_name
from conftest import cluster_of_its_own

from cilia.cluster.cluster import Cluster, node_argv

pytestmark = [pytest.mark.root, pytest.mark.cluster]
CILIA = [sys.executable, "-m", "cilia.cli"]
NODE_PORT = 31080


@pytest.fixture(scope="module")
def kpr():
    for c in cluster_of_its_own("kpr", kube_proxy="none", quiet=True):
        yield c, Kube(c)


@pytest.fixture(scope="module")
def app(kpr):
    """A server on node1 behind a ClusterIP Service and a NodePort one, clients on both
    nodes, a hostNetwork client on node2, and a Service selecting nothing."""
    _, kube = kpr
    ns = unique_name("kpr")
    node_port = service("server-np", ns, {"app": "server"})
    node_port["spec"]["type"] = "NodePort"
    node_port["spec"]["ports"][0]["nodePort"] = NODE_PORT
    node_port["spec"]["ports"] = node_port["spec"]["ports"][:1]
    hostnet = client_pod("hostnet", ns, "node2")
    hostnet["spec"]["hostNetwork"] = True
    kube.apply(namespace(ns),
               server_pod("server", ns, "node1", {"app": "server"}),
               client_pod("near", ns, "node1"), client_pod("far", ns, "node2"), hostnet,
               service("server", ns, {"app": "server"}), node_port,
               service("nothing", ns, {"app": "nothing"}))
    kube.wait_ready(ns, "server", "near", "far", "hostnet")
    yield ns
    kube("delete", "namespace", ns, "--wait=false", check=False)


def _node_run(cluster: Cluster, node: str, argv: list[str]) -> str:
    n = next(x for x in cluster.load().nodes if x.name == node)
    return subprocess.run(node_argv(n.netns, n.mntns, argv), capture_output=True, text=True,
                          check=False).stdout


def test_no_kube_proxy_and_the_agents_say_they_replace_it(kpr):
    cluster, _ = kpr
    state = cluster.load()
    assert not [p.name for p in state.procs if p.name.startswith("kube-proxy")]
    for n in state.nodes:
        for save in ("iptables-save", "iptables-legacy-save"):
            assert "KUBE-SERVICES" not in _node_run(cluster, n.name, [save, "-t", "nat"])
        out = subprocess.run([*CILIA, "--socket", n.agent_sock, "status", "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        st = json.loads(out)
        assert st["kube_proxy_replacement"] is True
        assert st["socket_lb"]["enabled"] and len(st["socket_lb"]["hooks"]) == 4, st


@pytest.mark.parametrize("client", ["near", "far"])
def test_pods_reach_cluster_ips_and_names(kpr, app, client):
    """Backend on the client's node and on the other; by address and by DNS name:
    CoreDNS answers, itself a Service, and listing Services through the `kubernetes`
    Service, which only cilia translates here."""
    _, kube = kpr
    ip = kube.json("-n", app, "get", "service", "server")["spec"]["clusterIP"]
    for host in (ip, f"server.{app}.svc.cluster.local"):
        assert kube.connect(app, client, f"{host}:80"), host
        assert kube.connect(app, client, f"{host}:81", protocol="udp"), host


def test_pods_reach_the_api_server_service(kpr, app):
    _, kube = kpr
    ip = kube.json("get", "service", "kubernetes")["spec"]["clusterIP"]
    assert kube.connect(app, "far", f"{ip}:443")


def test_pods_reach_node_ports_on_every_node(kpr, app):
    cluster, kube = kpr
    for n in cluster.load().nodes:
        assert kube.connect(app, "far", f"{n.ip}:{NODE_PORT}"), n.name


# One HTTP request from the cluster's outside network namespace (where no pod or node
# process runs): agnhost netexec answers /hostname with the serving pod's name.
OUTSIDE_GET = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode())
"""


def test_outside_reaches_node_ports_on_every_node(kpr, app):
    """externalTrafficPolicy: Cluster from outside: at node1 the backend is local; at
    node2 it is node1's, reached SNATed to node2 and answered back through it."""
    cluster, _ = kpr
    state = cluster.load()
    for n in state.nodes:
        out = subprocess.run(["ip", "netns", "exec", state.outside_netns, sys.executable, "-c",
                              OUTSIDE_GET, n.ip, str(NODE_PORT)], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.strip() == "server", (n.name, out.stdout, out.stderr)


def test_host_network_pod_reaches_cluster_ips_by_socket_lb(kpr, app):
    """The node's own processes: no per-packet NAT anywhere, the socket connects to the
    backend from the start."""
    _, kube = kpr
    ip = kube.json("-n", app, "get", "service", "server")["spec"]["clusterIP"]
    assert kube.connect(app, "hostnet", f"{ip}:80")
    assert kube.connect(app, "hostnet", f"{ip}:81", protocol="udp")


def test_service_without_endpoints_refuses_at_once(kpr, app):
    """As kube-proxy's REJECT: the client is refused, it does not wait out a timeout."""
    _, kube = kpr
    ip = kube.json("-n", app, "get", "service", "nothing")["spec"]["clusterIP"]
    res = kube("-n", app, "exec", "near", "--", "/agnhost", "connect", f"{ip}:80",
               "--timeout=5s", check=False)
    assert res.returncode != 0
    # agnhost connect names the failure: REFUSED, not TIMEOUT
    assert "REFUSED" in res.stderr + res.stdout, (res.stdout, res.stderr)
