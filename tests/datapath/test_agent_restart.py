"""The datapath outlives the agent: programs stay attached, maps stay pinned."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from labkit import PROBE, pod_manifest, servers

from cilia.client import AgentClient
from cilia.lab.lab import _alive


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_stream_survives_agent_restart(lab, how):
    x = lab.run_pod(pod_manifest(f"x{int(how)}"))
    y = lab.run_pod(pod_manifest(f"y{int(how)}"))
    try:
        with servers(lab, f"default/{y.name}", [5001], "y"):
            stream = subprocess.Popen(
                lab.exec_argv(f"default/{x.name}",
                              [*PROBE, "stream", y.ip, "5001", "--seconds", "6"]),
                stdout=subprocess.PIPE, text=True,
            )
            time.sleep(1.5)
            node = lab.load().nodes[0]
            os.kill(node.pid, how)
            deadline = time.monotonic() + 10
            while _alive(node.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(node.pid)
            time.sleep(1.0)  # the agent is away: traffic must keep flowing
            node = lab.start_agent()
            out, _ = stream.communicate(timeout=30)
        report = json.loads(out)
        assert report["error"] is None, report
        assert report["max_gap"] < 0.5, f"the stream stalled: {report}"
        assert report["bytes"] > 100_000, report
        known = {(e.pod_namespace, e.pod_name) for e in AgentClient(node.socket).endpoints()}
        assert {("default", x.name), ("default", y.name)} <= known
    finally:
        lab.remove_pod("default", x.name)
        lab.remove_pod("default", y.name)


def test_restarted_agent_keeps_serving_new_pods(lab):
    lab.restart_agent()
    p = lab.run_pod(pod_manifest("after-restart"))
    q = lab.run_pod(pod_manifest("after-restart2"))
    try:
        with servers(lab, "default/after-restart2", [80], "q"):
            res = subprocess.run(
                lab.exec_argv("default/after-restart",
                              [sys.executable, "-m", "cilia.lab.probe", "connect", q.ip, "80"]),
                capture_output=True, text=True,
            )
        assert res.stdout.strip() == "q:hello", res.stderr
        # endpoint ids stay unique across restarts
        ids = [e.id for e in AgentClient(lab.load().nodes[0].socket).endpoints()]
        assert len(ids) == len(set(ids))
    finally:
        lab.remove_pod("default", p.name)
        lab.remove_pod("default", q.name)
