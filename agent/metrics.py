"""Prometheus metrics of the agent, read at scrape time from the same state the CLI
reads: datapath counters from the per-CPU metrics map, endpoints, policy, prefilter."""

from __future__ import annotations

import logging
import threading
from socketserver import TCPServer, ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cilia.datapath import layouts

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
        # How full the tables are that refuse or evict when full: conntrack (an LRU: a
        # full one evicts idle connections), policy, ipcache, endpoints.
        entries = GaugeMetricFamily("cilia_map_entries", "Entries in a datapath map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("cilia_map_capacity", "Entries a datapath map holds "
                                     "at most", labels=["map"])
        pressure = GaugeMetricFamily("cilia_map_pressure", "Entries / capacity",
                                     labels=["map"])
        for spec in PRESSURE_MAPS:
            m = a.datapath.map(spec)
            n, cap = m.count(), m.max_entries
            entries.add_metric([spec.name], n)
            capacity.add_metric([spec.name], cap)
            pressure.add_metric([spec.name], n / cap if cap else 0.0)
        yield entries
        yield capacity
        yield pressure


PRESSURE_MAPS = (layouts.CONNTRACK, layouts.POLICY, layouts.IPCACHE, layouts.ENDPOINTS)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind names itself by socket.getfqdn(address): a reverse DNS
        # lookup, which on a node whose resolver is unreachable waits for its timeouts
        # before metrics are served at all. The name is never used: skip it.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # one line per scrape is noise
        pass


def serve_metrics(agent, port: int, addresses: list[str]) -> None:
    """Serves /metrics on `addresses` of the node's network namespace (by default the
    node's own address and loopback: not every address a node may have)."""
    REGISTRY.register(AgentCollector(agent))
    app = make_wsgi_app(REGISTRY)
    for addr in addresses:
        server = make_server(addr, port, app, _Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name=f"metrics-{addr}",
                         daemon=True).start()
    log.info("metrics on %s/metrics", ", ".join(f"{a}:{port}" for a in addresses))
