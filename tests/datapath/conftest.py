"""Fixtures of the policy tests: the reachability model (tests/reachability.py) and
storing objects until the agent has applied them."""

import pytest
from reachability import Model

from cilia.client import AgentClient


@pytest.fixture(scope="module")
def model(lab):
    """The x/y/z x a/b/c model on the module's lab; a module may define its own."""
    m = Model(lab)
    try:
        m.build()
        yield m
    finally:
        m.close()


@pytest.fixture
def m(model):
    """The model, brought back to no policy and base labels after the test."""
    yield model
    model.reset()


@pytest.fixture
def apply(lab):
    """Stores objects (policies, prefilters) and waits until the agent has applied them;
    removes them afterwards, and waits again."""
    stored = []
    client = AgentClient(lab.load().nodes[0].socket)

    def _apply(*objs):
        for o in objs:
            lab.datastore.put(o)
            stored.append(o)
        client.wait_policy_synced()

    yield _apply
    for o in stored:
        lab.datastore.delete(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
    client.wait_policy_synced()
