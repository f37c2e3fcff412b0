#!/usr/bin/env bash
# Installs everything cilia needs on Debian 12 (bookworm) or Debian 13 (trixie), as root:
# apt packages, a virtual environment in .venv with cilia installed (editable) and every
# Python dependency at the version uv.lock names, and the compiled BPF objects.
# Idempotent and quick when nothing changed. Sourced by scripts/demo.sh and scripts/test.sh.
# Needs no Go toolchain (only `cilia cluster`, which builds upstream Kubernetes, does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# ---- the release: Debian 12 and 13 are supported, anything else stops here ----------------
os_release="${CILIA_OS_RELEASE:-/etc/os-release}"   # another file only for tests/unit/test_setup.py
os_id="$(. "$os_release" 2>/dev/null && echo "${ID:-unknown}")" || os_id=unknown
os_version="$(. "$os_release" 2>/dev/null && echo "${VERSION_ID:-}")" || os_version=
os_name="$(. "$os_release" 2>/dev/null && echo "${PRETTY_NAME:-$os_id $os_version}")" || os_name=unknown

# The same names on both releases (checked against bookworm and trixie): bookworm brings
# clang 14, libbpf 1.1, Python 3.11; trixie clang 19, libbpf 1.5, Python 3.13.
APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 bpftool   # build and inspect the BPF datapath
  gcc make libc6-dev linux-libc-dev        # BPF build glue, benchmark tools
  iproute2 util-linux procps iptables      # ip, tc, nsenter; masquerade
  nftables                                 # bench/run_policy.py
  python3 python3-venv python3-dev         # the agent, CLI and plugin (venv: uv's bootstrap)
  ca-certificates                          # PyPI over TLS (uv and pip use the system's store)
  iperf3                                   # benchmarks
  containerd containernetworking-plugins   # the real-runtime test, reference plugins
  busybox-static                           # the runtime test's container rootfs
)
case "$os_id:$os_version" in
  debian:12) ;;  # bookworm
  debian:13) ;;  # trixie
  *)
    echo "cilia: scripts/setup.sh supports Debian 12 (bookworm) and Debian 13 (trixie);" \
         "this machine is $os_name ($os_release: ID=$os_id VERSION_ID=${os_version:-none})." >&2
    echo "cilia: on another system install the equivalents of: ${APT_PACKAGES[*]};" \
         "then uv (scripts/requirements-uv.txt), \`uv sync --locked --extra test\` and \`make -C bpf\`." >&2
    exit 1 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "cilia: run this as root (it installs packages, creates network namespaces and loads BPF)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]} ($os_name)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- the Python environment, exactly as uv.lock says ---------------------------------------
# The system Python (3.11 on Debian 12, 3.13 on Debian 13); uv never downloads one.
PY=/usr/bin/python3
# uv itself, pinned with its hashes, in a small virtual environment of its own.
UV="$ROOT/.venv-tools/bin/uv"
uv_want="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' scripts/requirements-uv.txt)"
if [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_want" ]; then
  echo "==> uv $uv_want in .venv-tools (pip --require-hashes -r scripts/requirements-uv.txt)"
  rm -rf .venv-tools
  "$PY" -m venv .venv-tools
  .venv-tools/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps \
    -r scripts/requirements-uv.txt
fi

# Every time: a sync that changes nothing takes some 20 ms, and it undoes whatever was
# installed or upgraded in .venv by hand. --locked: a uv.lock that no longer matches
# pyproject.toml is an error, never re-resolved here (scripts/lock.sh is the one command
# that changes a version). The sync is exact: what the lock does not name is removed.
[ -x .venv/bin/python ] || echo "==> virtual environment in .venv (uv sync --locked --extra test, $("$PY" -V))"
if ! UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-1}" \
     UV_PROJECT_ENVIRONMENT="$ROOT/.venv" \
     "$UV" sync --locked --extra test --python "$PY"; then
  echo "cilia: uv sync failed. If uv.lock is out of date with pyproject.toml (a dependency" \
       "changed there), re-lock with: bash scripts/lock.sh --keep" >&2
  exit 1
fi

echo "==> BPF objects (make -C bpf)"
make -s -C bpf

if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi
export PATH="$ROOT/.venv/bin:$PATH"
