"""CiliaIdentity objects in the local datastore: the identity allocator's store."""

from __future__ import annotations

import os
import tempfile

import yaml

from cilia.datastore.local import LocalDatastore
from cilia.identity import SecurityLabels

API_VERSION = "cilia.io/v1alpha1"
KIND = "CiliaIdentity"


def identity_object(number: int, labels: SecurityLabels) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": str(number)},
        "securityLabels": sorted(labels),
    }


class LocalIdentityStore:
    """One file per identity; a number is claimed by hard-linking a complete file into
    place, which fails if the name exists: atomic across processes, never half-written."""

    def __init__(self, datastore: LocalDatastore):
        self.datastore = datastore
        # An identity file is never rewritten in place (a new one is a new inode), so
        # each is parsed once: the allocator re-reads the store for every new label set,
        # which would otherwise cost O(identities) YAML parses each time.
        self._parsed: dict[tuple, tuple[int, SecurityLabels] | None] = {}

    def identities(self) -> dict[int, SecurityLabels]:
        folder = self.datastore.path(KIND, "", "0").parent
        try:
            entries = [e for e in os.scandir(folder)
                       if e.name.endswith(".yaml") and not e.name.startswith(".")]
        except FileNotFoundError:
            return {}
        out, parsed = {}, {}
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            key = (entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key in self._parsed:
                parsed[key] = self._parsed[key]
            else:
                parsed[key] = _read(entry.path)
            if parsed[key] is not None:
                number, labels = parsed[key]
                out[number] = labels
        self._parsed = parsed
        return out

    def create(self, number: int, labels: SecurityLabels) -> bool:
        path = self.datastore.path(KIND, "", str(number))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".new-")
        try:
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(identity_object(number, labels), f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)


def _read(path: str) -> tuple[int, SecurityLabels] | None:
    try:
        with open(path) as f:
            obj = yaml.safe_load(f)
        return int(obj["metadata"]["name"]), frozenset(obj.get("securityLabels", []))
    except (OSError, yaml.YAMLError, KeyError, ValueError, TypeError, AttributeError):
        return None
