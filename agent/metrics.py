"""Prometheus metrics of the agent, named by Prometheus's rules (`_total` counters,
base units in the name): state read at scrape time from what the CLI reads (datapath
counters from the per-CPU metrics map, endpoints, policy, prefilter, how full each map
is), and what the agent observes as it goes: flows and drops by direction and reason,
verdicts per policy, and (opt-in, bounded) flows between workloads, from the flow events;
latencies of policy propagation, policy syncs and endpoint creation; sync errors by
controller. The process collector adds the agent's resident memory
(process_resident_memory_bytes). charts/cilia/dashboards/cilia.json is built from these;
tests/chart/test_dashboard.py holds it to them."""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from socketserver import TCPServer, ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cilia.datapath import kernel_drops, layouts

log = logging.getLogger(__name__)

# Seconds: a sync's work is milliseconds to seconds; an ADD tens of ms to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FLOWS = Counter("cilia_flows", "New flows and drops the datapath reported, by the policy "
                "direction that decided, verdict and drop reason",
                ["direction", "verdict", "reason"])
POLICY_VERDICTS = Counter("cilia_policy_verdicts", "New flows decided by a policy's rule, "
                          "by policy", ["kind", "namespace", "policy", "direction",
                                        "verdict"])
WORKLOAD_FLOWS = Counter("cilia_workload_flows", "New flows between workloads (opt-in: "
                         "--metrics-workload-labels; series bounded, the rest 'other')",
                         ["source_namespace", "source_workload", "destination_namespace",
                          "destination_workload", "verdict"])
POLICY_PROPAGATION = Histogram("cilia_policy_propagation_seconds", "From the agent seeing "
                               "a datastore change to the policy it implies being in the "
                               "maps", buckets=LATENCY_BUCKETS)
POLICY_SYNC = Histogram("cilia_policy_sync_seconds", "One policy sync: compile and write",
                        buckets=LATENCY_BUCKETS)
ENDPOINT_REGENERATION = Histogram("cilia_endpoint_regeneration_seconds", "Endpoint "
                                  "creation (CNI ADD) in the agent: veth, address, "
                                  "identity, policy, maps", ["outcome"],
                                  buckets=LATENCY_BUCKETS)
SYNC_ERRORS = Counter("cilia_sync_errors", "Reconciles in which a controller failed",
                      ["controller"])

# A pod's workload: its name without the suffixes Kubernetes generates, in the alphabet
# it generates them from (no vowels, no 0, 1, 3: they never spell a word): a ReplicaSet's
# hash and the pod's own (web-5d8f7c9b6-x2x4q -> web), or a StatefulSet's ordinal (db-0).
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_GENERATED = re.compile(rf"(-{_SAFE}{{6,10}})?-{_SAFE}{{5}}$|-\d+$")


def workload(pod: str) -> str:
    return _GENERATED.sub("", pod) or pod


class FlowMetrics:
    """Counts each flow event as it comes (agent/monitor.py): by direction, verdict and
    reason; by deciding policy; and, when asked for, by workloads at both ends, with at
    most `series` label sets (more go to 'other': a label set per pod pair would be a
    cardinality bomb)."""

    def __init__(self, workloads: bool = False, series: int = 1000):
        self.workloads = workloads
        self.series = series
        self._seen: set[tuple[str, ...]] = set()
        self._flows: dict[tuple[int, ...], object] = {}  # the counters' children

    def count_raw(self, raw: bytes, rules: dict, names) -> None:
        """One flow_event record, read in place (only the bytes the labels need: this
        runs for every event the datapath reports)."""
        direction, verdict, reason = raw[_DIR], raw[_VERDICT], raw[_REASON]
        cookie = int.from_bytes(raw[_COOKIE:_COOKIE + 4], "little")
        kernel = reason == layouts.Reason.DROP_KERNEL  # the cookie: the kernel's reason
        key = (direction, verdict, reason, cookie if kernel else 0)
        child = self._flows.get(key)
        if child is None:
            child = self._flows[key] = FLOWS.labels(
                _label(layouts.Direction, direction), _verdict(verdict),
                kernel_drops.label(cookie) if kernel else
                _label(layouts.Reason, reason) if reason else "")
        child.inc()
        rule = rules.get(cookie) if cookie and not kernel else None
        if rule is not None:
            POLICY_VERDICTS.labels(rule.kind, rule.namespace, rule.name, rule.direction,
                                   _verdict(verdict)).inc()
        if self.workloads:
            src = names.pods.get(str(ipaddress.IPv4Address(raw[8:12])), "")
            dst = names.pods.get(str(ipaddress.IPv4Address(raw[12:16])), "")
            self.count_workloads(src, dst, _verdict(verdict))

    def count_workloads(self, src: str, dst: str, verdict: str) -> None:
        """`src`, `dst`: NAMESPACE/POD, or what else an end is ("" unknown)."""
        labels = (*_ns_workload(src), *_ns_workload(dst), verdict)
        if labels not in self._seen:
            if len(self._seen) >= self.series:
                labels = ("other", "other", "other", "other", verdict)
            else:
                self._seen.add(labels)
        WORKLOAD_FLOWS.labels(*labels).inc()


# Offsets in a flow_event record (bpf/include/cilia/events.h; layouts.FlowEvent)
_COOKIE, _VERDICT, _REASON, _DIR = 24, 41, 42, 43


def _verdict(value: int) -> str:
    """forwarded, dropped, or audit (passed, though a policy in audit mode refused it)."""
    return layouts.VERDICTS.get(value, "dropped")


def _label(enum_type, value: int) -> str:
    try:
        return enum_type(value).label
    except ValueError:
        return f"unknown_{value}"


def _ns_workload(who: str) -> tuple[str, str]:
    """("namespace", "workload") of NAMESPACE/POD; ("", "reserved:world") and the like
    for what is no pod."""
    ns, sep, pod = who.partition("/")
    return (ns, workload(pod)) if sep and not ns.startswith(("reserved", "cidr")) else (
        "", who or "unknown")


class AgentCollector:
    # (type, name, help, labels) of what collect() yields: describe() answers these
    FAMILIES = (
        ("counter", "cilia_datapath_packets", "Packets by reason and direction, from the "
         "datapath's metrics map", ["reason", "direction", "drop"]),
        ("counter", "cilia_datapath_bytes", "Bytes by reason and direction",
         ["reason", "direction", "drop"]),
        ("gauge", "cilia_endpoints", "Endpoints (pods) on this node", None),
        ("gauge", "cilia_policies", "Policies by state", ["state"]),
        ("counter", "cilia_policy_syncs", "Policy compilations written to the datapath",
         None),
        ("counter", "cilia_prefilter_drops", "Packets dropped at XDP by CIDR", ["cidr"]),
        ("gauge", "cilia_reconcile_failing", "1 while reconciling fails", None),
        ("gauge", "cilia_flow_history_flows", "Flows kept for cilia observe", None),
        ("gauge", "cilia_map_entries", "Entries in a datapath map", ["map"]),
        ("gauge", "cilia_map_capacity", "Entries a datapath map holds at most", ["map"]),
        ("gauge", "cilia_map_pressure", "Entries / capacity", ["map"]),
    )

    def __init__(self, datapath, endpoints, policy, prefilter,
                 failing: Callable[[], bool], flows_kept: Callable[[], int]):
        """Read-only sources: the datapath's maps (counted, never written), the
        EndpointsView, the PolicyView, the prefilter's entries; whether reconciling
        fails now and how many flows the history keeps."""
        self.datapath = datapath
        self.endpoints = endpoints
        self.policy = policy
        self.prefilter = prefilter
        self.failing = failing
        self.flows_kept = flows_kept

    @classmethod
    def families(cls):
        for kind, name, text, labels in cls.FAMILIES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, text, labels=labels)

    def describe(self):
        return self.families()

    def collect(self):
        from cilia.agent.server import read_metrics

        packets = CounterMetricFamily("cilia_datapath_packets", "Packets by reason and "
                                      "direction, from the datapath's metrics map",
                                      labels=["reason", "direction", "drop"])
        octets = CounterMetricFamily("cilia_datapath_bytes", "Bytes by reason and direction",
                                     labels=["reason", "direction", "drop"])
        for m in read_metrics(self.datapath):
            labels = [m.reason, m.direction, str(m.drop).lower()]
            packets.add_metric(labels, m.packets)
            octets.add_metric(labels, m.bytes)
        yield packets
        yield octets
        yield GaugeMetricFamily("cilia_endpoints", "Endpoints (pods) on this node",
                                value=len(self.endpoints.list()))
        statuses = self.policy.statuses()
        policies = GaugeMetricFamily("cilia_policies", "Policies by state", labels=["state"])
        policies.add_metric(["enforced"], sum(s.valid for s in statuses))
        policies.add_metric(["rejected"], sum(not s.valid for s in statuses))
        yield policies
        yield CounterMetricFamily("cilia_policy_syncs", "Policy compilations written to "
                                  "the datapath", value=self.policy.sync_count)
        drops = CounterMetricFamily("cilia_prefilter_drops", "Packets dropped at XDP by CIDR",
                                    labels=["cidr"])
        for e in self.prefilter.entries():
            drops.add_metric([e.cidr], e.packets)
        yield drops
        yield GaugeMetricFamily("cilia_reconcile_failing", "1 while reconciling fails",
                                value=1 if self.failing() else 0)
        yield GaugeMetricFamily("cilia_flow_history_flows", "Flows kept for cilia "
                                "observe", value=self.flows_kept())
        # How full the tables are that refuse or evict when full: conntrack (an LRU: a
        # full one evicts idle connections), policy, ipcache, endpoints.
        entries = GaugeMetricFamily("cilia_map_entries", "Entries in a datapath map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("cilia_map_capacity", "Entries a datapath map holds "
                                     "at most", labels=["map"])
        pressure = GaugeMetricFamily("cilia_map_pressure", "Entries / capacity",
                                     labels=["map"])
        for spec in PRESSURE_MAPS:
            m = self.datapath.map(spec)
            n, cap = m.count(), m.max_entries
            entries.add_metric([spec.name], n)
            capacity.add_metric([spec.name], cap)
            pressure.add_metric([spec.name], n / cap if cap else 0.0)
        yield entries
        yield capacity
        yield pressure


PRESSURE_MAPS = (layouts.CONNTRACK, layouts.POLICY, layouts.IPCACHE, layouts.ENDPOINTS,
                 layouts.LB4_SERVICES, layouts.LB4_BACKENDS, layouts.LB4_SLOTS,
                 layouts.LB4_AFFINITY, layouts.SNAT4)


def exported_names() -> set[str]:
    """Every metric family name the agent's /metrics may carry (as a query names it:
    counters with `_total`, histograms with `_bucket`, `_sum`, `_count`)."""
    names = set()
    families = [m for metric in (FLOWS, POLICY_VERDICTS, WORKLOAD_FLOWS, POLICY_PROPAGATION,
                                 POLICY_SYNC, ENDPOINT_REGENERATION, SYNC_ERRORS)
                for m in metric.describe()]
    families += list(AgentCollector.families())
    for fam in families:
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
    return names | {"process_resident_memory_bytes", "process_cpu_seconds_total",
                    "process_open_fds"}


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


def serve_metrics(collector: AgentCollector, port: int, addresses: list[str]) -> None:
    """Serves /metrics on `addresses` of the node's network namespace (by default the
    node's own address and loopback: not every address a node may have)."""
    REGISTRY.register(collector)
    app = make_wsgi_app(REGISTRY)
    for addr in addresses:
        server = make_server(addr, port, app, _Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name=f"metrics-{addr}",
                         daemon=True).start()
    log.info("metrics on %s/metrics", ", ".join(f"{a}:{port}" for a in addresses))
