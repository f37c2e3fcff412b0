"""Host-local IPAM: addresses from the node's pod CIDR, leased to an owner and persisted
before they are handed out, so a restarted agent never hands out an address twice."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

from cilia.statefile import read_json, write_json


class IpamExhausted(RuntimeError):
    """No free address left in the pod CIDR."""


class Ipam:
    """Leases of one pod CIDR. The network and broadcast addresses are never handed out,
    nor the first host address, which is kept for the node's own use in that range.
    Allocation moves round-robin past the last address given, so a just-released address
    is not reused at once (stale conntrack and neighbour state would meet a new pod)."""

    def __init__(self, cidr: str, path: Path):
        self.net = ipaddress.IPv4Network(cidr)
        if self.net.num_addresses < 4:
            raise ValueError(f"pod CIDR {cidr} is too small: use a /30 or larger")
        self.path = path
        self._lock = threading.Lock()
        state = read_json(path, {})
        if state and state.get("cidr") != str(self.net):
            raise ValueError(
                f"IPAM state {path} is for pod CIDR {state.get('cidr')}, not {cidr}: "
                "a node's pod CIDR cannot change while it has pods; drain the node first"
            )
        self.leases: dict[str, str] = dict(state.get("leases", {}))  # ip -> owner
        self._last = int(state.get("last", int(self.reserved)))

    @property
    def reserved(self) -> ipaddress.IPv4Address:
        return self.net.network_address + 1

    def _save(self) -> None:
        write_json(self.path, {"cidr": str(self.net), "leases": self.leases, "last": self._last})

    def allocate(self, owner: str) -> str:
        with self._lock:
            for ip, who in self.leases.items():
                if who == owner:
                    return ip
            first = int(self.net.network_address) + 2
            last = int(self.net.broadcast_address) - 1
            size = last - first + 1
            start = self._last + 1
            for i in range(size):
                cand = first + (start - first + i) % size
                ip = str(ipaddress.IPv4Address(cand))
                if ip not in self.leases:
                    self.leases[ip] = owner
                    self._last = cand
                    self._save()
                    return ip
            raise IpamExhausted(
                f"pod CIDR {self.net} has no free address ({len(self.leases)} leased): "
                "delete unused pods or give the node a larger pod CIDR"
            )

    def release(self, owner: str) -> list[str]:
        """Releases every lease of `owner`; returns the addresses freed."""
        with self._lock:
            freed = [ip for ip, who in self.leases.items() if who == owner]
            for ip in freed:
                del self.leases[ip]
            if freed:
                self._save()
            return freed

    def reserve(self, ip: str, owner: str) -> bool:
        """Leases `ip` to `owner` if nobody holds it (rebuilding leases from what the
        node really has, after a lost state file); True when it was free."""
        with self._lock:
            if ip in self.leases or ipaddress.IPv4Address(ip) not in self.net:
                return False
            self.leases[ip] = owner
            self._save()
            return True

    def release_address(self, ip: str) -> None:
        with self._lock:
            if self.leases.pop(ip, None) is not None:
                self._save()

    def owner_of(self, ip: str) -> str | None:
        return self.leases.get(ip)
