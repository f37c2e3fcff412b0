#!/bin/sh
# with-cni-dirs.sh SCRATCH CONF_DIR BIN_DIR -- COMMAND [ARG...]
#
# Runs COMMAND in a private mount namespace in which /etc/cni/net.d shows CONF_DIR and
# /opt/cni/bin shows BIN_DIR. `ctr run --cni` (containerd 1.6) reads its network config
# only from /etc/cni/net.d (it takes the first file in name order) and finds plugins only
# in /opt/cni/bin and /usr/lib/cni: no flag, variable or setting moves them. Showing our
# own directories there, to ctr and the plugins it starts and to nothing else, leaves the
# machine's CNI set-up alone (a CRI runtime watching /etc/cni/net.d never sees ours).
#
# A missing directory is made inside an overlay of its nearest existing ancestor, with
# the overlay's layers on a tmpfs under SCRATCH; all of it vanishes with the namespace.
set -eu

if [ "${CILIA_RT_PRIVATE_MOUNTS:-}" != 1 ]; then
    CILIA_RT_PRIVATE_MOUNTS=1 exec unshare --mount --propagation private -- sh "$0" "$@"
fi
unset CILIA_RT_PRIVATE_MOUNTS

scratch=$1 conf=$2 bin=$3
shift 3
[ "${1:-}" = -- ] && shift

mkdir -p "$scratch"
mount -t tmpfs cilia-rt-layers "$scratch"

show() {  # show SOURCE TARGET
    if [ ! -d "$2" ]; then
        base=$(dirname "$2")
        while [ ! -d "$base" ]; do base=$(dirname "$base"); done
        if [ "$base" = / ]; then
            echo "with-cni-dirs.sh: will not overlay / to make $2" >&2
            exit 1
        fi
        layer=$scratch/$(echo "$base" | tr / _)
        mkdir -p "$layer/upper" "$layer/work"
        mount -t overlay cilia-rt-overlay \
            -o "lowerdir=$base,upperdir=$layer/upper,workdir=$layer/work" "$base"
        mkdir -p "$2"
    fi
    mount --bind "$1" "$2"
}

show "$conf" /etc/cni/net.d
show "$bin" /opt/cni/bin
exec "$@"
