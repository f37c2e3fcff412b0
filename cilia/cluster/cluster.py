"""A real Kubernetes on one machine: upstream components, nodes in network namespaces.

Layout (NAME is the cluster's name):
- `NAME-outside`: a network namespace with the underlay bridge (as in the lab). The
  control plane runs here: etcd on its loopback, kube-apiserver on the bridge address
  (where nodes and pods reach it, through the `kubernetes` Service too),
  kube-controller-manager, kube-scheduler and cilia-operator. Once the nodes have their
  pod CIDRs it has a route to each via that node, as a real control plane does (the API
  server dials pods for pods/proxy and services/proxy; see `route_pods`).
- `NAME-nodeN`: one network namespace per node on the underlay, playing the node's host
  namespace: its own containerd (own root, state, socket, CNI bin and conf dirs), its
  own kubelet (own root dir, cgroup root, node IP and name), kube-proxy, cilia-agent.
- A mount namespace per node (a slave of the machine's), shared by everything on the
  node, in which the paths a node's cilia uses are the node's own: /sys/fs/bpf (a
  directory of the machine's bpffs), /run/cilia, /var/lib/cilia and /run/netns (the
  pods' namespaces), and the node view RUN_DIR/NAME/node (its CNI dirs). So the chart's
  hostPaths and the agent's defaults mean the same on every node as on a real one, and
  nothing a node mounts reaches the machine.
- A forwarder on the root namespace's loopback makes the API server reachable from the
  machine's own kubectl; nothing else is added to the root namespace.

Everything lives under /var/lib/cilia-clusters/NAME, /run/cilia-clusters/NAME, the
bpffs root /sys/fs/bpf/cilia-cluster/NAME and the cgroups /cilia-NAME-nodeN. Each process
is recorded in the state file the moment it starts, so `down` removes everything even
after a failed or killed `up`. The machine's /etc/cni, /var/lib/kubelet,
/run/containerd and root-namespace iptables are never touched; the one machine setting
raised (never lowered) is fs.inotify.max_user_instances (see `_ensure_inotify`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cilia import nsutil
from cilia.cluster import image, images, manifests, upstream
from cilia.cluster.pki import Pki
from cilia.nsutil import NETNS_DIR, in_netns, netns_del, remove_pins
from cilia.nsutil import alive as _alive
from cilia.statefile import read_json, write_json

# Not under /var/lib/cilia or /run/cilia: those are a node's own (bound over in its mount
# namespace), and the node's processes must still see the cluster's files.
CLUSTERS_DIR = Path(os.environ.get("CILIA_CLUSTERS_DIR", "/var/lib/cilia-clusters"))
RUN_DIR = Path("/run/cilia-clusters")
BPFFS_DIR = "/sys/fs/bpf/cilia-cluster"
CGROUP_FS = Path("/sys/fs/cgroup")
UNDERLAY = ipaddress.IPv4Network("172.31.0.0/24")
API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_MASK = 24
CNI_VERSION = "1.0.0"  # containerd 1.6's libcni knows spec versions up to 1.0.0
POD_MTU = 1500
DEFAULT_CLUSTER = "cilia"
# How cilia runs on the cluster. "process": the agents and the operator as processes on
# the nodes (from the checkout: a code change needs no image; the default). "helm":
# `helm install` of charts/cilia with the image built from the Dockerfile, as users run it.
# "none": no CNI at all (nodes NotReady, CoreDNS Pending), for installing it yourself.
CILIA_MODES = ("process", "helm", "none")
# What does Services besides cilia's own translation for pods: kube-proxy in iptables or
# nftables mode, or nothing (cilia replaces kube-proxy: --kube-proxy-replacement, socket LB).
KUBE_PROXY_MODES = ("iptables", "nftables", "none")
HELM_RELEASE = "cilia"
HELM_NAMESPACE = "kube-system"
CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "cilia"


class ClusterError(RuntimeError):
    """Something a person must act on; the message says what."""


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return nsutil.run(*cmd, error=ClusterError, check=check, **kw)


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,11}", name):
        raise ClusterError(f"invalid cluster name {name!r}: up to 12 lowercase letters, digits "
                           "or '-', starting with a letter")
    return name


@dataclass
class Proc:
    name: str
    pid: int
    log: str
    netns: str = ""
    argv: list[str] = field(default_factory=list)
    mntns: str = ""  # a node's mount namespace (its bind file), or the machine's


# A node's own paths, as its processes and pods see them (the chart's and the agent's
# defaults), each bound in the node's mount namespace over the machine's.
NODE_BPFFS = "/sys/fs/bpf"
NODE_CILIA_RUN = "/run/cilia"
NODE_CILIA_STATE = "/var/lib/cilia"
NODE_NETNS = "/run/netns"
NODE_SOCKET = f"{NODE_CILIA_RUN}/cilia.sock"
NODE_PINS = f"{NODE_BPFFS}/cilia"
# The kubelet's device-plugin socket is this fixed path whatever its --root-dir
# (k8s.io/kubelet deviceplugin/v1beta1 KubeletSocket): every node binds its own over it,
# or two kubelets starting at once race on one socket ("bind: address already in use")
# and one never starts.
NODE_DEVICE_PLUGINS = "/var/lib/kubelet/device-plugins"


@dataclass
class ClusterNode:
    name: str
    netns: str
    ip: str
    dir: str
    run_dir: str
    cgroup: str
    bpffs_root: str

    @property
    def containerd_sock(self) -> str:
        return f"{self.run_dir}/containerd.sock"

    # The machine's view of the node's own paths (what is bound over NODE_* in its mount
    # namespace). bpffs_root is the node's /sys/fs/bpf.
    @property
    def agent_sock(self) -> str:
        return f"{self.run_dir}/run-cilia/cilia.sock"

    @property
    def state_dir(self) -> str:
        return f"{self.dir}/var-lib-cilia"

    @property
    def pins(self) -> str:
        return f"{self.bpffs_root}/cilia"

    @property
    def mntns(self) -> str:
        return str(Path(self.run_dir).parent / "mntns" / self.name)

    @property
    def view(self) -> str:
        """The path at which every node sees its own dir (CNI bin and conf dirs under it)."""
        return str(Path(self.run_dir).parent / "node")


@dataclass
class ClusterState:
    name: str
    outside_netns: str
    api_port: int = 0  # the forwarder's port on the root namespace's loopback
    nodes: list[ClusterNode] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    bin_dir: str = ""
    cilia: str = "process"  # how cilia runs: "process" or "helm" (see CILIA_MODES)
    image: str = ""         # cilia's image, in helm mode
    kube_proxy: str = "iptables"  # see KUBE_PROXY_MODES
    agent_args: list[str] = field(default_factory=list)  # more flags for every agent

    @classmethod
    def from_dict(cls, raw: dict) -> ClusterState:
        return cls(name=raw["name"], outside_netns=raw["outside_netns"],
                   api_port=raw.get("api_port", 0), bin_dir=raw.get("bin_dir", ""),
                   cilia=raw.get("cilia", "process"), image=raw.get("image", ""),
                   kube_proxy=raw.get("kube_proxy", "iptables"),
                   agent_args=list(raw.get("agent_args", [])),
                   nodes=[ClusterNode(**n) for n in raw.get("nodes", [])],
                   procs=[Proc(**p) for p in raw.get("procs", [])])


class Stages:
    """Prints each stage of a bring-up and how long it took."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.start = time.monotonic()
        self.times: list[tuple[str, float]] = []

    def run(self, label: str, fn, *args):
        if not self.quiet:
            print(f"==> {label}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        out = fn(*args)
        took = time.monotonic() - t0
        self.times.append((label, took))
        if not self.quiet:
            print(f"    {label}: {took:.1f} s", file=sys.stderr, flush=True)
        return out


class Cluster:
    def __init__(self, name: str = DEFAULT_CLUSTER):
        self.name = _check_name(name)
        self.dir = CLUSTERS_DIR / name
        self.run_dir = RUN_DIR / name
        self.state_file = self.dir / "cluster.json"
        self.pki = Pki(self.dir / "pki")
        self.gw = str(UNDERLAY.network_address + 1)
        self.api_server = f"https://{self.gw}:{API_PORT}"

    # ---- state -------------------------------------------------------------------

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> ClusterState:
        raw = read_json(self.state_file, None)
        if raw is None:
            raise ClusterError(f"cluster {self.name!r} is not up: start it with "
                               f"`cilia cluster up --name {self.name}`")
        return ClusterState.from_dict(raw)

    def save(self, state: ClusterState) -> None:
        write_json(self.state_file, asdict(state))

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig for this machine's root namespace (through the forwarder)."""
        return self.dir / "kubeconfig"

    @property
    def inner_kubeconfig(self) -> Path:
        """The admin kubeconfig for use inside the cluster's namespaces."""
        return self.dir / "pki" / "admin.kubeconfig"

    def kubectl_argv(self, args: list[str], state: ClusterState | None = None) -> list[str]:
        state = state or self.load()
        return [f"{state.bin_dir}/kubectl", "--kubeconfig", str(self.kubeconfig_path), *args]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(*self.kubectl_argv(list(args)), input=input, check=check, timeout=timeout)

    # ---- processes ---------------------------------------------------------------

    def _spawn(self, state: ClusterState, name: str, netns: str, argv: list[str],
               env: dict[str, str] | None = None, mntns: str = "") -> Proc:
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            p = subprocess.Popen(node_argv(netns, mntns, argv), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env={**os.environ, **(env or {})})
        proc = Proc(name, p.pid, str(log), netns, argv, mntns)
        state.procs.append(proc)
        self.save(state)
        return proc

    def _log_tail(self, proc: Proc, n: int = 3000) -> str:
        try:
            return Path(proc.log).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait(self, what: str, check, timeout: float, procs: list[Proc] = ()) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in procs:
                if not _alive(p.pid):
                    raise ClusterError(f"{p.name} exited while waiting for {what}; its log "
                                       f"({p.log}) ends:\n{self._log_tail(p)}")
            try:
                if check():
                    return
            except (ClusterError, subprocess.SubprocessError, OSError) as err:
                last = str(err)
            time.sleep(0.5)
        tails = "".join(f"\n--- {p.name} ({p.log}):\n{self._log_tail(p, 1500)}" for p in procs)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}"
                           f"{': ' + last if last else ''}{tails}")

    def restart_process(self, name: str, timeout: float = 60) -> Proc:
        """Stops one of the cluster's processes and starts it again with the same argv
        (e.g. `cilia-agent-node1`: the datapath keeps forwarding while it is away)."""
        state = self.load()
        proc = next((p for p in state.procs if p.name == name), None)
        if proc is None:
            raise ClusterError(f"cluster {self.name!r} has no process {name!r}")
        nsutil.stop(proc.pid, str(self.dir))
        state.procs.remove(proc)
        new = self._spawn(state, name, proc.netns, proc.argv, mntns=proc.mntns)
        if name.startswith("cilia-agent-"):
            node = next(n for n in state.nodes if name == f"cilia-agent-{n.name}")
            self._wait_agent(node, new, timeout)
        return new

    # ---- up ----------------------------------------------------------------------

    def up(self, nodes: int = 2, quiet: bool = False, cilia: str = "process",
           image_tag: str | None = None, kube_proxy: str = "iptables",
           agent_args: list[str] | None = None) -> ClusterState:
        """Brings the cluster up; nodes=0 is a control plane alone (etcd, the API server,
        controller-manager, scheduler and cilia's CRDs: no operator, no nodes), for tests
        of the operator and the datastore against the real API server. cilia: one of
        CILIA_MODES; in "helm" mode the nodes start with no CNI and cilia comes from
        `helm install` (image_tag: the image's tag, default dev-<sources' hash>).
        kube_proxy "none": no kube-proxy on the nodes, cilia replaces it; "nftables":
        kube-proxy in nftables mode. agent_args: more flags for every process-mode agent
        (e.g. --no-services, to leave every Service to kube-proxy)."""
        if self.exists():
            state = self.load()
            if state.procs and all(_alive(p.pid) for p in state.procs):
                return state
            raise ClusterError(f"cluster {self.name!r} exists but is not healthy: "
                               f"`cilia cluster down --name {self.name}` and up again")
        if not 0 <= nodes <= 9:
            raise ClusterError("--nodes must be between 1 and 9")
        if cilia not in CILIA_MODES:
            raise ClusterError(f"--cilia {cilia!r}: one of {', '.join(CILIA_MODES)}")
        if kube_proxy not in KUBE_PROXY_MODES:
            raise ClusterError(f"--kube-proxy {kube_proxy!r}: one of "
                               f"{', '.join(KUBE_PROXY_MODES)}")
        helm = cilia == "helm" and nodes > 0
        own = cilia == "process" or not nodes  # cilia's CRDs and daemons from here
        stages = Stages(quiet)
        if nodes:
            _ensure_inotify(quiet)
        wanted = upstream.CLUSTER_COMPONENTS if nodes else upstream.CONTROL_PLANE_COMPONENTS
        bin_dir = stages.run("upstream components (built once per machine)", upstream.ensure,
                             wanted + (("helm",) if helm else ()))
        built = (stages.run("cilia's image (from the Dockerfile, with buildah)", image.build,
                            image_tag) if helm else None)
        state = ClusterState(name=self.name, outside_netns=f"{self.name}-outside",
                             bin_dir=str(bin_dir), cilia=cilia if nodes else "process",
                             image=built.name if built else "", kube_proxy=kube_proxy,
                             agent_args=list(agent_args or []))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save(state)
        try:
            specs = images.cluster_images(bin_dir, upstream.pins()) if nodes else []
            archives = (stages.run(f"images ({', '.join(_short_name(s) for s in specs)})",
                                   self._images, specs) if nodes else [])
            if built:
                archives.append(built.archive)
            stages.run("network namespaces and underlay", self._network, state, nodes)
            stages.run("certificates and kubeconfigs", self._pki, state)
            stages.run("control plane (etcd, kube-apiserver, controller-manager, scheduler)",
                       self._control_plane, state)
            if own:
                stages.run("cilia CRDs", self._crds)
            if nodes and own:
                stages.run("cilia operator", self._cilia_operator, state)
            if nodes:
                with_kube_proxy = ", kube-proxy" if kube_proxy != "none" else ""
                stages.run(f"{nodes} node(s): containerd, images, kubelet{with_kube_proxy}",
                           self._nodes, state, archives)
            if helm:
                stages.run("helm install cilia (no CNI until then)", self.helm_install,
                           built)
            elif nodes and own:
                stages.run("cilia agents and CNI configuration", self._cilia_agents, state)
            if nodes and cilia != "none":
                stages.run("nodes Ready", self._wait_nodes_ready, state)
                stages.run("the control plane's routes to the nodes' pod CIDRs",
                           self._wait_pod_routes, state)
                stages.run("CoreDNS", self._coredns, state)
            elif nodes:
                stages.run("CoreDNS (Pending until a CNI is installed)", self._coredns,
                           state, False)
        except BaseException:
            if not quiet:
                print(f"==> bring-up failed; logs are in {self.dir / 'logs'}; removing the "
                      "cluster", file=sys.stderr)
            self.keep_logs()
            self.down()
            raise
        total = time.monotonic() - stages.start
        if not quiet:
            print(f"==> cluster {self.name!r} up in {total:.1f} s; kubeconfig: "
                  f"{self.kubeconfig_path}", file=sys.stderr)
        return state

    # ---- helm --------------------------------------------------------------------

    def helm_argv(self, args: list[str], state: ClusterState | None = None) -> list[str]:
        state = state or self.load()
        return [f"{state.bin_dir}/helm", "--kubeconfig", str(self.kubeconfig_path),
                "--namespace", HELM_NAMESPACE, *args]

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return _run(*self.helm_argv(list(args)), timeout=timeout)

    def helm_values(self, state: ClusterState | None = None) -> list[str]:
        """--set arguments that fit the chart to this cluster: containerd 1.6's CNI
        version, the node view's CNI dirs (containerd's config names them), the pool, the
        nodes' uplink, one operator per node up to two."""
        state = state or self.load()
        view = state.nodes[0].view
        return [
            "--set", f"cni.version={CNI_VERSION}",
            "--set", f"cni.binDir={view}/cni/bin", "--set", f"cni.confDir={view}/cni/net.d",
            "--set", f"ipam.clusterPoolIPv4CIDR={CLUSTER_CIDR}",
            "--set", f"ipam.clusterPoolIPv4MaskSize={NODE_MASK}",
            "--set", "agent.devices={eth0}", "--set", f"agent.mtu={POD_MTU}",
            "--set", f"operator.replicas={min(2, len(state.nodes))}",
            *self._helm_service_values(state),
        ]

    def _helm_service_values(self, state: ClusterState) -> list[str]:
        """Without kube-proxy: the chart's kube-proxy replacement, the agents reaching
        the API server at its own address (not yet through the `kubernetes` Service,
        which they translate themselves), socket LB on the machine's cgroup v2."""
        if state.kube_proxy != "none":
            return []
        from cilia.agent.socket_lb import cgroup2_mounts

        mounts = cgroup2_mounts()
        return ["--set", "kubeProxyReplacement=true", "--set", f"k8sServiceHost={self.gw}",
                "--set", f"k8sServicePort={API_PORT}",
                *(["--set", f"socketLB.hostCgroupRoot={mounts[0]}"] if mounts else
                  ["--set", "socketLB.enabled=false"])]

    def helm_install(self, img: image.Image, timeout: str = "5m") -> str:
        """`helm install --wait` (every agent Ready); returns helm's output (NOTES.txt)."""
        state = self.load()
        out = self.helm("install", HELM_RELEASE, str(CHART_DIR), "--wait", "--timeout",
                        timeout, "--set", f"image.repository={img.repository}",
                        "--set", f"image.tag={img.tag}", *self.helm_values(state))
        if state.cilia != "helm":
            state.cilia, state.image = "helm", img.name
            self.save(state)
        return out.stdout

    def import_image(self, archive: Path) -> None:
        """Imports an image archive into every node's containerd (as `kind load` does)."""
        for node in self.load().nodes:
            _ctr_import(node, archive)

    def keep_logs(self) -> None:
        """Copies the logs of a failed bring-up where `down` does not remove them."""
        src = self.dir / "logs"
        if src.is_dir():
            dst = CLUSTERS_DIR / f".{self.name}-failed-logs"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)

    def _images(self, specs: list[images.ImageSpec]) -> list[Path]:
        out_dir = Path(os.environ.get("CILIA_CACHE", "/var/cache/cilia")) / "images"
        out_dir.mkdir(parents=True, exist_ok=True)
        archives = []
        for spec in specs:
            key = re.sub(r"[^A-Za-z0-9.-]", "_", spec.name)
            archive = out_dir / f"{key}.tar"
            newest_input = max(p.stat().st_mtime for p in spec.files.values())
            if not archive.exists() or archive.stat().st_mtime < newest_input:
                images.build_archive(spec, archive)
            archives.append(archive)
        return archives

    def _network(self, state: ClusterState, count: int) -> None:
        outside = state.outside_netns
        _netns_add(outside)
        _run("ip", "-n", outside, "link", "add", "underlay", "type", "bridge")
        _run("ip", "-n", outside, "addr", "add", f"{self.gw}/{UNDERLAY.prefixlen}", "dev",
             "underlay")
        _run("ip", "-n", outside, "link", "set", "underlay", "up")
        for i in range(1, count + 1):
            name = f"node{i}"
            node = ClusterNode(
                name=name, netns=f"{self.name}-{name}",
                ip=str(UNDERLAY.network_address + 10 + i), dir=str(self.dir / "nodes" / name),
                run_dir=str(self.run_dir / name), cgroup=f"cilia-{self.name}-{name}",
                bpffs_root=f"{BPFFS_DIR}/{self.name}/{name}",
            )
            state.nodes.append(node)
            self.save(state)
            _netns_add(node.netns)
            _run("ip", "link", "add", "eth0", "netns", node.netns, "type", "veth", "peer",
                 "name", name, "netns", outside)
            _run("ip", "-n", outside, "link", "set", name, "master", "underlay", "up")
            _run("ip", "-n", node.netns, "addr", "add", f"{node.ip}/{UNDERLAY.prefixlen}",
                 "dev", "eth0")
            _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", node.netns, "route", "add", "default", "via", self.gw)

    def _pki(self, state: ClusterState) -> None:
        pki = self.pki
        pki.init()
        pki.issue("apiserver", "kube-apiserver", server=True,
                  ips=(self.gw, API_SERVICE_IP, "127.0.0.1"),
                  dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       f"kubernetes.default.svc.{manifests.CLUSTER_DOMAIN}", "localhost"))
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                  groups=("system:masters",))
        inner = self.api_server
        pki.kubeconfig(self.inner_kubeconfig, inner, "cilia-admin",
                       pki.issue("admin", "cilia-admin", groups=("system:masters",)))
        for component in ("kube-controller-manager", "kube-scheduler", "kube-proxy"):
            pki.kubeconfig(pki.dir / f"{component}.kubeconfig", inner, f"system:{component}",
                           pki.issue(component, f"system:{component}"))
        # cilia's daemons as processes run with an administrator's rights; the Helm
        # install (charts/cilia) gives them the chart's least-privilege roles instead.
        for component in ("cilia-agent", "cilia-operator"):
            pki.kubeconfig(pki.dir / f"{component}.kubeconfig", inner, component,
                           pki.issue(component, component, groups=("system:masters",)))
        for node in state.nodes:
            pki.kubeconfig(pki.dir / f"kubelet-{node.name}.kubeconfig", inner,
                           f"system:node:{node.name}",
                           pki.issue(f"kubelet-{node.name}", f"system:node:{node.name}",
                                     groups=("system:nodes",)))
            pki.issue(f"kubelet-{node.name}-serving", f"system:node:{node.name}", server=True,
                      ips=(node.ip,), dns=(node.name,))

    def _control_plane(self, state: ClusterState) -> None:
        b, p, ns = state.bin_dir, self.pki.dir, state.outside_netns
        etcd = self._spawn(state, "etcd", ns, [
            f"{b}/etcd", "--data-dir", str(self.dir / "etcd"), "--name", "etcd",
            "--listen-client-urls", "http://127.0.0.1:2379",
            "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "etcd=http://127.0.0.1:2380",
            # A throwaway test cluster: durability is not worth an fsync per write here.
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        apiserver = self._spawn(state, "kube-apiserver", ns, [
            f"{b}/kube-apiserver", "--etcd-servers", "http://127.0.0.1:2379",
            "--bind-address", self.gw, "--advertise-address", self.gw,
            "--secure-port", str(API_PORT), "--service-cluster-ip-range", SERVICE_CIDR,
            "--client-ca-file", f"{p}/ca.crt",
            "--tls-cert-file", f"{p}/apiserver.crt", "--tls-private-key-file",
            f"{p}/apiserver.key",
            "--kubelet-client-certificate", f"{p}/apiserver-kubelet-client.crt",
            "--kubelet-client-key", f"{p}/apiserver-kubelet-client.key",
            "--kubelet-certificate-authority", f"{p}/ca.crt",
            "--service-account-key-file", f"{p}/sa.pub",
            "--service-account-signing-key-file", f"{p}/sa.key",
            "--service-account-issuer",
            f"https://kubernetes.default.svc.{manifests.CLUSTER_DOMAIN}",
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins",
            "NodeRestriction", "--allow-privileged=true", "--profiling=false",
            "--kubelet-preferred-address-types", "InternalIP",
        ])
        self._spawn_forwarder(state)
        self._wait("the API server", lambda: self.kubectl(
            "get", "--raw", "/readyz", check=False, timeout=10).returncode == 0,
            120, [etcd, apiserver])
        cm = self._spawn(state, "kube-controller-manager", ns, [
            f"{b}/kube-controller-manager",
            "--kubeconfig", f"{p}/kube-controller-manager.kubeconfig",
            "--authentication-kubeconfig", f"{p}/kube-controller-manager.kubeconfig",
            "--authorization-kubeconfig", f"{p}/kube-controller-manager.kubeconfig",
            "--bind-address", "127.0.0.1", "--leader-elect=false",
            "--service-account-private-key-file", f"{p}/sa.key",
            "--root-ca-file", f"{p}/ca.crt", "--use-service-account-credentials=true",
            "--cluster-signing-cert-file", f"{p}/ca.crt",
            "--cluster-signing-key-file", f"{p}/ca.key",
            "--service-cluster-ip-range", SERVICE_CIDR, "--allocate-node-cidrs=false",
            "--controllers", "*,bootstrapsigner,tokencleaner",
        ])
        sched = self._spawn(state, "kube-scheduler", ns, [
            f"{b}/kube-scheduler", "--kubeconfig", f"{p}/kube-scheduler.kubeconfig",
            "--authentication-kubeconfig", f"{p}/kube-scheduler.kubeconfig",
            "--authorization-kubeconfig", f"{p}/kube-scheduler.kubeconfig",
            "--bind-address", "127.0.0.1", "--leader-elect=false",
        ])
        self._wait("the default service account", lambda: self.kubectl(
            "-n", "default", "get", "serviceaccount", "default", check=False,
            timeout=10).returncode == 0, 90, [cm, sched, apiserver])

    def _spawn_forwarder(self, state: ClusterState) -> None:
        port_file = self.dir / "api-port"
        port_file.unlink(missing_ok=True)
        log = self.dir / "logs" / "api-forwarder.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "cilia.cluster.forward", str(NETNS_DIR /
                 state.outside_netns), "127.0.0.1:0", f"{self.gw}:{API_PORT}", str(port_file)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        proc = Proc("api-forwarder", p.pid, str(log))
        state.procs.append(proc)
        self.save(state)
        self._wait("the API forwarder", port_file.exists, 10, [proc])
        state.api_port = int(port_file.read_text())
        self.pki.kubeconfig(self.kubeconfig_path, f"https://127.0.0.1:{state.api_port}",
                            "cilia-admin", self.pki.issue("admin", "cilia-admin",
                                                          groups=("system:masters",)))
        self.save(state)

    def _apply(self, objs: list[dict]) -> None:
        text = yaml.safe_dump_all(objs, sort_keys=False)
        self.kubectl("apply", "-f", "-", input=text)

    def _crds(self) -> None:
        crds = Path(upstream.UPSTREAM_DIR).parents[1] / "charts" / "cilia" / "crds"
        self.kubectl("apply", "-f", str(crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

    def _cilia_operator(self, state: ClusterState) -> None:
        self._spawn(state, "cilia-operator", state.outside_netns, [
            sys.executable, "-m", "cilia.operator.main",
            "--kubeconfig", str(self.pki.dir / "cilia-operator.kubeconfig"),
            "--cluster-pool", CLUSTER_CIDR, "--node-mask", str(NODE_MASK),
            "--bind-address", "127.0.0.1", "--id", "cilia-operator-0",
        ])

    def _nodes(self, state: ClusterState, archives: list[Path]) -> None:
        for node in state.nodes:
            _node_mount_ns(node)
            self._containerd(state, node)
        for node in state.nodes:
            self._wait(f"containerd on {node.name}", lambda n=node: _run(
                "ctr", "--address", n.containerd_sock, "version", check=False,
                timeout=10).returncode == 0, 60,
                [p for p in state.procs if p.name == f"containerd-{node.name}"])
            for archive in archives:
                _ctr_import(node, archive)
        for node in state.nodes:
            self._kubelet(state, node)
            if state.kube_proxy != "none":
                self._kube_proxy(state, node)

    def _containerd(self, state: ClusterState, node: ClusterNode) -> None:
        d, r = Path(node.dir), Path(node.run_dir)
        for sub in ("cni/bin", "cni/net.d", "containerd"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        r.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copy2("/usr/lib/cni/loopback", d / "cni/bin/loopback")
        pins = upstream.pins()
        config = f"""\
version = 2
root = "{d}/containerd/root"
state = "{r}/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{node.containerd_sock}"
[ttrpc]
  address = "{node.containerd_sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:{pins['PAUSE_VERSION']}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # These machines withhold CAP_SYS_RESOURCE even from root, so the kubelet's negative
  # OOM scores (-998 for sandboxes) cannot be written: clamp them to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{node.view}/cni/bin"
    conf_dir = "{node.view}/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""
        conf = d / "containerd" / "config.toml"
        conf.write_text(config)
        self._spawn(state, f"containerd-{node.name}", node.netns,
                    ["containerd", "--config", str(conf), "--log-level", "warn"],
                    mntns=node.mntns)

    def _kubelet(self, state: ClusterState, node: ClusterNode) -> None:
        d, p = Path(node.dir), self.pki.dir
        _make_cgroup(node.cgroup)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": f"{p}/ca.crt"}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{node.cgroup}",
            "clusterDNS": [manifests.DNS_SERVICE_IP],
            "clusterDomain": manifests.CLUSTER_DOMAIN,
            "containerRuntimeEndpoint": f"unix://{node.containerd_sock}",
            "failSwapOn": False,
            # The images are made here and exist nowhere else: never collect them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "tlsCertFile": f"{p}/kubelet-{node.name}-serving.crt",
            "tlsPrivateKeyFile": f"{p}/kubelet-{node.name}-serving.key",
            "podLogsDir": f"{d}/pod-logs", "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf", "nodeStatusReportFrequency": "10s",
        }
        conf = d / "kubelet.yaml"
        conf.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn(state, f"kubelet-{node.name}", node.netns, [
            f"{state.bin_dir}/kubelet", "--config", str(conf),
            "--kubeconfig", f"{p}/kubelet-{node.name}.kubeconfig",
            "--root-dir", f"{d}/kubelet", "--cert-dir", f"{d}/kubelet/pki",
            "--hostname-override", node.name, "--node-ip", node.ip, "--v", "1",
        ], mntns=node.mntns)

    def _kube_proxy(self, state: ClusterState, node: ClusterNode) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.pki.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": node.name, "mode": state.kube_proxy,
            "clusterCIDR": CLUSTER_CIDR,
            # Conntrack limits are the machine's, shared by every namespace: leave them.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "metricsBindAddress": "127.0.0.1:10249",
        }
        conf = Path(node.dir) / "kube-proxy.yaml"
        conf.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn(state, f"kube-proxy-{node.name}", node.netns,
                    [f"{state.bin_dir}/kube-proxy", "--config", str(conf)], mntns=node.mntns)

    def _cilia_agents(self, state: ClusterState) -> None:
        for node in state.nodes:
            # The node's own paths, as the chart's agent uses them.
            self._spawn(state, f"cilia-agent-{node.name}", node.netns, [
                sys.executable, "-m", "cilia.agent.main", "--datastore", "kubernetes",
                "--kubeconfig", str(self.pki.dir / "cilia-agent.kubeconfig"),
                "--node-name", node.name, "--node-ip", node.ip, "--devices", "eth0",
                "--socket", NODE_SOCKET, "--bpffs-root", NODE_PINS,
                "--state-dir", NODE_CILIA_STATE, "--routing", "native",
                "--cluster-cidr", CLUSTER_CIDR, "--mtu", str(POD_MTU),
                *self._service_args(state), *state.agent_args,
            ], mntns=node.mntns)
        for node in state.nodes:
            proc = next(p for p in state.procs if p.name == f"cilia-agent-{node.name}")
            self._wait_agent(node, proc, 120)
            self._install_cni(node)

    @staticmethod
    def _service_args(state: ClusterState) -> list[str]:
        """Without kube-proxy, cilia replaces it; its socket LB hangs on the machine's
        cgroup v2, which the nodes share (each agent's copy acts only in its node's
        network namespace)."""
        if state.kube_proxy != "none":
            return ["--no-kube-proxy-replacement"]
        from cilia.agent.socket_lb import cgroup2_mounts

        mounts = cgroup2_mounts()
        if not mounts:
            raise ClusterError("--kube-proxy none: cilia's socket LB needs a cgroup v2 "
                               "mount, and this machine has none")
        return ["--kube-proxy-replacement", "--socket-lb-cgroup", mounts[0]]

    def _wait_agent(self, node: ClusterNode, proc: Proc, timeout: float) -> None:
        from cilia.client import AgentClient, AgentUnreachable

        def ready() -> bool:
            try:
                AgentClient(node.agent_sock).status()
                return True
            except AgentUnreachable:
                return False

        self._wait(f"the cilia agent on {node.name}", ready, timeout, [proc])

    def _install_cni(self, node: ClusterNode) -> None:
        """What the chart's init container does on a real node: plugin and conflist."""
        d = Path(node.dir)
        plugin = d / "cni/bin/cilia-cni"
        exe = Path(sys.executable).parent / "cilia-cni"
        target = str(exe) if exe.exists() else f"{sys.executable} -m cilia.cni.main"
        plugin.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
        plugin.chmod(0o755)
        conflist = {"cniVersion": CNI_VERSION, "name": "cilia",
                    "plugins": [{"type": "cilia-cni", "socket": NODE_SOCKET}]}
        tmp = d / "cni/net.d/.05-cilia.conflist.tmp"
        tmp.write_text(json.dumps(conflist, indent=2) + "\n")
        tmp.replace(d / "cni/net.d/05-cilia.conflist")

    def _wait_nodes_ready(self, state: ClusterState) -> None:
        want = {n.name for n in state.nodes}

        def ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "json", check=False, timeout=15)
            if out.returncode != 0:
                return False
            got = set()
            for item in json.loads(out.stdout)["items"]:
                conds = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
                if conds.get("Ready") == "True":
                    got.add(item["metadata"]["name"])
            return want <= got

        self._wait(f"{len(want)} Ready node(s)", ready, 180,
                   [p for p in state.procs if p.name.startswith(("kubelet-", "containerd-"))])

    def _wait_pod_routes(self, state: ClusterState) -> None:
        want = {n.name for n in state.nodes}
        self._wait(f"a pod CIDR routed for each of {len(want)} node(s)",
                   lambda: want <= set(self.route_pods(state)), 60)

    def route_pods(self, state: ClusterState | None = None) -> dict[str, tuple[str, str]]:
        """Routes the control plane's namespace (NAME-outside, the API server's) to each
        node's pod CIDR via that node's InternalIP, as a real control plane is routed: the
        API server dials pods for pods/proxy and services/proxy (the upstream Proxy specs,
        and the DNS specs, which read their probes' results so). The CIDRs are the
        CiliaNodes' (cilia's IPAM), else the Nodes' spec.podCIDRs, so this runs once a
        CNI has given them out: `up` does it when the nodes are Ready; on a `--cilia none`
        cluster, call it again after installing one. Idempotent (`ip route replace`); a
        route into the cluster pool that no node's CIDR wants any more goes. `ip -n
        NAME-outside route` shows them; they go with the namespace. Returns node ->
        (pod CIDR, via) for every node routed."""
        state = state or self.load()
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        cilia_nodes = self.kubectl("get", "cilianodes.cilia.io", "-o", "json", check=False)
        cidrs = {n["metadata"]["name"]: (n.get("spec") or {}).get("podCIDRs") or []
                 for n in (json.loads(cilia_nodes.stdout)["items"]
                           if cilia_nodes.returncode == 0 else [])}
        routes: dict[str, tuple[str, str]] = {}
        for n in nodes:
            name = n["metadata"]["name"]
            via = next((a["address"] for a in (n.get("status") or {}).get("addresses", [])
                        if a.get("type") == "InternalIP"), "")
            for cidr in cidrs.get(name) or (n.get("spec") or {}).get("podCIDRs") or []:
                try:
                    net = ipaddress.ip_network(cidr, strict=False)
                    if via and net.version == ipaddress.ip_address(via).version:
                        routes[name] = (str(net), via)
                        break
                except ValueError:
                    continue
        ns = state.outside_netns
        wanted = set(routes.values())
        pool = ipaddress.ip_network(CLUSTER_CIDR)
        for r in json.loads(_run("ip", "-n", ns, "-j", "route", "show").stdout or "[]"):
            dst, gw = r.get("dst", ""), r.get("gateway", "")
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if (gw and net.version == pool.version and net.subnet_of(pool)
                    and (str(net), gw) not in wanted):
                _run("ip", "-n", ns, "route", "del", dst, "via", gw, check=False)
        for cidr, via in sorted(wanted):
            _run("ip", "-n", ns, "route", "replace", cidr, "via", via)
        return routes

    def _coredns(self, state: ClusterState, wait: bool = True) -> None:
        pins = upstream.pins()
        ref = f"registry.k8s.io/coredns/coredns:{pins['COREDNS_VERSION']}"
        self._apply(manifests.coredns(ref, replicas=min(2, len(state.nodes))))
        if wait:
            self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns",
                         "--timeout=180s", timeout=200)

    # ---- down --------------------------------------------------------------------

    def down(self) -> None:
        """Removes everything the cluster made, whatever state it is in."""
        raw = read_json(self.state_file, None)
        state = (ClusterState.from_dict(raw) if raw
                 else ClusterState(self.name, f"{self.name}-outside"))
        marker = str(self.dir)
        # Kubelets first, so that nothing restarts what is being removed; the API
        # server's clients before it, and etcd last, so that nothing waits on a server
        # that is gone.
        last = {"containerd": 1, "kube-apiserver": 2, "etcd": 3}
        order = sorted(state.procs, key=lambda p: (
            -1 if p.name.startswith("kubelet-") else last.get(p.name.split("-node")[0], 0)))
        for proc in order:
            nsutil.stop(proc.pid, marker if proc.name != "api-forwarder" else "cilia.cluster")
        nodes = state.nodes or [ClusterNode(
            name=f"node{i}", netns=f"{self.name}-node{i}", ip="", dir=str(self.dir / "nodes" /
            f"node{i}"), run_dir=str(self.run_dir / f"node{i}"),
            cgroup=f"cilia-{self.name}-node{i}", bpffs_root=f"{BPFFS_DIR}/{self.name}/node{i}")
            for i in range(1, 10)]
        for node in nodes:
            _kill_cgroup(node.cgroup)
            _kill_matching(node.containerd_sock)  # containerd's shims outlive it
        # Unmounting the nodes' mount namespaces (their bind files) frees them, and with
        # them every mount made on a node: the pods' netns files, the kubelet's volumes.
        _unmount_under(str(self.dir), str(self.run_dir))
        for node in nodes:
            _rm_cgroup(node.cgroup)
            netns_del(node.netns)
            remove_pins(node.bpffs_root)
        netns_del(state.outside_netns)
        remove_pins(f"{BPFFS_DIR}/{self.name}")
        for d in (BPFFS_DIR,):
            try:
                os.rmdir(d)
            except OSError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- helpers -------------------------------------------------------------------------


def _ctr_import(node: ClusterNode, archive: Path) -> None:
    """An image archive into the node's containerd, in the namespace the kubelet uses."""
    _run("ctr", "--address", node.containerd_sock, "-n", "k8s.io", "images", "import",
         str(archive), timeout=300)


def _short_name(spec: images.ImageSpec) -> str:
    """registry.k8s.io/e2e-test-images/agnhost:2.56 -> agnhost"""
    return spec.name.rsplit("/", 1)[-1].split(":", 1)[0]


def _netns_add(name: str) -> None:
    nsutil.netns_add(name, error=ClusterError)


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
# Each kubelet holds 6 inotify instances, containerd and the control plane more, and every
# cluster on the machine (and kind's, and anything else of root's) shares one per-user
# limit, 128 by default: past it a kubelet starts without its watches ("too many open
# files") and a node never registers. kind advises the same raise.
MIN_INOTIFY_INSTANCES = 1024


def _ensure_inotify(quiet: bool) -> None:
    try:
        current = int(INOTIFY_INSTANCES.read_text())
        if current < MIN_INOTIFY_INSTANCES:
            INOTIFY_INSTANCES.write_text(str(MIN_INOTIFY_INSTANCES))
            if not quiet:
                print(f"==> fs.inotify.max_user_instances raised from {current} to "
                      f"{MIN_INOTIFY_INSTANCES} (kubelets run out of inotify instances "
                      "below it)", file=sys.stderr)
    except (OSError, ValueError) as err:
        print(f"==> warning: fs.inotify.max_user_instances not checked ({err}); kubelets "
              "may start without their file watches", file=sys.stderr)


def node_argv(netns: str, mntns: str, argv: list[str]) -> list[str]:
    """argv run on a node: in its network namespace and, if given, its mount namespace."""
    if not mntns:
        return in_netns(netns, argv)
    return ["nsenter", f"--net={NETNS_DIR / netns}", f"--mount={mntns}", *argv]


def _is_mountpoint(path: Path) -> bool:
    return any(line.split()[4] == str(path)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _node_mount_ns(node: ClusterNode) -> None:
    """The node's mount namespace: a slave of the machine's (its mounts reach the node,
    the node's never reach the machine), with the node's own paths bound over NODE_*,
    then made rshared as on a systemd host (Bidirectional and HostToContainer volumes
    need that)."""
    base = Path(node.mntns).parent
    base.mkdir(parents=True, exist_ok=True)
    if not _is_mountpoint(base):  # a namespace's bind file must be on a private mount
        _run("mount", "--bind", str(base), str(base))
        _run("mount", "--make-private", str(base))
    Path(node.mntns).touch()
    binds = {node.bpffs_root: NODE_BPFFS, f"{node.run_dir}/run-cilia": NODE_CILIA_RUN,
             node.state_dir: NODE_CILIA_STATE, f"{node.run_dir}/netns": NODE_NETNS,
             f"{node.dir}/device-plugins": NODE_DEVICE_PLUGINS, node.dir: node.view}
    for src, dst in binds.items():
        os.makedirs(src, exist_ok=True)
        os.makedirs(dst, exist_ok=True)  # cilia's own directories on the machine: empty
    _run("unshare", f"--mount={node.mntns}", "--propagation", "slave", "true")
    script = " && ".join([*(f"mount --bind {src} {dst}" for src, dst in binds.items()),
                          "mount --make-rshared /"])
    _run("nsenter", f"--mount={node.mntns}", "sh", "-ec", script)


def _kill_matching(text: str) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and text in nsutil.cmdline(int(entry.name)):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _hierarchies() -> list[Path]:
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2") and parts[1].startswith(
                str(CGROUP_FS)):
            out.append(Path(parts[1]))
    return out


def _make_cgroup(name: str) -> None:
    """The kubelet's --cgroup-root, in every hierarchy (kubelet requires it to exist)."""
    for h in _hierarchies():
        d = h / name
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset is empty until set
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for h in _hierarchies():
        root = h / name
        if root.is_dir():
            for procs in root.rglob("cgroup.procs"):
                try:
                    pids |= {int(x) for x in procs.read_text().split()}
                except OSError:
                    pass
    return pids


def _kill_cgroup(name: str) -> None:
    for _ in range(20):
        pids = _cgroup_pids(name)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def _rm_cgroup(name: str) -> None:
    for h in _hierarchies():
        root = h / name
        if root.is_dir():
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(
                    p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError:
                pass


def _unmount_under(*prefixes: str) -> None:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            mounts.append(point)
    for point in sorted(set(mounts), key=lambda m: -len(m)):
        _run("umount", "-l", point, check=False)
