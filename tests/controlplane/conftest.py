import pytest
from cp_emulator import EmulatorThread
from cpkit import Cluster


@pytest.fixture
def cluster(tmp_path):
    """An emulated API server with cilia's CRDs loaded (through its API, as `kubectl
    apply` would), and a client; everything started here is stopped, even on failure."""
    emulator = EmulatorThread().start()
    c = None
    try:
        c = Cluster(emulator, tmp_path)
        c.load_crds()
        yield c
    finally:
        if c is not None:
            c.close()
        emulator.stop()
