#!/usr/bin/env bash
# Runs upstream Kubernetes e2e suites, by their own binary (e2e.test, under ginkgo), against
# a real cluster made by `cilia cluster up`.
#
#   scripts/e2e-upstream.sh [netpol|sig-network|network-policy-api]... [--cluster NAME]
#                           [--kube-proxy MODE] [--procs N] [--focus REGEX] [--report-dir DIR]
#
# netpol       the NetworkPolicy suite ([Feature:NetworkPolicy]); SCTP cases are skipped
#              where the kernel has no SCTP, and the script says so
# sig-network  the sig-network [Conformance] tests
# network-policy-api  sigs.k8s.io/network-policy-api's conformance suite (ClusterNetworkPolicy,
#              the standard profile), its Go test binary at packaging/upstream/suites.env's
#              version; the CRD is applied where the cluster lacks it. One test is one
#              conformance test (a subtest of TestConformance); --focus is a regex of their
#              names. Where the kernel has no SCTP the SCTP tests are skipped and the base
#              pods run without their SCTP servers, and the script says so.
# Without --cluster a 2-node cluster is made for the run (`cilia cluster up --kube-proxy
# MODE`: iptables, the default, nftables, or none: cilia replaces kube-proxy) and removed
# afterwards, also on failure. With --cluster the mode is that cluster's. JUnit goes to
# --report-dir (default /var/tmp/cilia-e2e/SUITE). Ends with one line per suite:
#   SUITE: N passed, N failed, N skipped (kube-proxy MODE)
# (network-policy-api's line is `network-policy-api: N passed, N failed, N skipped`; its
# raw `-test.v` output is go-test.log.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" >&2

suites=() cluster="" procs=2 focus="" report_root="/var/tmp/cilia-e2e" kube_proxy=""
while [ $# -gt 0 ]; do
  case "$1" in
    netpol|sig-network|network-policy-api) suites+=("$1") ;;
    --cluster) cluster="$2"; shift ;;
    --kube-proxy) kube_proxy="$2"; shift ;;
    --procs) procs="$2"; shift ;;
    --focus) focus="$2"; shift ;;
    --report-dir) report_root="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "e2e-upstream.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#suites[@]} -gt 0 ] || suites=(netpol)

no_sctp=""
if [ ! -e /proc/net/sctp ] && ! modprobe -q sctp 2>/dev/null; then no_sctp=1; fi
components=(kubectl)
for suite in "${suites[@]}"; do
  case "$suite" in
    netpol|sig-network) components+=(e2e.test ginkgo) ;;
    # The base pods' SCTP servers exit where the kernel has none: a build without them.
    network-policy-api) components+=("network-policy-api${no_sctp:+-nosctp}.test") ;;
  esac
done
BIN="$(bash "$ROOT/packaging/upstream/build.sh" "${components[@]}")"

made=""
if [ -z "$cluster" ]; then
  kube_proxy="${kube_proxy:-iptables}"
  cluster="e2e$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  made="$cluster"
  trap 'cilia cluster down --name "$made" >&2 || true' EXIT
  trap 'exit 130' INT TERM  # so that the EXIT trap removes the cluster then too
  cilia cluster up --name "$cluster" --nodes 2 --kube-proxy "$kube_proxy" >&2
else
  # The cluster's own mode, as `cilia cluster up` recorded it.
  mode="$(python3 -c 'import sys
from cilia.cluster.cluster import Cluster, ClusterError
try:
    print(Cluster(sys.argv[1]).load().kube_proxy)
except ClusterError as e:
    sys.exit(f"e2e-upstream.sh: {e}")' "$cluster")"
  if [ -n "$kube_proxy" ] && [ "$kube_proxy" != "$mode" ]; then
    echo "e2e-upstream.sh: cluster $cluster runs --kube-proxy $mode, not $kube_proxy" >&2
    exit 2
  fi
  kube_proxy="$mode"
fi
KUBECONFIG_PATH="$(cilia cluster kubeconfig --name "$cluster")"

# The API server must reach pods (pods/proxy, services/proxy: the Proxy specs, and the DNS
# specs, which read their probes' results so): `cilia cluster up` routes its namespace to
# each node's pod CIDR. A cluster of the caller's may predate that, or have got its CNI
# after `up` (`--cilia none`): make the routes now (idempotent).
if [ -z "$made" ]; then
  python3 -c 'import sys
from cilia.cluster.cluster import Cluster
for node, (cidr, via) in sorted(Cluster(sys.argv[1]).route_pods().items()):
    print(f"==> control plane: route to {cidr} (pods of {node}) via {via}", file=sys.stderr)
' "$cluster"
fi

# sigs.k8s.io/network-policy-api's conformance suite: its Go test binary, under -test.v.
network_policy_api() {
  local dir="$1" bin mod crd skip_names=() skip_args=() skipped=() run='^TestConformance$'
  # shellcheck source=../packaging/upstream/suites.env
  source "$ROOT/packaging/upstream/suites.env"
  bin="$BIN/network-policy-api${no_sctp:+-nosctp}-$NETWORK_POLICY_API_VERSION.test"
  mod="${GOMODCACHE:-${CILIA_CACHE:-/var/cache/cilia}/go-mod}/sigs.k8s.io/network-policy-api@$NETWORK_POLICY_API_VERSION"
  crd="$mod/config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml"
  if ! "$BIN/kubectl" --kubeconfig="$KUBECONFIG_PATH" get crd \
      clusternetworkpolicies.policy.networking.k8s.io >/dev/null 2>&1; then
    echo "==> network-policy-api: the cluster has no ClusterNetworkPolicy CRD: applying" \
         "$crd" >&2
    "$BIN/kubectl" --kubeconfig="$KUBECONFIG_PATH" apply -f "$crd" >&2
    "$BIN/kubectl" --kubeconfig="$KUBECONFIG_PATH" wait --for condition=established \
        --timeout=60s crd/clusternetworkpolicies.policy.networking.k8s.io >&2
  fi
  if [ -n "$no_sctp" ]; then
    # (those the focus selects: a skipped test is counted)
    mapfile -t skip_names < <(grep -ho 'ShortName: *"[^"]*SCTP[^"]*"' \
        "$mod"/conformance/tests/*.go | cut -d'"' -f2 | sort | grep -E -- "${focus:-.}" || true)
    echo "==> network-policy-api: the kernel has no SCTP (no /proc/net/sctp, modprobe sctp" \
         "failed): skipping the SCTP tests (${skip_names[*]}); the base pods run without" \
         "their SCTP servers and the mixed-protocol tests skip their SCTP probes, each" \
         "logged 'SKIPPED SCTP probe' (${bin##*/})" >&2
    if [ ${#skip_names[@]} -gt 0 ]; then
      skip_args=(-test.skip "^TestConformance\$/^($(IFS='|'; echo "${skip_names[*]}"))\$")
      for n in "${skip_names[@]}"; do skipped+=(--skipped "$n=the kernel has no SCTP"); done
    fi
  fi
  if [ -n "$focus" ]; then run="^TestConformance\$/$focus"; fi
  echo "==> network-policy-api: ${bin##*/} -test.run='$run' (profile ClusterNetworkPolicy," \
       "standard features) against cluster $cluster (kube-proxy $kube_proxy)" >&2
  # Its tests run one after the other; -test.timeout is Go's 10 minutes unless set.
  (cd "$dir" && KUBECONFIG="$KUBECONFIG_PATH" "$bin" -test.v -test.run "$run" \
      "${skip_args[@]}" -test.timeout 3h -supported-features ClusterNetworkPolicy \
      -cleanup-base-resources=true > "$dir/go-test.log" 2>&1) || true
  python3 "$ROOT/scripts/junit_summary.py" --go-test network-policy-api "$dir/go-test.log" \
      "$dir/junit.xml" "${skipped[@]}"
}

summaries=()
for suite in "${suites[@]}"; do
  if [ "$suite" = network-policy-api ]; then
    dir="$report_root/$suite"
    rm -rf "$dir"; mkdir -p "$dir"
    start=$SECONDS
    network_policy_api "$dir"
    echo "    $suite took $((SECONDS - start)) s; log $dir/go-test.log; JUnit $dir/junit.xml" >&2
    python3 "$ROOT/scripts/junit_summary.py" --failures "$dir/junit.xml" >&2 || true
    summaries+=("$(python3 "$ROOT/scripts/junit_summary.py" "$suite" "$dir/junit.xml")")
    continue
  fi
  skip='\[Serial\]|\[Disruptive\]|\[Flaky\]'
  case "$suite" in
    netpol)
      regex='\[Feature:NetworkPolicy\]'
      if [ -n "$no_sctp" ]; then
        echo "==> netpol: the kernel has no SCTP (no /proc/net/sctp, modprobe sctp failed):" \
             "skipping the SCTP cases" >&2
        skip+='|SCTP'
      fi ;;
    sig-network)
      regex='\[sig-network\].*\[Conformance\]' ;;
  esac
  # Go's regexp has no lookahead: "both, in any order" is spelled out, the focus before,
  # after, or (for a regex A.*B, like sig-network's) between the suite's own parts.
  if [ -n "$focus" ]; then
    alt="$regex.*$focus|$focus.*$regex"
    case "$regex" in
      *'.*'*) alt="$alt|${regex%%.\**}.*$focus.*${regex#*.\*}" ;;
    esac
    regex="(?:$alt)"
  fi
  dir="$report_root/$suite"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "==> $suite: e2e.test --ginkgo.focus='$regex' against cluster $cluster" \
       "(kube-proxy $kube_proxy, $procs processes)" >&2
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
  summaries+=("$line (kube-proxy $kube_proxy)")
done
for line in "${summaries[@]}"; do echo "$line"; done
