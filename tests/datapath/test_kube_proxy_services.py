"""Services done by kube-proxy, not by cilia: netfilter in the node's stack translates a
pod's connection to a ClusterIP into one to a backend pod (DNAT), and only netfilter can
translate the backend's replies back. Those replies must go back through the stack,
never by bpf_redirect_peer straight into the client (which would see an answer from the
backend's address, not the ClusterIP's, and never open the connection), whether the
backend is on the client's node (the reply leaves cil_from_pod) or on another node (it
arrives at cil_from_netdev). NetworkPolicy still holds: the client's namespace denies
all ingress (the replies pass as replies), the backends allow only the client.

Two nodes: client and backend `near` on node1, backend `far` on node2. kube-proxy's
rules live in node1's nat PREROUTING, as kube-proxy's iptables mode puts them:
  10.96.0.10:80/TCP and :53/UDP -> near:8080 and near:5353
  10.96.0.11:80/TCP and :53/UDP -> far:8080 and far:5353
"""

import subprocess

import pytest
from labkit import metric, pod_manifest, probe, servers, unique_lab_name
from reachability import labels, netpol, port

from cilia.client import AgentClient
from cilia.lab.lab import Lab, in_netns

NEAR_IP = "10.96.0.10"  # a ClusterIP whose backend is on the client's node
FAR_IP = "10.96.0.11"  # a ClusterIP whose backend is on the other node
COMMENT = "cilia-test: kube-proxy stand-in"


def _iptables(node, action: str, rule: list[str]) -> None:
    subprocess.run(in_netns(node.netns, ["iptables", "-w", "-t", "nat", action, "PREROUTING",
                                         *rule]), check=True, capture_output=True)


def _dnat_rules(service_ip: str, backend_ip: str) -> list[list[str]]:
    return [
        ["-d", f"{service_ip}/32", "-p", "tcp", "--dport", "80", "-m", "comment",
         "--comment", COMMENT, "-j", "DNAT", "--to-destination", f"{backend_ip}:8080"],
        ["-d", f"{service_ip}/32", "-p", "udp", "--dport", "53", "-m", "comment",
         "--comment", COMMENT, "-j", "DNAT", "--to-destination", f"{backend_ip}:5353"],
    ]


def _sync_all(lab: Lab) -> None:
    for node in lab.load().nodes:
        AgentClient(node.socket).wait_policy_synced()


@pytest.fixture(scope="module", params=["native", "vxlan"])
def svc(request):
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2, routing=request.param)
        node1 = lab.node(lab.load(), "node1")
        client = lab.run_pod(pod_manifest("client", "kpc", {"app": "client"}), "node1")
        near = lab.run_pod(pod_manifest("near", "kpb", {"app": "backend"}), "node1")
        far = lab.run_pod(pod_manifest("far", "kpb", {"app": "backend"}), "node2")
        rules = _dnat_rules(NEAR_IP, near.ip) + _dnat_rules(FAR_IP, far.ip)
        added = []
        try:
            for rule in rules:
                _iptables(node1, "-A", rule)
                added.append(rule)
            for p in (
                # the client's namespace accepts nothing: what reaches the client must be
                # the reply of a connection it opened
                netpol("deny-in", "kpc", types=["Ingress"]),
                # the backends accept only the client, on their target ports
                netpol("backend-from-client", "kpb", labels(app="backend"), ingress=[{
                    "from": [{"namespaceSelector": labels(**{
                                  "kubernetes.io/metadata.name": "kpc"}),
                              "podSelector": labels(app="client")}],
                    "ports": [port(8080, "TCP"), port(5353, "UDP")]}]),
            ):
                lab.datastore.put(p)
            _sync_all(lab)
            with servers(lab, "kpb/near", [8080, 5353], "near"), \
                 servers(lab, "kpb/far", [8080, 5353], "far"), \
                 servers(lab, "kpc/client", [8080], "client"):
                yield lab, node1, client, near, far
        finally:
            for rule in added:
                _iptables(node1, "-D", rule)
    finally:
        lab.down()


def test_policies_are_in_force(svc):
    lab, _, client, near, far = svc
    assert probe(lab, "kpb/near", client.ip, 8080, timeout=1) is None  # client: deny all
    assert probe(lab, "kpb/far", client.ip, 8080, "udp", timeout=1) is None


@pytest.mark.parametrize("proto,port_", [("tcp", 80), ("udp", 53)])
def test_cluster_ip_backend_on_the_same_node(svc, proto, port_):
    """The backend's replies leave cil_from_pod for the stack (to_stack_nat, egress),
    which turns them back into the ClusterIP's; cil_to_pod lets them into the client."""
    lab, node1, *_ = svc
    before = metric(node1, "to_stack_nat", "egress")
    for _ in range(3):
        assert probe(lab, "kpc/client", NEAR_IP, port_, proto) == "near:hello"
    assert metric(node1, "to_stack_nat", "egress") - before >= 3


@pytest.mark.parametrize("proto,port_", [("tcp", 80), ("udp", 53)])
def test_cluster_ip_backend_on_another_node(svc, proto, port_):
    """The replies arrive at node1's uplink (or VXLAN device); cil_from_netdev hands them
    to the stack (to_stack_nat, ingress) before any policy: the client denies all
    ingress, and they still arrive, as the replies they are."""
    lab, node1, *_ = svc
    before = metric(node1, "to_stack_nat", "ingress")
    for _ in range(3):
        assert probe(lab, "kpc/client", FAR_IP, port_, proto) == "far:hello"
    assert metric(node1, "to_stack_nat", "ingress") - before >= 3


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_to_pod_stays_on_redirect_peer(svc, proto):
    """No regression: straight to the backend's address, both ways by bpf_redirect_peer,
    and no netfilter lookup sends anything to the stack."""
    lab, node1, _, near, _ = svc
    peer, nat = metric(node1, "redirect_peer", "egress"), metric(node1, "to_stack_nat")
    target = 8080 if proto == "tcp" else 5353
    for _ in range(3):
        assert probe(lab, "kpc/client", near.ip, target, proto) == "near:hello"
    # TCP: SYN, SYN-ACK, ACK, data, answer...; UDP: datagram and answer, per probe
    assert metric(node1, "redirect_peer", "egress") - peer >= 6
    assert metric(node1, "to_stack_nat") == nat


def test_metrics_name_the_new_path(svc):
    lab, *_ = svc
    assert probe(lab, "kpc/client", NEAR_IP, 80) == "near:hello"
    out = subprocess.run(["cilia", "--lab", lab.name, "--node", "node1", "metrics"],
                         capture_output=True, text=True, check=True).stdout
    assert "to_stack_nat" in out
