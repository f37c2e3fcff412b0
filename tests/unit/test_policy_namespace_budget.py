"""The per-namespace policy budget (issue 13 item 9): which policies a namespace over its
share of the policy map loses, and that cluster-wide policies count against none."""

from cilia.agent.policy import _over_namespace_share

NP, CNP, CCNP = "NetworkPolicy", "CiliaNetworkPolicy", "CiliaClusterwideNetworkPolicy"


def test_a_namespace_over_its_share_loses_its_largest_policies_first():
    counts = {(NP, "tenant", "a"): 30, (NP, "tenant", "b"): 30, (CNP, "tenant", "c"): 5,
              (NP, "default", "other"): 31}
    out = _over_namespace_share(counts, 32, 64, "node1")
    # 65 -> 35 (still over) -> 5; default's 31 is within its own share
    assert list(out) == [(NP, "tenant", "a"), (NP, "tenant", "b")]


def test_largest_first_until_the_rest_fits():
    counts = {(NP, "tenant", "a"): 30, (NP, "tenant", "b"): 20, (CNP, "tenant", "c"): 5,
              (NP, "default", "other"): 31}
    out = _over_namespace_share(counts, 32, 64, "node1")
    assert set(out) == {(NP, "tenant", "a")}  # 55 -> 25
    assert "namespace tenant's policies together need 55" in out[(NP, "tenant", "a")]
    assert "share of 32 of the map's 64" in out[(NP, "tenant", "a")]


def test_ties_go_by_kind_and_name():
    counts = {(NP, "t", "b"): 20, (NP, "t", "a"): 20, (CNP, "t", "a"): 20}
    assert set(_over_namespace_share(counts, 25, 100, "n")) == {(CNP, "t", "a"),
                                                                (NP, "t", "a")}


def test_cluster_wide_policies_count_against_no_namespace():
    counts = {(CCNP, "", "big"): 60, (NP, "default", "x"): 20}
    assert _over_namespace_share(counts, 32, 64, "n") == {}


def test_within_the_share_nothing_is_refused():
    counts = {(NP, "a", "x"): 32, (NP, "b", "y"): 32}
    assert _over_namespace_share(counts, 32, 64, "n") == {}
