#!/usr/bin/env bash
# Builds the pinned upstream components of `cilia cluster` from their Go modules, once per
# machine, into a cache outside the checkout keyed by the pins:
#   $CILIA_CACHE/upstream/<key>/bin/{kube-apiserver,...,e2e.test,agnhost,etcd,coredns,helm}
# and the conformance suites of suites.env (network-policy-api.test, its -nosctp variant:
# files named with their version, network-policy-api-v0.3.1.test).
# Usage: packaging/upstream/build.sh [COMPONENT...]   (default: all); prints the bin dir last.
#        packaging/upstream/build.sh --dir            prints the bin dir, builds nothing.
# Go is used here and nowhere else: cilia's own code stays Python and C.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/pins.env"
source "$HERE/suites.env"
CACHE="${CILIA_CACHE:-/var/cache/cilia}"
# The key names what is built, not how: editing this script does not throw the cache away.
key="$(cat "$HERE/pins.env" "$HERE"/*/go.mod "$HERE"/*/go.sum | sha256sum | cut -c1-12)"
BIN="$CACHE/upstream/$key/bin"
mkdir -p "$BIN"
export GOFLAGS="-buildvcs=false -mod=mod"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
# One Go build cache for every component and every key: a pin change rebuilds only what moved.
export GOCACHE="${GOCACHE:-$CACHE/go-build}" GOMODCACHE="${GOMODCACHE:-$CACHE/go-mod}"

K8S_ALL=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl e2e.test agnhost ginkgo)
ALL=("${K8S_ALL[@]}" pause etcd coredns helm)
SUITES=(network-policy-api.test network-policy-api-nosctp.test)
if [ "${1:-}" = "--dir" ]; then echo "$BIN"; exit 0; fi
want=("$@"); [ ${#want[@]} -gt 0 ] || want=("${ALL[@]}")

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

# Where a component is: the suites' binaries carry their version (suites.env is not in the
# key), the cluster's components are named as they are.
file_of() {
  case "$1" in
    network-policy-api*.test) echo "$BIN/${1%.test}-$NETWORK_POLICY_API_VERSION.test" ;;
    *) echo "$BIN/$1" ;;
  esac
}

# network-policy-api's base manifests (conformance/base/manifests.yaml), less the
# containers that serve SCTP (`agnhost porter` with SERVE_SCTP_PORT_*): where the kernel
# has no SCTP they exit at once, their pods are never Ready and the suite's setup fails.
strip_sctp_containers() {
  python3 - "$1" <<'PY'
import re
import sys

def depth(line):
    return len(line) - len(line.lstrip(" "))

lines, out, i = open(sys.argv[1]).read().splitlines(keepends=True), [], 0
while i < len(lines):
    out.append(lines[i])
    key = re.match(r"( *)containers:\s*$", lines[i])
    i += 1
    if not key:
        continue
    base, items = len(key.group(1)), []
    while i < len(lines) and (not lines[i].strip() or depth(lines[i]) > base
                              or lines[i].startswith(" " * base + "- ")):
        if lines[i].lstrip(" ").startswith("- ") and (
                not items or depth(lines[i]) == depth(items[0][0])):
            items.append([])
        (items[-1] if items else out).append(lines[i])
        i += 1
    out += [line for item in items if not any("SERVE_SCTP_PORT_" in x for x in item)
            for line in item]
sys.stdout.write("".join(out))
PY
}

# ... and whose SCTP probes are skipped, each logged as such: the tests that probe TCP,
# UDP and SCTP in one (gress rules, port ranges, inline CIDR peers) then judge TCP and UDP
# instead of failing on a protocol the kernel lacks. The tests about SCTP alone are
# skipped whole by scripts/e2e-upstream.sh.
skip_sctp_probes() {
  python3 - "$1" <<'PY'
import sys

path = sys.argv[1]
text = open(path).read()
head = ("timeoutConfig config.TimeoutConfig, shouldConnect bool) {\n"
        "\trequire.Eventually(")
assert text.count(head) == 1, f"{path}: PokeServer is not as expected; update skip_sctp_probes"
skip = ('timeoutConfig config.TimeoutConfig, shouldConnect bool) {\n'
        '\tif protocol == "sctp" {\n'
        '\t\tt.Logf("SKIPPED SCTP probe %s/%s -> %s:%d: the kernel has no SCTP", '
        'clientNamespace, clientPod, targetHost, targetPort)\n'
        '\t\treturn\n'
        '\t}\n'
        '\trequire.Eventually(')
open(path, "w").write(text.replace(head, skip))
PY
}

build_one() {
  local name="$1" out
  out="$(file_of "$1")"
  case "$name" in
    network-policy-api.test|network-policy-api-nosctp.test)
      # The module's own conformance package as a test binary, with the module's own
      # go.mod and go.sum (read-only, in the module cache): running it downloads nothing.
      local mod="sigs.k8s.io/network-policy-api@$NETWORK_POLICY_API_VERSION" src
      src="$(cd / && go mod download -json "$mod" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
      if [ "$name" = network-policy-api-nosctp.test ]; then
        # Go takes no overlay of a file in the module cache: a copy of the module, edited.
        rm -rf "$BIN/.nosctp" && cp -r "$src" "$BIN/.nosctp" && chmod -R u+w "$BIN/.nosctp"
        strip_sctp_containers "$src/conformance/base/manifests.yaml" \
          > "$BIN/.nosctp/conformance/base/manifests.yaml"
        skip_sctp_probes "$BIN/.nosctp/conformance/utils/kubernetes/helper.go"
        src="$BIN/.nosctp"
      fi
      (cd "$src" && GOFLAGS="-buildvcs=false -mod=readonly" go test -c -trimpath \
         -ldflags "-s -w" -o "$out.tmp" ./conformance)
      rm -rf "$BIN/.nosctp" ;;
    e2e.test)
      (cd "$HERE/kubernetes" && go test -c -o "$out.tmp" -ldflags "$k8s_ldflags" k8s.io/kubernetes/test/e2e) ;;
    agnhost)
      (cd "$HERE/kubernetes" && CGO_ENABLED=0 go build -o "$out.tmp" -ldflags "$k8s_ldflags" k8s.io/kubernetes/test/images/agnhost) ;;
    ginkgo)
      (cd "$HERE/kubernetes" && go build -o "$out.tmp" -ldflags "-s -w" github.com/onsi/ginkgo/v2/ginkgo) ;;
    kube-*|kubelet|kubectl)
      (cd "$HERE/kubernetes" && go build -o "$out.tmp" -ldflags "$k8s_ldflags" "k8s.io/kubernetes/cmd/$name") ;;
    pause)
      # The pod sandbox's process: upstream's own pause.c, linked statically.
      (cd "$HERE/kubernetes" && go mod download "k8s.io/kubernetes@$KUBERNETES_VERSION")
      local src="$GOMODCACHE/k8s.io/kubernetes@$KUBERNETES_VERSION/build/pause/linux/pause.c"
      gcc -Os -static -DVERSION="$PAUSE_VERSION" -o "$out.tmp" "$src" && strip "$out.tmp" ;;
    etcd)
      (cd "$HERE/etcd" && go build -o "$out.tmp" -ldflags "-s -w" go.etcd.io/etcd/server/v3) ;;
    coredns)
      GOBIN="$BIN/.coredns" CGO_ENABLED=0 go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
      mv "$BIN/.coredns/coredns" "$out.tmp"; rmdir "$BIN/.coredns" ;;
    helm)
      GOBIN="$BIN/.helm" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
      mv "$BIN/.helm/helm" "$out.tmp"; rmdir "$BIN/.helm" ;;
    *) echo "build.sh: unknown component $name (known: ${ALL[*]} ${SUITES[*]})" >&2; return 2 ;;
  esac
  mv "$out.tmp" "$out"
}

total_start=$SECONDS
for name in "${want[@]}"; do
  if [ -x "$(file_of "$name")" ]; then continue; fi
  echo "==> building $name (cache $BIN)" >&2
  start=$SECONDS
  build_one "$name"
  echo "    $name built in $((SECONDS - start)) s" >&2
done
echo "==> upstream components ready in $((SECONDS - total_start)) s" >&2
echo "$BIN"
