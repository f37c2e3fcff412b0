"""kill -9 of the agent at every step of ADD and of DEL (issue 13): the agent is started
with CILIA_CRASH_AT=<step> (cilia/crashpoints.py) and SIGKILLs itself there, mid-call,
as a crash or an OOM kill would. Then, with a fresh agent, the runtime does what it does
after a failed call (DEL; or DEL again), and the node must hold nothing of the pod: no
veth, no lease, no endpoints map entry, no record, no conntrack; a new ADD of the same
container works and its DEL leaves the node as it was. And a pod already running is
never weaker for it: its entry and enforcement survive every crash."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from labkit import cni, leases, node_links, pod_manifest, probe, sandbox, servers

from cilia.agent.endpoint import ADD_CRASH_POINTS, DEL_CRASH_POINTS, host_ifname
from cilia.agent.policy import POLICY_CRASH_POINTS
from cilia.client import AgentClient
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey
from cilia.datapath.maps import BpfMap
from cilia.nsutil import alive


def _records(node) -> set[str]:
    path = Path(node.state_dir) / "endpoints.json"
    eps = json.loads(path.read_text()).get("endpoints", []) if path.exists() else []
    return {e["container_id"] for e in eps}


def _map_entries(node) -> dict[str, int]:
    with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
        return {k.ip: v.flags for k, v in m.items()}


@pytest.fixture(scope="module")
def guarded(lab):
    """A running pod under default-deny ingress, whose enforcement every crash must
    leave as it is."""
    pod = lab.run_pod(pod_manifest("guarded", labels={"app": "guarded"}))
    lab.datastore.put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "guarded", "namespace": "default"},
                       "spec": {"podSelector": {"matchLabels": {"app": "guarded"}},
                                "policyTypes": ["Ingress"]}})
    AgentClient(lab.load().nodes[0].socket).wait_policy_synced()
    yield pod
    lab.datastore.delete("NetworkPolicy", "default", "guarded")


def _crash_during(lab, point: str, call) -> object:
    """Restarts the agent so that it dies at `point`, makes the call, checks it died,
    starts it again normally; returns the call's result."""
    node = lab.load().nodes[0]
    lab.stop_agent()
    lab.start_agent(env={"CILIA_CRASH_AT": point})
    result = call()
    node = lab.load().nodes[0]
    assert not alive(node.pid), f"the agent did not reach {point}"
    lab.start_agent()
    return result


def _assert_clean(node, cid: str, baseline: dict) -> None:
    assert host_ifname(cid, "eth0") not in node_links(node), "a veth was left"
    assert leases(node) == baseline["leases"], "a lease was left"
    assert _map_entries(node) == baseline["entries"], "an endpoints map entry was left"
    assert cid not in _records(node), "an endpoint record was left"


@pytest.mark.parametrize("point", ADD_CRASH_POINTS)
def test_crash_during_add(lab, guarded, point):
    node = lab.load().nodes[0]
    baseline = {"leases": leases(node), "entries": _map_entries(node)}
    cid = f"crash{secrets.token_hex(6)}"
    with sandbox(f"{node.netns[:8]}-{cid}") as netns:
        try:
            rc, out = _crash_during(lab, point, lambda: cni(node, "ADD", cid, netns))
            if point != "add:saved":  # the agent died before it could answer
                assert rc != 0, out
            # The runtime cleans up a failed ADD with DEL; after the last step the pod
            # exists and is deleted the same way when it goes.
            rc, out = cni(node, "DEL", cid, netns)
            assert rc == 0, out
            node = lab.load().nodes[0]
            _assert_clean(node, cid, baseline)
            rc, out = cni(node, "ADD", cid, netns)
            assert rc == 0, out
        finally:
            cni(node, "DEL", cid, netns)
    _assert_clean(lab.load().nodes[0], cid, baseline)
    _guarded_still_enforced(lab, guarded)


@pytest.mark.parametrize("point", DEL_CRASH_POINTS)
def test_crash_during_del(lab, guarded, point):
    node = lab.load().nodes[0]
    baseline = {"leases": leases(node), "entries": _map_entries(node)}
    cid = f"crash{secrets.token_hex(6)}"
    with sandbox(f"{node.netns[:8]}-{cid}") as netns:
        rc, out = cni(node, "ADD", cid, netns)
        assert rc == 0, out
        try:
            _crash_during(lab, point, lambda: cni(node, "DEL", cid, netns))
        finally:
            rc, out = cni(node, "DEL", cid, netns)  # the runtime retries a failed DEL
        assert rc == 0, out
    _assert_clean(lab.load().nodes[0], cid, baseline)
    _guarded_still_enforced(lab, guarded)


def _guarded_still_enforced(lab, guarded) -> None:
    node = lab.load().nodes[0]
    entry = _map_entries(node).get(guarded.ip)
    assert entry is not None and entry & layouts.ENDPOINT_F_INGRESS_ENFORCED, (
        "the guarded pod lost its entry or its enforcement")
    with servers(lab, "default/guarded", [8087], "guarded"):
        assert probe(lab, "outside", guarded.ip, 8087, timeout=1) is None, (
            "the guarded pod was opened")
        assert probe(lab, f"node:{node.name}", guarded.ip, 8087) == "guarded:hello"
    with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
        assert m.lookup(EndpointKey.for_ip(guarded.ip)) is not None


@pytest.mark.parametrize("point", POLICY_CRASH_POINTS)
def test_crash_while_writing_a_policy(lab, point):
    """The agent dies at each step of writing a policy that replaces another (deny
    entries, ipcache, allow entries, removals, enforcement flags: the new one denies a
    pod, allows another CIDR and isolates egress too). Restarted, it finishes the job:
    the pod ends up enforced both ways as the new policy says; the node still reaches
    it."""
    import time

    name = f"pc{secrets.token_hex(3)}"
    pod = lab.run_pod(pod_manifest(name, labels={"app": name}))
    lab.run_pod(pod_manifest(f"{name}o", labels={"app": f"{name}o"}))
    sel = {"podSelector": {"matchLabels": {"app": name}}}
    first = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": name, "namespace": "default"},
             "spec": {**sel, "policyTypes": ["Ingress"], "ingress": [
                 {"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}, {"podSelector": {
                     "matchLabels": {"app": f"{name}o"}}}]}]}}
    second = {**first, "spec": {**sel, "policyTypes": ["Ingress", "Egress"], "ingress": [
        {"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}, {"podSelector": {
            "matchLabels": {"app": f"{name}o"}}}]}]}}
    deny = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
            "metadata": {"name": f"{name}-deny", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": name}},
                     "ingressDeny": [{"fromEndpoints": [{"matchLabels": {
                         "app": f"{name}o"}}]}]}}
    try:
        with servers(lab, f"default/{name}", [8088], name):
            lab.datastore.put(first)
            AgentClient(lab.load().nodes[0].socket).wait_policy_synced()
            assert probe(lab, f"default/{name}o", pod.ip, 8088) == f"{name}:hello"
            # The new policy is stored while the agent is away; the agent that starts
            # writes it in its first sync, and dies at `point` doing so.
            lab.stop_agent()
            lab.datastore.put(second)
            lab.datastore.put(deny)
            node = lab.start_agent(env={"CILIA_CRASH_AT": point}, wait=False)
            deadline = time.monotonic() + 20
            while alive(node.pid):
                assert time.monotonic() < deadline, f"the agent never reached {point}"
                time.sleep(0.05)
            node = lab.start_agent()
            AgentClient(node.socket).wait_policy_synced()
            flags = _map_entries(node)[pod.ip]
            assert flags == (layouts.ENDPOINT_F_INGRESS_ENFORCED
                             | layouts.ENDPOINT_F_EGRESS_ENFORCED), flags
            assert probe(lab, f"default/{name}o", pod.ip, 8088, timeout=1) is None, (
                "the denied pod got in")
            assert probe(lab, "outside", pod.ip, 8088, timeout=1) is None
            assert probe(lab, f"node:{node.name}", pod.ip, 8088) == f"{name}:hello"
    finally:
        lab.datastore.delete("CiliaNetworkPolicy", "default", f"{name}-deny")
        lab.datastore.delete("NetworkPolicy", "default", name)
        lab.remove_pod("default", name)
        lab.remove_pod("default", f"{name}o")


def test_restore_never_weakens_what_the_map_enforces(lab, guarded):
    """Issue 13 item 6: the flags are written to the map before the state file is
    saved, so a crash between the two leaves a state file that says less than the map.
    An agent restarted then must keep what the map enforces, whatever its file says:
    seen at the moment restore() is done, before any sync could write the flags again
    (the agent dies there: CILIA_CRASH_AT=agent:restored)."""
    import time

    node = lab.load().nodes[0]
    before = _map_entries(node)[guarded.ip]
    assert before & layouts.ENDPOINT_F_INGRESS_ENFORCED
    lab.stop_agent()
    path = Path(node.state_dir) / "endpoints.json"
    state = json.loads(path.read_text())
    for e in state["endpoints"]:
        if e["ip"] == guarded.ip:
            e["flags"] = 0  # what the file says when the crash came before its save
    path.write_text(json.dumps(state))
    node = lab.start_agent(env={"CILIA_CRASH_AT": "agent:restored"}, wait=False)
    deadline = time.monotonic() + 20
    while alive(node.pid):
        assert time.monotonic() < deadline, "the agent never reached agent:restored"
        time.sleep(0.05)
    try:
        assert _map_entries(node)[guarded.ip] == before, "restore weakened the map"
    finally:
        lab.start_agent()
        AgentClient(lab.load().nodes[0].socket).wait_policy_synced()
    assert _map_entries(lab.load().nodes[0])[guarded.ip] == before
