#!/usr/bin/env bash
# Builds cilia's image from the repository's Dockerfile with buildah (no Docker engine),
# its base made locally: debootstrap of the Debian release the Dockerfile's BASE names,
# imported under that very name, since no registry is reachable. Cached outside the
# checkout, keyed by everything the build reads:
#   $CILIA_CACHE/image/cilia-<key>[-<tag>].tar   (a docker-archive; `ctr images import` takes it)
# Usage: packaging/image/build.sh [--tag TAG]   prints the image's name (docker.io/library/
#        cilia:TAG) and then the archive's path, last. TAG defaults to dev-<key>; a second
#        TAG over the same sources is a second build (a new image ID: its own label), as an
#        upgrade needs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${CILIA_CACHE:-/var/cache/cilia}/image"
TAG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    *) echo "build.sh: unknown argument $1 (usage: build.sh [--tag TAG])" >&2; exit 2 ;;
  esac
done
say() { echo "image: $*" >&2; }

# What the build reads: the Dockerfile, its .dockerignore and every file it copies.
key="$(cd "$ROOT" && {
  printf '%s\n' Dockerfile .dockerignore pyproject.toml README.md
  git ls-files bpf cilia agent cni operator packaging/cni packaging/image 2>/dev/null \
    || find bpf cilia agent cni operator packaging/cni packaging/image -type f -not -path '*/__pycache__/*' -not -path 'bpf/build/*'
} | LC_ALL=C sort -u | while read -r f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | xargs -0 sha256sum | sha256sum | cut -c1-12)"
TAG="${TAG:-dev-$key}"
NAME="docker.io/library/cilia:$TAG"
ARCHIVE="$CACHE/cilia-$key-$TAG.tar"
if [ -s "$ARCHIVE" ]; then
  say "cached: $ARCHIVE ($(du -m "$ARCHIVE" | cut -f1) MB)"
  echo "$NAME"; echo "$ARCHIVE"; exit 0
fi

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$CACHE"
STORE=(--root "$CACHE/storage" --runroot /run/cilia/buildah --storage-driver overlay)
start=$(date +%s)

# The base: `ARG BASE=debian:<release>-slim`, made by debootstrap of that release's suite.
base="$(sed -n 's/^ARG BASE=//p' "$ROOT/Dockerfile" | head -1)"
case "$base" in
  debian:12*) suite=bookworm ;;
  debian:13*) suite=trixie ;;
  *) echo "build.sh: the Dockerfile's BASE is $base; only debian:12* and debian:13* can be made here" >&2; exit 1 ;;
esac
base_ref="docker.io/library/$base"
if ! buildah "${STORE[@]}" images --quiet "$base_ref" >/dev/null 2>&1; then
  say "making the base image $base_ref: debootstrap --variant=minbase $suite"
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  ctr=""
  cleanup() {
    [ -n "$ctr" ] && buildah "${STORE[@]}" rm "$ctr" >/dev/null 2>&1
    rm -rf "$rootfs"
  }
  trap cleanup EXIT
  debootstrap --variant=minbase "$suite" "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
  # As Debian's -slim images: no documentation, no package lists, apt does not keep .debs.
  rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
  printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/docker"
  ctr="$(buildah "${STORE[@]}" from scratch)"
  mnt="$(buildah "${STORE[@]}" mount "$ctr")"
  tar -C "$rootfs" -c . | tar -C "$mnt" -x
  buildah "${STORE[@]}" umount "$ctr" >/dev/null
  buildah "${STORE[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash --label "org.opencontainers.image.description=debootstrap $suite (made by cilia)" "$ctr"
  buildah "${STORE[@]}" commit --quiet "$ctr" "$base_ref" >/dev/null
  cleanup; trap - EXIT
fi

# The layer cache grows with every change built (untagged intermediate images): past
# CILIA_IMAGE_STORAGE_GB (default 20) it is dropped once, and this build is a full one.
if [ -d "$CACHE/storage" ] && \
   [ "$(du -s --block-size=1G "$CACHE/storage" | cut -f1)" -gt "${CILIA_IMAGE_STORAGE_GB:-20}" ]; then
  say "layer cache over ${CILIA_IMAGE_STORAGE_GB:-20} GB: dropping it"
  buildah "${STORE[@]}" rmi --prune >/dev/null 2>&1 || true
fi

# The build. pip inside reaches the index with the machine's CA bundle (a TLS-inspecting
# proxy's CA is in it where there is one): mounted for the RUN steps only, never in a layer.
piprc="$(mktemp)"; trap 'rm -f "$piprc"' EXIT
printf '[global]\ncert = /run/cilia-build/ca.crt\n' > "$piprc"
say "building $NAME from $ROOT/Dockerfile (buildah $(buildah --version | cut -d' ' -f3))"
buildah "${STORE[@]}" bud --isolation chroot --network host --layers --pull-never \
  --volume /etc/ssl/certs/ca-certificates.crt:/run/cilia-build/ca.crt:ro \
  --volume "$piprc:/etc/pip.conf:ro" \
  --label "org.opencontainers.image.version=$TAG" \
  --tag "$NAME" --file "$ROOT/Dockerfile" "$ROOT" >&2
buildah "${STORE[@]}" push --quiet "$NAME" "docker-archive:$ARCHIVE.tmp.$$:$NAME" >&2
mv "$ARCHIVE.tmp.$$" "$ARCHIVE"
# The cache keeps the newest KEEP archives (each ≈0.5 GB) and their images; older ones
# go (the layer cache stays: it is what makes a rebuild after a code change take seconds).
KEEP="${CILIA_IMAGE_KEEP:-4}"
ls -1t "$CACHE"/cilia-*.tar 2>/dev/null | tail -n +"$((KEEP + 1))" | while read -r old; do
  tag="${old##*/cilia-}"; tag="${tag#*-}"; tag="${tag%.tar}"
  rm -f "$old"
  buildah "${STORE[@]}" rmi "docker.io/library/cilia:$tag" >/dev/null 2>&1 || true
done

size="$(buildah "${STORE[@]}" inspect --format '{{.FromImageID}}' "$NAME" >/dev/null 2>&1; du -m "$ARCHIVE" | cut -f1)"
say "built $NAME in $(( $(date +%s) - start )) s: $size MB ($ARCHIVE)"
echo "$NAME"
echo "$ARCHIVE"
