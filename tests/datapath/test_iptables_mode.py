"""The masquerade chain goes where the node's rules are: the iptables backend that holds
kube-proxy's chains (legacy or nf_tables), whichever the agent's image defaults to; and
`--cleanup` removes it from both. Each case in a network namespace of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from labkit import sandbox, unique_lab_name

pytestmark = pytest.mark.skipif(
    not (shutil.which("iptables-nft") and shutil.which("iptables-legacy")),
    reason="needs both iptables backends (Debian's iptables package has them)")

PICK = ("from cilia.agent.masquerade import iptables_command; "
        "print(iptables_command('auto').rsplit('-', 1)[1])")
MASQ = ("from cilia.agent.masquerade import Masquerade; "
        "Masquerade('10.244.0.0/24', '10.244.0.0/16', {mode!r}).{call}()")


def _in(netns: str, *argv: str) -> str:
    res = subprocess.run(["nsenter", f"--net={netns}", *argv], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _has_chain(netns: str, backend: str) -> bool:
    return "CILIA-MASQ" in _in(netns, f"iptables-{backend}-save", "-t", "nat")


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_masquerade_follows_kube_proxys_backend(backend):
    other = "nft" if backend == "legacy" else "legacy"
    with sandbox(unique_lab_name()) as netns:
        # kube-proxy's chains in `backend`, one unrelated rule in the other.
        _in(netns, f"iptables-{backend}", "-t", "nat", "-N", "KUBE-SERVICES")
        _in(netns, f"iptables-{backend}", "-t", "nat", "-A", "PREROUTING", "-j",
            "KUBE-SERVICES")
        _in(netns, f"iptables-{other}", "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
        _in(netns, f"iptables-{other}", "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
        assert _in(netns, sys.executable, "-c", PICK).strip() == backend
        _in(netns, sys.executable, "-c", MASQ.format(mode="auto", call="setup"))
        assert _has_chain(netns, backend) and not _has_chain(netns, other)
        # --cleanup removes it from every backend, also one another agent chose.
        _in(netns, sys.executable, "-c", MASQ.format(mode=other, call="setup"))
        assert _has_chain(netns, other)
        _in(netns, sys.executable, "-c", MASQ.format(mode="auto", call="cleanup"))
        assert not _has_chain(netns, backend) and not _has_chain(netns, other)
        # Flushed for the namespace's end: legacy tables outlive nothing, but be tidy.
        _in(netns, f"iptables-{other}", "-t", "filter", "-F", "INPUT")


def test_no_rules_anywhere_means_nf_tables():
    with sandbox(unique_lab_name()) as netns:
        assert _in(netns, sys.executable, "-c", PICK).strip() == "nft"
