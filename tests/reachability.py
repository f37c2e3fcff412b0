"""The Kubernetes NetworkPolicy reachability model, against a real lab.

Like upstream's e2e netpol framework: namespaces x, y, z (labelled `ns=<name>`), pods
a, b, c in each (labelled `pod=<name>`, named container ports serve-80-tcp,
serve-80-udp, serve-81-tcp, serve-81-udp), an echo server on TCP and UDP ports 80 and 81
in every pod (one process per pod), a truth table of what should connect
(`Reachability`), and a prober that tries every pair through the real datapath.

Probing is parallel: one prober process per source pod, run inside the pod, tries all
its targets on all asked ports at once, each with a short timeout (a denied TCP SYN or
UDP datagram is dropped, so it simply gets no answer). A whole 9x9 matrix on four
port/protocol pairs takes about one timeout. Cells that should connect but did not are
probed once more with a longer timeout (a slow machine is not a policy bug); a cell
that connected but should not is never retried.

UDP probes use a fresh source port for every probe of the session: a UDP conntrack entry
of an earlier allowed probe with the same 5-tuple would otherwise pass a now-denied
one (established flows skip policy, as they should).

    m = Model(lab); m.build()
    m.apply(policy)                       # stores it and waits for the agent
    r = m.reachability()                  # everything connects
    r.expect_all_ingress("x/a", False)    # ...except into x/a
    m.check(r)                            # all pairs, 80/81, TCP/UDP; a readable diff
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cilia.client import AgentClient, AgentUnreachable
from cilia.lab.lab import Lab

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
SERVE_PORTS = (80, 81)
PROBE_TIMEOUT = 0.6
RETRY_TIMEOUT = 2.0
UDP_SOURCE_PORTS = (20000, 60000)


@dataclass(frozen=True, order=True)
class PortProtocol:
    port: int
    protocol: str  # TCP, UDP

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


TCP80 = PortProtocol(80, "TCP")
TCP81 = PortProtocol(81, "TCP")
UDP80 = PortProtocol(80, "UDP")
UDP81 = PortProtocol(81, "UDP")
ALL_PORTS = (TCP80, TCP81, UDP80, UDP81)


def container_ports(overrides: Mapping[str, int] | None = None) -> list[dict]:
    """Named container ports as upstream's agnhost pods have them (serve-80-tcp...);
    `overrides` maps a name to another number."""
    out = []
    for port in SERVE_PORTS:
        for proto in ("TCP", "UDP"):
            name = f"serve-{port}-{proto.lower()}"
            out.append({"name": name, "containerPort": (overrides or {}).get(name, port),
                        "protocol": proto})
    return out


def pod_manifest(namespace: str, name: str, labels: Mapping[str, str] | None = None,
                 ports: list[dict] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": dict(labels if labels is not None else {"pod": name})},
        "spec": {"containers": [{"name": "c", "image": "none",
                                 "ports": ports if ports is not None else container_ports()}]},
    }


def namespace_manifest(name: str, labels: Mapping[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name,
                         "labels": dict(labels if labels is not None else {"ns": name})}}


# ---- the truth table -----------------------------------------------------------------

Match = str | Iterable[str] | Callable[[str], bool] | None


def _matcher(m: Match) -> Callable[[str], bool]:
    """None or "*": every pod; "x/a": that pod; "x": every pod of namespace x; a list of
    those; or a predicate on "ns/pod"."""
    if m is None or m == "*":
        return lambda _: True
    if callable(m):
        return m
    if isinstance(m, str):
        return (lambda p: p == m) if "/" in m else (lambda p: p.split("/")[0] == m)
    parts = [_matcher(x) for x in m]
    return lambda p: any(f(p) for f in parts)


class Reachability:
    """expected[from][to] for one port/protocol; a pod always reaches itself (its own IP
    never leaves its netns), as in upstream's model."""

    def __init__(self, pods: Sequence[str], default: bool = True):
        self.pods = list(pods)
        self.table = {(s, d): default for s in self.pods for d in self.pods}

    def copy(self) -> Reachability:
        return copy.deepcopy(self)

    def expect(self, src: str, dst: str, allowed: bool) -> Reachability:
        self.table[(src, dst)] = allowed
        return self

    def expect_peer(self, src: Match = None, dst: Match = None,
                    allowed: bool = True) -> Reachability:
        """Every pair with a matching source and destination (see `_matcher`)."""
        fs, fd = _matcher(src), _matcher(dst)
        for s, d in self.table:
            if fs(s) and fd(d):
                self.table[(s, d)] = allowed
        return self

    def expect_all(self, allowed: bool) -> Reachability:
        return self.expect_peer(None, None, allowed)

    def expect_all_ingress(self, pod: Match, allowed: bool) -> Reachability:
        """Everything into `pod`."""
        return self.expect_peer(None, pod, allowed)

    def expect_all_egress(self, pod: Match, allowed: bool) -> Reachability:
        """Everything out of `pod`."""
        return self.expect_peer(pod, None, allowed)

    def expected(self, src: str, dst: str) -> bool:
        return src == dst or self.table[(src, dst)]


@dataclass
class Cell:
    allowed: bool
    detail: str  # the answer, or why there was none


@dataclass
class Observed:
    case: PortProtocol
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)


def render(case: PortProtocol, expected: Reachability, observed: Observed,
           sources: Sequence[str], targets: Sequence[str]) -> str:
    """Expected and observed side by side ('.' connects, 'X' blocked, ' ' not probed);
    differing cells are marked with '!' in the observed matrix and listed below."""
    w = max(len(p) for p in [*sources, *targets]) + 1
    head = " " * w + "".join(t.rjust(w) for t in targets)
    lines = [f"{case}: expected{' ' * (len(head) - 8)}   observed", f"{head}   {head}"]
    diffs = []
    for s in sources:
        exp_row, obs_row = s.ljust(w), s.ljust(w)
        for t in targets:
            e = expected.expected(s, t)
            exp_row += ("." if e else "X").rjust(w)
            cell = observed.cells.get((s, t))
            if cell is None:
                obs_row += " ".rjust(w)
                continue
            mark = "." if cell.allowed else "X"
            if cell.allowed != e:
                mark = "!" + mark
                diffs.append(f"  {s} -> {t} {case}: expected "
                             f"{'connected' if e else 'blocked'}, observed "
                             f"{'connected' if cell.allowed else 'blocked'} ({cell.detail})")
            obs_row += mark.rjust(w)
        lines.append(f"{exp_row}   {obs_row}")
    return "\n".join(lines + diffs)


# ---- the prober that runs inside a source pod -------------------------------------------

PROBER = r"""
import json, socket, sys, threading, time
req = json.loads(sys.argv[1])
out = {}

def one(key, ip, port, proto, sport, timeout):
    deadline = time.monotonic() + timeout
    udp = proto == "UDP"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if sport:
            s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(b"probe")
        s.settimeout(max(0.05, deadline - time.monotonic()))
        out[key] = [True, s.recv(512).decode(errors="replace")]
    except socket.timeout:
        out[key] = [False, "timeout"]
    except OSError as err:
        out[key] = [False, f"{type(err).__name__}: {err.strerror or err}"]
    finally:
        s.close()

threads = [threading.Thread(target=one, args=(*p, req["timeout"])) for p in req["probes"]]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


# ---- the model: pods, servers, policies, probes ---------------------------------------


@dataclass
class ModelPod:
    namespace: str
    name: str
    ip: str
    manifest: dict

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.manifest["metadata"]["labels"])


class MismatchError(AssertionError):
    pass


class Model:
    """Namespaces x, y, z with pods a, b, c in a lab, echo servers in every pod.

    `reset()` brings it back to the base state (no NetworkPolicy, base labels and
    ports, base pods only) and `close()` stops every process it started; the lab itself
    removes the namespaces."""

    def __init__(self, lab: Lab, namespaces: Sequence[str] = NAMESPACES,
                 pod_names: Sequence[str] = POD_NAMES,
                 placement: Callable[[str], str | None] | None = None):
        """`placement` maps "ns/pod" to the lab node it runs on (default: the first)."""
        self.lab = lab
        self.placement = placement or (lambda _: None)
        self.base_namespaces = {ns: namespace_manifest(ns) for ns in namespaces}
        self.base_pods = {f"{ns}/{p}": pod_manifest(ns, p) for ns in namespaces
                          for p in pod_names}
        self.pods: dict[str, ModelPod] = {}
        self.servers: dict[str, subprocess.Popen] = {}
        self._udp_port = UDP_SOURCE_PORTS[0]

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.lab.load().nodes[0].socket)

    def build(self) -> Model:
        for ns in self.base_namespaces.values():
            self.lab.datastore.put(copy.deepcopy(ns))
        for manifest in self.base_pods.values():
            self._run(manifest)
        self._wait_servers(list(self.base_pods))
        self.sync()
        return self

    def close(self) -> None:
        for key in list(self.servers):
            self._stop_server(key)

    def _run(self, manifest: dict) -> ModelPod:
        manifest = copy.deepcopy(manifest)
        meta = manifest["metadata"]
        self.lab.datastore.put(copy.deepcopy(manifest))
        pod = self.lab.run_pod(manifest, self.placement(f"{meta['namespace']}/{meta['name']}"))
        mp = ModelPod(meta["namespace"], meta["name"], pod.ip, manifest)
        self.pods[mp.key] = mp
        self.servers[mp.key] = subprocess.Popen(
            self.lab.exec_argv(mp.key, [sys.executable, "-m", "cilia.lab.probe", "serve",
                                        "--tcp", "80", "--udp", "80", "--tcp", "81",
                                        "--udp", "81", "--name", mp.key]),
            stdout=subprocess.PIPE, text=True)
        return mp

    def _wait_servers(self, keys: Iterable[str]) -> None:
        for key in keys:
            line = self.servers[key].stdout.readline().strip()
            assert line == "ready", f"the echo server in {key} did not start"

    def _stop_server(self, key: str) -> None:
        proc = self.servers.pop(key, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def sync(self) -> None:
        """Waits until every node's agent has compiled and written the datastore as it
        is now."""
        for node in self.lab.load().nodes:
            try:
                AgentClient(node.socket).wait_policy_synced()
            except (AgentUnreachable, TimeoutError) as err:
                raise AssertionError(f"{err}\nthe log of {node.name}'s agent ends:\n"
                                     f"{self.agent_log(node.name)}") from err

    def agent_log(self, node_name: str | None = None, lines: int = 40) -> str:
        state = self.lab.load()
        path = Path(self.lab.node(state, node_name).log)
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def reset(self) -> None:
        """No NetworkPolicy or ClusterNetworkPolicy, base namespace and pod labels, base
        pods only."""
        ds = self.lab.datastore
        for kind in ("NetworkPolicy", "ClusterNetworkPolicy"):
            for pol in ds.list(kind):
                meta = pol.get("metadata") or {}
                ds.delete(kind, meta.get("namespace") or ("" if kind.startswith("Cluster")
                                                          else "default"), meta["name"])
        for key in [k for k in self.pods if k not in self.base_pods]:
            self.remove_pod(key, sync=False)
        for ns in list(ds.list("Namespace")):
            name = ns["metadata"]["name"]
            if name in self.base_namespaces:
                ds.put(copy.deepcopy(self.base_namespaces[name]))
            elif name != "default":
                ds.delete("Namespace", "", name)
        missing = [k for k in self.base_pods if k not in self.pods]
        for key, manifest in self.base_pods.items():
            if key in self.pods:
                ds.put(copy.deepcopy(manifest))
                self.pods[key].manifest = copy.deepcopy(manifest)
            else:
                self._run(manifest)
        self._wait_servers(missing)
        self.sync()

    # ---- changes ---------------------------------------------------------------------

    def apply(self, *policies: dict, sync: bool = True) -> None:
        for p in policies:
            self.lab.datastore.put(copy.deepcopy(p))
        if sync:
            self.sync()

    def delete_policy(self, namespace: str, name: str, sync: bool = True) -> None:
        assert self.lab.datastore.delete("NetworkPolicy", namespace, name), name
        if sync:
            self.sync()

    def set_pod(self, key: str, labels: Mapping[str, str] | None = None,
                ports: list[dict] | None = None, sync: bool = True) -> None:
        """Stores the pod's manifest again with new labels and/or container ports."""
        pod = self.pods[key]
        manifest = copy.deepcopy(pod.manifest)
        if labels is not None:
            manifest["metadata"]["labels"] = dict(labels)
        if ports is not None:
            manifest["spec"]["containers"][0]["ports"] = ports
        self.lab.datastore.put(copy.deepcopy(manifest))
        pod.manifest = manifest
        if sync:
            self.sync()

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str],
                             sync: bool = True) -> None:
        self.lab.datastore.put(namespace_manifest(namespace, labels))
        if sync:
            self.sync()

    def add_pod(self, namespace: str, name: str, labels: Mapping[str, str] | None = None,
                ports: list[dict] | None = None, sync: bool = True) -> ModelPod:
        if namespace not in self.base_namespaces and \
                self.lab.datastore.get("Namespace", "", namespace) is None:
            self.lab.datastore.put(namespace_manifest(namespace))
        mp = self._run(pod_manifest(namespace, name, labels, ports))
        self._wait_servers([mp.key])
        if sync:
            self.sync()
        return mp

    def remove_pod(self, key: str, sync: bool = True) -> None:
        ns, name = key.split("/")
        self._stop_server(key)
        self.lab.remove_pod(ns, name)
        self.lab.datastore.delete("Pod", ns, name)
        del self.pods[key]
        if sync:
            self.sync()

    # ---- probes ----------------------------------------------------------------------

    def reachability(self, default: bool = True) -> Reachability:
        return Reachability(list(self.pods), default)

    def source_port(self) -> int:
        """A source port not used before in this session (for connectionless probes)."""
        lo, hi = UDP_SOURCE_PORTS
        port = self._udp_port
        self._udp_port = lo + (self._udp_port + 1 - lo) % (hi - lo)
        return port

    def probe(self, cells: Iterable[tuple[str, str, PortProtocol]],
              timeout: float = PROBE_TIMEOUT) -> dict[tuple[str, str, PortProtocol], Cell]:
        """Probes (source, target, port) cells: one process per source, all at once."""
        by_source: dict[str, list] = {}
        names: dict[str, tuple[str, str, PortProtocol]] = {}
        for src, dst, case in cells:
            if src == dst:
                continue  # never leaves the pod's netns
            k = f"{dst} {case}"
            names[f"{src} {k}"] = (src, dst, case)
            sport = self.source_port() if case.protocol == "UDP" else 0
            by_source.setdefault(src, []).append(
                [k, self.pods[dst].ip, case.port, case.protocol, sport])
        procs = {
            src: subprocess.Popen(
                self.lab.exec_argv(src, [sys.executable, "-I", "-S", "-c", PROBER,
                                         json.dumps({"timeout": timeout, "probes": probes})]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for src, probes in by_source.items()
        }
        out: dict[tuple[str, str, PortProtocol], Cell] = {}
        try:
            for src, proc in procs.items():
                stdout, stderr = proc.communicate(timeout=timeout * 3 + 30)
                assert proc.returncode == 0, f"prober in {src} failed: {stderr}"
                for k, (ok, detail) in json.loads(stdout).items():
                    src_, dst, case = names[f"{src} {k}"]
                    # The answer must come from the server asked: "<ns/pod>:probe".
                    if ok and detail != f"{dst}:probe":
                        ok, detail = False, f"wrong answer {detail!r}"
                    out[(src_, dst, case)] = Cell(ok, detail)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        return out

    def observe(self, expected: Reachability | Mapping[PortProtocol, Reachability],
                cases: Sequence[PortProtocol] = ALL_PORTS,
                sources: Match = None, targets: Match = None,
                ) -> tuple[dict[PortProtocol, Observed], dict[PortProtocol, Reachability],
                           list[str], list[str]]:
        per_case = {c: expected if isinstance(expected, Reachability) else expected[c]
                    for c in cases}
        fs, fd = _matcher(sources), _matcher(targets)
        srcs = [p for p in self.pods if fs(p)]
        dsts = [p for p in self.pods if fd(p)]
        cells = [(s, d, c) for c in cases for s in srcs for d in dsts]
        result = self.probe(cells)
        retry = [k for k, cell in result.items()
                 if not cell.allowed and per_case[k[2]].expected(k[0], k[1])]
        if retry:
            again = self.probe(retry, timeout=RETRY_TIMEOUT)
            for k, cell in again.items():
                if cell.allowed:
                    result[k] = cell
                else:
                    result[k] = Cell(False, f"{result[k].detail}; retried: {cell.detail}")
        observed = {c: Observed(c) for c in cases}
        for s, d, c in cells:
            observed[c].cells[(s, d)] = result.get((s, d, c)) or Cell(True, "self")
        return observed, per_case, srcs, dsts

    def check(self, expected: Reachability | Mapping[PortProtocol, Reachability],
              cases: Sequence[PortProtocol] = ALL_PORTS,
              sources: Match = None, targets: Match = None, what: str = "") -> None:
        """Probes every pair (or those from `sources` to `targets`) on `cases` and fails
        with expected and observed matrices if any cell differs. `expected` is one table
        for all cases or one per case."""
        observed, per_case, srcs, dsts = self.observe(expected, cases, sources, targets)
        reports = []
        for c in cases:
            obs = observed[c]
            if any(cell.allowed != per_case[c].expected(s, d)
                   for (s, d), cell in obs.cells.items()):
                reports.append(render(c, per_case[c], obs, srcs, dsts))
        if reports:
            title = f"reachability differs{f' ({what})' if what else ''}:"
            raise MismatchError("\n\n".join([title, *reports]))


def wait_until(fn: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(interval)
    return fn()


# ---- NetworkPolicy manifests -----------------------------------------------------------


def netpol(name: str, namespace: str, pod_selector: dict | None = None, *,
           ingress: list | None = None, egress: list | None = None,
           types: list[str] | None = None) -> dict:
    """A networking.k8s.io/v1 NetworkPolicy; fields left None are left out."""
    spec: dict = {"podSelector": pod_selector if pod_selector is not None else {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def labels(**kv: str) -> dict:
    """{"matchLabels": {...}}"""
    return {"matchLabels": dict(kv)}


def expr(key: str, operator: str, *values: str) -> dict:
    """{"matchExpressions": [one requirement]}"""
    req: dict = {"key": key, "operator": operator}
    if values:
        req["values"] = list(values)
    return {"matchExpressions": [req]}


def port(number: int | str | None = None, protocol: str = "TCP",
         end: int | None = None) -> dict:
    out: dict = {"protocol": protocol}
    if number is not None:
        out["port"] = number
    if end is not None:
        out["endPort"] = end
    return out
