"""What the policy engine hands the policy writer: a plan, plain frozen data.

The engine (agent/policy.py) computes a `PolicyPlan` from a snapshot of the node's
endpoints and the datastore, holding no map; the writer (agent/policy_writer.py) applies
it to the maps it owns, and hands each endpoint's `EndpointState` to the endpoint manager,
which owns the endpoints map (agent/endpoint.py apply_policy_state)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from cilia.policy.compiler import EntryKey


class Written(NamedTuple):
    """A policy map value as the engine and the writer keep track of it (a tuple:
    compared by the ten thousand at each sync)."""

    action: int
    cookie: int
    rank: int = 0  # Admin and Baseline tiers (struct policy_value)


class EndpointState(NamedTuple):
    """What policy decides of one endpoint of this node: its security identity, its
    ENDPOINT_F_* flags, and the labels its identity stands for."""

    identity: int
    flags: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class PolicyPlan:
    """The maps as a sync wants them, and the endpoints' states it started from.

    entries: (endpoint id, key) -> value, every policy map entry of the node;
    ipcache: prefix -> (identity, CIDR identity);
    before/after: endpoint id -> its state as the snapshot had it / as it is to be."""

    entries: Mapping[tuple[int, EntryKey], Written]
    ipcache: Mapping[str, tuple[int, int]]
    before: Mapping[int, EndpointState]
    after: Mapping[int, EndpointState]
