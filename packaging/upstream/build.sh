#!/usr/bin/env bash
# Builds the pinned upstream components of `cilia cluster` from their Go modules, once per
# machine, into a cache outside the checkout keyed by the pins:
#   $CILIA_CACHE/upstream/<key>/bin/{kube-apiserver,...,e2e.test,agnhost,etcd,coredns,helm}
# Usage: packaging/upstream/build.sh [COMPONENT...]   (default: all); prints the bin dir last.
#        packaging/upstream/build.sh --dir            prints the bin dir, builds nothing.
# Go is used here and nowhere else: cilia's own code stays Python and C.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/pins.env"
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
if [ "${1:-}" = "--dir" ]; then echo "$BIN"; exit 0; fi
want=("$@"); [ ${#want[@]} -gt 0 ] || want=("${ALL[@]}")

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build_one() {
  local name="$1" out="$BIN/$1"
  case "$name" in
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
    *) echo "build.sh: unknown component $name (known: ${ALL[*]})" >&2; return 2 ;;
  esac
  mv "$out.tmp" "$out"
}

total_start=$SECONDS
for name in "${want[@]}"; do
  if [ -x "$BIN/$name" ]; then continue; fi
  echo "==> building $name (cache $BIN)" >&2
  start=$SECONDS
  build_one "$name"
  echo "    $name built in $((SECONDS - start)) s" >&2
done
echo "==> upstream components ready in $((SECONDS - total_start)) s" >&2
echo "$BIN"
