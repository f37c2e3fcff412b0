#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from cilia/api/v1/cilia.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. cilia/api/v1/cilia.proto
