"""The agent's configuration: flags, with defaults for a real node."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cilia.agent.masquerade import IPTABLES_MODES

DEFAULT_SOCKET = "/run/cilia/cilia.sock"
DEFAULT_BPFFS_ROOT = "/sys/fs/bpf/cilia"
DEFAULT_STATE_DIR = "/var/lib/cilia"


@dataclass
class AgentConfig:
    node_name: str
    pod_cidr: str
    socket: str = DEFAULT_SOCKET
    bpffs_root: str = DEFAULT_BPFFS_ROOT
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    datastore: str = "local"
    datastore_dir: Path | None = None
    kubeconfig: str | None = None  # kubernetes datastore; None: in-cluster, then $KUBECONFIG
    mtu: int = 1500
    bpf_dir: Path | None = None
    devices: list[str] = field(default_factory=list)  # uplinks: XDP prefilter, from-netdev
    node_ip: str = ""  # the address other nodes reach this one at
    routing: str = "native"  # native | vxlan
    cluster_cidr: str = "10.244.0.0/16"  # every pod CIDR: traffic beyond it is masqueraded
    masquerade: bool = True
    iptables_mode: str = "auto"
    policy_map_max: int = 0
    ct_map_max: int = 0  # entries of the conntrack table (0: from the node's memory)
    ct_endpoint_max: int | None = None  # live entries of one endpoint (None: 1/8; 0: any)
    policy_namespace_share: float = 0.5  # of the policy map, for one namespace's policies
    identity_max: int = 0  # the highest cluster identity this agent allocates (0: 65535)
    metrics_addresses: list[str] = field(default_factory=list)
    prefilter: bool = True
    kernel_drop_reasons: bool = True  # the stack's drops of pods' packets, in the flows
    cleanup: bool = False  # remove everything cilia set up on the node, then exit
    log_level: str = "info"
    metrics_port: int = 9962  # Prometheus /metrics; 0 turns it off
    service_cidr: str = "10.96.0.0/16"  # local datastore: ClusterIPs of Services naming none
    services: bool = True  # translate Service frontends in the datapath
    # cilia does every Service itself (kube-proxy is not installed): implies socket LB
    kube_proxy_replacement: bool = False
    socket_lb: bool = False  # Services for the node's own sockets (agent/socket_lb.py)
    socket_lb_cgroup: str = "/sys/fs/cgroup"  # the cgroup v2 its programs hang on
    maglev_table_size: int = 1021  # slots of each external frontend (prime; 0: no Maglev)
    flow_history: int = 16384  # flows kept for `cilia observe` (0: none)
    metrics_workload_labels: bool = False  # flows by workloads at both ends (opt-in)
    metrics_workload_series: int = 1000  # at most this many such label sets
    policy_audit_mode: bool = False  # every endpoint's policy only reports its drops

    @property
    def local_datastore_dir(self) -> Path:
        return self.datastore_dir or self.state_dir / "datastore"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> AgentConfig:
        p = argparse.ArgumentParser(
            prog="cilia-agent", description="cilia node agent: pod networking on eBPF"
        )
        p.add_argument("--node-name", help="this node's name (required but for --cleanup)")
        p.add_argument("--pod-cidr", help="this node's pod CIDR, e.g. 10.244.1.0/24 (with "
                       "--datastore kubernetes, default: its CiliaNode's, from the operator)")
        p.add_argument("--socket", default=DEFAULT_SOCKET, help="gRPC unix socket (root-only)")
        p.add_argument("--bpffs-root", default=DEFAULT_BPFFS_ROOT, help="where maps are pinned")
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
        p.add_argument("--datastore", default="local", choices=["local", "kubernetes"],
                       help="local: manifests in --datastore-dir; kubernetes: the API server")
        p.add_argument("--kubeconfig", help="kubernetes datastore: a kubeconfig file (default: "
                                            "in-cluster config, then $KUBECONFIG)")
        p.add_argument(
            "--datastore-dir", type=Path, help="local datastore (default STATE/datastore)"
        )
        p.add_argument("--mtu", type=int, default=1500, help="MTU of pod interfaces")
        p.add_argument("--bpf-dir", type=Path, help="compiled BPF objects")
        p.add_argument("--devices", default="",
                       help="uplink devices, comma-separated (default: the default route's)")
        p.add_argument("--node-ip", default="",
                       help="this node's address for other nodes (default: the first device's)")
        p.add_argument("--routing", choices=["native", "vxlan"], default="native",
                       help="cross-node pod traffic: routed natively, or a VXLAN overlay")
        p.add_argument("--cluster-cidr", default="10.244.0.0/16",
                       help="all pod CIDRs of the cluster: pod traffic beyond it is masqueraded")
        p.add_argument("--no-masquerade", dest="masquerade", action="store_false")
        p.add_argument("--metrics-address", action="append", default=[], metavar="IP",
                       help="address to serve metrics on, repeatable (default: the node's "
                            "address and 127.0.0.1; 0.0.0.0 for all)")
        p.add_argument("--policy-map-max", type=int, default=0, metavar="N",
                       help="entries of the policy map (default: the objects' own, 262144); "
                            "a pinned map of another size must be removed first")
        p.add_argument("--ct-map-max", type=int, default=0, metavar="N",
                       help="entries of the conntrack table (default: 0.25%% of the node's "
                            "memory at 128 bytes an entry, a power of two between 65,536 "
                            "and 4,194,304); a pinned table of another size is copied "
                            "into a new one")
        p.add_argument("--ct-endpoint-max", type=int, default=None, metavar="N",
                       help="live conntrack entries one endpoint may have (the flows its "
                            "pod opens, and those opened to it from elsewhere); a new flow "
                            "over it is dropped (drop_ct_endpoint_limit), so one pod cannot "
                            "evict the others' connections (default: an eighth of the "
                            "table; 0: no limit)")
        p.add_argument("--policy-namespace-share", type=float, default=0.5, metavar="F",
                       help="the share of the policy map the policies of one namespace may "
                            "take together on a node (default 0.5); over it, the "
                            "namespace's largest policies are refused (their pods stay "
                            "isolated). Cluster-wide policies count against no namespace")
        p.add_argument("--identity-max", type=int, default=0, metavar="N",
                       help="the highest security identity this agent allocates (default: "
                            "65535, the whole 16-bit space; smaller only for tests, to "
                            "exhaust the space)")
        p.add_argument("--iptables-mode", choices=IPTABLES_MODES, default="auto",
                       help="iptables backend for the masquerade chain (default auto: the "
                            "one holding the node's rules, kube-proxy's)")
        p.add_argument("--no-prefilter", dest="prefilter", action="store_false",
                       help="do not attach the XDP prefilter to the devices")
        p.add_argument("--kernel-drop-reasons", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="report the packets from or to this node's pods that the "
                            "kernel's stack drops, with its reason (kernel:NO_SOCKET), in "
                            "the flows beside the datapath's drops: a program on the "
                            "skb:kfree_skb tracepoint (default: on where the kernel has it)")
        p.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
        p.add_argument("--metrics-port", type=int, default=9962,
                       help="Prometheus metrics port (0: off)")
        p.add_argument("--service-cidr", default="10.96.0.0/16",
                       help="local datastore: where Services without a clusterIP get one")
        p.add_argument("--no-services", dest="services", action="store_false",
                       help="translate no Service frontends (leave Services to kube-proxy)")
        p.add_argument("--kube-proxy-replacement", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="cilia does every Service itself, kube-proxy is not installed: "
                            "turns socket LB on (unless --no-socket-lb); without it, pods' "
                            "Services are still translated in BPF, before policy, and the "
                            "rest is kube-proxy's")
        p.add_argument("--socket-lb", action=argparse.BooleanOptionalAction, default=None,
                       help="load-balance Services for the node's own sockets (host "
                            "network namespace) at connect/sendmsg, as without kube-proxy "
                            "(default: on with --kube-proxy-replacement)")
        p.add_argument("--lb-maglev-table-size", type=int, default=1021, metavar="PRIME",
                       help="NodePorts from outside pick their backend from a Maglev table "
                            "of this many slots, the same on every node (a prime; 0: off). "
                            "Each such frontend takes that many entries of the slots map "
                            "(262,144 in all)")
        p.add_argument("--socket-lb-cgroup", default="/sys/fs/cgroup", metavar="PATH",
                       help="the cgroup v2 the socket LB programs attach to (default "
                            "/sys/fs/cgroup, the cgroup2 root)")
        p.add_argument("--flow-history", type=int, default=16384, metavar="N",
                       help="keep the last N flow events for `cilia observe --last/--since` "
                            "(about 145 bytes each; 0: keep none, live streaming only)")
        p.add_argument("--metrics-workload-labels", action="store_true",
                       help="count flows by source and destination namespace and workload "
                            "(cilia_workload_flows_total; off by default: cardinality)")
        p.add_argument("--metrics-workload-series", type=int, default=1000, metavar="N",
                       help="with --metrics-workload-labels: at most N label sets, the "
                            "rest counted as 'other'")
        p.add_argument("--policy-audit-mode", action="store_true",
                       help="policy audit mode for every pod of this node: what a policy "
                            "would drop passes, reported as verdict audit in flows, "
                            "metrics and `cilia policy trace` (per namespace or pod: the "
                            "annotation cilia.io/policy-audit-mode: \"true\")")
        p.add_argument("--cleanup", action="store_true",
                       help="remove everything cilia set up on this node (programs, "
                            "socket LB links, routes, VXLAN device, iptables chain, pinned "
                            "maps) and exit")
        a = p.parse_args(argv)
        try:
            ipaddress.IPv4Network(a.cluster_cidr)
            ipaddress.IPv4Network(a.service_cidr)
            if a.node_ip:
                ipaddress.IPv4Address(a.node_ip)
        except ValueError as err:
            p.error(str(err))
        if a.node_name is None and not a.cleanup:
            p.error("--node-name is required")
        size = a.lb_maglev_table_size
        if size and (size < 3 or size > 65521 or any(size % d == 0 for d in range(2, 256)
                                                     if d * d <= size)):
            p.error(f"--lb-maglev-table-size {size}: give a prime between 3 and 65521 "
                    "(e.g. 251, 1021, 4099), or 0 to turn Maglev off")
        if a.pod_cidr is None and a.datastore != "kubernetes" and not a.cleanup:
            p.error("--pod-cidr is required (but for --datastore kubernetes)")
        try:
            if a.pod_cidr is not None:
                ipaddress.IPv4Network(a.pod_cidr)
        except ValueError as err:
            p.error(f"--pod-cidr {a.pod_cidr!r}: {err}")
        for addr in a.metrics_address:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError as err:
                p.error(f"--metrics-address: {err}")
        if a.policy_map_max < 0:
            p.error(f"--policy-map-max {a.policy_map_max}: must be 0 (the default) or more")
        if a.ct_map_max and not 1024 <= a.ct_map_max <= 1 << 24:
            p.error(f"--ct-map-max {a.ct_map_max}: must be 0 (the default: from the node's "
                    "memory) or between 1024 and 16,777,216")
        if a.ct_endpoint_max is not None and a.ct_endpoint_max < 0:
            p.error(f"--ct-endpoint-max {a.ct_endpoint_max}: must be 0 (no limit) or more")
        if not 0 < a.policy_namespace_share <= 1:
            p.error(f"--policy-namespace-share {a.policy_namespace_share}: must be more "
                    "than 0 and at most 1")
        if a.identity_max and not 256 <= a.identity_max <= 65535:
            p.error(f"--identity-max {a.identity_max}: must be between 256 and 65535")
        if not 0 <= a.flow_history <= 10_000_000:
            p.error(f"--flow-history {a.flow_history}: must be between 0 and 10,000,000")
        if not 576 <= a.mtu <= 65535:
            p.error(f"--mtu {a.mtu}: must be between 576 and 65535")
        return cls(
            node_name=a.node_name or "",
            pod_cidr=a.pod_cidr or "",
            socket=a.socket,
            bpffs_root=a.bpffs_root,
            state_dir=a.state_dir,
            datastore=a.datastore,
            datastore_dir=a.datastore_dir,
            kubeconfig=a.kubeconfig,
            mtu=a.mtu,
            bpf_dir=a.bpf_dir,
            devices=[d for d in a.devices.split(",") if d],
            node_ip=a.node_ip,
            routing=a.routing,
            cluster_cidr=a.cluster_cidr,
            masquerade=a.masquerade,
            iptables_mode=a.iptables_mode,
            policy_map_max=a.policy_map_max,
            ct_map_max=a.ct_map_max,
            ct_endpoint_max=a.ct_endpoint_max,
            policy_namespace_share=a.policy_namespace_share,
            identity_max=a.identity_max,
            metrics_addresses=list(a.metrics_address),
            prefilter=a.prefilter,
            kernel_drop_reasons=a.kernel_drop_reasons,
            cleanup=a.cleanup,
            log_level=a.log_level,
            metrics_port=a.metrics_port,
            service_cidr=a.service_cidr,
            services=a.services,
            kube_proxy_replacement=a.kube_proxy_replacement,
            socket_lb=a.kube_proxy_replacement if a.socket_lb is None else a.socket_lb,
            maglev_table_size=a.lb_maglev_table_size,
            socket_lb_cgroup=a.socket_lb_cgroup,
            flow_history=a.flow_history,
            metrics_workload_labels=a.metrics_workload_labels,
            metrics_workload_series=a.metrics_workload_series,
            policy_audit_mode=a.policy_audit_mode,
        )
