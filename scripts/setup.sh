#!/usr/bin/env bash
# Installs everything cilia needs on a Debian 12 machine, as root: apt packages, a virtual
# environment in .venv with cilia installed (editable), and the compiled BPF objects.
# Idempotent and quick when nothing changed. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  echo "cilia: run this as root (it installs packages, creates network namespaces and loads BPF)" >&2
  exit 1
fi

APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 bpftool   # build and inspect the BPF datapath
  gcc make libc6-dev linux-libc-dev        # BPF build glue, benchmark tools
  iproute2 util-linux procps iptables      # ip, tc, nsenter; masquerade
  nftables                                 # bench/run_policy.py
  python3 python3-venv python3-dev         # the agent, CLI and plugin
  iperf3                                   # benchmarks
  containerd containernetworking-plugins   # the real-runtime test, reference plugins
  busybox-static                           # the runtime test's container rootfs
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"
stamp="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.cilia-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "==> virtual environment in .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$stamp" > .venv/.cilia-stamp
fi

echo "==> BPF objects (make -C bpf)"
make -s -C bpf

if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi
export PATH="$ROOT/.venv/bin:$PATH"
