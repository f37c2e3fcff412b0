"""`cilia connectivity test`: what a user or a provider checks a cilia network with, run
against the lab or a `cilia cluster` (real Kubernetes: the pods are agnhost's, made with
kubectl): pod to pod on one node and across nodes, pod to Service, pod to its node and
the node to a pod, pod to the world and the world to a pod, DNS (in a cluster: CoreDNS
through its Service), a policy that allows and one that denies, and the same traffic
through a restart of every agent. A readable report, one line per check, and for a
failure the flows that explain it (the agents' flow history, cilia observe's).

One suite of checks (Connectivity) over two ways of making pods and sending traffic
(LabConnectivity, ClusterConnectivity). Everything it makes lives in its own namespace
and goes away afterwards.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cilia.api.v1 import cilia_pb2
from cilia.client import AgentClient

PORT = 8080  # the echo servers in pods (TCP; UDP on UDP_PORT)
UDP_PORT = 8080
NODE_PORT = 9090  # the lab's server on its first node


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped, with why in `detail`
    detail: str
    flows: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "skipped" if self.ok is None else "ok" if self.ok else "FAIL"


class Connectivity:
    """The checks, over what a subclass provides: pods, traffic, policies, restarts."""

    namespace = "cilia-test"
    udp_port = UDP_PORT

    # ---- what a subclass provides ----------------------------------------------------

    def setup(self) -> None: ...
    def teardown(self) -> None: ...
    def probe(self, src: str, host: str, port: int, proto: str, timeout: float
              ) -> str | None:
        """The answer `src` (a pod's name, or "node", or "outside") gets, or None."""
        raise NotImplementedError

    def who(self, answer: str | None) -> str:
        """Which server an answer came from ("" none, or cannot tell)."""
        raise NotImplementedError

    def answered_by(self, answer: str | None, server: str) -> bool:
        return answer is not None and self.who(answer) in (server, "?")

    def pod_ip(self, name: str) -> str: ...
    def node_target(self) -> tuple[str, int, str]:
        """(host, port, expected answerer) a pod reaches on its own node."""
        raise NotImplementedError

    def world_target(self) -> tuple[str, int, str]: ...
    def service_ip(self) -> str | None: ...
    def dns(self) -> Check: ...
    def put(self, obj: dict) -> None: ...
    def delete(self, kind: str, name: str) -> None: ...
    def synced(self) -> None: ...
    def restart_agents(self) -> int: ...
    def agent_sockets(self) -> list[str]: ...
    def nodes(self) -> int: ...
    def servers(self) -> list[str]:
        return ["server-1", "server-2"] if self.nodes() > 1 else ["server-1"]

    # ---- the checks ------------------------------------------------------------------

    def run(self) -> list[Check]:
        host, port, who = self.node_target()
        world, wport, wwho = self.world_target()
        return [
            self._attempt("pod to pod, same node", "client", self.pod_ip("server-1"),
                          "server-1", ("client", "server-1")),
            self._attempt("pod to pod, other node", "client", self.pod_ip("server-2"),
                          "server-2", ("client", "server-2"))
            if self.nodes() > 1 else
            Check("pod to pod, other node", None, "one node only (the lab: cilia lab up "
                  "--nodes 2)"),
            self._service(),
            self._attempt("pod to host", "client", host, who, ("client",), port=port,
                          protos=("tcp",)),
            self._attempt("host to pod", "node", self.pod_ip("server-1"), "server-1",
                          ("server-1",), protos=("tcp",)),
            self._attempt("pod to world", "client", world, wwho, ("client",), port=wport,
                          protos=("tcp",)),
            self._attempt("world to pod", "outside", self.pod_ip("server-1"), "server-1",
                          ("server-1",), protos=("tcp",)),
            self.dns(),
            *self._policies(),
            self._through_restart(),
        ]

    def _attempt(self, name: str, src: str, host: str, want: str | None,
                 flows_of: tuple[str, ...], port: int = PORT,
                 protos: tuple[str, ...] = ("tcp", "udp")) -> Check:
        """`src` reaches host:port answered by `want` (None: must not be answered), over
        each protocol; a failure carries the flows of its window."""
        since, details, ok = time.time(), [], True
        for proto in protos:
            answer = self.probe(src, host, self.udp_port if proto == "udp" else port, proto,
                                2 if want else 1)
            good = self.answered_by(answer, want) if want else answer is None
            ok &= good
            details.append(f"{proto}: {_short(answer) if answer is not None else 'no answer'}")
        check = Check(name, ok, f"{src} -> {host}:{port} " + ", ".join(details)
                      + ("" if want else " (refused, as it must be)" if ok else
                         " (NOT refused)"))
        if not ok:
            check.flows = self._flows(since, flows_of)
        return check

    def _service(self) -> Check:
        """Several connections to the Service's ClusterIP: each answered by a backend."""
        ip = self.service_ip()
        if ip is None:
            return Check("pod to Service", False, f"no ClusterIP for {self.namespace}/echo")
        since = time.time()
        answers = [self.probe("client", ip, PORT, "tcp", 2) for _ in range(6)]
        by = sorted({self.who(a) for a in answers if a is not None})
        ok = all(a is not None and self.who(a) in self.servers() for a in answers)
        return Check("pod to Service", ok, f"client -> {ip}:{PORT} (ClusterIP): "
                     f"{sum(a is not None for a in answers)}/6 answered, by "
                     f"{', '.join(by) or 'none'}",
                     [] if ok else self._flows(since, ("client",)))

    def _policies(self) -> list[Check]:
        """A NetworkPolicy that lets only app=client in, then a CiliaNetworkPolicy that
        denies app=client: each judged both ways, then removed and traffic back."""
        out = []
        server = self.pod_ip("server-1")
        self.put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "allow-client", "namespace": self.namespace},
                  "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                           "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {
                               "app": "client"}}}], "ports": [
                               {"port": PORT, "protocol": "TCP"},
                               {"port": self.udp_port, "protocol": "UDP"}]}]}})
        self.synced()
        out.append(self._attempt("allow policy: allowed pod", "client", server, "server-1",
                                 ("client",)))
        out.append(self._attempt("allow policy: other pod refused", "other", server, None,
                                 ("other",)))
        self.put({"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
                  "metadata": {"name": "deny-client", "namespace": self.namespace},
                  "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                           "ingressDeny": [{"fromEndpoints": [{"matchLabels": {
                               "app": "client"}}]}]}})
        self.synced()
        out.append(self._attempt("deny policy: denied pod refused", "client", server, None,
                                 ("client",)))
        self.delete("CiliaNetworkPolicy", "deny-client")
        self.delete("NetworkPolicy", "allow-client")
        self.synced()
        out.append(self._attempt("policies removed: traffic back", "other", server,
                                 "server-1", ("other",)))
        return out

    def _through_restart(self) -> Check:
        """The same traffic, round after round, while each node's agent restarts in
        turn: pod to pod on both nodes, to the Service, to the host, to the world; the
        datapath keeps working without its agent. (Policies are not changed meanwhile:
        with no agent, nothing would write them.)"""
        host, port, who = self.node_target()
        world, wport, wwho = self.world_target()
        service = self.service_ip()
        targets = [(self.pod_ip(n), PORT, n, f"pod {n}") for n in self.servers()]
        if service:
            targets.append((service, PORT, None, "the Service"))
        targets += [(host, port, who, "the host"), (world, wport, wwho, "the world")]
        stop = threading.Event()
        tried, failed = [0], []

        def traffic() -> None:
            while not stop.is_set():
                for ip, to_port, name, what in targets:
                    answer = self.probe("client", ip, to_port, "tcp", 2)
                    tried[0] += 1
                    good = (answer is not None and self.who(answer) in self.servers()
                            if name is None else self.answered_by(answer, name))
                    if not good:
                        failed.append(f"{what} at {time.strftime('%H:%M:%S')}")
                stop.wait(0.2)

        since = time.time()
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            restarted = self.restart_agents()
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join(timeout=60)
        ok = not failed and tried[0] > 0
        return Check("through agent restarts", ok,
                     f"{tried[0] - len(failed)}/{tried[0]} connections answered while "
                     f"{restarted} agent(s) restarted" +
                     (f"; unanswered: {', '.join(failed[:5])}" if failed else ""),
                     [] if ok else self._flows(since, ("client",)))

    def _flows(self, since: float, pods: tuple[str, ...]) -> list[str]:
        """The flows every node saw since `since` from or to `pods`, in time order."""
        from cilia.observe import compact, history

        request = cilia_pb2.ObserveRequest(since=since, filter=cilia_pb2.FlowFilter(
            pod=[f"{self.namespace}/{p}" for p in pods]))
        try:
            events = history([AgentClient(s, timeout=5) for s in self.agent_sockets()],
                             request)
        except Exception as err:  # noqa: BLE001 - the report says why there are none
            return [f"(flows unavailable: {err})"]
        return [compact(e) for e in events[-12:]] or ["(no flow event: the datapath "
                                                      "reported nothing for these pods)"]


def _short(answer: str) -> str:
    line = answer.strip().splitlines()[0] if answer.strip() else "(empty)"
    return line[:60]


# ---- the lab ----------------------------------------------------------------------


def _lab_pod(name: str, namespace: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "echo", "image": "none",
                                     "ports": [{"name": "echo", "containerPort": PORT}]}]}}


class LabConnectivity(Connectivity):
    """Pods through the lab's CNI, echo servers and probes of cilia/lab/probe.py; the
    world is the lab's outside network; DNS: the lab runs none."""

    def __init__(self, lab):
        from cilia.lab.lab import UNDERLAY

        self.lab = lab
        self.state = lab.load()
        self.pods: dict[str, object] = {}
        self.procs = []
        self.objects: list[tuple[str, str, str]] = []
        self.outside_ip = str(UNDERLAY.network_address + 1)

    def nodes(self) -> int:
        return len(self.state.nodes)

    def setup(self) -> None:
        from cilia.lab.traffic import start_server

        first, last = self.state.nodes[0].name, self.state.nodes[-1].name
        self.put({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": self.namespace}})
        for name, labels, node in (("client", {"app": "client"}, first),
                                   ("other", {"app": "other"}, first),
                                   ("server-1", {"app": "server"}, first),
                                   ("server-2", {"app": "server"}, last)):
            if name == "server-2" and self.nodes() == 1:
                continue
            self.put(_lab_pod(name, self.namespace, labels))
            self.pods[name] = self.lab.run_pod(_lab_pod(name, self.namespace, labels), node)
        self.put({"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "echo", "namespace": self.namespace},
                  "spec": {"selector": {"app": "server"},
                           "ports": [{"name": "echo", "port": PORT, "targetPort": "echo"}]}})
        for name in self.servers():
            self.procs.append(start_server(self.lab, f"{self.namespace}/{name}", PORT, name))
        self.procs.append(start_server(self.lab, f"node:{first}", NODE_PORT, first))
        self.procs.append(start_server(self.lab, "outside", 9000, "outside"))
        self.synced()

    def teardown(self) -> None:
        from cilia.lab.traffic import stop_servers

        stop_servers(self.procs)
        for name in list(self.pods):
            self.lab.remove_pod(self.namespace, name)
        for kind, ns, name in reversed(self.objects):
            self.lab.datastore.delete(kind, ns, name)

    def _target(self, src: str) -> str:
        return {"node": f"node:{self.state.nodes[0].name}", "outside": "outside"}.get(
            src, f"{self.namespace}/{src}")

    def probe(self, src, host, port, proto, timeout):
        from cilia.lab.traffic import probe

        return probe(self.lab, self._target(src), host, port, proto, timeout)

    def who(self, answer):
        return answer.split(":", 1)[0] if answer else ""

    def pod_ip(self, name):
        return self.pods[name].ip

    def node_target(self):
        node = self.state.nodes[0]
        return node.underlay_ip, NODE_PORT, node.name

    def world_target(self):
        return self.outside_ip, 9000, "outside"

    def service_ip(self):
        return next((s.ip for s in AgentClient(self.state.nodes[0].socket).services()
                     if s.service == f"{self.namespace}/echo" and s.port == PORT
                     and s.type == "ClusterIP"), None)

    def dns(self):
        return Check("DNS", None, "the lab runs no cluster DNS (cilia --cluster NAME "
                     "connectivity test checks CoreDNS)")

    def put(self, obj):
        meta = obj["metadata"]
        self.lab.datastore.put(obj)
        self.objects.append((obj["kind"], meta.get("namespace", ""), meta["name"]))

    def delete(self, kind, name):
        self.lab.datastore.delete(kind, self.namespace, name)
        self.objects.remove((kind, self.namespace, name))

    def synced(self):
        for node in self.state.nodes:
            AgentClient(node.socket).wait_policy_synced()

    def restart_agents(self):
        for node in self.state.nodes:
            self.lab.restart_agent(node.name)
        return self.nodes()

    def agent_sockets(self):
        return [n.socket for n in self.state.nodes]


# ---- a cilia cluster (real Kubernetes) -----------------------------------------------


class ClusterConnectivity(Connectivity):
    """Pods of the e2e suites' agnhost (netexec servers: HTTP and UDP; clients run
    `agnhost connect`), made and judged through the cluster's kubectl and API; the node is
    a hostNetwork pod; the world is the cluster's outside network, where its API server
    runs; DNS is CoreDNS through its Service."""

    udp_port = 8081  # netexec's UDP port

    def __init__(self, cluster):
        from cilia.cluster import upstream

        self.cluster = cluster
        self.state = cluster.load()
        self.namespace = f"cilia-test-{secrets.token_hex(2)}"
        self.image = ("registry.k8s.io/e2e-test-images/agnhost:"
                      f"{upstream.pins()['AGNHOST_VERSION']}")
        self.ips: dict[str, str] = {}

    def nodes(self) -> int:
        return len(self.state.nodes)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def _pod(self, name: str, node: str, labels: dict, args: list[str],
             host_network: bool = False) -> dict:
        spec: dict = {"nodeName": node, "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "c", "image": self.image,
                                      "imagePullPolicy": "Never", "args": args}]}
        if host_network:
            spec["hostNetwork"] = True
        return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels}}

    def setup(self) -> None:
        first, last = self.state.nodes[0].name, self.state.nodes[-1].name
        serve = ["netexec", f"--http-port={PORT}", f"--udp-port={self.udp_port}"]
        objs = [{"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": self.namespace}},
                self._pod("client", first, {"app": "client"}, ["pause"]),
                self._pod("other", first, {"app": "other"}, ["pause"]),
                self._pod("node", first, {"app": "node"}, ["pause"], host_network=True),
                self._pod("server-1", first, {"app": "server"}, serve),
                {"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "echo", "namespace": self.namespace},
                 "spec": {"selector": {"app": "server"},
                          "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}}]
        if self.nodes() > 1:
            objs.append(self._pod("server-2", last, {"app": "server"}, serve))
        import yaml

        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs, sort_keys=False))
        pods = ["client", "other", "node", *self.servers()]
        self.kubectl("-n", self.namespace, "wait", "--for=condition=Ready", "--timeout=120s",
                     *[f"pod/{p}" for p in pods], timeout=130)
        for p in pods:
            self.ips[p] = json.loads(self.kubectl(
                "-n", self.namespace, "get", "pod", p, "-o", "json").stdout)["status"]["podIP"]

    def teardown(self) -> None:
        self.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)

    def probe(self, src, host, port, proto, timeout):
        """To a netexec server over TCP: its /hostname (the pod's name: who answered);
        otherwise agnhost's connect (or, from the outside network, cilia's probe), which
        says only that something answered ("?")."""
        if src == "outside":
            http = proto == "tcp" and port == PORT  # netexec: ask for its /hostname
            argv = ["ip", "netns", "exec", self.state.outside_netns, sys.executable, "-m",
                    "cilia.lab.probe", "connect", host, str(port), "--proto", proto,
                    "--timeout", str(timeout)]
            if http:
                argv += ["--message", "GET /hostname HTTP/1.0\r\n\r\n"]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
            if res.returncode != 0:
                return None
            lines = [line.strip() for line in res.stdout.splitlines() if line.strip()]
            return lines[-1] if http and lines else "?"
        if proto == "tcp" and port == PORT:
            res = self.kubectl("-n", self.namespace, "exec", src, "--", "curl", "-s",
                               "--max-time", str(timeout), f"http://{host}:{port}/hostname",
                               check=False, timeout=timeout + 30)
            return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None
        res = self.kubectl("-n", self.namespace, "exec", src, "--", "/agnhost", "connect",
                           f"{host}:{port}", f"--timeout={timeout}s", f"--protocol={proto}",
                           check=False, timeout=timeout + 30)
        return "?" if res.returncode == 0 else None

    def who(self, answer):
        return (answer or "").strip()

    def pod_ip(self, name):
        return self.ips[name]

    def node_target(self):
        node = self.state.nodes[0]
        return node.ip, 10250, node.name  # the kubelet's API, on every address

    def world_target(self):
        gw = self.cluster.gw
        return gw, 6443, "the API server"

    def service_ip(self):
        svc = json.loads(self.kubectl("-n", self.namespace, "get", "service", "echo", "-o",
                                      "json").stdout)
        return svc["spec"].get("clusterIP")

    def dns(self):
        name = f"echo.{self.namespace}.svc.cluster.local"
        want = self.service_ip()
        since = time.time()
        res = self.kubectl("-n", self.namespace, "exec", "client", "--", "getent", "hosts",
                           name, check=False, timeout=60)
        got = res.stdout.split()[0] if res.returncode == 0 and res.stdout.strip() else ""
        ok = bool(want) and got == want
        return Check("DNS", ok, f"client resolves {name}: {got or 'nothing'} (the "
                     f"Service's ClusterIP: {want})", [] if ok else
                     self._flows(since, ("client",)))

    def put(self, obj):
        import yaml

        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj, sort_keys=False))

    def delete(self, kind, name):
        resource = {"NetworkPolicy": "networkpolicy",
                    "CiliaNetworkPolicy": "cilianetworkpolicy"}[kind]
        self.kubectl("-n", self.namespace, "delete", resource, name, "--wait=false",
                     check=False)

    def synced(self):
        time.sleep(0.5)  # the informers' watch events
        for sock in self.agent_sockets():
            AgentClient(sock).wait_policy_synced()

    def restart_agents(self):
        if self.state.cilia == "process":
            for node in self.state.nodes:
                self.cluster.restart_process(f"cilia-agent-{node.name}")
            return self.nodes()
        for node in self.state.nodes:  # helm: the DaemonSet's pod on each node
            self.kubectl("-n", "kube-system", "delete", "pod", "-l",
                         "app.kubernetes.io/component=agent", "--field-selector",
                         f"spec.nodeName={node.name}", "--wait=true", timeout=120)
            self.kubectl("-n", "kube-system", "rollout", "status", "daemonset/cilia-agent",
                         "--timeout=120s", timeout=130)
        return self.nodes()

    def agent_sockets(self):
        return [f"{n.run_dir}/run-cilia/cilia.sock" for n in self.state.nodes]


def run(test: Connectivity, keep: bool = False, say: Callable[[str], None] = print
        ) -> list[Check]:
    say(f"cilia connectivity test: {test.nodes()} node(s), namespace {test.namespace}")
    try:
        test.setup()
        return test.run()
    finally:
        if not keep:
            test.teardown()


def report(checks: list[Check]) -> list[str]:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"  {c.result:7}  {c.name:{width}}  {c.detail}")
        lines.extend(f"             {f}" for f in c.flows)
    failed = sum(c.ok is False for c in checks)
    passed = sum(bool(c.ok) for c in checks)
    skipped = sum(c.ok is None for c in checks)
    lines.append(f"\n{passed} passed, {failed} failed, {skipped} skipped")
    return lines
