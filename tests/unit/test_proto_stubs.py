"""The committed gRPC stubs are what the .proto generates.

The generators write their own version into what they generate: protoc's Python version
(a comment and the arguments of ``ValidateProtobufRuntimeVersion``) and grpcio-tools'
``GRPC_GENERATED_VERSION``. Those stamps say which tool ran, not what the .proto says, so
the comparison ignores them (``normalise``): a grpcio-tools release, or a lock update that
moves it, cannot turn this red, while a .proto change whose stubs were not regenerated
still does (``test_a_proto_change_is_detected`` proves it). What the stamps do matter for
is the runtime each stub demands at import (it refuses an older grpcio / protobuf), so
``test_stamps_within_the_declared_ranges`` checks them against pyproject.toml instead.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = "cilia/api/v1/cilia.proto"
STUBS = ("cilia_pb2.py", "cilia_pb2_grpc.py")

# (pattern, replacement): each matches exactly one place in the generated stubs.
STAMPS = [
    (re.compile(r"^# Protobuf Python Version: \S+$", re.M), "# Protobuf Python Version: *"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)"
                r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"), r"\1 *,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = '*'"),
]


def normalise(text: str) -> str:
    for pattern, replacement in STAMPS:
        text = pattern.sub(replacement, text)
    return text


def generate(tmp_path: Path, proto_text: str) -> dict[str, str]:
    """The stubs that the installed (locked) grpcio-tools makes of proto_text."""
    pytest.importorskip("grpc_tools")
    (tmp_path / "cilia/api/v1").mkdir(parents=True)
    (tmp_path / PROTO).write_text(proto_text)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", PROTO], cwd=tmp_path, check=True)
    return {name: (tmp_path / "cilia/api/v1" / name).read_text() for name in STUBS}


def committed() -> dict[str, str]:
    return {name: (REPO / "cilia/api/v1" / name).read_text() for name in STUBS}


def test_stubs_are_current(tmp_path):
    fresh = generate(tmp_path, (REPO / PROTO).read_text())
    for name, text in committed().items():
        assert normalise(fresh[name]) == normalise(text), (
            f"{name} is stale: run scripts/gen-proto.sh")


def test_every_stamp_is_found():
    """If a generator changed how it stamps, the normalisation would silently do nothing."""
    text = "\n".join(committed().values())
    for pattern, _ in STAMPS:
        assert len(pattern.findall(text)) == 1, pattern.pattern


def test_a_version_stamp_alone_is_ignored():
    for name, text in committed().items():
        moved = re.sub(r"(?<=GRPC_GENERATED_VERSION = ')[^']*", "9.99.0", text)
        moved = moved.replace("# Protobuf Python Version: ", "# Protobuf Python Version: 9")
        moved = re.sub(r"(Domain\.PUBLIC,\s*)\d+", r"\g<1>99", moved)
        assert moved != text, name
        assert normalise(moved) == normalise(text)


def test_a_proto_change_is_detected(tmp_path):
    """A field added to the .proto, stubs not regenerated: the comparison must see it."""
    proto = (REPO / PROTO).read_text()
    changed = proto.replace("message StatusRequest {}",
                            "message StatusRequest { string added_not_regenerated = 99; }", 1)
    assert changed != proto
    fresh = generate(tmp_path, changed)
    assert normalise(fresh["cilia_pb2.py"]) != normalise(committed()["cilia_pb2.py"])


def _lower_bound(requirement: str) -> tuple[int, ...]:
    version = re.search(r">=\s*([0-9.]+)", requirement).group(1)
    return tuple(int(x) for x in version.split("."))


def test_stamps_within_the_declared_ranges():
    """A stub refuses to import under a grpcio or protobuf older than the generator that
    made it: pyproject.toml's lower bounds must not promise older ones."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bound = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower(): _lower_bound(d)
             for d in deps if ">=" in d}
    stubs = committed()
    grpc_stamp = re.search(r"^GRPC_GENERATED_VERSION = '([^']*)'$", stubs["cilia_pb2_grpc.py"],
                           re.M).group(1)
    pb_stamp = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
                         stubs["cilia_pb2.py"]).groups()
    assert tuple(int(x) for x in grpc_stamp.split(".")) <= bound["grpcio"], (
        f"the stubs need grpcio>={grpc_stamp}: raise the bound in pyproject.toml")
    assert tuple(int(x) for x in pb_stamp) <= bound["protobuf"], (
        f"the stubs need protobuf>={'.'.join(pb_stamp)}: raise the bound in pyproject.toml")
