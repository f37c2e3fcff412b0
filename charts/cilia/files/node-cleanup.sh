#!/bin/sh
# Removes what cilia put on this node: run by the chart's post-delete hook on every node
# (in the host's network namespace), after `helm uninstall` deleted the agents. Every step
# is idempotent; nothing that is not cilia's is touched. Paths come from the environment:
#   CNI_BIN_DIR, CNI_CONF_DIR, CNI_CONF_FILE, BPFFS_ROOT, STATE_DIR, SOCKET
set -u
say() { echo "node-cleanup: $*"; }
# The links of this network namespace (netlink: /sys/class/net shows the namespace that
# mounted /sys, which need not be this one).
links() { ip -o link show | while IFS=': ' read -r _ name _; do echo "${name%@*}"; done; }

# 1. The agent may still be terminating: wait (up to a minute) until it stops answering.
i=0
while [ -S "$SOCKET" ] && cilia --socket "$SOCKET" status >/dev/null 2>&1 && [ "$i" -lt 60 ]; do
  sleep 1
  i=$((i + 1))
done

# 2. The runtime's view first: no cilia network config, then no plugin.
if [ -e "$CNI_CONF_DIR/$CNI_CONF_FILE" ]; then
  rm -f "$CNI_CONF_DIR/$CNI_CONF_FILE" && say "removed $CNI_CONF_DIR/$CNI_CONF_FILE"
fi
for f in cilia-cni cilia-cni.d .cilia-cni.new .cilia-cni.d.new .cilia-cni.d.old; do
  if [ -e "$CNI_BIN_DIR/$f" ]; then rm -rf "${CNI_BIN_DIR:?}/$f" && say "removed $CNI_BIN_DIR/$f"; fi
done

# 3. Everything else is the agent's own cleanup (one implementation, tested with the
#    datapath): pods' host veths, cilia's tc and XDP programs on every device, routes to
#    other nodes (proto 196), the VXLAN device, the masquerade chain, pinned maps, state.
#    It logs each thing it removes.
cilia-agent --cleanup --bpffs-root "$BPFFS_ROOT" --state-dir "$STATE_DIR" \
  --socket "$SOCKET" 2>&1 | sed -n 's/^.*cilia.agent[^:]*: /node-cleanup: /p'
# The agent removes only its own files; on a node the whole directories are cilia's.
for d in "$(dirname "$SOCKET")" "$STATE_DIR"; do
  if [ -e "$d" ]; then rm -rf "$d" && say "removed $d"; fi
done
say "done"
