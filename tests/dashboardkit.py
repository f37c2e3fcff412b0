"""The metric names the chart's Grafana dashboard (charts/cilia/dashboards/cilia.json)
queries: one reading for the chart tier (against what the agent's code exports) and
the datapath tier (against a real agent's /metrics)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "cilia" / "dashboards" / "cilia.json"
# A metric name in PromQL: not a function (followed by "("), nor inside label matchers,
# ranges or strings (those are cut out first).
_CUT = re.compile(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"')
_NAME = re.compile(r"\b(cilia_[a-z0-9_]+|process_[a-z0-9_]+)\b(?!\s*\()")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    return out


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(_CUT.sub(" ", expr)))


def dashboard_metric_names() -> set[str]:
    return set().union(*(metric_names(q) for q in queries(dashboard())))
