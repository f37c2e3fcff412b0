"""The shim's side of the agent's gRPC API: one call, mapped to CNI errors."""

from __future__ import annotations

import os

import grpc

from cilia.api.v1 import cilia_pb2_grpc
from cilia.cnispec import (
    IO_FAILURE,
    PLUGIN_NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    CNIError,
)

TIMEOUT_SECONDS = 60.0


class AgentClient:
    def __init__(self, socket: str, status: bool = False):
        self.socket = socket
        # STATUS reports "not available" (50); every other command "try again later" (11).
        self.down_code = PLUGIN_NOT_AVAILABLE if status else TRY_AGAIN_LATER

    def _unreachable(self, why: str) -> CNIError:
        return CNIError(
            self.down_code,
            f"agent not reachable at {self.socket}: is the cilia agent running?",
            f"{why}; try again later",
        )

    def call(self, method: str, request):
        if not os.path.exists(self.socket):
            raise self._unreachable("the socket does not exist")
        if not os.access(self.socket, os.R_OK | os.W_OK):
            raise CNIError(
                IO_FAILURE,
                f"permission denied on {self.socket}",
                "the agent's socket is root-only: the runtime must run the plugin as root",
            )
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = cilia_pb2_grpc.CNIStub(channel)
            try:
                resp = getattr(stub, method)(request, timeout=TIMEOUT_SECONDS)
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise self._unreachable(f"{err.code().name}: {err.details()}") from err
                raise CNIError(
                    IO_FAILURE, f"agent call {method} failed: {err.code().name}", err.details()
                ) from err
        if resp.HasField("error"):
            raise CNIError(resp.error.code, resp.error.msg, resp.error.details)
        return resp
