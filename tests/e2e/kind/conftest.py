"""The kind e2e suite's cluster: created once per run, with cilia installed by Helm from
this checkout's chart and an image built from this checkout's Dockerfile; deleted at the
end (CILIA_E2E_KEEP=1 keeps it). Skipped, saying exactly what is missing, on machines
without a working Docker engine, kind, kubectl or helm."""

from __future__ import annotations

import pytest
from kindkit import (
    KEEP,
    all_nodes_ready,
    build_and_load_image,
    create_cluster,
    delete_cluster,
    helm_install,
    kubectl,
    missing_tools,
    pods_not_running,
    wait_for,
)


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
def cluster():
    """A kind cluster with cilia installed, every node Ready and every pod Running."""
    create_cluster()
    try:
        build_and_load_image()
        helm_install()
        wait_for("every node Ready", all_nodes_ready, timeout=300, interval=3)
        wait_for("every pod Running and Ready", lambda: not pods_not_running(), timeout=300,
                 interval=3)
        yield
    except BaseException:
        print(kubectl("get", "pods", "-A", "-o", "wide", check=False))
        print(kubectl("-n", "kube-system", "logs", "ds/cilia-agent", "-c", "agent",
                      "--tail", "100", check=False))
        raise
    finally:
        if not KEEP:
            delete_cluster()
