#!/usr/bin/env bash
# The whole test suite: lint, unit, datapath (root, real BPF, real packets), runtime, and
# the cluster tier (a real Kubernetes; its upstream components are built first, once per
# machine, when Go is there: packaging/upstream/build.sh).
# Extra arguments go to pytest (e.g. `scripts/test.sh tests/unit -k ipam`).
# At the end pytest prints the wall time of each tier (tests/conftest.py), with the time
# setup and ruff took before it, so a slow tier shows.
set -euo pipefail
t0=$EPOCHREALTIME
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
t1=$EPOCHREALTIME
echo "==> ruff"
ruff check .
t2=$EPOCHREALTIME
# The cluster and control-plane tiers' binaries, built here rather than inside a test (a cold build takes
# ~10 minutes on two cores, longer than any one test may). Without Go the tier skips,
# saying why.
if { [ $# -eq 0 ] || [[ "$*" == *cluster* ]] || [[ "$*" == *controlplane* ]]; } \
    && command -v go >/dev/null; then
  echo "==> upstream Kubernetes components (packaging/upstream/build.sh)"
  python -c 'from cilia.cluster import upstream; upstream.ensure()' >/dev/null
fi
t3=$EPOCHREALTIME
echo "==> pytest"
CILIA_PRE_TIERS="setup=$(awk "BEGIN{print $t1-$t0}") ruff=$(awk "BEGIN{print $t2-$t1}")"
CILIA_PRE_TIERS+=" upstream=$(awk "BEGIN{print $t3-$t2}")"
export CILIA_PRE_TIERS
exec python -m pytest -ra "$@"
