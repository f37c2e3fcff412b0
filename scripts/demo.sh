#!/usr/bin/env bash
# The demo: a one-node lab, two pods through the real CNI plugin, real traffic, and the
# datapath counters that show delivery by bpf_redirect_peer. `--keep` keeps the lab.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec cilia demo "$@"
