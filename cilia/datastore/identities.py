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

    def identities(self) -> dict[int, SecurityLabels]:
        out = {}
        for obj in self.datastore.list(KIND):
            try:
                out[int(obj["metadata"]["name"])] = frozenset(obj.get("securityLabels", []))
            except (KeyError, ValueError, TypeError):
                continue
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
