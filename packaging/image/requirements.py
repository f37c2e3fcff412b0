#!/usr/bin/env python3
"""Writes the image's pinned, hashed requirements from uv.lock (run by scripts/lock.sh).

- requirements.txt: cilia's runtime dependencies, installed into the image's virtual
  environment (what the agent, operator and CLI import).
- requirements-build.txt: those plus PyInstaller and setuptools with everything they
  need, for the build stage that makes the wheel of cilia and the standalone CNI plugin.

Both come from `uv export --frozen`, so the image holds exactly the versions (and
hashes) the tests ran with. `--check` exits 1 when a committed file is stale.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD_TOOLS = ("pyinstaller", "setuptools")
HEADER = ("# Generated from uv.lock by packaging/image/requirements.py (scripts/lock.sh runs it)."
          "\n# Do not edit: change pyproject.toml, then `bash scripts/lock.sh --keep`.\n")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> str:
    local = ROOT / ".venv-tools/bin/uv"
    return os.environ.get("UV") or (str(local) if local.exists() else "uv")


def _export(*extra: str) -> str:
    return subprocess.run(
        [_uv(), "export", "--frozen", "--no-emit-project", "--no-header", "--no-annotate",
         "--format", "requirements-txt", *extra],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _blocks(text: str) -> dict[str, str]:
    """name -> its requirement with hashes (a line and its indented continuations)."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            name = _norm(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0])
            blocks[name] = line + "\n"
        elif name:
            blocks[name] += line + "\n"
    return blocks


def _closure(roots: tuple[str, ...]) -> set[str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    deps = {_norm(p["name"]): [_norm(d["name"]) for d in p.get("dependencies", [])]
            for p in lock["package"]}
    seen: set[str] = set()
    todo = [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(deps.get(name, []))
    return seen


def render() -> dict[str, str]:
    runtime = _blocks(_export("--no-dev"))
    everything = _blocks(_export("--no-dev", "--all-extras"))
    build = dict(runtime)
    for name in sorted(_closure(BUILD_TOOLS)):
        if name in everything:
            build[name] = everything[name]
    return {
        "requirements.txt": HEADER + "".join(runtime[k] for k in sorted(runtime)),
        "requirements-build.txt": HEADER + "".join(build[k] for k in sorted(build)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed files differ from uv.lock's")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"packaging/image/{', '.join(stale)} do not match uv.lock: run "
              "`python3 packaging/image/requirements.py` (scripts/lock.sh does)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
