"""`cilia observe`: flows from the agents' histories and live streams, filtered, from
every node at once and merged in time order (what Hubble Relay does for Hubble), as a
table, JSON lines or one compact line each."""

from __future__ import annotations

import datetime
import json
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator

from cilia.api.v1 import cilia_pb2

DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# How long the live merge holds an event back so that a later-arriving earlier one from
# another node can go first: nodes drain their rings every 50 ms.
REORDER_SECONDS = 0.2


def parse_since(text: str, now: float | None = None) -> float:
    """`5m`, `30s`, `1.5h` ago, an ISO 8601 time (`2026-12-07T12:00:00`, UTC unless it
    says), or unix seconds: answers unix seconds."""
    now = time.time() if now is None else now
    if m := DURATION.match(text):
        return now - float(m.group(1)) * UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"--since {text!r}: give a duration (30s, 5m, 2h), an ISO time "
                         "(2026-12-07T12:00:00) or unix seconds") from err
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def build_filter(args) -> cilia_pb2.FlowFilter:
    f = cilia_pb2.FlowFilter(
        namespace=args.namespace or [], pod=[_pod(p) for p in args.pod or []],
        labels=args.label or "", identity=args.identity or [],
        verdict=args.verdict or "", reason=args.reason or [], port=args.port or [],
        protocol=[p.upper() for p in args.protocol or []],
        from_namespace=args.from_namespace or [],
        from_pod=[_pod(p) for p in args.from_pod or []], from_labels=args.from_label or "",
        from_identity=args.from_identity or [], to_namespace=args.to_namespace or [],
        to_pod=[_pod(p) for p in args.to_pod or []], to_labels=args.to_label or "",
        to_identity=args.to_identity or [], to_port=args.to_port or [])
    return f


def _pod(text: str) -> str:
    return text if "/" in text else f"default/{text}"


def history(clients: Iterable, request: cilia_pb2.ObserveRequest
            ) -> list[cilia_pb2.FlowEvent]:
    """Every node's matching history, in time order; `last` applies to the merge."""
    req = cilia_pb2.ObserveRequest()
    req.CopyFrom(request)
    req.follow = False
    events = [e for c in clients for e in c.observe(req)]
    events.sort(key=lambda e: e.time)
    return events[-request.last:] if request.last else events


def follow(clients: list, request: cilia_pb2.ObserveRequest, after: float
           ) -> Iterator[cilia_pb2.FlowEvent]:
    """New flows from every node, merged: each is held REORDER_SECONDS so that nodes'
    streams interleave in time order."""
    req = cilia_pb2.ObserveRequest(follow=True, filter=request.filter)
    q: queue.Queue = queue.Queue()

    def pump(client) -> None:
        try:
            for e in client.observe(req):
                q.put(e)
        except Exception as err:  # noqa: BLE001 - handed to the reader
            q.put(err)

    for c in clients:
        threading.Thread(target=pump, args=(c,), daemon=True).start()
    held: list[cilia_pb2.FlowEvent] = []
    while True:
        try:
            item = q.get(timeout=REORDER_SECONDS / 2)
            if isinstance(item, Exception):
                raise item
            if item.time > after:
                held.append(item)
        except queue.Empty:
            pass
        held.sort(key=lambda e: e.time)
        now = time.time()
        while held and held[0].time < now - REORDER_SECONDS:
            yield held.pop(0)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _end(e: cilia_pb2.FlowEvent, side: str) -> str:
    ip, port, who = (getattr(e, f"{side}_ip"), getattr(e, f"{side}_port"),
                     getattr(e, side))
    return f"{who} {ip}:{port}" if who and who != ip else f"{ip}:{port}"


def _outcome(e: cilia_pb2.FlowEvent) -> str:
    out = e.verdict.upper()
    if e.verdict in ("dropped", "audit"):  # audit: the drop it was spared
        out += f" ({e.reason}, {e.direction})"
    if e.rule:
        out += f" [{e.rule}]"
    return out


def compact(e: cilia_pb2.FlowEvent) -> str:
    via = f" via {e.service}" if e.service else ""
    flags = f" {e.tcp_flags}" if e.tcp_flags else ""
    return (f"{_when(e.time)} [{e.node}] {_end(e, 'src')} -> {_end(e, 'dst')}{via} "
            f"{e.protocol}{flags} {_outcome(e)}")


TABLE = (("TIME", 12), ("NODE", 10), ("SOURCE", 34), ("DESTINATION", 34), ("PROTO", 5),
         ("FLAGS", 8), ("VERDICT", 0))


def table_header() -> str:
    return "  ".join(name.ljust(width) for name, width in TABLE).rstrip()


def table_row(e: cilia_pb2.FlowEvent) -> str:
    dst = _end(e, "dst") + (f" ({e.service})" if e.service else "")
    cells = [_when(e.time), e.node, _end(e, "src"), dst, e.protocol, e.tcp_flags or "-",
             _outcome(e)]
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, TABLE, strict=True)).rstrip()


def jsonl(e: cilia_pb2.FlowEvent) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(e, preserving_proto_field_name=True))


def render(events: Iterable[cilia_pb2.FlowEvent], output: str, header: bool = True
           ) -> Iterator[str]:
    if output == "table" and header:
        yield table_header()
    line = {"table": table_row, "jsonl": jsonl, "compact": compact}[output]
    for e in events:
        yield line(e)
