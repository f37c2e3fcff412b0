"""cilia installed the way users install it, checked the same way wherever it runs.

`HelmSuite` is the one copy of the checks; a tier subclasses it with a `platform` fixture
(a cluster with no CNI yet) and pytest runs the methods in order:

- tests/cluster/test_helm.py: on `cilia cluster` (real kube-apiserver, kubelet,
  containerd on this machine; the image built by buildah), in the README's test command;
- tests/e2e/kind/test_kind.py: on kind (Docker; the image built by `docker build`), in
  .github/workflows/e2e-kind.yml.

The order: snapshot every node, build and load the image, `helm install --wait`, the
NOTES commands, what the image runs as, traffic and policy, an agent restart under an
established connection, `helm upgrade` to a second build under traffic, and `helm
uninstall`, after which every node must be as it was before the install.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHART = REPO / "charts" / "cilia"
MANIFESTS = HERE / "manifests"
NAMESPACE = "cilia-e2e"
SYSTEM = "kube-system"
RELEASE = "cilia"
PORT = 8080
PROBE = ["python3", "/probe/probe.py"]
SERVICE = f"server.{NAMESPACE}.svc.cluster.local"
POOL_PREFIX = "10.244."
# New connections between running pods may fail for no longer than this while the agents
# are replaced (the chart's promise, charts/cilia/README.md: none at all, since the
# pinned datapath keeps forwarding; the bound leaves room for a loaded machine).
UPGRADE_MAX_GAP_MS = 1000


def wait_for(what: str, fn, timeout: float = 60, interval: float = 1.0):
    """Polls fn until it returns something true; returns it, or fails saying what."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Platform(ABC):
    """A cluster with no CNI yet, and how to reach it and its nodes."""

    name: str
    cni_bin_dir = "/opt/cni/bin"
    cni_conf_dir = "/etc/cni/net.d"

    @abstractmethod
    def kubectl_argv(self) -> list[str]:
        """kubectl with the cluster's kubeconfig or context."""

    @abstractmethod
    def helm_argv(self) -> list[str]:
        """helm with the cluster's kubeconfig or context."""

    @abstractmethod
    def workers(self) -> list[str]:
        """Two nodes that run the test's pods."""

    @abstractmethod
    def node_exec(self, node: str, script: str, env: dict[str, str]) -> (
            subprocess.CompletedProcess):
        """A shell script in the node's own namespaces (its host network and files)."""

    @abstractmethod
    def build_and_load_image(self, tag: str | None = None) -> tuple[str, str]:
        """Builds the image from the Dockerfile and loads it on every node; returns
        (repository, tag) as pods name it. A second tag is a second build."""

    def install_values(self) -> list[str]:
        """--set arguments this cluster needs beyond the chart's defaults."""
        return []

    def run(self, *argv: str, input: str | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, input=input, capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"`{shlex.join(argv)}` failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 300) -> str:
        return self.run(*self.kubectl_argv(), *args, input=input, check=check,
                        timeout=timeout).stdout

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def helm(self, *args: str, timeout: float = 900) -> str:
        return self.run(*self.helm_argv(), "--namespace", SYSTEM, *args,
                        timeout=timeout).stdout

    def nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.kubectl_json("get", "nodes")["items"]]


# ---- what a node holds ----------------------------------------------------------------

LINKS = r"""links() { ip -o link show | while IFS=': ' read -r _ n _; do echo "${n%@*}"; done; }"""

# Everything cilia could leave on a node, printed so that two runs compare: links but the
# pods' (checked on their own), tc filters, XDP, routes, cilia's and the CNI's files, and
# the iptables rules that are not kube-proxy's (counters stripped). Sysctls are set, not
# added, and stay (as with every CNI).
NODE_SNAPSHOT = LINKS + r"""
echo "# links"; links | grep -v '^lxc' | sort
echo "# tc"
for d in $(links); do
  case "$d" in lxc*) continue ;; esac
  for h in ingress egress; do tc filter show dev "$d" "$h" 2>/dev/null | sed "s|^|$d/$h: |"; done
done
echo "# xdp"; ip -d link show | grep -o 'prog/xdp.*' | sed 's/ id [0-9]*//'
echo "# routes"; ip route show | grep -v ' dev lxc' | sort
echo "# files"
for p in "$CNI_BIN" "$CNI_CONF" /sys/fs/bpf /run/cilia /var/lib/cilia; do
  [ -e "$p" ] && find "$p" -maxdepth 3 | sort
done
echo "# iptables"
for t in filter nat mangle raw; do
  iptables-save -t "$t" 2>/dev/null | grep -v -e '^#' -e 'KUBE-' | sed -E 's/\[[0-9]+:[0-9]+\]//'
done
"""

# What must never be left after `helm uninstall`, named one by one.
NODE_LEFTOVERS = LINKS + r"""
left=""
for p in "$CNI_CONF/05-cilia.conflist" "$CNI_BIN/cilia-cni" "$CNI_BIN/cilia-cni.d" \
         /sys/fs/bpf/cilia /run/cilia/cilia.sock /var/lib/cilia/endpoints.json; do
  [ -e "$p" ] && left="$left file:$p"
done
for d in $(links); do
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


def node_script(platform: Platform, node: str, script: str) -> str:
    res = platform.node_exec(node, script, {"CNI_BIN": platform.cni_bin_dir,
                                            "CNI_CONF": platform.cni_conf_dir})
    assert res.returncode == 0, f"{node}: {res.stderr}"
    return res.stdout


# ---- pods -------------------------------------------------------------------------------

def pod(name: str, node: str, image: str, command: list[str], server: bool = False) -> dict:
    container = {
        "name": "c", "image": image, "imagePullPolicy": "Never", "command": command,
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


def pods_not_running(platform: Platform) -> list[str]:
    """Every pod of the cluster that is neither Running and Ready nor Succeeded."""
    bad = []
    for item in platform.kubectl_json("get", "pods", "-A")["items"]:
        phase = item["status"].get("phase")
        if phase == "Succeeded" or (phase == "Running" and _ready(item)):
            continue
        bad.append(f"{item['metadata']['namespace']}/{item['metadata']['name']}: {phase}")
    return bad


def _ready(obj: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in obj["status"].get("conditions", []))


# A merge patch of a CiliaNode's label `cilia-test`, sent with the pod's own service
# account token (argv: node name, JSON value); prints the HTTP status and message.
PATCH_AS_AGENT = """
import json, os, ssl, sys, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
body = {"metadata": {"labels": {"cilia-test": json.loads(sys.argv[2])}}}
req = urllib.request.Request(
    f"https://{host}:{port}/apis/cilia.io/v1alpha1/cilianodes/{sys.argv[1]}",
    data=json.dumps(body).encode(), method="PATCH",
    headers={"Authorization": "Bearer " + open(sa + "/token").read().strip(),
             "Content-Type": "application/merge-patch+json"})
try:
    urllib.request.urlopen(req, context=ssl.create_default_context(cafile=sa + "/ca.crt"))
    print(200)
except urllib.error.HTTPError as err:
    print(err.code, json.load(err).get("message", ""))
"""


class Probe:
    """probe.py running in a pod through `kubectl exec -i`, until stop()."""

    def __init__(self, platform: Platform, client: str, mode: str, host: str):
        self.what = f"{client} {mode} {host}"
        self.proc = subprocess.Popen(
            [*platform.kubectl_argv(), "-n", NAMESPACE, "exec", "-i", client, "--", *PROBE,
             mode, host, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        if first not in ("connected", "dialing"):
            self.proc.kill()
            raise AssertionError(f"{self.what}: {first} {self.proc.stderr.read()}")

    def stop(self) -> list[str]:
        """Ends the probe; returns its result line's fields (see probe.py)."""
        out, err = self.proc.communicate(input="", timeout=60)  # stdin closed: the end
        assert self.proc.returncode == 0, f"{self.what} broke: {out} {err}"
        fields = out.split()
        assert fields and fields[0] == "ok", f"{self.what}: {out} {err}"
        return fields[1:]


# ---- the suite ----------------------------------------------------------------------------

class HelmSuite:
    """The checks, in order; subclasses provide a `platform` fixture (class scope)."""

    @pytest.fixture(scope="class")
    @classmethod
    def state(cls, platform: Platform) -> dict:
        """What one step leaves for the next (the image, the nodes before the install)."""
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def workload(cls, platform: Platform, state: dict) -> dict[str, str]:
        """server and client-same on the first worker, server-other and client-other on
        the second, the Service `server`; returns pod name -> pod IP."""
        assert "image" in state, "cilia is not installed (test_install failed)"
        image = ":".join(state["image"])
        first, second = platform.workers()[:2]
        platform.kubectl("create", "namespace", NAMESPACE)
        platform.kubectl("-n", NAMESPACE, "create", "configmap", "probe",
                         f"--from-file={HERE / 'probe.py'}")
        objs = [
            pod("server", first, image, [*PROBE, "serve", str(PORT)], server=True),
            pod("server-other", second, image, [*PROBE, "serve", str(PORT)], server=True),
            pod("client-same", first, image, ["sleep", "infinity"]),
            pod("client-other", second, image, ["sleep", "infinity"]),
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "server", "namespace": NAMESPACE},
             "spec": {"selector": {"app": "server"},
                      "ports": [{"port": 80, "targetPort": PORT, "protocol": "TCP"}]}},
        ]
        platform.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objs}))
        platform.kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "pod", "--all",
                         "--timeout=180s", timeout=200)
        ips = {p["metadata"]["name"]: p["status"]["podIP"]
               for p in platform.kubectl_json("-n", NAMESPACE, "get", "pods")["items"]}
        assert all(ip.startswith(POOL_PREFIX) for ip in ips.values()), (
            f"pod IPs outside the pool: {ips}")
        return ips

    @pytest.fixture
    def no_policies(self, platform: Platform, workload: dict[str, str]):
        self._delete_policies(platform)
        for client in ("client-same", "client-other"):
            self._expect(platform, client, workload["server"], allowed=True)
        yield workload
        self._delete_policies(platform)

    @staticmethod
    def _delete_policies(platform: Platform) -> None:
        platform.kubectl("-n", NAMESPACE, "delete", "networkpolicies", "--all")
        platform.kubectl("-n", NAMESPACE, "delete", "cilianetworkpolicies", "--all",
                         "--ignore-not-found")

    @staticmethod
    def _connects(platform: Platform, client: str, host: str, port: int = PORT) -> bool:
        res = platform.run(*platform.kubectl_argv(), "-n", NAMESPACE, "exec", client, "--",
                           *PROBE, "connect", host, str(port), "2", check=False, timeout=60)
        return res.returncode == 0

    def _expect(self, platform: Platform, client: str, host: str, allowed: bool,
                port: int = PORT, timeout: float = 30) -> None:
        """Waits (policy is applied asynchronously) until client reaches host or is
        refused."""
        verdict = "reach" if allowed else "be blocked from"
        wait_for(f"{client} to {verdict} {host}:{port}",
                 lambda: self._connects(platform, client, host, port) == allowed,
                 timeout=timeout, interval=1)

    # -- install ------------------------------------------------------------------------

    def test_install(self, platform: Platform, state: dict):
        """Nodes snapshotted with no CNI; `helm install --wait` returns only once every
        agent is Ready; then every node is Ready and every pod Running."""
        nodes = platform.nodes()
        state["before"] = {n: node_script(platform, n, NODE_SNAPSHOT) for n in nodes}
        t0 = time.monotonic()
        state["image"] = repo, tag = platform.build_and_load_image()
        built = time.monotonic() - t0
        t0 = time.monotonic()
        out = platform.helm("install", RELEASE, str(CHART), "--wait", "--timeout", "10m",
                            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
                            "--set", "image.pullPolicy=Never", *platform.install_values())
        helm_took = time.monotonic() - t0
        ds = platform.kubectl_json("-n", SYSTEM, "get", "daemonset", "cilia-agent")["status"]
        assert ds["numberReady"] == ds["desiredNumberScheduled"] == len(nodes), (
            f"helm install --wait returned before every agent was Ready: {ds}")
        wait_for("every node Ready", lambda: all(
            _ready(n) for n in platform.kubectl_json("get", "nodes")["items"]),
            timeout=300, interval=1)
        took = time.monotonic() - t0
        wait_for("every pod Running and Ready", lambda: not pods_not_running(platform),
                 timeout=300, interval=2)
        print(f"\nimage {repo}:{tag} built and loaded in {built:.1f} s; helm install --wait "
              f"{helm_took:.1f} s; install to every node Ready {took:.1f} s")
        assert "NOTES:" in out and "kubectl" in out, out

    def test_notes_commands_work(self, platform: Platform):
        """Every command NOTES.txt tells the user to run works, as written."""
        notes = platform.helm("get", "notes", RELEASE)
        commands = [shlex.split(line.strip()) for line in notes.splitlines()
                    if line.strip().startswith("kubectl ")]
        assert len(commands) >= 8, notes
        for argv in commands:
            out = platform.kubectl(*argv[1:], timeout=120)
            if argv[1] == "run":  # the first pod: an address from a node's pod CIDR
                name = argv[2]
                ip = wait_for(f"{name} to get an address", lambda n=name: platform.kubectl(
                    "get", "pod", n, "-o", "jsonpath={.status.podIP}"), timeout=120)
                assert ip.startswith(POOL_PREFIX), ip
            if argv[1:3] == ["get", "lease"]:
                assert out.strip().startswith("cilia-operator"), f"no leader: {out!r}"

    def test_image_runs_as_the_chart_says(self, platform: Platform):
        """The agent (root with the capabilities to own the node's network, not
        privileged) has the tools to look at the datapath; the operator runs as 65532;
        both have read-only root filesystems; `kubectl logs ds/cilia-agent` shows the
        agent's log."""
        agent = ["-n", SYSTEM, "exec", "ds/cilia-agent", "-c", "agent", "--"]
        operator = ["-n", SYSTEM, "exec", "deploy/cilia-operator", "--"]
        assert "cil_" in platform.kubectl(*agent, "bpftool", "prog", "show")
        for tool in (["ip", "-V"], ["iptables", "-V"], ["tc", "-V"]):
            platform.kubectl(*agent, *tool)
        assert platform.kubectl(*operator, "id", "-u").strip() == "65532"
        for target in (agent, operator):
            res = platform.run(*platform.kubectl_argv(), *target, "touch", "/written",
                               check=False)
            assert res.returncode != 0 and "Read-only file system" in res.stderr, res
        logs = platform.kubectl("-n", SYSTEM, "logs", "ds/cilia-agent", "-c", "agent")
        assert "cilia.agent" in logs, logs[-2000:]
        spec = platform.kubectl_json("-n", SYSTEM, "get", "daemonset", "cilia-agent")
        privileged = {c["name"] for c in (spec["spec"]["template"]["spec"]["initContainers"] +
                                          spec["spec"]["template"]["spec"]["containers"])
                      if c.get("securityContext", {}).get("privileged")}
        assert privileged == {"mount-bpf-fs", "apply-sysctls"}, privileged
        caps = next(c for c in spec["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "agent")["securityContext"]["capabilities"]
        assert caps["drop"] == ["ALL"] and "SYS_ADMIN" in caps["add"], caps
        dep = platform.kubectl_json("-n", SYSTEM, "get", "deployment", "cilia-operator")
        op = dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert not op.get("privileged") and op.get("readOnlyRootFilesystem"), op

    def test_an_agent_may_write_only_its_own_cilianode(self, platform: Platform):
        """With the agent's own token, from inside its pod: a change to another node's
        CiliaNode is refused by the chart's ValidatingAdmissionPolicy, one to its own
        node's is allowed (RBAC alone would allow both)."""
        agent = self._agents(platform)[0]
        own = agent["spec"]["nodeName"]
        other = next(n for n in platform.nodes() if n != own)

        def patch(node: str, value) -> str:
            return platform.kubectl(
                "-n", SYSTEM, "exec", agent["metadata"]["name"], "-c", "agent", "--",
                "python3", "-c", PATCH_AS_AGENT, node, json.dumps(value)).strip()

        refused = patch(other, "x")
        assert refused.startswith("403") and "its own node" in refused, refused
        assert patch(own, "x") == "200"
        assert patch(own, None) == "200"  # the label off again

    def test_every_node_has_a_pod_cidr_from_the_pool(self, platform: Platform):
        cilia_nodes = platform.kubectl_json("get", "cilianodes")["items"]
        assert {n["metadata"]["name"] for n in cilia_nodes} == set(platform.nodes())
        cidrs = [n["spec"]["podCIDRs"][0] for n in cilia_nodes]
        assert len(set(cidrs)) == len(cidrs) and all(c.startswith(POOL_PREFIX) for c in cidrs)
        dep = platform.kubectl_json("-n", SYSTEM, "get", "deployment", "cilia-operator")
        assert dep["status"].get("readyReplicas") == dep["spec"]["replicas"]

    # -- traffic and policy -------------------------------------------------------------

    def test_pod_to_pod_same_node(self, platform: Platform, workload):
        assert self._connects(platform, "client-same", workload["server"])

    def test_pod_to_pod_across_nodes(self, platform: Platform, workload):
        assert self._connects(platform, "client-other", workload["server"])
        assert self._connects(platform, "client-same", workload["server-other"])

    def test_pod_to_service(self, platform: Platform, workload):
        assert self._connects(platform, "client-other", SERVICE, 80), (
            "by name (CoreDNS, itself on cilia)")
        cluster_ip = platform.kubectl("-n", NAMESPACE, "get", "service", "server", "-o",
                                      "jsonpath={.spec.clusterIP}")
        assert self._connects(platform, "client-same", cluster_ip, 80)

    def test_default_deny(self, platform: Platform, no_policies):
        platform.kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"))
        server = no_policies["server"]
        self._expect(platform, "client-same", server, allowed=False)
        self._expect(platform, "client-other", server, allowed=False)
        assert not self._connects(platform, "client-other", SERVICE, 80)

    def test_policy_allowing_one_peer(self, platform: Platform, no_policies):
        platform.kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"), "-f",
                         str(MANIFESTS / "allow-one-peer.yaml"))
        server = no_policies["server"]
        self._expect(platform, "client-other", server, allowed=False)
        self._expect(platform, "client-same", server, allowed=True)
        assert self._connects(platform, "client-same", SERVICE, 80)

    def test_cilia_network_policy_deny(self, platform: Platform, no_policies):
        platform.kubectl("apply", "-f", str(MANIFESTS / "cilia-deny.yaml"))
        server = no_policies["server"]
        self._expect(platform, "client-same", server, allowed=False)
        self._expect(platform, "client-other", server, allowed=True)
        valid = platform.kubectl(
            "-n", NAMESPACE, "get", "cilianetworkpolicy", "deny-client-same", "-o",
            "jsonpath={.status.conditions[?(@.type=='Valid')].status}")
        assert valid in ("True", ""), f"the operator found the policy invalid: {valid}"

    def test_policies_add_up_and_removal_restores(self, platform: Platform, no_policies):
        """Policies are a union: default deny isolates the server, then a
        CiliaNetworkPolicy allowing the namespace (but denying client-same) lets
        client-other back in; deleting both lets everyone in again."""
        server = no_policies["server"]
        platform.kubectl("apply", "-f", str(MANIFESTS / "default-deny.yaml"))
        self._expect(platform, "client-other", server, allowed=False)
        self._expect(platform, "client-same", server, allowed=False)
        platform.kubectl("apply", "-f", str(MANIFESTS / "cilia-deny.yaml"))
        self._expect(platform, "client-other", server, allowed=True)
        self._expect(platform, "client-same", server, allowed=False)
        platform.kubectl("delete", "-f", str(MANIFESTS / "default-deny.yaml"), "-f",
                         str(MANIFESTS / "cilia-deny.yaml"))
        self._expect(platform, "client-other", server, allowed=True)
        self._expect(platform, "client-same", server, allowed=True)

    # -- the agents replaced ------------------------------------------------------------

    def _agents(self, platform: Platform) -> list[dict]:
        return platform.kubectl_json("-n", SYSTEM, "get", "pods", "-l",
                                     "app.kubernetes.io/name=cilia-agent")["items"]

    def test_agent_restart_keeps_established_connection(self, platform: Platform,
                                                        workload):
        """Across nodes, one TCP connection echoing every 100 ms while the agents of both
        nodes are deleted and replaced: the pinned datapath keeps forwarding."""
        workers = platform.workers()[:2]
        stream = Probe(platform, "client-other", "stream", workload["server"])
        try:
            time.sleep(2)
            old = [p["metadata"]["name"] for p in self._agents(platform)
                   if p["spec"]["nodeName"] in workers]
            assert len(old) == 2
            platform.kubectl("-n", SYSTEM, "delete", "pod", *old, "--wait=true", timeout=180)

            def replaced() -> bool:
                fresh = [p for p in self._agents(platform) if p["spec"]["nodeName"] in workers
                         and p["metadata"]["name"] not in old and _ready(p)]
                return len(fresh) == 2

            wait_for("new agents Ready on both nodes", replaced, timeout=300, interval=2)
            time.sleep(3)
        finally:
            sent, received, max_gap_ms = stream.stop()
        assert int(sent) == int(received) > 20
        print(f"\nestablished connection kept: {received} echoes, longest gap {max_gap_ms} ms")
        assert self._connects(platform, "client-other", workload["server"]), (
            "new connections after the restart")

    def test_upgrade_under_traffic(self, platform: Platform, workload, state: dict):
        """`helm upgrade` to a second build of the image (a changed tag) while four
        long-lived connections (same node and across, both ways) and a new connection
        every 50 ms from each node run: none of the four is reset, and new connections
        stop working for no longer than UPGRADE_MAX_GAP_MS."""
        repo, tag = state["image"]
        t0 = time.monotonic()
        repo2, tag2 = platform.build_and_load_image(f"{tag}-upgrade")
        assert tag2 != tag
        built = time.monotonic() - t0
        streams = [Probe(platform, c, "stream", workload[s])
                   for c in ("client-same", "client-other") for s in ("server", "server-other")]
        dials = [Probe(platform, "client-same", "dial", workload["server-other"]),
                 Probe(platform, "client-other", "dial", workload["server"])]
        try:
            time.sleep(2)
            t0 = time.monotonic()
            platform.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--wait",
                          "--timeout", "10m", "--set", f"image.repository={repo2}",
                          "--set", f"image.tag={tag2}")
            platform.kubectl("-n", SYSTEM, "rollout", "status", "daemonset/cilia-agent",
                             "--timeout=300s", timeout=320)
            rolled = time.monotonic() - t0
            time.sleep(3)
        finally:
            stream_results = [s.stop() for s in streams]
            dial_results = [d.stop() for d in dials]
        images = {c["image"] for p in self._agents(platform) for c in p["spec"]["containers"]}
        assert images == {f"{repo2}:{tag2}"}, images
        for (sent, received, _), s in zip(stream_results, streams, strict=True):
            assert int(sent) == int(received) > 20, s.what
        longest = max(int(r[2]) for r in dial_results)
        failures = sum(int(r[1]) for r in dial_results)
        attempts = sum(int(r[0]) for r in dial_results)
        print(f"\nsecond image built in {built:.1f} s; helm upgrade and rollout {rolled:.1f} s; "
              f"4 connections kept (longest echo gap {max(int(r[2]) for r in stream_results)}"
              f" ms); new connections: {attempts} attempts, {failures} failed, longest gap "
              f"{longest} ms")
        assert longest <= UPGRADE_MAX_GAP_MS, dial_results
        state["image"] = (repo2, tag2)

    # -- uninstall ----------------------------------------------------------------------

    def test_uninstall_leaves_nodes_as_before(self, platform: Platform, state: dict):
        platform.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--ignore-not-found",
                         timeout=300)
        platform.helm("uninstall", RELEASE, "--wait", "--timeout", "5m")
        for kind, name in (("daemonset", "cilia-agent"), ("deployment", "cilia-operator"),
                           ("daemonset", "cilia-node-cleanup"),
                           ("job", "cilia-node-cleanup-wait"), ("configmap", "cilia-config")):
            out = platform.kubectl("-n", SYSTEM, "get", kind, name, "--ignore-not-found", "-o",
                                   "name")
            assert not out.strip(), f"{kind}/{name} is left after helm uninstall"
        for node, before in state["before"].items():
            left = node_script(platform, node, NODE_LEFTOVERS).strip()
            assert not left, f"{node}: left behind: {left}"
            after = node_script(platform, node, NODE_SNAPSHOT)
            assert after == before, f"{node} differs from before the install:\n" + "\n".join(
                _diff(before, after))


def _diff(before: str, after: str) -> list[str]:
    import difflib

    return list(difflib.unified_diff(before.splitlines(), after.splitlines(), "before",
                                     "after", lineterm=""))
