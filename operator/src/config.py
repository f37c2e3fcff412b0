"""cilia-operator's configuration: flags, with the defaults of a real cluster."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass

CONTROLLERS = ("identities", "ipam", "policies", "nodegc")


@dataclass
class OperatorConfig:
    kubeconfig: str | None = None
    cluster_pool: str = "10.244.0.0/16"
    node_mask: int = 24
    identity_gc_grace: float = 900.0  # an identity unused this long is deleted
    gc_interval: float = 30.0  # how often the sweeps run (identity and node GC, repair)
    lease_namespace: str = "kube-system"
    lease_name: str = "cilia-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = ""  # this replica's name in the Lease
    bind_address: str = "0.0.0.0"
    health_port: int = 9234  # /healthz, /readyz
    metrics_port: int = 9963  # /metrics (0: none; equal to health_port: served there)
    identities: bool = True
    ipam: bool = True
    policies: bool = True
    nodegc: bool = True
    log_level: str = "info"

    def enabled(self) -> list[str]:
        return [c for c in CONTROLLERS if getattr(self, c)]

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> OperatorConfig:
        d = cls()
        p = argparse.ArgumentParser(
            prog="cilia-operator",
            description="cilia's cluster-wide controller: identities, pod CIDRs, policy "
                        "status, garbage collection (kopf; one active replica per Lease)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then "
                                            "$KUBECONFIG or ~/.kube/config)")
        p.add_argument("--cluster-pool", default=d.cluster_pool,
                       help="the IPv4 pool nodes' pod CIDRs are taken from")
        p.add_argument("--node-mask", type=int, default=d.node_mask,
                       help="prefix length of each node's pod CIDR")
        p.add_argument("--identity-gc-grace", type=float, default=d.identity_gc_grace,
                       metavar="SECONDS", help="delete an identity no pod has used this long")
        p.add_argument("--gc-interval", type=float, default=d.gc_interval, metavar="SECONDS",
                       help="period of the garbage-collection and repair sweeps")
        p.add_argument("--leader-election-namespace",
                       default=os.environ.get("POD_NAMESPACE") or d.lease_namespace)
        p.add_argument("--leader-election-lease", default=d.lease_name)
        p.add_argument("--lease-duration", type=float, default=d.lease_duration,
                       metavar="SECONDS", help="how long a lease not renewed stays held")
        p.add_argument("--renew-deadline", type=float, default=d.renew_deadline,
                       metavar="SECONDS", help="the leader steps down if it cannot renew "
                                               "for this long")
        p.add_argument("--retry-period", type=float, default=d.retry_period,
                       metavar="SECONDS", help="between attempts to acquire or renew")
        p.add_argument("--id", default="", help="this replica's identity in the Lease "
                                                "(default: hostname and a random suffix)")
        p.add_argument("--bind-address", default=d.bind_address)
        p.add_argument("--health-port", type=int, default=d.health_port,
                       help="/healthz and /readyz")
        p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                       help="Prometheus /metrics (0: off)")
        for name in CONTROLLERS:
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True,
                           help=f"run the {name} controller")
        p.add_argument("--log-level", default=d.log_level,
                       choices=["debug", "info", "warning", "error"])
        a = p.parse_args(argv)
        try:
            pool = ipaddress.IPv4Network(a.cluster_pool)
        except ValueError as err:
            p.error(f"--cluster-pool {a.cluster_pool!r}: {err}")
        if not pool.prefixlen <= a.node_mask <= 30:
            p.error(f"--node-mask {a.node_mask}: must be between the pool's prefix length "
                    f"({pool.prefixlen}) and 30")
        if not 0 < a.retry_period < a.renew_deadline < a.lease_duration:
            p.error("leader election needs 0 < --retry-period < --renew-deadline < "
                    "--lease-duration")
        if a.identity_gc_grace < 0 or a.gc_interval <= 0:
            p.error("--identity-gc-grace must be >= 0 and --gc-interval > 0")
        return cls(
            kubeconfig=a.kubeconfig, cluster_pool=str(pool), node_mask=a.node_mask,
            identity_gc_grace=a.identity_gc_grace, gc_interval=a.gc_interval,
            lease_namespace=a.leader_election_namespace, lease_name=a.leader_election_lease,
            lease_duration=a.lease_duration, renew_deadline=a.renew_deadline,
            retry_period=a.retry_period,
            identity=a.id or f"{socket.gethostname()}_{uuid.uuid4().hex[:6]}",
            bind_address=a.bind_address, health_port=a.health_port,
            metrics_port=a.metrics_port, identities=a.identities, ipam=a.ipam,
            policies=a.policies, nodegc=a.nodegc, log_level=a.log_level,
        )
