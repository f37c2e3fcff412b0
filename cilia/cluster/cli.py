"""`cilia cluster up|down|kubectl|kubeconfig`: a real Kubernetes on this machine."""

from __future__ import annotations

import argparse
import os
import sys

from cilia.cluster.cluster import (
    CILIA_MODES,
    DEFAULT_CLUSTER,
    HELM_NAMESPACE,
    HELM_RELEASE,
    KUBE_PROXY_MODES,
    Cluster,
    ClusterError,
)
from cilia.cluster.image import ImageError
from cilia.cluster.upstream import UpstreamError


def _cluster(args) -> Cluster:
    return Cluster(args.name or os.environ.get("CILIA_CLUSTER", DEFAULT_CLUSTER))


def cmd_up(args) -> None:
    cluster = _cluster(args)
    state = cluster.up(nodes=args.nodes, cilia=args.cilia, image_tag=args.image_tag,
                       kube_proxy=args.kube_proxy, agent_args=args.agent_arg)
    for n in state.nodes:
        print(f"node {n.name}: netns {n.netns}, address {n.ip}")
    print(f"control plane: netns {state.outside_netns}, API server {cluster.api_server} "
          f"(from this machine: https://127.0.0.1:{state.api_port})")
    print(f"kubeconfig: {cluster.kubeconfig_path}")
    if state.cilia == "helm":
        print(f"cilia: helm release {HELM_RELEASE} in {HELM_NAMESPACE}, image {state.image}"
              f" (`helm --kubeconfig {cluster.kubeconfig_path} -n {HELM_NAMESPACE} status "
              f"{HELM_RELEASE}`)")
    print(f"try: cilia cluster kubectl --name {cluster.name} -- get nodes")


def cmd_down(args) -> None:
    cluster = _cluster(args)
    cluster.down()
    print(f"cluster {cluster.name} is down")


def cmd_kubectl(args) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    full = _cluster(args).kubectl_argv(argv)
    os.execv(full[0], full)


def cmd_kubeconfig(args) -> None:
    cluster = _cluster(args)
    cluster.load()
    print(cluster.kubeconfig_path)


def add_parser(sub) -> None:
    cl = sub.add_parser("cluster", help="a real Kubernetes on this machine: upstream "
                        "components, nodes in network namespaces, cilia as the CNI")
    cs = cl.add_subparsers(dest="sub", required=True)

    def named(s):
        s.add_argument("--name", help="cluster name (default: $CILIA_CLUSTER or "
                       f"{DEFAULT_CLUSTER})")
        return s

    s = named(cs.add_parser("up", help="build what is missing and start a cluster"))
    s.add_argument("--nodes", type=int, default=2, choices=range(1, 10), metavar="N",
                   help="number of nodes, 1-9 (default 2)")
    s.add_argument("--cilia", choices=CILIA_MODES, default="process",
                   help="how cilia runs: 'process' (default: the agents and operator as "
                   "processes from this checkout, fastest to iterate on) or 'helm' (the "
                   "nodes start with no CNI; `helm install` of charts/cilia with the image "
                   "built from the Dockerfile, as users install it)")
    s.add_argument("--image-tag", help="with --cilia helm: the image's tag (default "
                   "dev-<hash of its sources>)")
    s.add_argument("--kube-proxy", choices=KUBE_PROXY_MODES, default="iptables",
                   help="'iptables' (default: kube-proxy on every node, cilia translating "
                   "pods' Services before it), 'nftables' (the same with kube-proxy in "
                   "nftables mode) or 'none' (no kube-proxy: cilia replaces it, socket LB "
                   "included)")
    s.add_argument("--agent-arg", action="append", default=[], metavar="FLAG",
                   help="one more flag for every cilia agent (process mode), repeatable; "
                   "e.g. --agent-arg=--no-services leaves every Service to kube-proxy")
    s.set_defaults(fn=cmd_up)
    named(cs.add_parser("down", help="remove everything the cluster made")).set_defaults(
        fn=cmd_down)
    s = named(cs.add_parser("kubectl", help="run the pinned kubectl against the cluster"))
    s.add_argument("argv", nargs=argparse.REMAINDER, help="-- ARGS...")
    s.set_defaults(fn=cmd_kubectl)
    named(cs.add_parser("kubeconfig", help="print the path of the cluster's kubeconfig")
          ).set_defaults(fn=cmd_kubeconfig)


ERRORS = (ClusterError, UpstreamError, ImageError)


def fail(err: Exception) -> None:
    print(f"cilia: {err}", file=sys.stderr)
    sys.exit(1)
