"""The kind cluster: created once per run with no CNI (the suite installs cilia with Helm
from this checkout's chart and an image built from its Dockerfile); deleted at the end
(CILIA_E2E_KEEP=1 keeps it). Skipped, saying exactly what is missing, on machines without
a working Docker engine, kind, kubectl or helm."""

from __future__ import annotations

import pytest
from kindkit import KEEP, KindPlatform, create_cluster, delete_cluster, missing_tools


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if "kind" in i.path.parts and "e2e" in i.path.parts]
    if not ours:
        return
    missing = missing_tools()
    if missing:
        skip = pytest.mark.skip(reason="kind e2e needs Docker, kind, kubectl and helm: "
                                + "; ".join(missing))
        for item in ours:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kind_cluster():
    create_cluster()
    try:
        yield KindPlatform()
    finally:
        if not KEEP:
            delete_cluster()
