"""scripts/setup.sh: Debian 12 and 13 only, and it says what it found anywhere else; no Go."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"

UNSUPPORTED = {
    "ubuntu": ('PRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n',
               "Ubuntu 24.04.1 LTS"),
    "bullseye": ('PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nID=debian\nVERSION_ID="11"\n',
                 "Debian GNU/Linux 11 (bullseye)"),
    "sid": ('PRETTY_NAME="Debian GNU/Linux trixie/sid"\nID=debian\n',
            "Debian GNU/Linux trixie/sid"),
}


@pytest.mark.parametrize("release", sorted(UNSUPPORTED))
def test_stops_on_an_unsupported_release_naming_it(tmp_path, release):
    text, name = UNSUPPORTED[release]
    os_release = tmp_path / "os-release"
    os_release.write_text(text)
    res = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "CILIA_OS_RELEASE": str(os_release)},
                         timeout=60)
    assert res.returncode == 1
    assert "supports Debian 12 (bookworm) and Debian 13 (trixie)" in res.stderr
    assert f"this machine is {name}" in res.stderr
    assert "==>" not in res.stdout  # stopped before installing anything


def test_stops_without_an_os_release(tmp_path):
    res = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "CILIA_OS_RELEASE": str(tmp_path / "no")},
                         timeout=60)
    assert res.returncode == 1
    assert "ID=unknown" in res.stderr


@pytest.mark.parametrize("script", ["setup.sh", "test.sh", "demo.sh"])
def test_no_go_toolchain_needed(script):
    """The lab, the demo, the unit and datapath tiers need no Go: nothing these scripts run
    calls it (only `cilia cluster`, which builds upstream Kubernetes, does). test.sh may
    ask whether Go is there (`command -v go`), to build the cluster tier's components
    first; without it that tier skips, saying why."""
    code = [line for line in (SCRIPTS / script).read_text().splitlines()
            if not line.lstrip().startswith("#")]
    for line in code:
        line = line.split("#")[0].replace("command -v go", "")
        assert not re.search(r"(^|[\s;&|(`$])go(\s|$)", line), line
