"""Flow history: the last N flow events of this node, for `cilia observe` (`--last`,
`--since`, then `--follow`), with both ends named as they were when the flow happened.

Kept raw: each record is the datapath's 48-byte flow_event and the naming valid at that
moment (the policy engine's Names, replaced, never changed, by each sync), so keeping a
flow costs an append and about 145 bytes, and decoding is paid only for what a query
reads. The filter (`matches`) serves the live stream too.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable

from cilia.api.v1 import cilia_pb2
from cilia.identity import split_labels

DEFAULT_SIZE = 16384

# A raw record, the names valid when it came, and how to decode the pair.
Decoder = Callable[[bytes, object], cilia_pb2.FlowEvent]


class FlowHistory:
    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self._ring: deque[tuple[bytes, object]] = deque(maxlen=size or 1)
        self._lock = threading.Lock()
        self.recorded = 0

    def __len__(self) -> int:
        """The flows kept now."""
        return len(self._ring) if self.size else 0

    def add(self, raw: bytes, names: object) -> None:
        if not self.size:
            return
        with self._lock:
            self._ring.append((raw, names))
            self.recorded += 1

    def query(self, decode: Decoder, flt: cilia_pb2.FlowFilter, last: int = 0,
              since: float = 0.0) -> list[cilia_pb2.FlowEvent]:
        """The flows that match, oldest first: from `since` (unix time) on, or the last
        `last` of them, or both (the last `last` from `since` on)."""
        with self._lock:
            records = list(self._ring) if self.size else []
        out = []
        for raw, names in records:
            event = decode(raw, names)
            if since and event.time < since:
                continue
            if matches(event, flt):
                out.append(event)
        return out[-last:] if last else out


# ---- the filter --------------------------------------------------------------------


def parse_selector(text: str) -> list[tuple[str, str, frozenset[str]]]:
    """A label selector as kubectl's -l takes it: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
    `k in (a,b)`, `k notin (a,b)`, joined by commas. Answers (key, op, values)."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    terms.append(cur)
    out = []
    for term in (t.strip() for t in terms):
        if not term:
            continue
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split("(", 1)[0].strip() in ("in", "notin"):
            op, _, rest = words[1].partition("(")
            values = frozenset(v.strip() for v in rest.rstrip(")").split(",") if v.strip())
            out.append((words[0], op.strip(), values))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            out.append((k.strip(), "!=", frozenset([v.strip()])))
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            out.append((k.strip(), "=", frozenset([v.strip()])))
        elif term.startswith("!"):
            out.append((term[1:].strip(), "!", frozenset()))
        else:
            out.append((term, "exists", frozenset()))
    return out


def selector_matches(selector: str, labels: Iterable[str]) -> bool:
    have = dict(kv.split("=", 1) for kv in labels if "=" in kv)
    for key, op, values in parse_selector(selector):
        value = have.get(key)
        if op in ("=", "in") and value not in values:
            return False
        if op in ("!=", "notin") and value in values:
            return False
        if op == "exists" and value is None:
            return False
        if op == "!" and value is not None:
            return False
    return True


def _end(event: cilia_pb2.FlowEvent, side: str) -> tuple[str, str, list[str], int, int]:
    return (getattr(event, f"{side}_namespace"),
            f"{getattr(event, f'{side}_namespace')}/{getattr(event, f'{side}_pod')}"
            if getattr(event, f"{side}_pod") else "",
            list(getattr(event, f"{side}_labels")),
            getattr(event, f"{side}_identity"), getattr(event, f"{side}_port"))


def _end_matches(end, namespaces, pods, labels, identities, ports=()) -> bool:
    ns, pod, pod_labels, identity, port = end
    return ((not namespaces or ns in namespaces) and (not pods or pod in pods)
            and (not labels or (bool(pod) and selector_matches(labels, pod_labels)))
            and (not identities or identity in identities) and (not ports or port in ports))


def matches(event: cilia_pb2.FlowEvent, f: cilia_pb2.FlowFilter) -> bool:
    if f.verdict and f.verdict != event.verdict:
        return False
    if f.reason and event.reason not in f.reason:
        return False
    if f.protocol and event.protocol not in {p.upper() for p in f.protocol}:
        return False
    src, dst = _end(event, "src"), _end(event, "dst")
    either = (list(f.namespace), list(f.pod), f.labels, list(f.identity), list(f.port))
    if any(either) and not (_end_matches(src, *either) or _end_matches(dst, *either)):
        return False
    return (_end_matches(src, list(f.from_namespace), list(f.from_pod), f.from_labels,
                         list(f.from_identity))
            and _end_matches(dst, list(f.to_namespace), list(f.to_pod), f.to_labels,
                             list(f.to_identity), list(f.to_port)))


def pod_labels(security_labels: Iterable[str]) -> list[str]:
    """k=v of the pod labels in a security label set (its `pod:` ones)."""
    pod, _ = split_labels(security_labels)
    return sorted(f"{k}={v}" for k, v in pod.items())


TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"),
             (0x20, "URG"))


def tcp_flags_text(flags: int) -> str:
    return "|".join(name for bit, name in TCP_FLAGS if flags & bit)
