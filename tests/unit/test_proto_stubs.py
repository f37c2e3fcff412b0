"""The committed gRPC stubs are what the .proto generates."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "cilia/api/v1").mkdir(parents=True)
    proto = "cilia/api/v1/cilia.proto"
    (tmp_path / proto).write_text((REPO / proto).read_text())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", proto], cwd=tmp_path, check=True)
    for name in ("cilia_pb2.py", "cilia_pb2_grpc.py"):
        fresh = (tmp_path / "cilia/api/v1" / name).read_text()
        assert fresh == (REPO / "cilia/api/v1" / name).read_text(), (
            f"{name} is stale: run scripts/gen-proto.sh")
