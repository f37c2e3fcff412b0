"""The datastore: where cilia reads cluster state (namespaces, pods, later policies).

One interface, two backends: `local` (manifests in a state directory, the embedded
default used by the lab) and `kubernetes` (the API server; see issue 4).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

# Kinds the local datastore accepts, by `kind`; namespaced kinds carry a namespace.
NAMESPACED = {
    "Pod": True,
    "Namespace": False,
    "NetworkPolicy": True,
    "CiliaNetworkPolicy": True,
    "CiliaClusterwideNetworkPolicy": False,
    "CiliaIdentity": False,
    "CiliaNode": False,
    "CiliaPrefilter": False,
    "Service": True,  # ClusterIP Services, translated by the datapath (agent/services.py)
    # sig-network's admin policy API (policy.networking.k8s.io: cilia/policy/cnp_model.py)
    "ClusterNetworkPolicy": False,
}


class ObjectError(ValueError):
    """A manifest that cannot be stored, with what is wrong and where."""


# (kind, namespace, name) of a stored object; namespace "" for cluster-scoped kinds
ObjectKey = tuple[str, str, str]


class ChangeFeed:
    """Which objects of some kinds changed since its consumer last looked, so that the
    consumer recomputes what those objects feed and nothing else. `take()` answers the
    (kind, namespace, name) of each changed object, or None for "anything may have
    changed": on the first look, and from a datastore that cannot tell which objects
    changed. A consumer that fails half-way must treat its next look as None: the
    keys it took are not given again."""

    def __init__(self, kinds: Iterable[str]):
        self.kinds = frozenset(kinds)
        self._lock = threading.Lock()
        self._keys: set[ObjectKey] | None = None

    def add(self, kind: str, keys: Iterable[tuple[str, str]] | None) -> None:
        """`keys`: (namespace, name) of the objects of `kind` that changed; None: any."""
        if kind not in self.kinds:
            return
        with self._lock:
            if self._keys is None:
                return  # everything is pending already
            if keys is None:
                self._keys = None
            else:
                self._keys.update((kind, ns, name) for ns, name in keys)

    def take(self) -> set[ObjectKey] | None:
        with self._lock:
            keys, self._keys = self._keys, set()
        return keys


class Datastore(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    def list(self, kind: str, namespace: str | None = None) -> list[dict]: ...

    def revision(self, kinds: Iterable[str] | None = None) -> tuple:
        """Changes whenever an object of one of `kinds` (None: any kind) changes."""
        ...

    def wait_changed(self, since: tuple, timeout: float,
                     kinds: Iterable[str] | None = None) -> tuple:
        """Blocks until `revision(kinds)` differs from `since`, at most `timeout`
        seconds; answers the revision then."""
        ...

    def subscribe(self, kinds: Iterable[str]) -> ChangeFeed: ...

    def put(self, obj: dict) -> str: ...

    def delete(self, kind: str, namespace: str, name: str) -> bool: ...


def object_ref(obj: dict) -> tuple[str, str, str]:
    """(kind, namespace, name) of a manifest, validated."""
    if not isinstance(obj, dict):
        raise ObjectError(f"a manifest must be a mapping, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in NAMESPACED:
        raise ObjectError(
            f"unsupported kind {kind!r}: the local datastore stores {', '.join(NAMESPACED)}"
        )
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ObjectError(f"{kind} without metadata.name")
    name = meta["name"]
    _check_name(kind, name)
    namespace = ""
    if NAMESPACED[kind]:
        namespace = meta.get("namespace") or "default"
        _check_name("namespace", namespace)
    labels = meta.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ObjectError(f"{kind} {name}: metadata.labels must map strings to strings")
    return kind, namespace, name


def check_object(obj: dict) -> tuple[tuple[str, str, str], list[str]]:
    """What `cilia apply` stores, checked as the API server checks it before storing
    (a CRD's schema and rules): (kind, namespace, name) and the warnings to show, or
    ObjectError. Only the kinds whose CRD validates its objects are checked beyond
    `object_ref`: a NetworkPolicy or a cilia policy that cilia cannot enforce is stored,
    as the API server stores it, and its pods are held closed by the agent."""
    kind, namespace, name = object_ref(obj)
    if kind != "ClusterNetworkPolicy":
        return (kind, namespace, name), []
    from cilia.policy import PolicyError
    from cilia.policy.cnp_model import API_VERSIONS, parse_cluster_network_policy

    if obj.get("apiVersion") not in API_VERSIONS:
        raise ObjectError(f"{kind} {name}: apiVersion {obj.get('apiVersion')!r} is not one "
                          f"cilia reads ({', '.join(API_VERSIONS)})")
    try:
        policy = parse_cluster_network_policy(obj)
    except PolicyError as err:
        raise ObjectError(f"{kind} {name}: {err}") from err
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ObjectError(f"{kind} {name}: spec cannot be parsed: {err}") from err
    return (kind, namespace, name), [f"{kind} {name}: {w}" for w in policy.warnings]


def _check_name(what: str, name: str) -> None:
    import re

    if len(name) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ObjectError(
            f"invalid {what} name {name!r}: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
