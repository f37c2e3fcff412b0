"""The datastore: where cilia reads cluster state (namespaces, pods, later policies).

One interface, two backends: `local` (manifests in a state directory, the embedded
default used by the lab) and `kubernetes` (the API server; see issue 4).
"""

from __future__ import annotations

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
}


class ObjectError(ValueError):
    """A manifest that cannot be stored, with what is wrong and where."""


class Datastore(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    def list(self, kind: str, namespace: str | None = None) -> list[dict]: ...

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


def _check_name(what: str, name: str) -> None:
    import re

    if len(name) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ObjectError(
            f"invalid {what} name {name!r}: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
