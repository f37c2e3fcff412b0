"""Fixtures of the NetworkPolicy reachability tests (tests/reachability.py)."""

import pytest
from reachability import Model


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
