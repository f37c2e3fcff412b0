import os
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# Wall time per tier (the folders of tests/: unit, datapath, ...): each test's setup, call
# and teardown, module fixtures included, summed by tier and printed at the end so a slow
# tier shows. scripts/test.sh passes the seconds of its own steps in CILIA_PRE_TIERS.
_tier_seconds: dict[str, float] = defaultdict(float)
_tier_tests: dict[str, int] = defaultdict(int)


def _tier(path: Path) -> str:
    try:
        parts = path.resolve().relative_to(TESTS).parts
    except ValueError:
        return "other"
    return parts[0] if len(parts) > 1 else "tests"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.monotonic()
    try:
        return (yield)
    finally:
        tier = _tier(item.path)
        _tier_seconds[tier] += time.monotonic() - start
        _tier_tests[tier] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = []
    for step in os.environ.get("CILIA_PRE_TIERS", "").split():
        name, _, seconds = step.partition("=")
        try:
            rows.append((name, float(seconds), ""))
        except ValueError:
            continue
    rows += [(tier, _tier_seconds[tier], str(_tier_tests[tier])) for tier in sorted(_tier_seconds)]
    if not rows:
        return
    tw = terminalreporter
    tw.write_sep("=", "wall time per tier")
    tw.write_line(f"{'tier':<14}{'seconds':>9}{'tests':>8}")
    for name, seconds, count in rows:
        tw.write_line(f"{name:<14}{seconds:>9.1f}{count:>8}")
    tw.write_line(f"{'total':<14}{sum(r[1] for r in rows):>9.1f}"
                  f"{sum(_tier_tests.values()):>8}")


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
