"""The development environment is exactly what uv.lock names.

scripts/setup.sh installs .venv with `uv sync --locked`: every distribution at the version
the lock names, nothing the lock does not name, and cilia itself editable. So a release
upstream changes nothing here until scripts/lock.sh updates the lock on purpose. These
tests look into .venv itself (through its own Python), whichever Python runs pytest.
"""

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
LOCK = tomllib.loads((REPO / "uv.lock").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Run by .venv's Python: what is installed in its site-packages (not whatever else is on
# sys.path) and the values of its environment markers.
PROBE = r"""
import importlib.metadata as md, json, sysconfig
from packaging.markers import default_environment
paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
dists = {}
for d in md.distributions(path=paths):
    direct = d.read_text("direct_url.json")
    dists[d.metadata["Name"]] = {"version": d.version,
                                 "direct_url": json.loads(direct) if direct else None}
print(json.dumps({"dists": dists, "env": default_environment()}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_packages() -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for package in LOCK["package"]:
        by_name.setdefault(canonical(package["name"]), []).append(package)
    return by_name


@pytest.fixture(scope="module")
def venv() -> dict:
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv here: run scripts/setup.sh (or scripts/test.sh)")
    out = subprocess.run([str(VENV_PYTHON), "-c", PROBE], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    data = json.loads(out)
    data["dists"] = {canonical(name): info for name, info in data["dists"].items()}
    return data


def test_every_installed_distribution_is_at_the_locked_version(venv):
    locked = locked_packages()
    wrong = []
    for name, info in sorted(venv["dists"].items()):
        versions = [p["version"] for p in locked.get(name, [])]
        if info["version"] not in versions:
            wrong.append(f"{name} {info['version']} (uv.lock: {versions or 'not named'})")
    assert not wrong, ("installed in .venv but not as uv.lock says: " + ", ".join(wrong)
                       + "; run scripts/setup.sh, or scripts/lock.sh to change the lock")


def test_cilia_is_installed_editable_from_this_checkout(venv):
    info = venv["dists"]["cilia"]
    (cilia,) = locked_packages()["cilia"]
    assert cilia["source"] == {"editable": "."}
    assert info["version"] == cilia["version"] == PYPROJECT["project"]["version"]
    direct = info["direct_url"] or {}
    assert direct.get("dir_info", {}).get("editable") is True, direct
    assert Path(direct["url"].removeprefix("file://")).resolve() == REPO


def test_everything_the_lock_requires_is_installed(venv):
    """cilia, its dependencies and the `test` extra, followed through the lock with the
    environment markers of .venv's Python: nothing is missing."""
    locked = locked_packages()
    env = {**venv["env"], "extra": ""}

    def applies(dep: dict) -> bool:
        return "marker" not in dep or Marker(dep["marker"]).evaluate(env)

    def package(dep: dict) -> dict:
        candidates = locked[canonical(dep["name"])]
        if "version" in dep:
            candidates = [p for p in candidates if p["version"] == dep["version"]]
        assert len(candidates) == 1, dep
        return candidates[0]

    (cilia,) = locked["cilia"]
    todo = [d for d in cilia["dependencies"] + cilia["optional-dependencies"]["test"]
            if applies(d)]
    need: dict[str, str] = {}
    while todo:
        dep = todo.pop()
        pkg = package(dep)
        name = canonical(pkg["name"])
        extras = dep.get("extra", [])
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in need:
            continue
        need[key] = pkg["version"]
        todo += [d for d in pkg.get("dependencies", []) if applies(d)]
        for extra in extras:
            todo += [d for d in pkg.get("optional-dependencies", {}).get(extra, [])
                     if applies(d)]
    missing = sorted(f"{key} {version}" for key, version in need.items()
                     if venv["dists"].get(key.split("[")[0], {}).get("version") != version)
    assert not missing, f"uv.lock names these, .venv lacks them: {missing}"


def test_lock_covers_both_supported_pythons():
    """One lock for Debian 12 (Python 3.11) and Debian 13 (3.13): universal, from 3.11 on,
    and every compiled package has a wheel for both (nothing builds from source)."""
    assert LOCK["requires-python"] == ">=3.11"
    for pkg in LOCK["package"]:
        if pkg["name"] == "cilia":
            continue
        wheels = [w["url"].rsplit("/", 1)[1] for w in pkg.get("wheels", [])]
        assert wheels, f"{pkg['name']}: no wheel in uv.lock"
        if any(w.endswith("-none-any.whl") for w in wheels):
            continue
        for tag in ("cp311", "cp313"):
            assert any("x86_64" in w and (f"-{tag}-" in w or "-abi3-" in w or "py3-none" in w)
                       for w in wheels), f"{pkg['name']}: no x86_64 wheel for {tag}"


def test_tools_pinned_consistently():
    """uv's own pin (scripts/requirements-uv.txt, with hashes) is the version pyproject.toml
    requires, and the setuptools that builds the editable cilia is the locked one."""
    uv_req = (REPO / "scripts" / "requirements-uv.txt").read_text()
    pinned = re.search(r"^uv==(\S+)", uv_req, re.M).group(1)
    assert "--hash=sha256:" in uv_req
    tool_uv = PYPROJECT["tool"]["uv"]
    assert tool_uv["required-version"] == f"=={pinned}"
    (setuptools,) = locked_packages()["setuptools"]
    assert tool_uv["build-constraint-dependencies"] == [f"setuptools=={setuptools['version']}"]
    assert LOCK["manifest"]["build-constraints"] == [
        {"name": "setuptools", "specifier": f"=={setuptools['version']}"}]


def test_image_requirements_match_the_lock():
    """The image installs what the tests ran with: packaging/image/requirements*.txt are
    uv.lock's export (scripts/lock.sh rewrites them), with a hash for every line."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(REPO / "packaging/image/requirements.py"),
                          "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("requirements.txt", "requirements-build.txt"):
        text = (REPO / "packaging/image" / name).read_text()
        reqs = [line for line in text.splitlines() if line and line[0].isalpha()]
        assert reqs and all("==" in r for r in reqs), name
        assert text.count("--hash=sha256:") >= len(reqs), name
    build = (REPO / "packaging/image/requirements-build.txt").read_text()
    assert "pyinstaller==" in build and "setuptools==" in build
