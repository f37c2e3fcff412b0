"""The local lab: a simulated cluster on one machine, with no cluster and no Docker.

Each node is a network namespace that plays the node's host namespace, running a real
cilia-agent with its own bpffs root, state and socket. Nodes reach "outside" (another
namespace with a bridge, standing in for the underlay and the world) through an uplink
veth. Pods are namespaces whose network the real cilia-cni builds, called exactly as a
container runtime calls it.

Everything the lab makes is named after it, recorded in its state file as it is made,
and removed by `down`, which also copes with a half-made lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cilia import nsutil
from cilia.datastore import object_ref
from cilia.datastore.local import LocalDatastore
from cilia.nsutil import NETNS_DIR, in_netns, netns_del
from cilia.nsutil import alive as _alive
from cilia.nsutil import netns_exists as netns_exists  # re-exported for the tests
from cilia.statefile import read_json, write_json

LABS_DIR = Path(os.environ.get("CILIA_LABS_DIR", "/var/lib/cilia/labs"))
RUN_DIR = Path("/run/cilia/labs")
BPFFS_DIR = "/sys/fs/bpf/cilia-lab"
DEFAULT_LAB = "cilia"
UNDERLAY = ipaddress.IPv4Network("172.30.0.0/24")
NETWORK_NAME = "cilia"
CLUSTER_CIDR = "10.244.0.0/16"
# Pods' MTU: the underlay's 1500, less VXLAN's 50 bytes in the overlay.
POD_MTU = {"native": 1500, "vxlan": 1450}
CNI_VERSION = "1.1.0"


class LabError(RuntimeError):
    """Something a person must act on; the message says what."""


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return nsutil.run(*cmd, error=LabError, check=check, **kw)


def netns_add(name: str) -> None:
    nsutil.netns_add(name, error=LabError)


@dataclass
class Node:
    name: str
    netns: str
    pod_cidr: str
    underlay_ip: str
    socket: str
    bpffs_root: str
    state_dir: str
    log: str
    pid: int = 0


@dataclass
class Pod:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    ip: str = ""


@dataclass
class LabState:
    name: str
    outside_netns: str
    routing: str = "native"
    nodes: list[Node] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)  # more flags for every agent

    @classmethod
    def from_dict(cls, raw: dict) -> LabState:
        return cls(
            name=raw["name"],
            outside_netns=raw["outside_netns"],
            routing=raw.get("routing", "native"),
            agent_args=list(raw.get("agent_args", [])),
            nodes=[Node(**n) for n in raw.get("nodes", [])],
            pods=[Pod(**p) for p in raw.get("pods", [])],
        )


def _check_lab_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", name):
        raise LabError(
            f"invalid lab name {name!r}: up to 20 lowercase letters, digits or '-', "
            "starting with a letter"
        )
    return name


class Lab:
    def __init__(self, name: str = DEFAULT_LAB):
        self.name = _check_lab_name(name)
        self.dir = LABS_DIR / name
        self.state_file = self.dir / "lab.json"
        self.datastore = LocalDatastore(self.dir / "datastore")

    # ---- state -------------------------------------------------------------------

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> LabState:
        raw = read_json(self.state_file, None)
        if raw is None:
            raise LabError(f"lab {self.name!r} is not up: start it with `cilia lab up`")
        return LabState.from_dict(raw)

    def save(self, state: LabState) -> None:
        write_json(self.state_file, asdict(state))

    def node(self, state: LabState, name: str | None) -> Node:
        if name is None:
            return state.nodes[0]
        for n in state.nodes:
            if n.name == name:
                return n
        raise LabError(f"lab {self.name!r} has no node {name!r}: nodes are "
                       f"{', '.join(n.name for n in state.nodes)}")

    # ---- up / down ---------------------------------------------------------------

    def up(self, nodes: int = 1, routing: str = "native",
           agent_args: list[str] | None = None) -> LabState:
        if self.exists():
            state = self.load()
            if all(_alive(n.pid) for n in state.nodes):
                return state
            raise LabError(
                f"lab {self.name!r} exists but an agent is not running: "
                f"`cilia lab down --name {self.name}` and up again"
            )
        outside = f"{self.name}-outside"
        state = LabState(name=self.name, outside_netns=outside, routing=routing,
                         agent_args=list(agent_args or []))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save(state)
        try:
            netns_add(outside)
            gw = str(UNDERLAY.network_address + 1)
            _run("ip", "-n", outside, "link", "add", "underlay", "type", "bridge")
            _run("ip", "-n", outside, "addr", "add", f"{gw}/{UNDERLAY.prefixlen}",
                 "dev", "underlay")
            _run("ip", "-n", outside, "link", "set", "underlay", "up")
            for i in range(1, nodes + 1):
                node = self._node_up(state, i, gw)
                state.nodes.append(node)
                self.save(state)
                self._start_agent(state, node)
                self.save(state)
            for node in state.nodes:
                self._wait_ready(node)
        except BaseException:
            self.down()
            raise
        return state

    def _node_up(self, state: LabState, i: int, gw: str) -> Node:
        name = f"node{i}"
        netns = f"{self.name}-{name}"
        ip = str(UNDERLAY.network_address + 10 + i)
        node = Node(
            name=name, netns=netns, pod_cidr=f"10.244.{i}.0/24", underlay_ip=ip,
            socket=str(RUN_DIR / self.name / f"{name}.sock"),
            bpffs_root=f"{BPFFS_DIR}/{self.name}/{name}",
            state_dir=str(self.dir / "nodes" / name),
            log=str(self.dir / "nodes" / name / "agent.log"),
        )
        netns_add(netns)
        _run("ip", "link", "add", "eth0", "netns", netns, "type", "veth",
             "peer", "name", name, "netns", state.outside_netns)
        _run("ip", "-n", state.outside_netns, "link", "set", name, "master", "underlay", "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/{UNDERLAY.prefixlen}", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", gw)
        # Outside reaches each node's pods through that node (native routing).
        _run("ip", "-n", state.outside_netns, "route", "add", node.pod_cidr, "via", ip)
        return node

    def _start_agent(self, state: LabState, node: Node,
                     env: dict[str, str] | None = None) -> None:
        Path(node.state_dir).mkdir(parents=True, exist_ok=True)
        argv = in_netns(node.netns, [
            sys.executable, "-m", "cilia.agent.main",
            "--node-name", node.name, "--pod-cidr", node.pod_cidr,
            "--socket", node.socket, "--bpffs-root", node.bpffs_root,
            "--state-dir", node.state_dir, "--datastore-dir", str(self.dir / "datastore"),
            "--devices", "eth0", "--node-ip", node.underlay_ip,
            "--routing", state.routing, "--cluster-cidr", CLUSTER_CIDR,
            "--mtu", str(POD_MTU[state.routing]), *_service_args(), *state.agent_args,
        ])
        with open(node.log, "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )
        node.pid = proc.pid

    def _wait_ready(self, node: Node, timeout: float = 30.0) -> None:
        from cilia.client import AgentClient, AgentUnreachable

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(node.pid):
                break
            try:
                AgentClient(node.socket).status()
                return
            except AgentUnreachable:
                time.sleep(0.1)
        tail = Path(node.log).read_text()[-2000:] if Path(node.log).exists() else ""
        raise LabError(f"agent of {node.name} did not become ready; its log:\n{tail}")

    def restart_agent(self, node_name: str | None = None) -> Node:
        """Stops a node's agent and starts it again (the datapath keeps running)."""
        state = self.load()
        node = self.node(state, node_name)
        nsutil.stop(node.pid)
        self._start_agent(state, node)
        self.save(state)
        self._wait_ready(node)
        return node

    def stop_agent(self, node_name: str | None = None) -> Node:
        state = self.load()
        node = self.node(state, node_name)
        nsutil.stop(node.pid)
        return node

    def start_agent(self, node_name: str | None = None,
                    env: dict[str, str] | None = None, wait: bool = True) -> Node:
        """Starts a node's agent if it is not running (`env`: more environment, for
        this run only: CILIA_CRASH_AT for the crash tests; `wait`: until it serves)."""
        state = self.load()
        node = self.node(state, node_name)
        if not _alive(node.pid):
            self._start_agent(state, node, env)
            self.save(state)
        if wait:
            self._wait_ready(node)
        return node

    def down(self) -> None:
        """Removes everything the lab made, whatever state it is in."""
        raw = read_json(self.state_file, None)
        state = LabState.from_dict(raw) if raw else LabState(self.name, f"{self.name}-outside")
        for pod in state.pods:
            node = next((n for n in state.nodes if n.name == pod.node), None)
            if node and _alive(node.pid):
                try:
                    self._cni(node, pod, "DEL")
                except LabError as err:
                    print(f"warning: DEL of {pod.namespace}/{pod.name}: {err}", file=sys.stderr)
            netns_del(pod.netns)
        for node in state.nodes:
            nsutil.stop(node.pid)
            netns_del(node.netns)
            _remove_tree(node.bpffs_root)
        netns_del(state.outside_netns)
        _remove_tree(f"{BPFFS_DIR}/{self.name}")
        try:
            os.rmdir(BPFFS_DIR)
        except OSError:
            pass
        shutil.rmtree(RUN_DIR / self.name, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- pods --------------------------------------------------------------------

    def run_pod(self, manifest: dict, node_name: str | None = None) -> Pod:
        kind, namespace, name = object_ref(manifest)
        if kind != "Pod":
            raise LabError(f"`cilia lab run` takes a Pod, not a {kind}")
        state = self.load()
        node = self.node(state, node_name)
        if any(p.namespace == namespace and p.name == name for p in state.pods):
            raise LabError(f"pod {namespace}/{name} is already running in lab {self.name!r}")
        if self.datastore.get("Pod", namespace, name) is None:
            self.datastore.put(manifest)
        pod = Pod(
            namespace=namespace, name=name, node=node.name,
            netns=f"{self.name}-{namespace}-{name}", container_id=secrets.token_hex(32),
        )
        netns_add(pod.netns)
        state.pods.append(pod)
        self.save(state)
        try:
            result = self._cni(node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
        except BaseException:
            state.pods.remove(pod)
            netns_del(pod.netns)
            self.save(state)
            raise
        self.save(state)
        return pod

    def remove_pod(self, namespace: str, name: str) -> None:
        state = self.load()
        pod = self.pod(state, namespace, name)
        self._cni(self.node(state, pod.node), pod, "DEL")
        netns_del(pod.netns)
        state.pods.remove(pod)
        self.save(state)

    def pod(self, state: LabState, namespace: str, name: str) -> Pod:
        for p in state.pods:
            if p.namespace == namespace and p.name == name:
                return p
        raise LabError(f"no pod {namespace}/{name} in lab {self.name!r}: `cilia lab run -f` it")

    def cni_config(self, node: Node) -> dict:
        return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "type": "cilia-cni",
                "socket": node.socket}

    def cni_env(self, pod: Pod, command: str) -> dict[str, str]:
        return {
            **os.environ,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": str(NETNS_DIR / pod.netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(Path(sys.executable).parent),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};"
                        f"K8S_POD_NAME={pod.name};K8S_POD_INFRA_CONTAINER_ID={pod.container_id}",
        }

    def _cni(self, node: Node, pod: Pod, command: str) -> dict:
        """Calls the plugin exactly as a runtime does: environment and config on stdin."""
        res = subprocess.run(
            cni_plugin_argv(), input=json.dumps(self.cni_config(node)), text=True,
            capture_output=True, env=self.cni_env(pod, command),
        )
        out = json.loads(res.stdout) if res.stdout.strip() else {}
        if res.returncode != 0:
            raise LabError(
                f"CNI {command} of {pod.namespace}/{pod.name} failed: "
                f"{out.get('msg', res.stderr.strip())} ({out.get('details', '')})"
            )
        return out

    def exec_argv(self, target: str, argv: list[str]) -> list[str]:
        """argv run in a pod ("NS/POD"), a node ("node:NAME") or outside ("outside")."""
        state = self.load()
        if target == "outside":
            return in_netns(state.outside_netns, argv)
        if target.startswith("node:"):
            return in_netns(self.node(state, target[5:]).netns, argv)
        namespace, sep, name = target.partition("/")
        if not sep:
            namespace, name = "default", target
        return in_netns(self.pod(state, namespace, name).netns, argv)


def cni_plugin_argv() -> list[str]:
    """The plugin as installed beside this Python, else through the interpreter."""
    exe = Path(sys.executable).parent / "cilia-cni"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cilia.cni.main"]


def _service_args() -> list[str]:
    """The lab runs no kube-proxy: its nodes' own processes reach Services by socket LB,
    on this machine's cgroup v2 (/sys/fs/cgroup, or /sys/fs/cgroup/unified beside v1)."""
    from cilia.agent.socket_lb import cgroup2_mounts

    mounts = cgroup2_mounts()
    return (["--kube-proxy-replacement", "--socket-lb-cgroup", mounts[0]] if mounts
            else ["--kube-proxy-replacement", "--no-socket-lb"])


def _remove_tree(path: str) -> None:
    nsutil.remove_pins(path)
