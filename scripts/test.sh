#!/usr/bin/env bash
# The whole test suite: lint, unit, datapath (root, real BPF, real packets), runtime.
# Extra arguments go to pytest (e.g. `scripts/test.sh tests/unit -k ipam`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "==> ruff"
ruff check .
echo "==> pytest"
exec python -m pytest -ra "$@"
