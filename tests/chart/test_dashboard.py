"""The Grafana dashboard the chart ships (charts/cilia/dashboards/cilia.json): rendered
in a ConfigMap the Grafana sidecar finds, and every query in it names only metrics the
agent exports (cilia/agent/metrics.py exported_names; the datapath tier's
test_pod_traffic checks the same names against a real agent's /metrics)."""

from __future__ import annotations

import json

from chartkit import CUSTOM_VALUES, find, render
from dashboardkit import DASHBOARD, dashboard, dashboard_metric_names, metric_names, queries

from cilia.agent.metrics import exported_names


def test_every_query_names_only_exported_metrics():
    board = dashboard()
    exported = exported_names()
    assert board["panels"] and all(p.get("targets") for p in board["panels"])
    for expr in queries(board):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names {names - exported}, not exported"


def test_the_dashboard_covers_what_operators_watch():
    names = dashboard_metric_names()
    for needed in ("cilia_flows_total", "cilia_policy_verdicts_total", "cilia_map_pressure",
                   "cilia_policy_propagation_seconds_bucket", "cilia_sync_errors_total",
                   "cilia_endpoint_regeneration_seconds_bucket",
                   "process_resident_memory_bytes", "cilia_workload_flows_total"):
        assert needed in names, needed


def test_a_name_in_a_query_is_found_and_a_label_is_not():
    assert metric_names('sum by (le) (rate(cilia_x_bucket{node=~"cilia_y"}[5m]))') == {
        "cilia_x_bucket"}


def test_the_configmap_carries_it_for_the_grafana_sidecar():
    assert not [o for o in render() if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == "cilia-dashboards"]  # off by default
    cm = find(render(CUSTOM_VALUES), "ConfigMap", "cilia-dashboards")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["cilia.json"]) == json.loads(DASHBOARD.read_text())
