"""A real runtime: containerd's `ctr run --cni`, with cilia as the network plugin.

Everything here is the test's own and goes away afterwards: a containerd (its own root,
state, socket and config), a cilia agent in a network namespace that plays the node's
host namespace (its own socket, state directory and bpffs root), a busybox root
filesystem (no image, no registry: `ctr run --rootfs`), and the CNI configuration and
plugin directory, which ctr sees through a private mount namespace (with-cni-dirs.sh)
because containerd 1.6's ctr reads only the fixed directories /etc/cni/net.d and
/opt/cni/bin, and the machine's own CNI set-up must not be touched.

The container is a pod like any other: ctr calls the plugin (ADD) with the container's
netns, the agent builds its network, and the container's own busybox talks to the node
and, across the BPF datapath, to a second pod. When the container exits, ctr calls DEL
and the agent must have nothing left of it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

pytestmark = [pytest.mark.runtime, pytest.mark.root]

HERE = Path(__file__).resolve().parent
WITH_CNI_DIRS = HERE / "with-cni-dirs.sh"
VENV_BIN = Path(sys.executable).parent
POD_CIDR = "10.243.7.0/24"
NODE_IP = "192.0.2.1"  # the node's own address, on lo in the node's namespace
NODE_PORT = 7777
POD_PORT = 8080
CTR_NAMESPACE = "cilia-rt"
NETWORK = "cilia"
CNI_VERSION = "1.0.0"  # ctr 1.6 links libcni 1.1, which knows spec versions up to 1.0.0

# Answers one line per connection with who answered and the peer address it saw, so the
# test knows the packets came from the pod's own address (no NAT, no proxy).
SERVER = r"""
import socket, sys
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    with c:
        c.settimeout(5)
        try:
            data = c.recv(1024)
            c.sendall(b"%s saw %s: %s" % (name, peer[0].encode(), data))
        except OSError:
            pass
"""


# ---- what the machine must have --------------------------------------------------------


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only; Debian amd64/arm64
            return False
        (e_phoff,) = struct.unpack_from("<Q", head, 32)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    return all(
        struct.unpack_from("<I", table, i * e_phentsize)[0] != 3  # PT_INTERP
        for i in range(e_phnum)
    )


def _why_not() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root: containerd, network namespaces and BPF (run the suite as root)"
    missing = [
        tool
        for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc")
        if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"containerd is not installed ({', '.join(missing)} not on PATH): "
            "`apt-get install -y containerd` (Debian 12: containerd 1.6 with ctr, its runc "
            "shim and runc)"
        )
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: `apt-get install -y {package}`"
    busybox = shutil.which("busybox")
    if busybox is None or not _is_static_elf(busybox):
        return (
            "the container's root filesystem needs a statically linked busybox "
            f"({'found a dynamic ' + busybox if busybox else 'none on PATH'}): "
            "`apt-get install -y busybox-static`"
        )
    if not (VENV_BIN / "cilia-cni").exists() or not (VENV_BIN / "cilia-agent").exists():
        return f"cilia is not installed in {VENV_BIN} (cilia-cni, cilia-agent missing)"
    return None


# ---- small tools ----------------------------------------------------------------------


def _run(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _quiet(*cmd: str) -> None:
    """A clean-up step: runs, never raises."""
    try:
        subprocess.run(cmd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout}s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _connectable(sock: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sock)
            return True
        except OSError:
            return False


def _pids_with(needle: bytes) -> list[int]:
    """Processes whose command line holds `needle` (a path unique to this test run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Env:
    """The test's own world: paths, names, and the commands that reach into it."""

    def __init__(self, tmp: Path, token: str):
        self.tmp = tmp
        self.token = token
        self.node_ns = f"cilia-rt-{token}"
        self.node_ns_path = f"/run/netns/{self.node_ns}"
        self.bpffs_root = f"/sys/fs/bpf/cilia-rt-{token}"
        self.agent_socket = str(tmp / "agent.sock")
        self.agent_state = tmp / "agent"
        self.agent_log = tmp / "agent.log"
        self.ctd_dir = tmp / "containerd"
        self.ctd_socket = str(self.ctd_dir / "containerd.sock")
        self.ctd_log = tmp / "containerd.log"
        self.rootfs = tmp / "rootfs"
        self.cni_bin = tmp / "cni-bin"
        self.cni_calls = tmp / "cni-calls.log"

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.ctd_socket, "-n", CTR_NAMESPACE, *args]

    def ctr_run(
        self, conf_dir: Path, container_id: str, *argv: str, cni: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """`ctr run --rm [--cni]`, with conf_dir and our plugin directory shown to ctr as
        /etc/cni/net.d and /opt/cni/bin. No cgroup path: runc then names the container's
        cgroup after its id and removes it with the container."""
        run = self.ctr(
            "run",
            "--rm",
            *(["--cni"] if cni else []),
            "--cgroup",
            "",
            "--runc-root",
            str(self.tmp / "runc"),
            "--fifo-dir",
            str(self.tmp / "fifo"),
            "--rootfs",
            str(self.rootfs),
            container_id,
            *argv,
        )
        scratch = self.tmp / f"mounts-{container_id}"
        cmd = ["sh", str(WITH_CNI_DIRS), str(scratch), str(conf_dir), str(self.cni_bin), "--", *run]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"`ctr run` of {container_id} did not finish in {timeout}s\n"
                f"stdout:\n{err.stdout}\nstderr:\n{err.stderr}\n"
                f"plugin calls:\n{_tail(self.cni_calls)}\nagent log:\n{_tail(self.agent_log)}"
            ) from None

    def remove_container(self, container_id: str) -> None:
        """What `ctr run --rm` should have done; needed when ctr failed half-way."""
        _quiet(*self.ctr("task", "kill", "-s", "SIGKILL", container_id))
        _quiet(*self.ctr("task", "delete", "-f", container_id))
        _quiet(*self.ctr("container", "delete", container_id))
        # runc removes the container's cgroup itself; this is for a half-made container.
        cgroups = Path("/sys/fs/cgroup")
        for cg in [*cgroups.glob(container_id), *cgroups.glob(f"*/{container_id}")]:
            try:
                cg.rmdir()
            except OSError:
                pass
        if (self.tmp / f"mounts-{container_id}").is_dir():
            shutil.rmtree(self.tmp / f"mounts-{container_id}", ignore_errors=True)

    def write_conf(self, name: str, socket_path: str) -> Path:
        conf_dir = self.tmp / f"net.d-{name}"
        conf_dir.mkdir()
        conflist = {
            "cniVersion": CNI_VERSION,
            "name": NETWORK,
            "plugins": [{"type": "cilia-cni", "socket": socket_path}],
        }
        (conf_dir / "10-cilia.conflist").write_text(json.dumps(conflist))
        return conf_dir

    def cni(self, command: str, container_id: str, netns: str, conf: dict) -> dict | None:
        """The plugin invoked directly, exactly as a runtime does (for the second pod)."""
        env = dict(
            os.environ,
            CNI_COMMAND=command,
            CNI_CONTAINERID=container_id,
            CNI_NETNS=netns,
            CNI_IFNAME="eth0",
            CNI_PATH=str(self.cni_bin),
            CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=server",
        )
        proc = subprocess.run(
            [str(self.cni_bin / "cilia-cni")],
            input=json.dumps(conf),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise AssertionError(f"cilia-cni {command} failed: {proc.stdout}{proc.stderr}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def endpoint_map(self) -> dict[str, int]:
        """The agent's pinned endpoints map: pod IP -> endpoint id."""
        from cilia.datapath.layouts import ENDPOINTS
        from cilia.datapath.maps import BpfMap

        with BpfMap.open_pinned(self.bpffs_root, ENDPOINTS) as emap:
            return {k.ip: v.ep_id for k, v in emap.items()}

    def redirect_peer_packets(self) -> int:
        from cilia.datapath.layouts import METRICS, Reason
        from cilia.datapath.maps import BpfMap

        with BpfMap.open_pinned(self.bpffs_root, METRICS) as metrics:
            return sum(
                v.packets
                for k, per_cpu in metrics.items()
                if k.reason == Reason.REASON_REDIRECT_PEER
                for v in per_cpu
            )

    def agent_endpoints(self) -> list[dict]:
        path = self.agent_state / "endpoints.json"
        return json.loads(path.read_text())["endpoints"] if path.exists() else []

    def node_links(self) -> list[str]:
        out = _run("ip", "-n", self.node_ns, "-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def serve(self, stack: ExitStack, netns_path: str, host: str, port: int, name: str) -> None:
        log = self.tmp / f"server-{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={netns_path}",
                    sys.executable,
                    "-c",
                    SERVER,
                    host,
                    str(port),
                    name,
                ],
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
            )
        stack.callback(_stop, proc)
        if proc.stdout.readline().strip() != "listening":
            proc.wait(5)
            raise AssertionError(f"server {name} did not start:\n{_tail(log)}")


# ---- the world, set up once and always taken down -------------------------------------


def _start_agent(env: Env, stack: ExitStack) -> None:
    _run("ip", "netns", "add", env.node_ns)
    stack.callback(_quiet, "ip", "netns", "delete", env.node_ns)
    _run("ip", "-n", env.node_ns, "link", "set", "lo", "up")
    _run("ip", "-n", env.node_ns, "addr", "add", f"{NODE_IP}/32", "dev", "lo")

    # Registered before the agent starts, so it runs after the agent has stopped.
    stack.callback(shutil.rmtree, env.bpffs_root, ignore_errors=True)
    with open(env.agent_log, "w") as log:
        agent = subprocess.Popen(
            [
                "nsenter",
                f"--net={env.node_ns_path}",
                str(VENV_BIN / "cilia-agent"),
                "--node-name",
                f"rt-{env.token}",
                "--pod-cidr",
                POD_CIDR,
                "--socket",
                env.agent_socket,
                "--bpffs-root",
                env.bpffs_root,
                "--state-dir",
                str(env.agent_state),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stack.callback(_stop, agent)
    _wait_for("cilia-agent", lambda: _connectable(env.agent_socket), agent, env.agent_log)


def _start_containerd(env: Env, stack: ExitStack) -> None:
    # containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its state dir;
    # remove that directory afterwards only if this test made it and it is empty.
    made = [p for p in (Path("/run/containerd"), Path("/run/containerd/s")) if not p.exists()]
    for p in made:
        stack.callback(lambda p=p: p.rmdir() if p.is_dir() and not any(p.iterdir()) else None)

    env.ctd_dir.mkdir()
    config = env.ctd_dir / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{env.ctd_dir}/root"\n'
        f'state = "{env.ctd_dir}/state"\n'
        # No CRI: it would look for images and its own CNI set-up; ctr is all we need.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{env.ctd_socket}"\n'
        "[ttrpc]\n"
        '  address = ""\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
        # Its default is /opt/containerd, made on start.
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{env.ctd_dir}/opt"\n'
    )
    with open(env.ctd_log, "w") as log:
        containerd = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_containerd() -> None:
        if containerd.poll() is None and _connectable(env.ctd_socket):
            out = _run(*env.ctr("container", "list", "-q"), check=False).stdout
            for cid in out.split():
                env.remove_container(cid)
        _stop(containerd)
        # Shims outlive containerd by design; any left are ours by their -address.
        _kill_pids(_pids_with(env.ctd_socket.encode()))

    stack.callback(stop_containerd)
    try:
        _wait_for("containerd", lambda: _connectable(env.ctd_socket), containerd, env.ctd_log)
    except AssertionError as err:
        pytest.skip(f"containerd is installed but cannot start here: {err}")


def _make_rootfs(env: Env) -> None:
    bin_dir = env.rootfs / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(shutil.which("busybox"), bin_dir / "busybox")
    for applet in ("sh", "ip", "nc", "cat", "echo", "sleep"):
        (bin_dir / applet).symlink_to("busybox")


def _make_cni_bin(env: Env) -> None:
    """The plugin directory: `cilia-cni` (found by the config's "type") is a wrapper that
    notes each call the runtime makes and then execs the real plugin, same environment,
    same stdin."""
    env.cni_bin.mkdir()
    wrapper = env.cni_bin / "cilia-cni"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME" >> {env.cni_calls}\n'
        f'exec {VENV_BIN / "cilia-cni"} "$@"\n'
    )
    wrapper.chmod(0o755)


@pytest.fixture(scope="module")
def env():
    why = _why_not()
    if why:
        pytest.skip(why)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cilia-rt-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        e = Env(tmp, secrets.token_hex(3))
        _make_rootfs(e)
        _make_cni_bin(e)
        _start_containerd(e, stack)

        # Can this machine run a container at all? If not, that is no fault of cilia.
        # (No --cni: the config directory is only there because the wrapper wants one.)
        smoke = f"cilia-rt-smoke-{e.token}"
        stack.callback(e.remove_container, smoke)
        proc = e.ctr_run(e.write_conf("smoke", "/nonexistent"), smoke, "/bin/echo", "ok", cni=False)
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            pytest.skip(
                "containerd is installed but cannot run a container here "
                f"(`ctr run --rootfs` without CNI failed: {proc.stderr.strip()})"
            )

        _start_agent(e, stack)
        yield e


@pytest.fixture
def server_pod(env):
    """A second pod on the same node, made through the plugin as a runtime makes one,
    running a TCP server; and a server in the node's own namespace."""
    with ExitStack() as stack:
        netns = f"{env.node_ns}-srv"
        _run("ip", "netns", "add", netns)
        stack.callback(_quiet, "ip", "netns", "delete", netns)
        conf = {
            "cniVersion": CNI_VERSION,
            "name": NETWORK,
            "type": "cilia-cni",
            "socket": env.agent_socket,
        }
        cid = f"server-{env.token}"
        stack.callback(env.cni, "DEL", cid, f"/run/netns/{netns}", conf)
        result = env.cni("ADD", cid, f"/run/netns/{netns}", conf)
        ip = result["ips"][0]["address"].split("/")[0]
        env.serve(stack, f"/run/netns/{netns}", "0.0.0.0", POD_PORT, "pod")
        env.serve(stack, env.node_ns_path, NODE_IP, NODE_PORT, "node")
        yield ip


# ---- the tests ------------------------------------------------------------------------


def test_ctr_run_cni_gets_a_working_pod(env, server_pod):
    """`ctr run --rm --cni`: the container gets its address from cilia, talks to the node
    and to another pod, and when it exits ctr's DEL leaves nothing of it behind."""
    cid = f"cilia-rt-{env.token}"
    full_id = f"{CTR_NAMESPACE}-{cid}"  # what ctr passes as CNI_CONTAINERID
    conf_dir = env.write_conf("pod", env.agent_socket)
    before = env.redirect_peer_packets()

    script = (
        "ip -4 -o addr show dev eth0; ip route; "
        f"echo to-node | nc -w 5 {NODE_IP} {NODE_PORT}; echo; "
        f"echo to-pod | nc -w 5 {server_pod} {POD_PORT}; echo"
    )
    try:
        proc = env.ctr_run(conf_dir, cid, "/bin/sh", "-c", script)
    finally:
        env.remove_container(cid)
    report = (
        f"ctr exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n"
        f"plugin calls:\n{_tail(env.cni_calls)}\nagent log:\n{_tail(env.agent_log)}"
    )
    assert proc.returncode == 0, report

    # The container's eth0 got a /32 from the node's pod CIDR and the link-local gateway.
    m = re.search(r"eth0\s+inet (\d+\.\d+\.\d+\.\d+)/32", proc.stdout)
    assert m, report
    pod_ip = m.group(1)
    assert ipaddress.IPv4Address(pod_ip) in ipaddress.IPv4Network(POD_CIDR), report
    assert pod_ip != server_pod, report
    assert "default via 169.254.1.1 dev eth0" in proc.stdout, report

    # Real packets both ways, from the pod's own address: to the node's stack, and to the
    # other pod through the datapath (bpf_redirect_peer, counted in the metrics map).
    assert f"node saw {pod_ip}: to-node" in proc.stdout, report
    assert f"pod saw {pod_ip}: to-pod" in proc.stdout, report
    assert env.redirect_peer_packets() > before, report

    # The runtime called ADD with the container's netns, then DEL, for the same id.
    calls = [line.split() for line in env.cni_calls.read_text().splitlines()]
    ours = [c for c in calls if c[1] == full_id]
    assert [c[0] for c in ours] == ["ADD", "DEL"], report
    assert re.fullmatch(r"/proc/\d+/ns/net", ours[0][2]), report
    assert ours[0][3] == "eth0", report

    # DEL left nothing of the container: only the server pod remains, in the map, in the
    # agent's state, in its IPAM leases, and as a host-side veth.
    assert env.endpoint_map().keys() == {server_pod}, report
    endpoints = env.agent_endpoints()
    assert [e["container_id"] for e in endpoints] == [f"server-{env.token}"], report
    leases = json.loads((env.agent_state / "ipam.json").read_text())["leases"]
    assert pod_ip not in leases, report
    assert not [owner for owner in leases.values() if owner.startswith(full_id)], report
    lxc = [name for name in env.node_links() if name.startswith("lxc")]
    assert lxc == [endpoints[0]["host_ifname"]], report


def test_ctr_run_cni_reports_an_unreachable_agent(env):
    """With no agent behind the configured socket, the runtime fails the container with
    the plugin's own message, and the agent is left with nothing."""
    cid = f"cilia-rt-down-{env.token}"
    missing = str(env.tmp / "no-agent.sock")
    before = env.endpoint_map()
    try:
        proc = env.ctr_run(env.write_conf("down", missing), cid, "/bin/echo", "unexpected")
    finally:
        env.remove_container(cid)
    assert proc.returncode != 0, proc.stdout
    assert "unexpected" not in proc.stdout
    assert f"agent not reachable at {missing}: is the cilia agent running?" in proc.stderr, (
        proc.stderr
    )
    assert env.endpoint_map() == before
    full_id = f"{CTR_NAMESPACE}-{cid}"
    assert full_id not in [e["container_id"] for e in env.agent_endpoints()]
