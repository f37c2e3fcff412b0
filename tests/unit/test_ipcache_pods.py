"""Which stored pods hold an address in the ipcache (agent/policy.py, pod_address)."""

import pytest

from cilia.agent.policy import node_addresses_of, pod_address, pod_addresses

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


# ---- clashes: two pods report one address -------------------------------------------

CIDRS = {"node1": ["10.244.1.0/24"], "node2": ["10.244.2.0/24"]}


def placed(name: str, ip: str, node: str, phase: str = "Running") -> dict:
    out = pod(ip, phase=phase)
    out["metadata"]["name"] = name
    out["spec"]["nodeName"] = node
    return out


def _resolve(*pods: dict, taken: set[str] = frozenset()) -> dict[str, str | None]:
    stored = {("ns", p["metadata"]["name"]): p for p in pods}
    return {k[1]: v for k, v in pod_addresses(stored, NODES, CIDRS, taken).items()}


def test_one_claim_each_is_kept():
    assert _resolve(placed("a", "10.244.1.5", "node1"), placed("b", "10.244.2.5", "node2")) \
        == {"a": "10.244.1.5", "b": "10.244.2.5"}


@pytest.mark.parametrize("order", [0, 1])
def test_the_running_pod_on_the_owning_node_wins_whatever_the_order(order):
    """A stale pod (its node went away, its status never updated) or a pod on another
    node reporting the address must not take the owner's identity: before, the pod
    sorting last won."""
    owner = placed("owner", "10.244.1.5", "node1")
    stale = placed("zz-stale", "10.244.1.5", "node2")
    pods = (owner, stale) if order else (stale, owner)
    assert _resolve(*pods) == {"owner": "10.244.1.5", "zz-stale": None}


def test_an_unresolved_clash_is_nobodys():
    """Two Running pods on the owning node, or none Running there: the address holds no
    pod's identity (world) until the clash clears."""
    assert _resolve(placed("a", "10.244.1.5", "node1"), placed("b", "10.244.1.5", "node1")) \
        == {"a": None, "b": None}
    assert _resolve(placed("a", "10.244.1.5", "node1", "Pending"),
                    placed("b", "10.244.1.5", "node2")) == {"a": None, "b": None}


def test_this_nodes_endpoints_win_over_any_report():
    assert _resolve(placed("a", "10.244.1.5", "node1"), taken={"10.244.1.5"}) == {"a": None}


# ---- CiliaNodes: one bad object never takes routes from the others ---------------------

def _cnode(name: str, cidr, ip) -> dict:
    return {"metadata": {"name": name},
            "spec": {"podCIDRs": [cidr], "addresses": [{"type": "InternalIP", "ip": ip}]}}


def test_bad_cilia_nodes_are_left_out_and_named():
    from cilia.agent.routing import remote_nodes

    warned = {}
    nodes = [
        _cnode("good", "10.244.2.0/24", "172.30.0.12"),
        _cnode("not-a-cidr", "banana", "172.30.0.13"),
        _cnode("bad-ip", "10.244.4.0/24", "300.1.1.1"),
        _cnode("everything", "0.0.0.0/0", "172.30.0.15"),
        _cnode("mine", "10.244.1.128/25", "172.30.0.16"),     # inside this node's CIDR
        _cnode("zz-twin", "10.244.2.0/24", "172.30.0.17"),    # another node's CIDR
        {"metadata": {"name": "garbage"}, "spec": "nonsense"},
    ]
    got = remote_nodes(nodes, "me", "10.244.1.0/24", lambda n, why: warned.update({n: why}))
    assert got == {"good": ("10.244.2.0/24", "172.30.0.12")}
    assert set(warned) == {"not-a-cidr", "bad-ip", "everything", "mine", "zz-twin"}
    assert "overlaps 10.244.1.0/24" in warned["mine"]
