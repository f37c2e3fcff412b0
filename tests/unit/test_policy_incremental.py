"""The compiler is incremental (issue 14 item 1): a change costs what it touches. A pod
ADD computes again only the policies that select the new pod, and only for it; a
changed policy computes only itself and assembles only the endpoints it selects; a new
identity computes again only the policies whose peers it joins. Correctness against a
fresh compile is test_policy_compiler_cache.py's; this holds the cost to its shape, by
counting the compiler's steps."""

import pytest
from test_policy_compiler import Cluster

from cilia.identity import security_labels
from cilia.policy.compiler import Compiler, PodView


def netpol(name: str, ns: str, selects: str, peer: dict) -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"pod": selects}},
                     "ingress": [{"from": [peer], "ports": [{"port": 80}]}]}}


class Counting(Compiler):
    """A compiler that records which policies it computes (and for which endpoints)
    and which endpoints it assembles."""

    def __init__(self):
        super().__init__()
        self.computed: list[tuple[str, frozenset | None]] = []
        self.assembled: list[int] = []

    def _compute(self, st, local, pods, only=None):
        self.computed.append((st.name, None if only is None else frozenset(only)))
        return super()._compute(st, local, pods, only)

    def _assemble(self, ep):
        self.assembled.append(ep)
        return super()._assemble(ep)

    def reset(self):
        self.computed, self.assembled = [], []


@pytest.fixture
def world():
    cluster = Cluster()
    policies = [netpol(f"{ns}-{sel}", ns, sel, {"podSelector": {"matchLabels": {"pod": peer}}})
                for ns in ("x", "y", "z") for sel, peer in (("a", "b"), ("b", "c"), ("c", "a"))]
    compiler = Counting()
    local = {ep: cluster.pods[name] for name, ep in cluster.ep_ids.items()}
    compiler.compile(policies, list(cluster.pods.values()), cluster.namespaces, local)
    compiler.reset()
    return cluster, policies, compiler, local


def test_a_pod_add_computes_only_the_policies_selecting_it_and_only_for_it(world):
    cluster, policies, compiler, local = world
    # a replica of x/a: same labels, so the same identity; a new endpoint
    twin = PodView("x", "a2", dict(cluster.pods["x/a"].labels), "10.1.0.9",
                   cluster.pods["x/a"].identity, cluster.pods["x/a"].ports)
    local = {**local, 99: twin}
    out = compiler.compile(policies, [*cluster.pods.values(), twin], cluster.namespaces,
                           local)
    assert compiler.computed == [("x-a", frozenset({99}))]
    assert compiler.assembled == [99]
    assert out.endpoints[99] == out.endpoints[cluster.ep_ids["x/a"]]


def test_a_changed_policy_computes_itself_and_assembles_what_it_selects(world):
    cluster, policies, compiler, local = world
    changed = netpol("y-b", "y", "b", {"podSelector": {"matchLabels": {"pod": "a"}}})
    policies = [changed if p["metadata"]["name"] == "y-b" else p for p in policies]
    compiler.compile(policies, list(cluster.pods.values()), cluster.namespaces, local)
    assert compiler.computed == [("y-b", None)]
    assert compiler.assembled == [cluster.ep_ids["y/b"]]


def test_a_new_identity_computes_only_the_policies_whose_peers_it_joins(world):
    cluster, policies, compiler, local = world
    labels = {"pod": "b", "extra": "1"}  # matches pod=b selectors, a new identity
    ident = cluster.allocator.allocate(security_labels(labels, "z", cluster.namespaces["z"]))
    remote = PodView("z", "b2", labels, "10.3.0.9", ident, ())
    compiler.compile(policies, [*cluster.pods.values(), remote], cluster.namespaces, local)
    assert sorted(name for name, _ in compiler.computed) == ["z-a"]  # its peer is pod=b
    assert compiler.assembled == [cluster.ep_ids["z/a"]]


def test_nothing_changed_computes_nothing(world):
    cluster, policies, compiler, local = world
    before = compiler.compile(policies, list(cluster.pods.values()), cluster.namespaces,
                              local)
    compiler.reset()
    after = compiler.compile(policies, list(cluster.pods.values()), cluster.namespaces,
                             local)
    assert compiler.computed == [] and compiler.assembled == []
    assert all(after.endpoints[ep] is before.endpoints[ep] for ep in before.endpoints)
    assert after.statuses is before.statuses and after.cidrs is before.cidrs
