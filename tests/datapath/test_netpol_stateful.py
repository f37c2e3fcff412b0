"""NetworkPolicy is stateful: replies of allowed connections pass whatever the policy
of the other direction says; a denied connection is dropped, counted by reason and
reported as a flow event (`cilia monitor`)."""

import json
import queue
import subprocess
import sys
import threading
import time

import pytest
from reachability import ALL_PORTS, TCP80, UDP81, labels, netpol


def cli(m, *argv: str, timeout: float = 30) -> str:
    res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", m.lab.name, *argv],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout


def drops(m, direction: str, reason: str = "drop_policy") -> int:
    return sum(r["packets"] for r in json.loads(cli(m, "metrics", "-o", "json"))
               if r["reason"] == reason and r["direction"] == direction)


def test_default_deny_ingress_pod_still_opens_connections_and_gets_replies(m):
    """x/a accepts nothing, yet its own TCP connections and UDP exchanges with every
    other pod work both ways: the replies are part of connections it opened."""
    m.apply(netpol("deny-in", "x", labels(pod="a"), types=["Ingress"]))
    m.check(m.reachability().expect_all_ingress("x/a", False))


def test_default_deny_egress_pod_still_answers(m):
    """y/b may open nothing, yet it answers every connection made to it."""
    m.apply(netpol("deny-out", "y", labels(pod="b"), types=["Egress"]))
    m.check(m.reachability().expect_all_egress("y/b", False))


def test_replies_pass_when_both_ends_isolate_the_reverse_direction(m):
    """z/a may only send to z/b, z/b may only receive from z/a: the replies go the other
    way, which neither allows, and still pass."""
    m.apply(netpol("a-out", "z", labels(pod="a"), types=["Egress"], egress=[{
                "to": [{"podSelector": labels(pod="b")}]}]),
            netpol("b-in", "z", labels(pod="b"), types=["Ingress"], ingress=[{
                "from": [{"podSelector": labels(pod="a")}]}]))
    r = m.reachability().expect_all_egress("z/a", False).expect_all_ingress("z/b", False)
    m.check(r.expect("z/a", "z/b", True))


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_denied_connections_are_counted_as_policy_drops(m, direction):
    if direction == "ingress":
        m.apply(netpol("deny-in", "x", labels(pod="a"), types=["Ingress"]))
        r = m.reachability().expect_all_ingress("x/a", False)
        cells = dict(targets="x/a")
    else:
        m.apply(netpol("deny-out", "x", labels(pod="a"), types=["Egress"]))
        r = m.reachability().expect_all_egress("x/a", False)
        cells = dict(sources="x/a")
    before = drops(m, direction)
    m.check(r, **cells)
    # 8 peers x 4 port/protocols, each at least one dropped packet (SYN or datagram)
    assert drops(m, direction) - before >= 8 * len(ALL_PORTS)


class Monitor:
    """`cilia monitor -o json` in the background; events collected by a thread."""

    def __init__(self, m, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cilia.cli", "--lab", m.lab.name, "monitor", "-o", "json",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.events.put(json.loads(line))

    def wait_for(self, match, poke, timeout: float = 10.0) -> dict | None:
        """Calls `poke` (makes traffic) until an event satisfying `match` arrives: the
        monitor's subscription starts at an unknown moment after launch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            poke()
            end = time.monotonic() + 0.5
            while (left := end - time.monotonic()) > 0:
                try:
                    e = self.events.get(timeout=left)
                except queue.Empty:
                    break
                self.seen.append(e)
                if match(e):
                    return e
        return None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def monitor(m):
    started = []

    def start(*args: str) -> Monitor:
        mon = Monitor(m, *args)
        started.append(mon)
        return mon

    yield start
    for mon in started:
        mon.close()


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_denied_connection_leaves_a_drop_event(m, monitor, direction):
    if direction == "ingress":
        m.apply(netpol("deny-in", "x", labels(pod="a"), types=["Ingress"]))
        src, dst, case = "y/c", "x/a", TCP80
    else:
        m.apply(netpol("deny-out", "x", labels(pod="a"), types=["Egress"]))
        src, dst, case = "x/a", "z/b", UDP81
    mon = monitor("--pod", "x/a", "--verdict", "dropped")
    dst_ip = m.pods[dst].ip

    def poke():
        cells = m.probe([(src, dst, case)], timeout=0.2)
        assert not cells[(src, dst, case)].allowed

    event = mon.wait_for(lambda e: e.get("dst_ip") == dst_ip, poke)
    assert event is not None, f"no drop event for {src} -> {dst}; saw {mon.seen}"
    assert event["verdict"] == "dropped", event
    assert event["reason"] == "drop_policy", event
    assert event["direction"] == direction, event
    assert (event["src"], event["dst"]) == (src, dst), event
    assert event["src_ip"] == m.pods[src].ip, event
    assert event["dst_port"] == case.port, event
    assert event["protocol"].upper() == case.protocol, event
    # only drops, only flows of x/a
    assert all(e["verdict"] == "dropped" for e in mon.seen), mon.seen
    assert all("x/a" in (e.get("src"), e.get("dst")) for e in mon.seen), mon.seen


def test_allowed_connection_is_not_reported_as_dropped(m, monitor):
    m.apply(netpol("from-b", "x", labels(pod="a"), ingress=[{
        "from": [{"podSelector": labels(pod="b")}]}]))
    mon = monitor("--pod", "x/a", "--verdict", "dropped")
    denied_ip = m.pods["x/c"].ip

    def poke():
        cells = m.probe([("x/b", "x/a", TCP80), ("x/c", "x/a", TCP80)], timeout=0.2)
        assert cells[("x/b", "x/a", TCP80)].allowed
        assert not cells[("x/c", "x/a", TCP80)].allowed

    assert mon.wait_for(lambda e: e.get("src_ip") == denied_ip, poke), mon.seen
    allowed_ip = m.pods["x/b"].ip
    assert not [e for e in mon.seen if e.get("src_ip") == allowed_ip], mon.seen
