"""`cilia demo`: the lab, two pods, real traffic, and the counters that show the path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from cilia.client import AgentClient
from cilia.lab.lab import Lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _server(lab: Lab, target: str, port: int, name: str) -> subprocess.Popen:
    argv = lab.exec_argv(target, [sys.executable, "-m", "cilia.lab.probe", "serve",
                                  "--tcp", str(port), "--udp", str(port), "--name", name])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # "ready"
    return proc


def _probe(lab: Lab, target: str, host: str, port: int, proto: str) -> bool:
    argv = lab.exec_argv(target, [sys.executable, "-m", "cilia.lab.probe", "connect", host,
                                  str(port), "--proto", proto, "--message", "hello"])
    res = subprocess.run(argv, capture_output=True, text=True)
    answer = res.stdout.strip() or res.stderr.strip()
    mark = "ok  " if res.returncode == 0 else "FAIL"
    print(f"  {mark} {target} -> {host}:{port}/{proto}: {answer}")
    return res.returncode == 0


def run_demo(lab_name: str, keep: bool = False) -> int:
    lab = Lab(lab_name)
    servers: list[subprocess.Popen] = []
    ok = True
    try:
        _say(f"bringing up lab {lab_name!r}: one node, an agent, an outside network")
        state = lab.up()
        node = state.nodes[0]
        print(f"  node {node.name} (netns {node.netns}), pod CIDR {node.pod_cidr}")

        _say(f"running the pods of {EXAMPLES / 'pods.yaml'} through cilia-cni")
        pods = {}
        for doc in yaml.safe_load_all((EXAMPLES / "pods.yaml").read_text()):
            if doc["kind"] == "Pod":
                pod = lab.run_pod(doc)
                pods[pod.name] = pod
                print(f"  pod {pod.namespace}/{pod.name}: {pod.ip}")
            else:
                lab.datastore.put(doc)
        server = pods["server"]

        _say("starting echo servers in demo/server, on the node and outside")
        servers.append(_server(lab, "demo/server", 8080, "server"))
        servers.append(_server(lab, f"node:{node.name}", 9090, node.name))
        servers.append(_server(lab, "outside", 9000, "outside"))
        before = _redirects(node.socket)

        _say("traffic")
        for proto in ("tcp", "udp"):
            ok &= _probe(lab, "demo/client", server.ip, 8080, proto)
        ok &= _probe(lab, "demo/client", node.underlay_ip, 9090, "tcp")
        ok &= _probe(lab, "demo/client", "172.30.0.1", 9000, "tcp")
        ok &= _probe(lab, "outside", server.ip, 8080, "tcp")

        _say("endpoints (cilia endpoint list)")
        for ep in AgentClient(node.socket).endpoints():
            print(f"  {ep.id:3} {ep.pod_namespace}/{ep.pod_name:8} {ep.ip:12} {ep.host_ifname}")

        _say("datapath counters (cilia metrics)")
        for m in AgentClient(node.socket).metrics():
            print(f"  {m.reason:26} {m.direction:8} {m.packets:8} packets {m.bytes:10} bytes")
        delivered = _redirects(node.socket) - before
        print(f"\n  {delivered} packets of this demo were delivered pod to pod by "
              "bpf_redirect_peer, straight into the destination pod's netns.")
        ok &= delivered > 0
    finally:
        for s in servers:
            s.terminate()
            s.wait()
        if keep and lab.exists():
            _say(f"lab {lab_name!r} kept: try `cilia endpoint list`, "
                 "`cilia lab exec demo/client -- ip route`; `cilia lab down` removes it")
        else:
            _say("tearing down")
            lab.down()
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _redirects(socket: str) -> int:
    return sum(
        m.packets for m in AgentClient(socket).metrics() if m.reason == "redirect_peer"
    )
