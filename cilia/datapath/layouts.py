"""Python mirrors of the C layouts in bpf/include/cilia.

Each mirror names its C struct and lists its members in order with a `struct` format.
tests/unit/test_layouts.py checks every mirror against the BTF of the compiled objects
(member names, offsets, sizes, total size), so a change on one side cannot silently
break the other.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import astuple, dataclass, fields
from typing import ClassVar, Self


class CStruct:
    """Base for a mirrored C struct: packs with native byte order and no implicit padding
    (the C side is laid out with explicit padding for exactly that reason)."""

    C_NAME: ClassVar[str]
    LAYOUT: ClassVar[tuple[tuple[str, str], ...]]
    _struct: ClassVar[struct.Struct]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._struct = struct.Struct("=" + "".join(fmt for _, fmt in cls.LAYOUT))

    @classmethod
    def size(cls) -> int:
        return cls._struct.size

    @classmethod
    def members(cls) -> list[tuple[str, int, int]]:
        """(name, byte offset, byte size) of every member, as BTF describes them."""
        out, offset = [], 0
        for name, fmt in cls.LAYOUT:
            size = struct.calcsize("=" + fmt)
            out.append((name, offset, size))
            offset += size
        return out

    def pack(self) -> bytes:
        return self._struct.pack(*astuple(self))  # type: ignore[call-overload]

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls._struct.unpack(bytes(data[: cls._struct.size])))

    def __post_init__(self):
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        assert names == [n for n, _ in self.LAYOUT], f"{type(self).__name__} out of step"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass
class EndpointKey(CStruct):
    C_NAME = "endpoint_key"
    LAYOUT = (("ip4", "4s"),)
    ip4: bytes

    @classmethod
    def for_ip(cls, ip: str) -> EndpointKey:
        return cls(ipaddress.IPv4Address(ip).packed)

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Address(self.ip4))


@dataclass
class EndpointInfo(CStruct):
    C_NAME = "endpoint_info"
    LAYOUT = (
        ("ifindex", "I"),
        ("sec_identity", "I"),
        ("ep_id", "H"),
        ("flags", "H"),
        ("mac", "6s"),
        ("node_mac", "6s"),
    )
    ifindex: int
    sec_identity: int
    ep_id: int
    flags: int
    mac: bytes
    node_mac: bytes


@dataclass
class MetricsKey(CStruct):
    C_NAME = "metrics_key"
    LAYOUT = (("reason", "B"), ("dir", "B"), ("pad", "H"))
    reason: int
    dir: int
    pad: int = 0


@dataclass
class MetricsValue(CStruct):
    C_NAME = "metrics_value"
    LAYOUT = (("packets", "Q"), ("bytes", "Q"))
    packets: int
    bytes: int


class Reason(enum.IntEnum):
    """enum metric_reason in bpf/include/cilia/metrics.h."""

    REASON_UNSPEC = 0
    REASON_REDIRECT_PEER = 1
    REASON_TO_STACK = 2
    DROP_BASE = 128
    DROP_INVALID = 130
    DROP_SPOOFED_SOURCE = 131
    DROP_NO_ENDPOINT_IFINDEX = 132

    @property
    def is_drop(self) -> bool:
        return self >= Reason.DROP_BASE

    @property
    def label(self) -> str:
        """The name a person reads: `redirect_peer`, `to_stack`, `drop_spoofed_source`."""
        name = self.name.lower()
        return name.removeprefix("reason_")


class Direction(enum.IntEnum):
    """enum metric_dir in bpf/include/cilia/metrics.h."""

    METRIC_DIR_UNSPEC = 0
    METRIC_DIR_INGRESS = 1
    METRIC_DIR_EGRESS = 2

    @property
    def label(self) -> str:
        return self.name.lower().removeprefix("metric_dir_")


@dataclass(frozen=True)
class MapSpec:
    """A pinned map: its name in the objects (and its pin file), its key and value."""

    name: str
    key: type[CStruct]
    value: type[CStruct]
    percpu: bool = False


ENDPOINTS = MapSpec("cilia_endpoints", EndpointKey, EndpointInfo)
METRICS = MapSpec("cilia_metrics", MetricsKey, MetricsValue, percpu=True)
ALL_MAPS = (ENDPOINTS, METRICS)
