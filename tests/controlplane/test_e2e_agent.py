"""End to end through the real API server: a real agent with `--datastore kubernetes` in a
lab node (its own netns, real BPF; it reaches the API server through a proxy listening on
its namespace's loopback), the operator beside it; policies created in the API reach the
agent's BPF maps, and the pods' reachability follows. The lab node is a Node object
(no kubelet): its pods are made in the API by the test, as a kubelet would see them."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cpkit import wait_for
from labkit import pod_manifest, probe, servers, unique_lab_name

from cilia.client import AgentClient
from cilia.datapath import layouts
from cilia.datapath.layouts import EndpointKey
from cilia.datapath.maps import BpfMap
from cilia.datastore.identities import identity_object
from cilia.datastore.kubernetes import (
    CILIA_NODES,
    CILIA_POLICIES,
    ENDPOINT_SLICES,
    IDENTITIES,
    NETWORK_POLICIES,
    PODS,
    SERVICES,
)
from cilia.identity import security_labels
from cilia.lab.lab import NETNS_DIR, Lab, LabError, in_netns

REPO = Path(__file__).resolve().parents[2]
_missing = [what for what, ok in (
    ("root", os.geteuid() == 0),
    ("the BPF objects (make -C bpf)", (REPO / "bpf" / "build" / "bpf_lxc.o").exists()),
    ("nsenter", shutil.which("nsenter") is not None),
) if not ok]
pytestmark = [pytest.mark.root, pytest.mark.skipif(
    bool(_missing), reason=f"needs {', '.join(_missing)}: run the README's test command")]


def _agent_args(pid: int) -> list[str]:
    """The lab agent's command line, as the lab started it (nsenter execs the agent)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    return [a.decode() for a in argv]


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


@pytest.fixture
def k8s_node(cluster, tmp_path):
    """A one-node lab whose agent reads the real API server (from inside the node's
    netns) instead of the lab's local datastore, and an operator that gives the node its
    pod CIDR (the only block of its pool is the one the lab routes to this node)."""
    lab = Lab(unique_lab_name())
    try:
        state = lab.up()
        node = state.nodes[0]
        argv = _agent_args(node.pid)
        assert "cilia.agent.main" in argv, argv
        lab.stop_agent(node.name)

        cluster.node(node.name)
        op = cluster.operator("e2e", "--cluster-pool", node.pod_cidr, "--node-mask",
                              node.pod_cidr.split("/")[1])
        kubeconfig = cluster.kubeconfig_in_netns(str(NETNS_DIR / node.netns))
        argv = _without(argv, "--datastore-dir", "--pod-cidr")
        argv += ["--datastore", "kubernetes", "--kubeconfig", str(kubeconfig)]
        with open(node.log, "ab") as log:
            proc = subprocess.Popen(in_netns(node.netns, argv), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node.pid = proc.pid
        lab.save(state)  # lab.down() stops this agent too
        lab._wait_ready(node)
        op.wait_ready("leader")
        yield lab, node, op
    finally:
        for n in (lab.load().nodes if lab.exists() else []):  # kept for a failure's report
            if Path(n.log).exists():
                shutil.copy(n.log, tmp_path / f"agent-{n.name}.log")
        lab.down()


def _endpoint(node, ip: str):
    with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
        return m.lookup(EndpointKey.for_ip(ip))


def _policy_entries(node, ep_id: int) -> list:
    with BpfMap.open_pinned(node.bpffs_root, layouts.POLICY) as m:
        return [(k, v) for k, v in m.items() if k.ep_id == ep_id]


def _synced(client: AgentClient, kind: str, name: str, present: bool = True) -> None:
    """The agent has seen the policy (or its deletion) and written the maps."""
    wait_for(lambda: any(p.kind == kind and p.name == name for p in client.policies())
             == present, what=f"the agent {'sees' if present else 'forgets'} {kind} {name}")
    client.wait_policy_synced()


def _endpoint_slice(ns: str, service: str, ip: str) -> dict:
    return {"metadata": {"name": f"{service}-manual", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


def _quiet_policy_syncs(client: AgentClient, quiet: float = 2.0) -> int:
    """The agent's policy sync count once it has stayed the same for `quiet` seconds."""
    last = [client.status().policy_syncs, time.monotonic()]

    def settled() -> bool:
        now = client.status().policy_syncs
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_for(settled, timeout=30, what="the agent's policy syncs to settle")
    return last[0]


def test_services_from_the_api_follow_their_slices_at_once_and_never_recompile_policy(
        cluster, k8s_node):
    """An EndpointSlice change reaches traffic through the agent's informers, recomputing
    its Service alone: the policy engine, which reads no Services, does not compile
    again (before, every change of any kind recompiled the whole cluster's policy)."""
    lab, node, _ = k8s_node
    client = AgentClient(node.socket)
    cluster.namespace("s")
    ns = cluster.ns("s")
    ips = {}
    for name in ("a", "b1", "b2"):
        cluster.pod("s", name, {"pod": name}, node=node.name)
        ips[name] = lab.run_pod(pod_manifest(name, ns, {"pod": name})).ip
    svc = cluster.client.create(SERVICES, {
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}, ns)
    frontend = svc["spec"]["clusterIP"]
    cluster.client.create(ENDPOINT_SLICES, _endpoint_slice(ns, "web", ips["b1"]), ns)
    with servers(lab, f"{ns}/b1", [80], "b1"), servers(lab, f"{ns}/b2", [80], "b2"):
        wait_for(lambda: probe(lab, f"{ns}/a", frontend, 80, timeout=0.5) == "b1:hello",
                 what="the Service's first backend answering at its ClusterIP")
        syncs = _quiet_policy_syncs(client)
        for i in range(6):
            backend = ("b2", "b1")[i % 2]
            sl = cluster.client.get(ENDPOINT_SLICES, ns, "web-manual")
            sl["endpoints"][0]["addresses"] = [ips[backend]]
            cluster.client.replace(ENDPOINT_SLICES, sl)
            wait_for(lambda b=backend: {s.backends[0].ip for s in client.services()
                                        if s.ip == frontend and s.backends} == {ips[b]},
                     what=f"the frontend's backend becoming {backend}")
            assert probe(lab, f"{ns}/a", frontend, 80) == f"{backend}:hello"
        assert client.status().policy_syncs == syncs, "a Service change recompiled policy"

        cluster.client.delete(SERVICES, ns, "web")
        wait_for(lambda: not any(s.ip == frontend for s in client.services()),
                 what="the deleted Service's frontend leaving the maps")


def test_policies_from_the_api_reach_the_maps_and_the_traffic(cluster, k8s_node):
    lab, node, op = k8s_node
    client = AgentClient(node.socket)
    assert client.status().pod_cidr == node.pod_cidr  # from its CiliaNode, by the operator
    cn = cluster.client.get(CILIA_NODES, None, node.name)
    assert cn["spec"]["podCIDRs"] == [node.pod_cidr]
    assert {"type": "InternalIP", "ip": node.underlay_ip} in cn["spec"]["addresses"]

    cluster.namespace("x", {"team": "x"})
    x = cluster.ns("x")
    labels = {"a": {"pod": "a", "access": "yes"}, "b": {"pod": "b"}, "c": {"pod": "c"}}
    pods = {}
    for name, pl in labels.items():
        cluster.pod("x", name, pl, node=node.name)  # the API first, as a kubelet sees it
        pods[name] = lab.run_pod(pod_manifest(name, x, pl))
    ips = {n: p.ip for n, p in pods.items()}

    # Identities: CiliaIdentity objects, the same numbers for agent and operator.
    eps = {e.pod_name: e for e in client.endpoints()}
    for name, pl in labels.items():
        number = cluster.identity_of(security_labels(pl, x, {"team": "x"}))
        assert number == eps[name].identity == _endpoint(node, ips[name]).sec_identity
        # The agent published the pod's address (no kubelet here).
        assert cluster.client.get(PODS, x, name)["status"]["podIP"] == ips[name]

    with servers(lab, f"{x}/b", [80, 81], "b"):
        assert probe(lab, f"{x}/a", ips["b"], 80) == "b:hello"
        assert probe(lab, f"{x}/c", ips["b"], 80) == "b:hello"
        assert not _endpoint(node, ips["b"]).flags & layouts.ENDPOINT_F_INGRESS_ENFORCED

        # A NetworkPolicy created in the API: b admits only pods with access=yes.
        cluster.client.create(NETWORK_POLICIES, {
            "metadata": {"name": "b-access", "namespace": x},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"access": "yes"}}}],
                                  "ports": [{"port": 80}]}]}})
        _synced(client, "NetworkPolicy", "b-access")
        b = _endpoint(node, ips["b"])
        assert b.flags & layouts.ENDPOINT_F_INGRESS_ENFORCED
        allowed = {k.identity for k, v in _policy_entries(node, b.ep_id)
                   if v.action == layouts.POLICY_ALLOW and k.dir == layouts.POLICY_INGRESS}
        assert allowed == {eps["a"].identity}
        assert probe(lab, f"{x}/a", ips["b"], 80) == "b:hello"
        assert probe(lab, f"{x}/c", ips["b"], 80, timeout=1) is None
        assert probe(lab, f"{x}/a", ips["b"], 81, timeout=1) is None

        # A label change in the API: c's new identity is selected, c gets in.
        cluster.client.patch(PODS, x, "c", {"metadata": {"labels": {"access": "yes"}}})
        new_c = security_labels({"pod": "c", "access": "yes"}, x, {"team": "x"})
        wait_for(lambda: probe(lab, f"{x}/c", ips["b"], 80, timeout=0.5) == "b:hello",
                 timeout=10, what="c admitted after its relabel")
        c_ident = _endpoint(node, ips["c"]).sec_identity
        assert c_ident == cluster.identity_of(new_c) != eps["c"].identity

        # A CiliaNetworkPolicy with a deny rule: deny wins over the NetworkPolicy's allow.
        cluster.client.create(CILIA_POLICIES, {
            "metadata": {"name": "b-deny-c", "namespace": x},
            "spec": {"endpointSelector": {"matchLabels": {"pod": "b"}},
                     "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "c"}}]}]}})
        _synced(client, "CiliaNetworkPolicy", "b-deny-c")
        denied = {k.identity for k, v in _policy_entries(node, b.ep_id)
                  if v.action == layouts.POLICY_DENY}
        assert c_ident in denied
        assert probe(lab, f"{x}/c", ips["b"], 80, timeout=1) is None
        assert probe(lab, f"{x}/a", ips["b"], 80) == "b:hello"
        # The operator says the policy is valid.
        wait_for(lambda: ((cluster.client.get(CILIA_POLICIES, x, "b-deny-c").get("status")
                           or {}).get("conditions") or [{}])[0].get("status") == "True",
                 what="b-deny-c Valid=True")

        # Deleting both opens b again.
        cluster.client.delete(CILIA_POLICIES, x, "b-deny-c")
        cluster.client.delete(NETWORK_POLICIES, x, "b-access")
        _synced(client, "NetworkPolicy", "b-access", present=False)
        _synced(client, "CiliaNetworkPolicy", "b-deny-c", present=False)
        assert not _endpoint(node, ips["b"]).flags & layouts.ENDPOINT_F_INGRESS_ENFORCED
        assert probe(lab, f"{x}/c", ips["b"], 80) == "b:hello"
        assert probe(lab, f"{x}/a", ips["b"], 81) == "b:hello"

    # A pod whose identity cannot be had (the API server refuses CiliaIdentity creates:
    # an admission policy; the operator is stopped) never gets an endpoint: its ADD
    # fails, to be retried by the runtime.
    op.stop()
    probe_identity = identity_object(65535, security_labels({"probe": "1"}, x, {}))
    with cluster.refusing_creates(IDENTITIES, probe_identity):
        cluster.pod("x", "d", {"pod": "d"}, node=node.name)
        with pytest.raises(LabError, match=f"CNI ADD of {x}/d failed"):
            lab.run_pod(pod_manifest("d", x, {"pod": "d"}))
        assert "d" not in {e.pod_name for e in client.endpoints()}
        with BpfMap.open_pinned(node.bpffs_root, layouts.ENDPOINTS) as m:
            assert len(list(m.keys())) == 3
    d = lab.run_pod(pod_manifest("d", x, {"pod": "d"}))
    assert _endpoint(node, d.ip).sec_identity == cluster.identity_of(
        security_labels({"pod": "d"}, x, {"team": "x"}))
    op.assert_no_errors()
