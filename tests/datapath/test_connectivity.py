"""`cilia connectivity test` on a two-node lab (issue 15 item 5): every check passes on a
healthy lab, and a broken one is reported as such with the flows that explain it."""

import json
import subprocess
import sys

import pytest
from labkit import unique_lab_name

from cilia.lab.lab import Lab


@pytest.fixture(scope="module")
def lab2():
    lab = Lab(unique_lab_name())
    try:
        lab.up(nodes=2)
        yield lab
    finally:
        lab.down()


def connectivity(lab, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", lab.name,
                           "connectivity", "test", *argv],
                          capture_output=True, text=True, timeout=300)


def test_a_healthy_lab_passes_every_check(lab2):
    res = connectivity(lab2, "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    for name in ("pod to pod, same node", "pod to pod, other node", "pod to Service",
                 "pod to host", "host to pod", "pod to world", "world to pod",
                 "allow policy: allowed pod", "allow policy: other pod refused",
                 "deny policy: denied pod refused", "policies removed: traffic back",
                 "through agent restarts"):
        assert checks[name]["result"] == "ok", checks[name]
    assert checks["DNS"]["result"] == "skipped" and checks["DNS"]["detail"]
    assert "server-1" in checks["pod to Service"]["detail"] \
        or "server-2" in checks["pod to Service"]["detail"]
    # it cleans up after itself
    state = lab2.load()
    assert not [p for p in state.pods if p.namespace == "cilia-test"]
    assert not lab2.datastore.list("Pod", "cilia-test")
    assert not lab2.datastore.list("Service", "cilia-test")


def test_a_failure_is_reported_with_the_flows_that_explain_it(lab2):
    deny = {"apiVersion": "cilia.io/v1alpha1", "kind": "CiliaClusterwideNetworkPolicy",
            "metadata": {"name": "break-servers"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                     "ingressDeny": [{"fromEntities": ["all"]}]}}
    lab2.datastore.put(deny)
    try:
        res = connectivity(lab2)
    finally:
        lab2.datastore.delete("CiliaClusterwideNetworkPolicy", "", "break-servers")
    assert res.returncode == 1, res.stdout
    lines = res.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.strip().startswith("FAIL")]
    assert any("pod to pod, same node" in lines[i] for i in failed), res.stdout
    first = next(i for i in failed if "pod to pod, same node" in lines[i])
    # the flows under it name the drop and the policy that made it
    assert "DROPPED" in lines[first + 1] and "break-servers" in lines[first + 1], \
        res.stdout
    assert "failed" in lines[-1] and not lines[-1].startswith("0 passed")
