"""The Python mirrors of the datapath's layouts agree with the compiled objects' BTF."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from cilia.datapath import layouts

REPO = Path(__file__).resolve().parents[2]
OBJECTS = sorted((REPO / "bpf" / "build").glob("*.o"))


class Btf:
    def __init__(self, bpftool: str, obj: Path):
        out = subprocess.run([bpftool, "btf", "dump", "file", str(obj), "-j"],
                             capture_output=True, text=True, check=True).stdout
        self.types = {t["id"]: t for t in json.loads(out)["types"]}

    def size(self, type_id: int) -> int:
        t = self.types[type_id]
        if t["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT"):
            return self.size(t["type_id"])
        if t["kind"] == "ARRAY":
            return t["nr_elems"] * self.size(t["type_id"])
        return t["size"]

    def struct(self, name: str) -> dict | None:
        return next((t for t in self.types.values()
                     if t["kind"] == "STRUCT" and t.get("name") == name), None)

    def maps(self) -> dict[str, tuple[str, str]]:
        """Map name -> (key struct name, value struct name), from the .maps section."""
        out = {}
        for t in self.types.values():
            if t["kind"] != "DATASEC" or t["name"] != ".maps":
                continue
            for v in t["vars"]:
                var = self.types[v["type_id"]]
                members = {m["name"]: m for m in self.types[var["type_id"]]["members"]}
                if "key" not in members:
                    continue  # a ring buffer has no key or value
                key = self.types[self.types[members["key"]["type_id"]]["type_id"]]
                value = self.types[self.types[members["value"]["type_id"]]["type_id"]]
                out[var["name"]] = (key.get("name"), value.get("name"))
        return out


MIRRORS = [
    layouts.EndpointKey, layouts.EndpointInfo, layouts.MetricsKey, layouts.MetricsValue,
    layouts.IpcacheKey, layouts.IpcacheValue, layouts.PolicyKey, layouts.PolicyValue,
    layouts.CtKey, layouts.CtValue, layouts.FlowEvent, layouts.PrefilterKey,
    layouts.PrefilterValue, layouts.NetdevInfo, layouts.Lb4Key, layouts.Lb4Service,
    layouts.Lb4SlotKey, layouts.Lb4Slot, layouts.Lb4Backend, layouts.Lb4ReverseNat,
    layouts.FragKey, layouts.FragPorts, layouts.Lb4AffinityKey, layouts.Lb4Affinity,
    layouts.Lb4AffinityMatchKey, layouts.Lb4AffinityMatch, layouts.Lb4SockRevKey,
    layouts.Lb4SockRevValue, layouts.Snat4Key, layouts.Snat4Entry,
    layouts.Lb4SnatSource, layouts.TunnelEndpoint,
]


@pytest.fixture(scope="module")
def btfs(request):
    import shutil

    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not Path(bpftool).exists():
        pytest.skip("bpftool not installed: apt-get install bpftool")
    if not OBJECTS:
        pytest.skip("no BPF objects: make -C bpf")
    return {obj.name: Btf(bpftool, obj) for obj in OBJECTS}


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.C_NAME)
def test_struct_mirror_matches_btf(btfs, mirror):
    seen = False
    for name, btf in btfs.items():
        st = btf.struct(mirror.C_NAME)
        if st is None:
            continue
        seen = True
        c_members = [(m["name"], m["bits_offset"] // 8, btf.size(m["type_id"]))
                     for m in st["members"]]
        assert c_members == mirror.members(), f"{mirror.C_NAME} differs in {name}"
        assert st["size"] == mirror.size(), f"{mirror.C_NAME} size differs in {name}"
    assert seen, f"struct {mirror.C_NAME} is in no compiled object"


def test_every_pinned_map_has_the_mirrored_key_and_value(btfs):
    specs = {s.name: s for s in layouts.ALL_MAPS + layouts.SOCK_MAPS + layouts.TRACE_MAPS}
    seen = set()
    for name, btf in btfs.items():
        for map_name, (key, value) in btf.maps().items():
            if map_name not in specs:
                continue  # maps private to one program (benchmarks, tests)
            spec = specs[map_name]
            assert (key, value) == (spec.key.C_NAME, spec.value.C_NAME), f"{map_name} in {name}"
            seen.add(map_name)
    assert seen == set(specs), f"maps never compiled: {set(specs) - seen}"


def _c_enum(header: str, enum: str) -> dict[str, int]:
    text = (REPO / "bpf" / "include" / "cilia" / header).read_text()
    body = re.search(rf"enum {enum}\s*\{{(.*?)\}};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"(\w+)\s*=\s*(\w+)", body)}


def test_reasons_match_the_header():
    assert _c_enum("metrics.h", "metric_reason") == {r.name: r.value for r in layouts.Reason}
    assert _c_enum("metrics.h", "metric_dir") == {d.name: d.value for d in layouts.Direction}


def _c_define(header: str, name: str) -> int:
    text = (REPO / "bpf" / "include" / "cilia" / header).read_text()
    return int(re.search(rf"#define\s+{name}\s+(\S+)", text).group(1), 0)


@pytest.mark.parametrize("header,name", [
    ("endpoint.h", "ENDPOINT_F_INGRESS_ENFORCED"), ("endpoint.h", "ENDPOINT_F_EGRESS_ENFORCED"),
    ("endpoint.h", "ENDPOINT_F_AUDIT"), ("endpoint.h", "ENDPOINT_F_TIERED_INGRESS"),
    ("endpoint.h", "ENDPOINT_F_TIERED_EGRESS"),
    ("policy.h", "POLICY_PREFIX_STATIC"), ("policy.h", "POLICY_PREFIX_PROTO"),
    ("policy.h", "POLICY_PREFIX_FULL"), ("policy.h", "IDENTITY_ANY"),
    ("policy.h", "IDENTITY_CIDR_VIEW"),
    ("events.h", "EVENTS_RINGBUF_SIZE"), ("conntrack.h", "MARK_CT_REPLY"),
    ("conntrack.h", "CT_F_REPLY_SEEN"), ("conntrack.h", "CT_F_CLOSING"),
    ("conntrack.h", "CT_F_VIA_STACK"), ("conntrack.h", "CT_F_BYPASS_STACK"),
    ("conntrack.h", "CT_F_FROM_NODE"),
    ("prefilter.h", "PREFILTER_PREFIX_STATIC"), ("prefilter.h", "PREFILTER_AF_INET"),
    ("prefilter.h", "PREFILTER_AF_INET6"),
    ("ipcache.h", "IDENTITY_MIN_CLUSTER"), ("ipcache.h", "IDENTITY_CIDR_BASE"),
    ("netdev.h", "NETDEV_F_UPLINK"), ("netdev.h", "NETDEV_F_OVERLAY"),
    ("tunnel.h", "TUNNEL_VNI"),
    ("conntrack.h", "CT_SCOPE_FLOW"), ("conntrack.h", "CT_SCOPE_SERVICE"),
    ("services.h", "LB_F_CLUSTER_IP"), ("services.h", "LB_SERVICES_MAP_SIZE"),
    ("services.h", "LB_BACKENDS_MAP_SIZE"), ("services.h", "LB_SLOTS_MAP_SIZE"),
    ("services.h", "LB_REVNAT_MAP_SIZE"), ("sock_lb.h", "LB_REVERSE_SK_MAP_SIZE"),
])
def test_constants_match_the_headers(header, name):
    assert _c_define(header, name) == getattr(layouts, name)


def test_identity_ranges_match_the_allocator():
    """The datapath tells pods from other peers by these ranges (identity_is_pod)."""
    from cilia import identity

    assert layouts.IDENTITY_MIN_CLUSTER == identity.MIN_CLUSTER_IDENTITY
    assert layouts.IDENTITY_CIDR_BASE == identity.CIDR_IDENTITY_BASE
    assert identity.MAX_CLUSTER_IDENTITY < identity.CIDR_IDENTITY_BASE
    assert all(r < identity.MIN_CLUSTER_IDENTITY for r in identity.RESERVED)


def test_policy_enums_match_the_header():
    assert _c_enum("policy.h", "policy_dir") == {"POLICY_INGRESS": layouts.POLICY_INGRESS,
                                                 "POLICY_EGRESS": layouts.POLICY_EGRESS}
    assert _c_enum("policy.h", "policy_action") == {"POLICY_ALLOW": layouts.POLICY_ALLOW,
                                                    "POLICY_DENY": layouts.POLICY_DENY,
                                                    "POLICY_PASS": layouts.POLICY_PASS}
    assert _c_enum("policy.h", "policy_tier") == {
        "POLICY_TIER_NETWORK_POLICY": layouts.POLICY_TIER_NETWORK_POLICY,
        "POLICY_TIER_ADMIN": layouts.POLICY_TIER_ADMIN,
        "POLICY_TIER_BASELINE": layouts.POLICY_TIER_BASELINE}
    assert _c_enum("events.h", "flow_verdict") == {
        "VERDICT_FORWARDED": layouts.VERDICT_FORWARDED,
        "VERDICT_DROPPED": layouts.VERDICT_DROPPED, "VERDICT_AUDIT": layouts.VERDICT_AUDIT}
    assert set(layouts.VERDICTS) == set(_c_enum("events.h", "flow_verdict").values())


def test_pack_roundtrip():
    info = layouts.EndpointInfo(7, 42, 3, 0, b"\x02" * 6, b"\x04" * 6)
    assert layouts.EndpointInfo.unpack(info.pack()) == info
    assert layouts.EndpointKey.for_ip("10.244.1.2").pack() == bytes([10, 244, 1, 2])
    key = layouts.PolicyKey(96, 5, 1, 0, 300, 6, 0, 80)
    raw = key.pack()
    assert raw[-2:] == b"\x00\x50"  # the port in network order, as in the packet
    assert layouts.PolicyKey.unpack(raw) == key


def test_socket_lb_maps_are_not_opened_by_every_datapath():
    """bpf_sock.o is loaded only with --socket-lb: a map only it pins stays out of
    ALL_MAPS, which every Datapath opens when it starts."""
    assert not set(layouts.SOCK_MAPS) & set(layouts.ALL_MAPS)
