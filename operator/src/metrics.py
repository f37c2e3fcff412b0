"""The operator's Prometheus metrics, in a registry of their own (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

NS = "cilia_operator"


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.leader = Gauge(f"{NS}_is_leader", "1 while this replica holds the Lease",
                            registry=r)
        self.lease_acquired = Counter(f"{NS}_lease_acquisitions",
                                      "Times this replica became the leader", registry=r)
        self.identities = Gauge(f"{NS}_identities",
                                "CiliaIdentity objects at the last sweep", registry=r)
        self.identity_allocations = Counter(
            f"{NS}_identity_allocations", "Identities created by this replica", registry=r)
        self.identity_gc = Counter(f"{NS}_identity_gc",
                                   "Unused identities deleted after the grace period",
                                   registry=r)
        self.pod_cidrs = Gauge(f"{NS}_pod_cidrs_allocated",
                               "Nodes' pod CIDRs taken from the cluster pool", registry=r)
        self.pod_cidrs_free = Gauge(f"{NS}_pod_cidrs_available",
                                    "Pod CIDRs left in the cluster pool", registry=r)
        self.pod_cidr_allocations = Counter(f"{NS}_pod_cidr_allocations",
                                            "Pod CIDRs given to nodes", registry=r)
        self.pod_cidr_releases = Counter(f"{NS}_pod_cidr_releases",
                                         "Pod CIDRs released with their node", registry=r)
        self.invalid_policies = Gauge(f"{NS}_invalid_policies",
                                      "Policies cilia cannot enforce, by kind", ["kind"],
                                      registry=r)
        self.events = Counter(f"{NS}_events_posted", "Kubernetes Events posted, by reason",
                              ["reason"], registry=r)
        self.sweeps = Counter(f"{NS}_sweeps", "Sweeps run, by controller", ["controller"],
                              registry=r)
        self.sweep_errors = Counter(f"{NS}_sweep_errors", "Sweeps that failed, by controller",
                                    ["controller"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
