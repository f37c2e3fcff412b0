#!/usr/bin/env bash
# Builds the standalone CNI plugin (no Python needed on the node) with PyInstaller in
# one-folder mode, and checks that it answers VERSION.
#
#   packaging/cni/build.sh [OUT_DIR]     (default: build/cni; the result is OUT_DIR/dist/cilia-cni/)
#
# Needs the project installed in the Python that runs it and pyinstaller
# (`pip install -e '.[test]'` has both). The result, OUT_DIR/dist/cilia-cni/, holds the
# executable `cilia-cni` and its contents directory `cilia-cni.d/`; copy both into the
# CNI bin directory (/opt/cni/bin). It needs a glibc at least as new as the build
# machine's (Debian 12: 2.36).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/build/cni}")"
PYTHON="${PYTHON:-python3}"
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ] && [ "${PYTHON}" = python3 ]; then
  PYTHON="$ROOT/.venv/bin/python"
fi

"$PYTHON" -m PyInstaller --version >/dev/null 2>&1 || {
  echo "build.sh: pyinstaller is not installed for $PYTHON: pip install pyinstaller" >&2
  exit 1
}
# A plain (non-editable) install of cilia into a staging directory: an editable install
# maps cilia.cni to cni/ through an import hook that PyInstaller's analysis cannot follow.
# With a setuptools that builds wheels by itself (70.1+), no isolated build environment
# is fetched from the index.
rm -rf "$OUT/site"
isolation=()
if "$PYTHON" -c 'import sys, setuptools; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' 2>/dev/null; then
  isolation=(--no-build-isolation)
fi
"$PYTHON" -m pip install --quiet --no-deps --no-compile "${isolation[@]}" \
  --target "$OUT/site" "$ROOT"
rm -rf "$OUT/site/bin"
CILIA_CNI_SITE="$OUT/site" "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$OUT/dist" --workpath "$OUT/work" "$ROOT/packaging/cni/cilia-cni.spec"

BIN="$OUT/dist/cilia-cni/cilia-cni"
out="$(CNI_COMMAND=VERSION "$BIN" </dev/null)"
case "$out" in
  *'"supportedVersions"'*) echo "built $BIN: $out" ;;
  *) echo "build.sh: $BIN answered VERSION with: $out" >&2; exit 1 ;;
esac
