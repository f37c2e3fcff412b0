"""Masquerade: pod traffic leaving the cluster takes the node's address, so the world
can answer it; traffic to any pod CIDR of the cluster keeps the pod's own address.

Connections opened from outside reach pods by bpf_redirect_peer and their replies
leave by bpf_redirect_neigh: netfilter never sees them. A reply that goes to the stack
after all (no route out of a device) carries MARK_CT_REPLY from the datapath and is left
alone: netfilter would take it for a new outbound flow.

One iptables chain, CILIA-MASQ, jumped to from nat POSTROUTING, rebuilt whole at every
start (`iptables -t nat -S CILIA-MASQ` shows it); `cleanup()` removes both.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from cilia.datapath.layouts import MARK_CT_REPLY

log = logging.getLogger(__name__)

CHAIN = "CILIA-MASQ"


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("iptables")
    if exe is None:
        raise RuntimeError("iptables is not installed (apt-get install iptables), "
                           "or run the agent with --no-masquerade")
    res = subprocess.run([exe, "-w", "-t", "nat", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {res.stderr.strip()}")
    return res


class Masquerade:
    def __init__(self, pod_cidr: str, cluster_cidr: str):
        self.pod_cidr = pod_cidr
        self.cluster_cidr = cluster_cidr

    def setup(self) -> None:
        if _iptables("-n", "-L", CHAIN, check=False).returncode != 0:
            _iptables("-N", CHAIN)
        _iptables("-F", CHAIN)
        _iptables("-A", CHAIN, "-m", "mark", "--mark", f"{MARK_CT_REPLY:#x}/{MARK_CT_REPLY:#x}",
                  "-m", "comment", "--comment", "cilia: replies of inbound connections",
                  "-j", "RETURN")
        _iptables("-A", CHAIN, "-s", self.pod_cidr, "!", "-d", self.cluster_cidr,
                  "-m", "comment", "--comment", "cilia: pods leaving the cluster",
                  "-j", "MASQUERADE")
        if _iptables("-C", "POSTROUTING", "-j", CHAIN, check=False).returncode != 0:
            _iptables("-A", "POSTROUTING", "-j", CHAIN)
        log.info("masquerading %s beyond %s", self.pod_cidr, self.cluster_cidr)

    def cleanup(self) -> None:
        if shutil.which("iptables") is None:
            return  # nothing can have been set up
        _iptables("-D", "POSTROUTING", "-j", CHAIN, check=False)
        _iptables("-F", CHAIN, check=False)
        _iptables("-X", CHAIN, check=False)
