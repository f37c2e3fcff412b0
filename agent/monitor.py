"""Flow events: the datapath's ring buffer, kept in the flow history (agent/flows.py),
and decoded, named and fanned out to every `cilia monitor` and `cilia observe
--follow` that is listening."""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from cilia.agent.flows import FlowHistory, pod_labels, tcp_flags_text
from cilia.agent.metrics import FlowMetrics
from cilia.api.v1 import cilia_pb2
from cilia.datapath import kernel_drops, layouts
from cilia.datapath.layouts import Direction, FlowEvent, Reason
from cilia.datapath.ringbuf import RingBuffer

log = logging.getLogger(__name__)

PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}
QUEUE_SIZE = 4096
DRAIN_SECONDS = 0.05  # the 1 MiB ring holds ~21,000 events: ample for 50 ms


class Monitor:
    """`policy`: the policy engine's PolicyView (names, rules, identities' labels);
    `describe_service`: a reverse-NAT id's Service, for people."""

    def __init__(self, policy, bpffs_root: str, node: str,
                 describe_service: Callable[[int], str],
                 history: FlowHistory | None = None, metrics: FlowMetrics | None = None):
        self.policy = policy
        self.bpffs_root = bpffs_root
        self.node = node
        self.describe_service = describe_service
        self.history = history if history is not None else FlowHistory()
        self.metrics = metrics if metrics is not None else FlowMetrics()
        self._subscribers: list[queue.Queue] = []
        self._lock = threading.Lock()
        # Kernel time (bpf_ktime_get_ns, CLOCK_MONOTONIC) to wall-clock time.
        self._offset = time.time() - time.monotonic()
        self.lost = 0

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(QUEUE_SIZE)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subscribers.remove(q)

    def run(self, stop: threading.Event) -> None:
        path = os.path.join(self.bpffs_root, layouts.EVENTS_MAP)
        rb = RingBuffer(path, self._on_record)
        try:
            # The datapath submits without waking anyone (bpf/lib/events.h): drain on a
            # timer, so flows cost no context switch and events come in small batches.
            while not stop.wait(DRAIN_SECONDS):
                rb.consume()
        finally:
            rb.close()

    def _on_record(self, raw: bytes) -> None:
        names = self.policy.names  # as they are now: the flow's ends' names
        raw = bytes(raw)
        self.history.add(raw, names)
        self.metrics.count_raw(raw, self.policy.rules, names)
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return  # nobody listens: kept raw, decoded only if a query asks
        event = self.decode_raw(raw, names)
        for q in subscribers:
            try:
                q.put_nowait(event)
            except queue.Full:
                self.lost += 1

    def decode_raw(self, raw: bytes, names) -> cilia_pb2.FlowEvent:
        return self.decode(FlowEvent.unpack(raw), names)

    def decode(self, e: FlowEvent, names=None) -> cilia_pb2.FlowEvent:
        """The event with both ends named by `names` (the engine's Names of the moment
        the flow came; the current ones when not given)."""
        names = names if names is not None else self.policy.names
        src_ip = str(ipaddress.IPv4Address(e.saddr))
        dst_ip = str(ipaddress.IPv4Address(e.daddr))
        src_ns, _, src_pod = names.pods.get(src_ip, "").partition("/")
        dst_ns, _, dst_pod = names.pods.get(dst_ip, "").partition("/")
        labels_of = self.policy.labels_of
        kernel = e.reason == Reason.DROP_KERNEL  # the cookie is the kernel's reason
        return cilia_pb2.FlowEvent(
            time=self._offset + e.ts_ns / 1e9,
            src_ip=src_ip, dst_ip=dst_ip, src_port=e.sport, dst_port=e.dport,
            protocol=PROTOCOLS.get(e.proto, str(e.proto)),
            src=names.peer(src_ip, e.src_identity), dst=names.peer(dst_ip, e.dst_identity),
            src_identity=e.src_identity, dst_identity=e.dst_identity,
            verdict=layouts.VERDICTS.get(e.verdict, "dropped"),
            reason=kernel_drops.label(e.cookie) if kernel else
            _label(Reason, e.reason) if e.reason else "",
            direction=_label(Direction, e.dir),
            rule=str(self.policy.rules.get(e.cookie, "")) if e.cookie and not kernel
            else "",
            service=self.describe_service(e.rev_nat_id) if e.rev_nat_id else "",
            node=self.node,
            src_namespace=src_ns, src_pod=src_pod, dst_namespace=dst_ns, dst_pod=dst_pod,
            src_labels=pod_labels(labels_of(e.src_identity) or ()) if src_pod else [],
            dst_labels=pod_labels(labels_of(e.dst_identity) or ()) if dst_pod else [],
            tcp_flags=tcp_flags_text(e.tcp_flags),
        )


def _label(enum_type, value: int) -> str:
    try:
        return enum_type(value).label
    except ValueError:
        return f"unknown_{value}"
