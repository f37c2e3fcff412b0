"""What the policy engine hands the policy writer: a plan, plain frozen data.

The engine (agent/policy.py) computes a `PolicyPlan` from a snapshot of the node's
endpoints and the datastore, holding no map; the writer (agent/policy_writer.py) applies
it to the maps it owns, and hands each endpoint's `EndpointState` to the endpoint manager,
which owns the endpoints map (agent/endpoint.py apply_policy_state)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
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


class EndpointEntries(Mapping):
    """Every policy map entry of the node, (endpoint id, key) -> value, held per
    endpoint (`by_endpoint`): the writer compares an endpoint's entries whole (in C) and
    looks key by key only into those that changed, and the engine hands over the same
    per-endpoint mapping while its compiled entries are unchanged. Read-only."""

    def __init__(self, by_endpoint: Mapping[int, Mapping[EntryKey, Written]]):
        self.by_endpoint = by_endpoint

    def __getitem__(self, k: tuple[int, EntryKey]) -> Written:
        return self.by_endpoint[k[0]][k[1]]

    def __iter__(self):
        for ep_id, entries in self.by_endpoint.items():
            for key in entries:
                yield (ep_id, key)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_endpoint.values())

    @classmethod
    def from_flat(cls, flat: Mapping[tuple[int, EntryKey], Written]) -> EndpointEntries:
        by_endpoint: dict[int, dict[EntryKey, Written]] = {}
        for (ep_id, key), value in flat.items():
            by_endpoint.setdefault(ep_id, {})[key] = value
        return cls(MappingProxyType(by_endpoint))


@dataclass(frozen=True)
class PolicyPlan:
    """The maps as a sync wants them, and the endpoints' states it started from.

    entries: (endpoint id, key) -> value, every policy map entry of the node;
    ipcache: prefix -> (identity, CIDR identity);
    before/after: endpoint id -> its state as the snapshot had it / as it is to be."""

    entries: EndpointEntries
    ipcache: Mapping[str, tuple[int, int]]
    before: Mapping[int, EndpointState]
    after: Mapping[int, EndpointState]
