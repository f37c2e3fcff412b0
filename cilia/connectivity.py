"""`cilia connectivity test`: what a user or a provider checks a cilia network with, run
against the lab: pod to pod on one node and across nodes, pod to Service, pod to its
node and the node to a pod, pod to the world and the world to a pod, a policy that
allows and one that denies, and the same traffic through a restart of every agent. A
readable report, one line per check, and for a failure the flows that explain it (the
agents' flow history, cilia observe's).

Everything it makes lives in its own namespace, cilia-test, and goes away afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cilia.api.v1 import cilia_pb2
from cilia.client import AgentClient
from cilia.lab.lab import UNDERLAY, Lab
from cilia.lab.traffic import probe, start_server, stop_servers

NAMESPACE = "cilia-test"
PORT = 8080  # the echo servers in pods
NODE_PORT = 9090  # on the first node
OUTSIDE_PORT = 9000  # in the lab's outside network
OUTSIDE_IP = str(UNDERLAY.network_address + 1)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped, with why in `detail`
    detail: str
    flows: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "skipped" if self.ok is None else "ok" if self.ok else "FAIL"


def _pod(name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": [{"name": "echo", "image": "none",
                                     "ports": [{"name": "echo", "containerPort": PORT}]}]}}


class LabConnectivity:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.state = lab.load()
        self.nodes = self.state.nodes
        self.pods: dict[str, object] = {}
        self.servers = []
        self.objects: list[tuple[str, str, str]] = []

    # ---- set up and tear down --------------------------------------------------------

    def setup(self) -> None:
        first, last = self.nodes[0].name, self.nodes[-1].name
        self._put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        for name, labels, node in (("client", {"app": "client"}, first),
                                   ("other", {"app": "other"}, first),
                                   ("server-1", {"app": "server"}, first),
                                   ("server-2", {"app": "server"}, last)):
            if name == "server-2" and len(self.nodes) == 1:
                continue
            self._put(_pod(name, labels))
            self.pods[name] = self.lab.run_pod(_pod(name, labels), node)
        self._put({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "echo", "namespace": NAMESPACE},
                   "spec": {"selector": {"app": "server"},
                            "ports": [{"name": "echo", "port": PORT, "targetPort": "echo"}]}})
        for name in ("server-1", "server-2"):
            if name in self.pods:
                self.servers.append(start_server(self.lab, f"{NAMESPACE}/{name}", PORT, name))
        self.servers.append(start_server(self.lab, f"node:{first}", NODE_PORT, first))
        self.servers.append(start_server(self.lab, "outside", OUTSIDE_PORT, "outside"))
        self._synced()

    def teardown(self) -> None:
        stop_servers(self.servers)
        for name in list(self.pods):
            self.lab.remove_pod(NAMESPACE, name)
        for kind, ns, name in reversed(self.objects):
            self.lab.datastore.delete(kind, ns, name)

    def _put(self, obj: dict) -> None:
        meta = obj["metadata"]
        self.lab.datastore.put(obj)
        self.objects.append((obj["kind"], meta.get("namespace", ""), meta["name"]))

    def _delete(self, kind: str, name: str) -> None:
        self.lab.datastore.delete(kind, NAMESPACE, name)
        self.objects.remove((kind, NAMESPACE, name))

    def _synced(self) -> None:
        for node in self.nodes:
            AgentClient(node.socket).wait_policy_synced()

    # ---- the checks ------------------------------------------------------------------

    def run(self) -> list[Check]:
        checks = [
            self._reach("pod to pod, same node", "client", "server-1"),
            self._reach("pod to pod, other node", "client", "server-2")
            if "server-2" in self.pods else
            Check("pod to pod, other node", None, "the lab has one node (cilia lab up "
                  "--nodes 2 for this check)"),
            self._service(),
            self._to("pod to host", "client", self.nodes[0].underlay_ip, NODE_PORT,
                     self.nodes[0].name),
            self._from("host to pod", f"node:{self.nodes[0].name}", "server-1"),
            self._to("pod to world", "client", OUTSIDE_IP, OUTSIDE_PORT, "outside"),
            self._from("world to pod", "outside", "server-1"),
            Check("DNS", None, "the lab runs no cluster DNS (the cluster's CoreDNS is "
                  "checked by the sig-network suites: scripts/e2e-upstream.sh)"),
            *self._policies(),
            self._through_restart(),
        ]
        return checks

    def _target(self, pod: str) -> str:
        return f"{NAMESPACE}/{pod}"

    def _attempt(self, name: str, src: str, host: str, port: int, want: str | None,
                 protos: tuple[str, ...] = ("tcp", "udp"), flows_of: tuple = ()) -> Check:
        """One check: `src` reaches host:port with the answer from `want` (None: must not
        be answered), over each protocol; the flows of the window when it fails."""
        since = time.time()
        details = []
        ok = True
        for proto in protos:
            answer = probe(self.lab, src, host, port, proto, timeout=2 if want else 1)
            good = (answer is not None and answer.startswith(f"{want}:")) if want \
                else answer is None
            ok &= good
            details.append(f"{proto}: {answer or 'no answer'}")
        check = Check(name, ok, f"{src} -> {host}:{port} " + ", ".join(details)
                      + ("" if want else " (refused, as it must be)" if ok else
                         " (NOT refused)"))
        if not ok:
            check.flows = self._flows(since, flows_of)
        return check

    def _reach(self, name: str, src: str, dst: str) -> Check:
        return self._attempt(name, self._target(src), self.pods[dst].ip, PORT, dst,
                             flows_of=(self._target(src), self._target(dst)))

    def _to(self, name: str, src: str, host: str, port: int, want: str) -> Check:
        return self._attempt(name, self._target(src), host, port, want,
                             flows_of=(self._target(src),))

    def _from(self, name: str, src: str, dst: str) -> Check:
        return self._attempt(name, src, self.pods[dst].ip, PORT, dst, ("tcp",),
                             flows_of=(self._target(dst),))

    def _service(self) -> Check:
        """Several connections to the Service's ClusterIP: each answered by a backend."""
        ip = next((s.ip for s in AgentClient(self.nodes[0].socket).services()
                   if s.service == f"{NAMESPACE}/echo" and s.port == PORT
                   and s.type == "ClusterIP"), None)
        if ip is None:
            return Check("pod to Service", False, "the agent has no frontend for "
                         f"{NAMESPACE}/echo (cilia service list)")
        since, answers = time.time(), []
        for _ in range(6):
            answers.append(probe(self.lab, self._target("client"), ip, PORT))
        ok = all(a and a.split(":")[0].startswith("server-") for a in answers)
        backends = sorted({a.split(":")[0] for a in answers if a})
        return Check("pod to Service", ok, f"client -> {ip}:{PORT} (ClusterIP): "
                     f"{sum(a is not None for a in answers)}/6 answered, by "
                     f"{', '.join(backends) or 'none'}",
                     [] if ok else self._flows(since, (self._target("client"),)))

    def _policies(self) -> list[Check]:
        """A NetworkPolicy that lets only app=client in, then a CiliaNetworkPolicy that
        denies app=client: each judged both ways, then removed and traffic back."""
        out = []
        self._put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "allow-client", "namespace": NAMESPACE},
                   "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                            "policyTypes": ["Ingress"],
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {
                                "app": "client"}}}], "ports": [
                                    {"port": PORT, "protocol": "TCP"},
                                    {"port": PORT, "protocol": "UDP"}]}]}})
        self._synced()
        out.append(self._attempt("allow policy: allowed pod", self._target("client"),
                                 self.pods["server-1"].ip, PORT, "server-1",
                                 flows_of=(self._target("client"),)))
        out.append(self._attempt("allow policy: other pod refused", self._target("other"),
                                 self.pods["server-1"].ip, PORT, None,
                                 flows_of=(self._target("other"),)))
        self._put({"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaNetworkPolicy",
                   "metadata": {"name": "deny-client", "namespace": NAMESPACE},
                   "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {
                                "app": "client"}}]}]}})
        self._synced()
        out.append(self._attempt("deny policy: denied pod refused", self._target("client"),
                                 self.pods["server-1"].ip, PORT, None,
                                 flows_of=(self._target("client"),)))
        self._delete("CiliaNetworkPolicy", "deny-client")
        self._delete("NetworkPolicy", "allow-client")
        self._synced()
        out.append(self._attempt("policies removed: traffic back", self._target("other"),
                                 self.pods["server-1"].ip, PORT, "server-1",
                                 flows_of=(self._target("other"),)))
        return out

    def _through_restart(self) -> Check:
        """Connections from the client to every server, every 0.2 s, while each node's
        agent restarts in turn: the datapath keeps working without its agent."""
        targets = [(self.pods[n].ip, n) for n in ("server-1", "server-2") if n in self.pods]
        stop = threading.Event()
        tried, failed = [0], []

        def traffic() -> None:
            while not stop.is_set():
                for ip, name in targets:
                    answer = probe(self.lab, self._target("client"), ip, PORT, timeout=2)
                    tried[0] += 1
                    if not (answer or "").startswith(f"{name}:"):
                        failed.append(f"{name} at {time.strftime('%H:%M:%S')}")
                stop.wait(0.2)

        since = time.time()
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            for node in self.nodes:
                self.lab.restart_agent(node.name)
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join(timeout=30)
        ok = not failed and tried[0] > 0
        return Check("through agent restarts", ok,
                     f"{tried[0] - len(failed)}/{tried[0]} connections answered while "
                     f"{len(self.nodes)} agent(s) restarted" +
                     (f"; unanswered: {', '.join(failed[:5])}" if failed else ""),
                     [] if ok else self._flows(since, (self._target("client"),)))

    def _flows(self, since: float, pods: tuple[str, ...]) -> list[str]:
        """The flows every node saw since `since` from or to `pods`, in time order."""
        from cilia.observe import compact, history

        request = cilia_pb2.ObserveRequest(since=since, filter=cilia_pb2.FlowFilter(
            pod=list(pods)))
        try:
            events = history([AgentClient(n.socket, timeout=5) for n in self.nodes], request)
        except Exception as err:  # noqa: BLE001 - the report says why there are none
            return [f"(flows unavailable: {err})"]
        return [compact(e) for e in events[-12:]] or ["(no flow event: the datapath "
                                                      "reported nothing for these pods)"]


def run(lab: Lab, keep: bool = False, say: Callable[[str], None] = print) -> list[Check]:
    test = LabConnectivity(lab)
    say(f"cilia connectivity test: lab {lab.name}, {len(test.nodes)} node(s), "
        f"namespace {NAMESPACE}")
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
