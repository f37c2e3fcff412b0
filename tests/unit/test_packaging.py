"""The layout keeps `import cilia.*` working and never shadows the standard library."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_checkout_root_does_not_shadow_stdlib_operator():
    # Any Python started at the top of the checkout has it on sys.path.
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not out.strip().startswith(str(REPO))


def test_namespace_imports_from_anywhere(tmp_path):
    code = "import cilia.agent, cilia.cni, cilia.operator, cilia.datapath, cilia.lab"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
