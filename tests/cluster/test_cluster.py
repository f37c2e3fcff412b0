"""cilia on a real Kubernetes: kubelet -> containerd CRI -> cilia-cni, kubectl-applied
objects, Services and DNS through cilia's datapath (kube-proxy installed too), the operator."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from clusterkit import client_pod, server_pod, service, unique_name

from cilia.cluster import upstream

pytestmark = [pytest.mark.root, pytest.mark.cluster]
CILIA = [sys.executable, "-m", "cilia.cli"]


def test_nodes_ready_and_versions(cluster, kube):
    nodes = kube.json("get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
    for n in nodes:
        conds = {c["type"]: c["status"] for c in n["status"]["conditions"]}
        assert conds["Ready"] == "True", n["metadata"]["name"]
    version = json.loads(kube("version", "-o", "json").stdout)
    pinned = upstream.pins()["KUBERNETES_VERSION"]
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned
    assert {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes} == {pinned}


@pytest.fixture(scope="module")
def app(kube):
    """A server on node1 behind a Service, clients on node1 and node2."""
    from clusterkit import namespace

    ns = unique_name("app")
    kube.apply(namespace(ns),
               server_pod("server", ns, "node1", {"app": "server"}),
               client_pod("near", ns, "node1"), client_pod("far", ns, "node2"),
               service("server", ns, {"app": "server"}))
    kube.wait_ready(ns, "server", "near", "far")
    yield ns
    kube("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("client", ["near", "far"])
def test_pod_to_pod(kube, app, client):
    ip = kube.pod_ip(app, "server")
    assert kube.connect(app, client, f"{ip}:8080")
    assert kube.connect(app, client, f"{ip}:8081", protocol="udp")


@pytest.mark.parametrize("client", ["near", "far"])
@pytest.mark.parametrize("target", ["clusterip", "dns"])
def test_service(kube, app, client, target):
    """A ClusterIP (translated by cilia before policy), with the backend on the client's
    node and on the other node; by address and by the Service's DNS name (CoreDNS, itself
    a Service)."""
    svc = kube.json("-n", app, "get", "service", "server")
    host = (svc["spec"]["clusterIP"] if target == "clusterip"
            else f"server.{app}.svc.cluster.local")
    assert kube.connect(app, client, f"{host}:80")
    assert kube.connect(app, client, f"{host}:81", protocol="udp")


def test_api_server_reaches_pods(cluster, kube, app):
    """`cilia cluster up` routes the control plane's namespace to each node's pod CIDR via
    that node, as a real control plane is: pods/proxy and services/proxy reach the server
    (netexec's /hostname answers with the pod's name)."""
    outside = cluster.load().outside_netns
    routes = {(r["dst"], r.get("gateway")) for r in json.loads(subprocess.run(
        ["ip", "-n", outside, "-j", "route", "show"], capture_output=True, text=True,
        check=True).stdout)}
    for cn in kube.json("get", "cilianodes")["items"]:
        node = kube.json("get", "node", cn["metadata"]["name"])
        via = next(a["address"] for a in node["status"]["addresses"]
                   if a["type"] == "InternalIP")
        assert (cn["spec"]["podCIDRs"][0], via) in routes, (cn["metadata"]["name"], routes)
    for path in ("pods/server:8080/proxy/hostname", "services/server:http/proxy/hostname"):
        deadline = time.monotonic() + 30  # the Service's endpoints may trail the pod
        while True:
            res = kube("get", "--raw", f"/api/v1/namespaces/{app}/{path}", check=False,
                       timeout=30)
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert res.returncode == 0, (path, res.stderr)
        assert res.stdout.strip() == "server", (path, res.stdout)


def test_egress_policy_judges_the_service_backend(kube, app):
    """An egress rule allowing the backend pods lets their Service through (the ClusterIP
    is translated before policy, so policy sees the backend, as NetworkPolicy requires),
    and DNS keeps working through an explicit rule for it."""
    svc_ip = kube.json("-n", app, "get", "service", "server")["spec"]["clusterIP"]
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "far-egress", "namespace": app},
        "spec": {"podSelector": {"matchLabels": {"app": "far"}}, "policyTypes": ["Egress"],
                 "egress": [
                     {"to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                      "ports": [{"port": 8080}]},
                     {"to": [{"namespaceSelector": {}}],
                      "ports": [{"port": 53, "protocol": "UDP"}]}]},
    }
    kube.apply(policy)
    try:
        kube.wait_connect(app, "far", f"{svc_ip}:80", want=True)
        kube.wait_connect(app, "far", f"server.{app}.svc.cluster.local:80", want=True)
        kube.wait_connect(app, "far", f"{svc_ip}:81", want=False, protocol="udp")
    finally:
        kube.delete(policy)


def test_network_policy_applied_enforced_deleted(kube, app):
    ip = kube.pod_ip(app, "server")
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "only-near", "namespace": app},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "near"}}}]}]},
    }
    kube.apply(policy)
    try:
        kube.wait_connect(app, "far", f"{ip}:8080", want=False)
        assert kube.connect(app, "near", f"{ip}:8080")
    finally:
        kube.delete(policy)
    kube.wait_connect(app, "far", f"{ip}:8080", want=True)


def test_default_deny_keeps_probes_passing(kube, ns):
    """The kubelet probes from the node: under default-deny ingress they must pass."""
    kube.apply(server_pod("probed", ns, "node1", probes=True))
    kube.wait_ready(ns, "probed")
    kube.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny-all", "namespace": ns},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    time.sleep(8)  # several probe periods (1 s, failure threshold 2)
    pod = kube.json("-n", ns, "get", "pod", "probed")
    conds = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conds["Ready"] == "True"
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0


def test_host_network_pod_keeps_node_identity(cluster, kube, ns):
    kube.apply(server_pod("hostnet", ns, "node1", host_network=True))
    kube.wait_ready(ns, "hostnet")
    state = cluster.load()
    node1 = next(n for n in state.nodes if n.name == "node1")
    node2 = next(n for n in state.nodes if n.name == "node2")
    time.sleep(2)  # the agents' watch sees the pod
    for node, want in ((node1, "reserved:host"), (node2, "reserved:remote-node")):
        out = subprocess.run([*CILIA, "--socket", node.agent_sock, "bpf", "ipcache", "list",
                              "-o", "json"], capture_output=True, text=True, check=True)
        entries = {e["prefix"]: e for e in json.loads(out.stdout)}
        entry = entries[f"{node1.ip}/32"]
        assert entry["name"] == want, entry


def test_cilia_network_policy_and_crd_validation(kube, app):
    ip = kube.pod_ip(app, "server")
    cnp = {
        "apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
        "metadata": {"name": "no-far", "namespace": app},
        "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"fromEntities": ["all"]}],
                 "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "far"}}]}]},
    }
    kube.apply(cnp)
    try:
        kube.wait_connect(app, "far", f"{ip}:8080", want=False)
        assert kube.connect(app, "near", f"{ip}:8080")
    finally:
        kube.delete(cnp)
    kube.wait_connect(app, "far", f"{ip}:8080", want=True)
    bad = {**cnp, "metadata": {"name": "bad", "namespace": app},
           "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                    "ingress": [{"toPorts": [{"ports": [{"port": "80",
                                                         "protocol": "BOGUS"}]}]}]}}
    res = kube("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0
    assert "protocol" in res.stderr and "Unsupported value" in res.stderr, res.stderr


def test_cluster_network_policy_tiers_and_status(kube, app):
    """sig-network's admin policy API on the real API server: an Admin tier Deny wins
    over a NetworkPolicy that allows everything, the operator says Accepted, the CRD's
    own validation refuses what the API forbids, and deleting the policy opens again."""
    ip = kube.pod_ip(app, "server")
    in_app = {"matchLabels": {"kubernetes.io/metadata.name": app}}
    allow_all = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "allow-all", "namespace": app},
                 "spec": {"podSelector": {}, "ingress": [{}]}}
    admin = {"apiVersion": "policy.networking.k8s.io/v1beta1", "kind": "ClusterNetworkPolicy",
             "metadata": {"name": f"{app}-no-far"},
             "spec": {"tier": "Admin", "priority": 10,
                      "subject": {"pods": {"namespaceSelector": in_app,
                                           "podSelector": {"matchLabels": {"app": "server"}}}},
                      "ingress": [{"name": "no-far", "action": "Deny", "from": [
                          {"pods": {"namespaceSelector": in_app,
                                    "podSelector": {"matchLabels": {"app": "far"}}}}]}]}}
    kube.apply(allow_all, admin)
    try:
        kube.wait_connect(app, "far", f"{ip}:8080", want=False)
        assert kube.connect(app, "near", f"{ip}:8080")
        deadline = time.monotonic() + 30
        while True:
            conds = (kube.json("get", "clusternetworkpolicy", admin["metadata"]["name"])
                     .get("status") or {}).get("conditions") or []
            accepted = next((c for c in conds if c["type"] == "Accepted"), None)
            if accepted or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert accepted and accepted["status"] == "True", conds
        bad = {**admin, "metadata": {"name": f"{app}-bad"},
               "spec": {**admin["spec"], "priority": 1001}}
        res = kube("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert res.returncode != 0 and "priority" in res.stderr, res.stderr
    finally:
        kube.delete(admin, allow_all)
    kube.wait_connect(app, "far", f"{ip}:8080", want=True)


def test_operator_objects(kube, app):
    nodes = {n["metadata"]["name"]: n for n in kube.json("get", "cilianodes")["items"]}
    assert set(nodes) == {"node1", "node2"}
    cidrs = [n["spec"]["podCIDRs"][0] for n in nodes.values()]
    assert len(set(cidrs)) == 2
    ids = kube.json("get", "ciliaidentities")["items"]
    want = {f"ns:kubernetes.io/metadata.name={app}", "pod:app=server"}
    assert any(want <= set(i.get("securityLabels", [])) for i in ids), ids


def test_pod_delete_releases_address_and_link(cluster, kube, ns):
    kube.apply(client_pod("gone", ns, "node2"))
    kube.wait_ready(ns, "gone")
    ip = kube.pod_ip(ns, "gone")
    node2 = next(n for n in cluster.load().nodes if n.name == "node2")

    def agent_endpoints() -> list[dict]:
        out = subprocess.run([*CILIA, "--socket", node2.agent_sock, "endpoint", "list", "-o",
                              "json"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    ep = next(e for e in agent_endpoints() if e["ip"] == ip)
    kube("-n", ns, "delete", "pod", "gone", "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 30
    while any(e["ip"] == ip for e in agent_endpoints()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(e["ip"] == ip for e in agent_endpoints())
    links = subprocess.run(["ip", "-n", node2.netns, "-o", "link"], capture_output=True,
                           text=True, check=True).stdout
    assert ep["hostInterface"] not in links
    leases = json.loads(open(f"{node2.state_dir}/ipam.json").read())
    assert ip not in json.dumps(leases)


def test_agent_restart_keeps_established_connection(cluster, kube, app):
    """One keep-alive TCP connection across nodes, requests every 0.3 s, while the
    server's node's agent restarts: every request is answered, nothing is reset."""
    ip = kube.pod_ip(app, "server")
    proc = subprocess.Popen(
        cluster.kubectl_argv(["-n", app, "exec", "-i", "far", "--", "nc", "-w", "3", ip, "8080"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    requests = 30

    def send() -> None:
        try:
            for i in range(requests):
                proc.stdin.write(f"GET /echo?msg=m{i} HTTP/1.1\r\nHost: x\r\n\r\n")
                proc.stdin.flush()
                time.sleep(0.3)
        except OSError as err:
            errors.append(str(err))

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(2)
    cluster.restart_process("cilia-agent-node1")
    sender.join()
    time.sleep(1)
    out, err = proc.communicate(timeout=30)  # closes stdin: nc ends 3 s after the last reply
    assert not errors
    assert out.count("HTTP/1.1 200") == requests, (out[-500:], err)


def test_observe_and_dumps_reach_every_node_of_the_cluster(cluster, kube, app):
    """`cilia --cluster NAME ...` asks the agents inside the cluster's nodes (their
    sockets and pins, as each node's mount namespace has them): `observe` merges both
    nodes' flows in time order; `bpf endpoint list` reads a node's map."""
    since = time.time()
    ip = kube.pod_ip(app, "server")
    assert kube.connect(app, "far", f"{ip}:8080")  # node2 -> node1: both datapaths see it
    res = subprocess.run([*CILIA, "--cluster", cluster.name, "observe", "--since",
                          str(since), "--to-pod", f"{app}/server", "-o", "jsonl"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    flows = [json.loads(line) for line in res.stdout.splitlines()]
    assert {f["node"] for f in flows} == {"node1", "node2"}, flows
    assert [f["time"] for f in flows] == sorted(f["time"] for f in flows)
    assert all(f["src_namespace"] == app and f["src_pod"] == "far" for f in flows)
    res = subprocess.run([*CILIA, "--cluster", cluster.name, "--node", "node1", "bpf",
                          "endpoint", "list", "-o", "json"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{app}/server" in {e["pod"] for e in json.loads(res.stdout)}


def test_connectivity_test_passes_on_the_cluster(cluster, kube):
    """`cilia --cluster NAME connectivity test` (issue 15 item 5) on real Kubernetes:
    agnhost pods through the kubelet, CoreDNS, both agents restarted under traffic."""
    res = subprocess.run([*CILIA, "--cluster", cluster.name, "connectivity", "test",
                          "-o", "json"], capture_output=True, text=True, timeout=900)
    checks = {c["name"]: c for c in json.loads(res.stdout)} if res.stdout.strip() else {}
    assert res.returncode == 0, res.stdout + res.stderr
    assert {name for name, c in checks.items() if c["result"] != "ok"} == set(), checks
    assert "DNS" in checks and "through agent restarts" in checks
    assert not [n for n in kube.json("get", "namespaces")["items"]
                if n["metadata"]["name"].startswith("cilia-test-")
                and n["status"].get("phase") != "Terminating"]
