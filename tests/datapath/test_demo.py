"""The README's first command runs the demo: it must pass and leave nothing behind."""

import subprocess
import sys

from labkit import unique_lab_name

from cilia.lab.lab import Lab, netns_exists


def test_demo_passes_and_cleans_up():
    name = unique_lab_name()
    try:
        res = subprocess.run([sys.executable, "-m", "cilia.cli", "--lab", name, "demo"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "demo passed" in res.stdout
        assert "refused by policy, as expected" in res.stdout
        assert not Lab(name).exists() and not netns_exists(f"{name}-node1")
    finally:
        Lab(name).down()
