#!/usr/bin/env bash
# Runs upstream Kubernetes e2e suites, by their own binary (e2e.test, under ginkgo), against
# a real cluster made by `cilia cluster up`.
#
#   scripts/e2e-upstream.sh [netpol|sig-network]... [--cluster NAME] [--procs N]
#                           [--focus REGEX] [--report-dir DIR]
#
# netpol       the NetworkPolicy suite ([Feature:NetworkPolicy]); SCTP cases are skipped
#              where the kernel has no SCTP, and the script says so
# sig-network  the sig-network [Conformance] tests
# Without --cluster a 2-node cluster is made for the run and removed afterwards. JUnit goes
# to --report-dir (default /var/tmp/cilia-e2e/SUITE). Ends with one line per suite:
#   SUITE: N passed, N failed, N skipped
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" >&2

suites=() cluster="" procs=2 focus="" report_root="/var/tmp/cilia-e2e"
while [ $# -gt 0 ]; do
  case "$1" in
    netpol|sig-network) suites+=("$1") ;;
    --cluster) cluster="$2"; shift ;;
    --procs) procs="$2"; shift ;;
    --focus) focus="$2"; shift ;;
    --report-dir) report_root="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "e2e-upstream.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#suites[@]} -gt 0 ] || suites=(netpol)

BIN="$(bash "$ROOT/packaging/upstream/build.sh" e2e.test ginkgo kubectl)"

made=""
if [ -z "$cluster" ]; then
  cluster="e2e$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  made="$cluster"
  trap 'cilia cluster down --name "$made" >&2 || true' EXIT
  cilia cluster up --name "$cluster" --nodes 2 >&2
fi
KUBECONFIG_PATH="$(cilia cluster kubeconfig --name "$cluster")"

summaries=()
for suite in "${suites[@]}"; do
  skip='\[Serial\]|\[Disruptive\]|\[Flaky\]'
  case "$suite" in
    netpol)
      regex='\[Feature:NetworkPolicy\]'
      if [ ! -e /proc/net/sctp ] && ! modprobe -q sctp 2>/dev/null; then
        echo "==> netpol: the kernel has no SCTP (no /proc/net/sctp, modprobe sctp failed):" \
             "skipping the SCTP cases" >&2
        skip+='|SCTP'
      fi ;;
    sig-network)
      regex='\[sig-network\].*\[Conformance\]' ;;
  esac
  # Go's regexp has no lookahead: "both, in either order" is spelled out.
  [ -z "$focus" ] || regex="(?:$regex.*$focus|$focus.*$regex)"
  dir="$report_root/$suite"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "==> $suite: e2e.test --ginkgo.focus='$regex' against cluster $cluster ($procs processes)" >&2
  start=$SECONDS
  # ginkgo runs e2e.test's specs in parallel processes; e2e.test exits non-zero on any
  # failure, which the summary below reports.
  "$BIN/ginkgo" --procs="$procs" --no-color --timeout=3h --junit-report=junit.xml \
      --output-dir="$dir" --focus="$regex" --skip="$skip" "$BIN/e2e.test" -- \
      --kubeconfig="$KUBECONFIG_PATH" --provider=local --kubectl-path="$BIN/kubectl" \
      --report-dir="$dir" --e2e-output-dir="$dir" --dump-logs-on-failure=false \
      > "$dir/e2e.log" 2>&1 || true
  took=$((SECONDS - start))
  line="$(python3 "$ROOT/scripts/junit_summary.py" "$suite" "$dir/junit.xml" "$regex")"
  echo "    $suite took ${took} s; log $dir/e2e.log; JUnit $dir/junit.xml" >&2
  python3 "$ROOT/scripts/junit_summary.py" --failures "$dir/junit.xml" >&2 || true
  summaries+=("$line")
done
for line in "${summaries[@]}"; do echo "$line"; done
