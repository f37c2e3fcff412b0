"""The agent's configuration: flags, with defaults for a real node."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOCKET = "/run/cilia/cilia.sock"
DEFAULT_BPFFS_ROOT = "/sys/fs/bpf/cilia"
DEFAULT_STATE_DIR = "/var/lib/cilia"


@dataclass
class AgentConfig:
    node_name: str
    pod_cidr: str
    socket: str = DEFAULT_SOCKET
    bpffs_root: str = DEFAULT_BPFFS_ROOT
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    datastore: str = "local"
    datastore_dir: Path | None = None
    mtu: int = 1500
    bpf_dir: Path | None = None

    @property
    def local_datastore_dir(self) -> Path:
        return self.datastore_dir or self.state_dir / "datastore"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> AgentConfig:
        p = argparse.ArgumentParser(
            prog="cilia-agent", description="cilia node agent: pod networking on eBPF"
        )
        p.add_argument("--node-name", required=True, help="this node's name")
        p.add_argument("--pod-cidr", required=True, help="this node's pod CIDR, e.g. 10.244.1.0/24")
        p.add_argument("--socket", default=DEFAULT_SOCKET, help="gRPC unix socket (root-only)")
        p.add_argument("--bpffs-root", default=DEFAULT_BPFFS_ROOT, help="where maps are pinned")
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
        p.add_argument("--datastore", default="local", choices=["local"])
        p.add_argument(
            "--datastore-dir", type=Path, help="local datastore (default STATE/datastore)"
        )
        p.add_argument("--mtu", type=int, default=1500, help="MTU of pod interfaces")
        p.add_argument("--bpf-dir", type=Path, help="compiled BPF objects")
        a = p.parse_args(argv)
        try:
            ipaddress.IPv4Network(a.pod_cidr)
        except ValueError as err:
            p.error(f"--pod-cidr {a.pod_cidr!r}: {err}")
        if not 576 <= a.mtu <= 65535:
            p.error(f"--mtu {a.mtu}: must be between 576 and 65535")
        return cls(
            node_name=a.node_name,
            pod_cidr=a.pod_cidr,
            socket=a.socket,
            bpffs_root=a.bpffs_root,
            state_dir=a.state_dir,
            datastore=a.datastore,
            datastore_dir=a.datastore_dir,
            mtu=a.mtu,
            bpf_dir=a.bpf_dir,
        )
