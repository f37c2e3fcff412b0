"""cilia on a real cluster (kind): installed by Helm, then pod-to-pod on one node and
across nodes, pod to Service, NetworkPolicy and CiliaNetworkPolicy applied with kubectl,
an agent restart under an established connection, and `helm uninstall` leaving the nodes
clean. The tests run in file order; the last one uninstalls."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from kindkit import (
    CLUSTER,
    HERE,
    IMAGE,
    NAMESPACE,
    SYSTEM,
    helm_uninstall,
    kubectl,
    kubectl_json,
    node_exec,
    nodes,
    pods_not_running,
    wait_for,
)

pytestmark = pytest.mark.timeout(2400)
MANIFESTS = HERE / "manifests"
PROBE = ["python3", "/probe/probe.py"]
PORT = 8080
SERVICE = f"server.{NAMESPACE}.svc.cluster.local"


def pod(name: str, node: str, command: list[str], server: bool = False) -> dict:
    container = {
        "name": "c", "image": IMAGE, "imagePullPolicy": "Never", "command": command,
        "volumeMounts": [{"name": "probe", "mountPath": "/probe"}],
    }
    if server:
        container["ports"] = [{"name": "echo", "containerPort": PORT}]
        container["readinessProbe"] = {"tcpSocket": {"port": PORT}, "periodSeconds": 2}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [container],
                 "volumes": [{"name": "probe", "configMap": {"name": "probe"}}]},
    }


@pytest.fixture(scope="module")
def workers(cluster) -> list[str]:
    names = sorted(n for n in nodes() if "control-plane" not in n)
    assert len(names) >= 2, f"the kind config has two workers, found {names}"
    return names


@pytest.fixture(scope="module")
def workload(cluster, workers) -> dict[str, str]:
    """server and client-same on the first worker, client-other on the second, a Service;
    returns pod name -> pod IP."""
    kubectl("create", "namespace", NAMESPACE)
    kubectl("-n", NAMESPACE, "create", "configmap", "probe", f"--from-file={HERE / 'probe.py'}")
    objs = [
        pod("server", workers[0], [*PROBE, "serve", str(PORT)], server=True),
        pod("client-same", workers[0], ["sleep", "infinity"]),
        pod("client-other", workers[1], ["sleep", "infinity"]),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "server", "namespace": NAMESPACE},
         "spec": {"selector": {"app": "server"},
                  "ports": [{"port": 80, "targetPort": PORT, "protocol": "TCP"}]}},
    ]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": objs}))
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=180s")
    ips = {p["metadata"]["name"]: p["status"]["podIP"]
           for p in kubectl_json("-n", NAMESPACE, "get", "pods")["items"]}
    pool = "10.244."
    assert all(ip.startswith(pool) for ip in ips.values()), f"pod IPs outside the pool: {ips}"
    return ips


def connects(client: str, host: str, port: int = PORT) -> bool:
    res = subprocess.run(
        ["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, "exec", client, "--",
         *PROBE, "connect", host, str(port), "2"], capture_output=True, text=True, timeout=60)
    return res.returncode == 0


def expect(client: str, host: str, allowed: bool, port: int = PORT, timeout: float = 30):
    """Waits (policy is applied asynchronously) until client reaches host or is refused."""
    verdict = "reach" if allowed else "be blocked from"
    wait_for(f"{client} to {verdict} {host}:{port}",
             lambda: connects(client, host, port) == allowed, timeout=timeout, interval=1)


@pytest.fixture
def no_policies(workload):
    kubectl("-n", NAMESPACE, "delete", "networkpolicies", "--all")
    kubectl("-n", NAMESPACE, "delete", "cilianetworkpolicies", "--all", "--ignore-not-found")
    for client in ("client-same", "client-other"):
        expect(client, workload["server"], allowed=True)
    yield workload
    kubectl("-n", NAMESPACE, "delete", "networkpolicies", "--all")
    kubectl("-n", NAMESPACE, "delete", "cilianetworkpolicies", "--all", "--ignore-not-found")


def test_every_node_ready_and_every_pod_running(cluster):
    for node in kubectl_json("get", "nodes")["items"]:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True", node["metadata"]["name"]
    assert not pods_not_running()
    ds = kubectl_json("-n", SYSTEM, "get", "daemonset", "cilia-agent")["status"]
    assert ds["numberReady"] == ds["desiredNumberScheduled"] == len(nodes())
    dep = kubectl_json("-n", SYSTEM, "get", "deployment", "cilia-operator")["status"]
    assert dep.get("readyReplicas") == 2


def test_every_node_has_a_pod_cidr_from_the_pool(cluster):
    cilia_nodes = kubectl_json("get", "cilianodes")["items"]
    assert {n["metadata"]["name"] for n in cilia_nodes} == set(nodes())
    cidrs = [n["spec"]["podCIDRs"][0] for n in cilia_nodes]
    assert len(set(cidrs)) == len(cidrs) and all(c.startswith("10.244.") for c in cidrs)


def test_pod_to_pod_same_node(workload):
    assert connects("client-same", workload["server"])


def test_pod_to_pod_across_nodes(workload):
    assert connects("client-other", workload["server"])


def test_pod_to_service(workload):
    assert connects("client-other", SERVICE, 80), "by name (CoreDNS, itself on cilia)"
    cluster_ip = kubectl("-n", NAMESPACE, "get", "service", "server", "-o",
                         "jsonpath={.spec.clusterIP}")
    assert connects("client-same", cluster_ip, 80)


def test_default_deny(no_policies):
    kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"))
    server = no_policies["server"]
    expect("client-same", server, allowed=False)
    expect("client-other", server, allowed=False)
    assert not connects("client-other", SERVICE, 80)


def test_policy_allowing_one_peer(no_policies):
    kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"), "-f",
            str(MANIFESTS / "allow-one-peer.yaml"))
    server = no_policies["server"]
    expect("client-other", server, allowed=False)
    expect("client-same", server, allowed=True)
    assert connects("client-same", SERVICE, 80)


def test_cilia_network_policy_deny(no_policies):
    kubectl("apply", "-f", str(MANIFESTS / "cilia-deny.yaml"))
    server = no_policies["server"]
    expect("client-same", server, allowed=False)
    expect("client-other", server, allowed=True)
    valid = kubectl("-n", NAMESPACE, "get", "cilianetworkpolicy", "deny-client-same", "-o",
                    "jsonpath={.status.conditions[?(@.type=='Valid')].status}")
    assert valid in ("True", ""), f"the operator found the policy invalid: {valid}"


def test_policy_removal(no_policies):
    server = no_policies["server"]
    kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"), "-f",
            str(MANIFESTS / "cilia-deny.yaml"))
    expect("client-other", server, allowed=False)
    kubectl("delete", "-f", str(MANIFESTS / "default-deny.yaml"), "-f",
            str(MANIFESTS / "cilia-deny.yaml"))
    expect("client-other", server, allowed=True)
    expect("client-same", server, allowed=True)


def test_agent_restart_keeps_established_connection(workload, workers):
    """Across nodes, one TCP connection echoing every 100 ms while the agents of both
    nodes are deleted and replaced: the pinned datapath keeps forwarding."""
    stream = subprocess.Popen(
        ["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, "exec", "-i",
         "client-other", "--", *PROBE, "stream", workload["server"], str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stream.stdout.readline().strip() == "connected", stream.stderr.read()
        time.sleep(2)
        agents = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in kubectl_json(
            "-n", SYSTEM, "get", "pods", "-l", "app.kubernetes.io/name=cilia-agent")["items"]}
        old = [name for name, node in agents.items() if node in workers[:2]]
        assert len(old) == 2
        kubectl("-n", SYSTEM, "delete", "pod", *old, "--wait=true", timeout=180)

        def replaced() -> bool:
            pods = kubectl_json("-n", SYSTEM, "get", "pods", "-l",
                                "app.kubernetes.io/name=cilia-agent")["items"]
            fresh = [p for p in pods if p["spec"]["nodeName"] in workers[:2]
                     and p["metadata"]["name"] not in old
                     and any(c["type"] == "Ready" and c["status"] == "True"
                             for c in p["status"].get("conditions", []))]
            return len(fresh) == 2

        wait_for("new agents Ready on both nodes", replaced, timeout=300, interval=2)
        time.sleep(3)
    finally:
        stream.stdin.close()
    out, err = stream.communicate(timeout=60)
    assert stream.returncode == 0, f"the connection broke: {out} {err}"
    status, sent, received, max_gap_ms = out.split()
    assert status == "ok" and int(sent) == int(received) > 20
    print(f"established connection kept: {received} echoes, longest gap {max_gap_ms} ms")
    assert connects("client-other", workload["server"]), "new connections after the restart"


NODE_LEFTOVERS = r"""
left=""
for p in /etc/cni/net.d/05-cilia.conflist /opt/cni/bin/cilia-cni /opt/cni/bin/cilia-cni.d \
         /sys/fs/bpf/cilia /run/cilia /var/lib/cilia; do
  [ -e "$p" ] && left="$left file:$p"
done
for d in $(ip -o link show | while IFS=': ' read -r _ n _; do echo "${n%@*}"; done); do
  case "$d" in lxc*|cilia_*) left="$left link:$d" ;; esac
  for h in ingress egress; do
    tc filter show dev "$d" "$h" 2>/dev/null | grep -q ' name cil_' && left="$left tc:$d/$h"
  done
  ip -d link show dev "$d" 2>/dev/null | grep -q 'prog/xdp.* name cil_' && left="$left xdp:$d"
done
[ -n "$(ip route show proto 196 2>/dev/null)" ] && left="$left routes:proto-196"
iptables -w -t nat -S CILIA-MASQ >/dev/null 2>&1 && left="$left iptables:CILIA-MASQ"
echo "$left"
"""


def test_helm_uninstall_leaves_nodes_clean(cluster, workload):
    kubectl("delete", "namespace", NAMESPACE, "--wait=true", timeout=300)
    helm_uninstall()
    for kind, name in (("daemonset", "cilia-agent"), ("deployment", "cilia-operator"),
                       ("daemonset", "cilia-node-cleanup"), ("job", "cilia-node-cleanup-wait"),
                       ("configmap", "cilia-config")):
        out = kubectl("-n", SYSTEM, "get", kind, name, "--ignore-not-found", "-o", "name")
        assert not out.strip(), f"{kind}/{name} is left after helm uninstall"
    for node in nodes():
        res = node_exec(node, NODE_LEFTOVERS)
        assert res.returncode == 0, res.stderr
        assert not res.stdout.strip(), f"{node}: left behind:{res.stdout.strip()}"
