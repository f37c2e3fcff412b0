"""Kubernetes label selectors: matchLabels and matchExpressions, validated."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from cilia.policy import PolicyError

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    @classmethod
    def parse(cls, raw: object, field: str) -> Selector:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise PolicyError(field, "must be a label selector (matchLabels, matchExpressions)")
        unknown = set(raw) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise PolicyError(field, f"unknown field(s) {', '.join(sorted(unknown))}")
        reqs = []
        labels = raw.get("matchLabels")
        labels = {} if labels is None else labels
        if not isinstance(labels, dict):
            raise PolicyError(f"{field}.matchLabels", "must map label keys to values")
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise PolicyError(f"{field}.matchLabels", f"{k!r}: keys and values are strings")
            reqs.append(_requirement(k, "In", (v,)))
        exprs = raw.get("matchExpressions")
        exprs = [] if exprs is None else exprs
        if not isinstance(exprs, list):
            raise PolicyError(f"{field}.matchExpressions", "must be a list")
        for i, e in enumerate(exprs):
            where = f"{field}.matchExpressions[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("key"), str):
                raise PolicyError(where, "needs a key")
            op = e.get("operator")
            if op not in OPERATORS:
                raise PolicyError(
                    f"{where}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}"
                )
            values = e.get("values")
            values = [] if values is None else values
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise PolicyError(f"{where}.values", "must be a list of strings")
            if op in ("In", "NotIn") and not values:
                raise PolicyError(f"{where}.values", f"{op} needs at least one value")
            if op in ("Exists", "DoesNotExist") and values:
                raise PolicyError(f"{where}.values", f"{op} takes no values")
            reqs.append(_requirement(e["key"], op, tuple(values)))
        return cls(tuple(reqs))


@functools.lru_cache(maxsize=4096)
def _requirement(key: str, operator: str, values: tuple[str, ...]) -> Requirement:
    """One shared Requirement per distinct (key, operator, values) among the last few
    thousand parsed: thousands of selectors repeat `app: web` (a frozen object, safe to
    share)."""
    return Requirement(key, operator, frozenset(values))
