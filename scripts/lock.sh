#!/usr/bin/env bash
# The one command that changes the version of a Python dependency: updates uv.lock (every
# package, runtime and test, with exact versions and hashes) within the ranges of
# pyproject.toml, for Python 3.11 and 3.13 alike. Nothing else changes a version:
# scripts/setup.sh installs exactly what uv.lock names (`uv sync --locked`).
#
#   bash scripts/lock.sh                            # everything to the newest allowed versions
#   bash scripts/lock.sh --upgrade-package grpcio   # one package (any `uv lock` arguments)
#   bash scripts/lock.sh --keep                     # after editing pyproject.toml: re-lock,
#                                                   # keeping every locked version that still fits
#   bash scripts/lock.sh --check                    # only check uv.lock matches pyproject.toml
#   bash scripts/lock.sh --uv 0.14.0                # move uv itself (scripts/requirements-uv.txt)
#
# After a change: bash scripts/test.sh (it re-syncs .venv), then commit uv.lock (and
# pyproject.toml, scripts/requirements-uv.txt, packaging/image/requirements*.txt when they
# changed) with the code.
# Needs no root and no apt packages: only python3 with venv, and PyPI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"

bootstrap_uv() {
  local want
  want="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' scripts/requirements-uv.txt)"
  if [ "$(.venv-tools/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$want" ]; then
    rm -rf .venv-tools
    "$PY" -m venv .venv-tools
    .venv-tools/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps \
      -r scripts/requirements-uv.txt
  fi
}

uv() {
  UV_PYTHON_DOWNLOADS=never UV_PYTHON="$PY" UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-1}" \
    "$ROOT/.venv-tools/bin/uv" "$@"
}

if [ "${1:-}" = "--uv" ]; then
  new="${2:?usage: scripts/lock.sh --uv X.Y.Z}"
  bootstrap_uv
  header="$(sed '/^uv==/,$d' scripts/requirements-uv.txt)"
  pinned="$(echo "uv==$new" | uv pip compile --quiet --generate-hashes --no-header \
              --no-annotate --python "$PY" -)"
  printf '%s\n%s\n' "$header" "$pinned" > scripts/requirements-uv.txt
  sed -i "s/^required-version = \"==[^\"]*\"/required-version = \"==$new\"/" pyproject.toml
  bootstrap_uv
  shift 2
  set -- --keep   # the new uv may write the lock its own way: re-lock, moving nothing
fi

bootstrap_uv
if [ "${1:-}" = "--check" ]; then
  uv lock --locked
  exit
fi
case "${1:-}" in
  "") set -- --upgrade ;;
  --keep) shift ;;
esac
before="$(cat uv.lock pyproject.toml scripts/requirements-uv.txt 2>/dev/null | sha256sum)"
uv lock "$@"

# The editable build of cilia uses the setuptools that the lock names (pyproject.toml:
# tool.uv.build-constraint-dependencies): keep the two equal.
locked="$("$PY" - <<'EOF'
import tomllib
lock = tomllib.load(open("uv.lock", "rb"))
print(next(p["version"] for p in lock["package"] if p["name"] == "setuptools"))
EOF
)"
if ! grep -q "\"setuptools==$locked\"" pyproject.toml; then
  sed -i "s/^build-constraint-dependencies = \[\"setuptools==[^\"]*\"\]/build-constraint-dependencies = [\"setuptools==$locked\"]/" pyproject.toml
  uv lock
fi
# The image installs the same versions with the same hashes (packaging/image/requirements*.txt).
UV="$ROOT/.venv-tools/bin/uv" "$PY" packaging/image/requirements.py
if [ "$(cat uv.lock pyproject.toml scripts/requirements-uv.txt | sha256sum)" = "$before" ]; then
  echo "lock.sh: nothing changed"
else
  git --no-pager diff --stat -- uv.lock pyproject.toml scripts/requirements-uv.txt packaging/image 2>/dev/null || true
  echo "lock.sh: the lock changed; now run bash scripts/test.sh (it re-syncs .venv), then commit it"
fi
