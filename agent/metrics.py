"""Prometheus metrics of the agent, read at scrape time from the same state the CLI
reads: datapath counters from the per-CPU metrics map, endpoints, policy, prefilter."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        from cilia.agent.server import read_metrics

        a = self.agent
        packets = CounterMetricFamily("cilia_datapath_packets", "Packets by reason and "
                                      "direction, from the datapath's metrics map",
                                      labels=["reason", "direction", "drop"])
        octets = CounterMetricFamily("cilia_datapath_bytes", "Bytes by reason and direction",
                                     labels=["reason", "direction", "drop"])
        for m in read_metrics(a.datapath):
            labels = [m.reason, m.direction, str(m.drop).lower()]
            packets.add_metric(labels, m.packets)
            octets.add_metric(labels, m.bytes)
        yield packets
        yield octets
        yield GaugeMetricFamily("cilia_endpoints", "Endpoints (pods) on this node",
                                value=len(a.endpoints.list()))
        statuses = a.policy.compiled.statuses if a.policy.compiled else []
        policies = GaugeMetricFamily("cilia_policies", "Policies by state", labels=["state"])
        policies.add_metric(["enforced"], sum(s.valid for s in statuses))
        policies.add_metric(["rejected"], sum(not s.valid for s in statuses))
        yield policies
        yield CounterMetricFamily("cilia_policy_syncs", "Policy compilations written to "
                                  "the datapath", value=a.policy.sync_count)
        drops = CounterMetricFamily("cilia_prefilter_drops", "Packets dropped at XDP by CIDR",
                                    labels=["cidr"])
        for e in a.prefilter.entries():
            drops.add_metric([e.cidr], e.packets)
        yield drops
        yield GaugeMetricFamily("cilia_reconcile_failing", "1 while reconciling fails",
                                value=1 if a.error else 0)


def serve_metrics(agent, port: int) -> None:
    """Serves /metrics on all addresses of the node's network namespace."""
    REGISTRY.register(AgentCollector(agent))
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)
