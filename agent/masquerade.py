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
from pathlib import Path

from cilia.datapath.layouts import MARK_CT_REPLY

log = logging.getLogger(__name__)

CHAIN = "CILIA-MASQ"


# iptables has two backends, the legacy xtables tables and nf_tables, and a node's rules
# live in one of them: kube-proxy's, the distribution's, ours. Both are evaluated by the
# kernel, but each backend's tools see only its own rules, and rules split over the two
# interleave in no defined order. So the agent uses the node's: in a container the image's
# `iptables` is just whichever the image's distribution chose.
IPTABLES_MODES = ("auto", "nft", "legacy")


def iptables_command(mode: str = "auto") -> str:
    """The iptables executable of the backend `mode` names; "auto": the backend that holds
    the node's rules (the one with more of them, kube-proxy's first of all; nf_tables
    when neither holds any), as kube-proxy's own images decide (iptables-wrappers)."""
    if mode not in IPTABLES_MODES:
        raise ValueError(f"iptables mode {mode!r}: one of {', '.join(IPTABLES_MODES)}")
    found = {m: shutil.which(f"iptables-{m}") for m in ("nft", "legacy")}
    if mode != "auto":
        if found[mode] is None:
            raise RuntimeError(f"--iptables-mode {mode}: iptables-{mode} is not installed")
        return found[mode]
    counts = {m: _rule_count(exe) for m, exe in found.items() if exe}
    if not counts:
        exe = shutil.which("iptables")
        if exe is None:
            raise RuntimeError("iptables is not installed (apt-get install iptables), "
                               "or run the agent with --no-masquerade")
        return exe
    best = max(counts, key=lambda m: (counts[m], m == "nft"))
    log.debug("iptables backends' rules: %s: using %s", counts, best)
    return found[best]


def _rule_count(exe: str) -> int:
    """The node's rules in one backend: kube-proxy's count ten times (the decisive ones)."""
    save = exe + "-save"  # iptables-nft-save, iptables-legacy-save
    if not shutil.which(save):
        return 0
    res = subprocess.run([save], capture_output=True, text=True)
    if res.returncode != 0:
        return 0
    rules = [line for line in res.stdout.splitlines() if line.startswith("-A ")]
    return len(rules) + 9 * sum("KUBE-" in r for r in rules)


def _run(exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([exe, "-w", "-t", "nat", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{exe} {' '.join(args)}: {res.stderr.strip()}")
    return res


class Masquerade:
    def __init__(self, pod_cidr: str, cluster_cidr: str, iptables_mode: str = "auto"):
        self.pod_cidr = pod_cidr
        self.cluster_cidr = cluster_cidr
        self.iptables_mode = iptables_mode

    def setup(self) -> None:
        exe = iptables_command(self.iptables_mode)

        def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
            return _run(exe, *args, check=check)

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
        log.info("masquerading %s beyond %s (%s)", self.pod_cidr, self.cluster_cidr,
                 Path(exe).name)

    def cleanup(self) -> None:
        """Removes the chain from every backend there is: an agent of another mode (or
        an image of another distribution) may have made it."""
        exes = {shutil.which(n) for n in ("iptables", "iptables-nft", "iptables-legacy")}
        for exe in sorted(e for e in exes if e):
            _run(exe, "-D", "POSTROUTING", "-j", CHAIN, check=False)
            _run(exe, "-F", CHAIN, check=False)
            _run(exe, "-X", CHAIN, check=False)
