"""The conntrack table's size from the node's memory, and the agent's flags for it
(issue 13 item 10)."""

import pytest

from cilia.agent.config import AgentConfig
from cilia.datapath.conntrack import (
    CT_MAP_MAX,
    CT_MAP_MIN,
    ct_map_size,
    default_endpoint_limit,
)

GiB = 1 << 30


@pytest.mark.parametrize("memory,size", [
    (1 * GiB, CT_MAP_MIN), (4 * GiB, CT_MAP_MIN),  # never below the old fixed size
    (8 * GiB, 131072), (24 * GiB, 262144), (64 * GiB, 1048576),
    (4096 * GiB, CT_MAP_MAX),  # bounded
])
def test_size_is_a_bounded_power_of_two_share_of_memory(memory, size):
    got = ct_map_size(memory)
    assert got == size and got & (got - 1) == 0


def test_this_node_gets_a_size():
    assert CT_MAP_MIN <= ct_map_size() <= CT_MAP_MAX


def test_endpoint_limit_default_is_an_eighth_of_the_table():
    assert default_endpoint_limit(262144) == 32768


BASE = ["--node-name", "n", "--pod-cidr", "10.244.1.0/24"]


def test_flags():
    c = AgentConfig.from_args(BASE)
    assert (c.ct_map_max, c.ct_endpoint_max) == (0, None)
    c = AgentConfig.from_args([*BASE, "--ct-map-max", "4096", "--ct-endpoint-max", "0"])
    assert (c.ct_map_max, c.ct_endpoint_max) == (4096, 0)


@pytest.mark.parametrize("argv", [["--ct-map-max", "100"], ["--ct-endpoint-max", "-1"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        AgentConfig.from_args([*BASE, *argv])
