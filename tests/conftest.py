import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests under datapath/ need root, network namespaces and BPF: say so when skipped."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not (REPO / "bpf" / "build" / "bpf_lxc.o").exists():
        missing.append("the BPF objects (make -C bpf)")
    if shutil.which("nsenter") is None:
        missing.append("nsenter (util-linux)")
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {', '.join(missing)}: run the README's test command")
    for item in items:
        if "datapath" in item.path.parts:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def lab():
    """A one-node lab with a unique name, torn down even when the tests fail."""
    from labkit import unique_lab_name

    from cilia.lab.lab import Lab

    lab = Lab(unique_lab_name())
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def bpftool():
    path = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(path):
        pytest.skip("bpftool not installed: apt-get install bpftool")
    subprocess.run([path, "version"], check=True, capture_output=True)
    return path
