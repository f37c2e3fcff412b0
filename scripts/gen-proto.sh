#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from cilia/api/v1/cilia.proto, with the grpcio-tools
# that uv.lock names (.venv; scripts/setup.sh installs it).
# The stubs carry the generator's version and refuse, at import, a grpcio or protobuf older
# than it: if that version went up, raise the lower bounds in pyproject.toml to match
# (tests/unit/test_proto_stubs.py says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. cilia/api/v1/cilia.proto
