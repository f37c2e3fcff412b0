"""The local datastore: manifests as YAML files under a state directory.

Layout: <root>/<Kind>/<namespace or _cluster>/<name>.yaml, one object per file, written
atomically, so `cilia apply` and a running agent never see half an object and any
person can read the state with `ls` and `cat`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from cilia.datastore import NAMESPACED, object_ref

CLUSTER = "_cluster"


class LocalDatastore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, kind: str, namespace: str, name: str) -> Path:
        return self.root / kind / (namespace or CLUSTER) / f"{name}.yaml"

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return yaml.safe_load(self._path(kind, namespace, name).read_text())
        except FileNotFoundError:
            return None

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        base = self.root / kind
        dirs = [base / (namespace or CLUSTER)] if namespace is not None else base.glob("*")
        out = []
        for d in dirs:
            for f in sorted(Path(d).glob("*.yaml")):
                try:
                    out.append(yaml.safe_load(f.read_text()))
                except FileNotFoundError:
                    continue
        return out

    def put(self, obj: dict) -> str:
        """Stores an object; returns "created", "configured" or "unchanged"."""
        kind, namespace, name = object_ref(obj)
        if NAMESPACED[kind]:
            obj.setdefault("metadata", {})["namespace"] = namespace
        path = self._path(kind, namespace, name)
        old = self.get(kind, namespace, name)
        if old == obj:
            return "unchanged"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
        os.replace(tmp, path)
        return "configured" if old is not None else "created"

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self._path(kind, namespace, name).unlink()
            return True
        except FileNotFoundError:
            return False
