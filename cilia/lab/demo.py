"""`cilia demo`: the lab, two pods, real traffic, and the counters that show the path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cilia.client import AgentClient
from cilia.lab.lab import Lab
from cilia.lab.traffic import probe, start_server, stop_servers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _probe(lab: Lab, target: str, host: str, port: int, proto: str,
           expect: bool = True) -> bool:
    """Sends one message; True if the outcome is the expected one (an answer, or none)."""
    answer = probe(lab, target, host, port, proto, timeout=2 if expect else 1)
    answered = answer is not None
    shown = answer if answered else "no answer"
    if not expect:
        shown += " (refused by policy, as expected)" if not answered else " (NOT refused)"
    mark = "ok  " if answered == expect else "FAIL"
    print(f"  {mark} {target} -> {host}:{port}/{proto}: {shown}")
    return answered == expect


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
        servers.append(start_server(lab, "demo/server", 8080, "server"))
        servers.append(start_server(lab, f"node:{node.name}", 9090, node.name))
        servers.append(start_server(lab, "outside", 9000, "outside"))
        before = _redirects(node.socket)

        _say("traffic")
        for proto in ("tcp", "udp"):
            ok &= _probe(lab, "demo/client", server.ip, 8080, proto)
        ok &= _probe(lab, "demo/client", node.underlay_ip, 9090, "tcp")
        ok &= _probe(lab, "demo/client", "172.30.0.1", 9000, "tcp")
        ok &= _probe(lab, "outside", server.ip, 8080, "tcp")
        print("  (the node masquerades pods' traffic to the outside; replies come back)")

        _say(f"policy: {EXAMPLES / 'policy.yaml'} (server accepts role=frontend only)")
        policy = yaml.safe_load((EXAMPLES / "policy.yaml").read_text())
        lab.datastore.put(policy)
        client_api = AgentClient(node.socket)
        client_api.wait_policy_synced()
        ok &= _probe(lab, "demo/client", server.ip, 8080, "tcp", expect=False)
        _trace(lab, node.socket)
        _say("relabelling demo/client with role=frontend")
        relabelled = next(d for d in yaml.safe_load_all((EXAMPLES / "pods.yaml").read_text())
                          if d["kind"] == "Pod" and d["metadata"]["name"] == "client")
        relabelled["metadata"]["labels"]["role"] = "frontend"
        lab.datastore.put(relabelled)
        client_api.wait_policy_synced()
        ok &= _probe(lab, "demo/client", server.ip, 8080, "tcp")
        _trace(lab, node.socket)

        _say("endpoints (cilia endpoint list)")
        for ep in AgentClient(node.socket).endpoints():
            print(f"  {ep.id:3} {ep.pod_namespace}/{ep.pod_name:8} {ep.ip:12} {ep.host_ifname}")

        _say("datapath counters (cilia metrics)")
        for m in AgentClient(node.socket).metrics():
            print(f"  {m.reason:26} {m.direction:8} {m.packets:8} packets {m.bytes:10} bytes")
        delivered = _redirects(node.socket) - before
        print(f"\n  {delivered} packets of this demo were delivered pod to pod by "
              "bpf_redirect_peer (redirect_peer/egress: from cil_from_pod), straight into\n"
              "  the destination pod's netns; redirect_peer/ingress counts the outside's\n"
              "  packets delivered the same way by cil_from_netdev on the node's uplink.")
        ok &= delivered > 0
    finally:
        stop_servers(servers)
        if keep and lab.exists():
            _say(f"lab {lab_name!r} kept: try `cilia endpoint list`, "
                 "`cilia lab exec demo/client -- ip route`; `cilia lab down` removes it")
        else:
            _say("tearing down")
            lab.down()
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _trace(lab: Lab, socket: str) -> None:
    from cilia.api.v1 import cilia_pb2

    req = cilia_pb2.TraceRequest(port=8080, protocol="TCP",
                                 to=cilia_pb2.PodRef(namespace="demo", name="server"))
    getattr(req, "from").CopyFrom(cilia_pb2.PodRef(namespace="demo", name="client"))
    res = AgentClient(socket).trace(req)
    print(f"  cilia policy trace --from demo/client --to demo/server --port 8080/TCP: "
          f"{'ALLOWED' if res.allowed else 'DENIED'}")
    for st in res.steps:
        print(f"    {st.direction} of {st.endpoint}: {st.reason}")


def _redirects(socket: str) -> int:
    return sum(m.packets for m in AgentClient(socket).metrics()
               if m.reason == "redirect_peer" and m.direction == "egress")
