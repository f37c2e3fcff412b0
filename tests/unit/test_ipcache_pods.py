"""Which stored pods hold an address in the ipcache (agent/policy.py, pod_address)."""

import pytest

from cilia.agent.policy import node_addresses_of, pod_address

NODES = {"172.30.0.11", "172.30.0.12", "10.244.2.1"}


def pod(ip: str | None = "10.244.1.5", *, host_network: bool | None = None,
        phase: str | None = "Running") -> dict:
    out: dict = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}, "status": {}}
    if host_network is not None:
        out["spec"]["hostNetwork"] = host_network
    if ip is not None:
        out["status"]["podIP"] = ip
    if phase is not None:
        out["status"]["phase"] = phase
    return out


@pytest.mark.parametrize("obj,expected", [
    (pod(), "10.244.1.5"),
    (pod(phase=None), "10.244.1.5"),              # phase not reported yet
    (pod(host_network=False), "10.244.1.5"),
    (pod(ip=None), None),                         # not started
    (pod("172.30.0.11", host_network=True), None),  # kube-proxy and the like
    (pod("10.244.1.5", host_network=True), None),   # hostNetwork whatever it reports
    (pod("172.30.0.12"), None),                   # a node's address, flag or not
    (pod("10.244.2.1"), None),                    # another node's VTEP
    (pod(phase="Succeeded"), None),
    (pod(phase="Failed"), None),
    (pod(phase="Pending"), "10.244.1.5"),
])
def test_pod_address(obj, expected):
    assert pod_address(obj, NODES) == expected


def test_node_addresses_of_cilia_nodes():
    nodes = [
        {"spec": {"addresses": [{"type": "InternalIP", "ip": "172.30.0.11"},
                                {"type": "ExternalIP", "ip": "203.0.113.7"}]}},
        {"spec": {"podCIDRs": ["10.244.2.0/24"]}},
        {"metadata": {"name": "broken"}, "spec": {"addresses": ["nonsense", {}]}},
    ]
    assert node_addresses_of(nodes) == {"172.30.0.11", "203.0.113.7"}
