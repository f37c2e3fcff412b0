"""The CLI's client of an agent's API."""

from __future__ import annotations

import os

import grpc

from cilia.api.v1 import cilia_pb2, cilia_pb2_grpc


class AgentUnreachable(RuntimeError):
    pass


class AgentClient:
    def __init__(self, socket: str, timeout: float = 10.0):
        self.socket = socket
        self.timeout = timeout

    def _call(self, method: str, request):
        if not os.path.exists(self.socket):
            raise AgentUnreachable(
                f"agent not reachable at {self.socket}: is the cilia agent running? "
                "(start a local one with `cilia lab up`)"
            )
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            try:
                return getattr(cilia_pb2_grpc.AgentStub(channel), method)(
                    request, timeout=self.timeout
                )
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise AgentUnreachable(
                        f"agent not reachable at {self.socket}: is the cilia agent running? "
                        f"({err.details()})"
                    ) from err
                raise

    def status(self) -> cilia_pb2.AgentStatus:
        return self._call("Status", cilia_pb2.StatusRequest())

    def endpoints(self) -> list[cilia_pb2.Endpoint]:
        return list(self._call("ListEndpoints", cilia_pb2.ListEndpointsRequest()).endpoints)

    def wait_policy_synced(self, timeout: float = 15.0) -> None:
        """Returns once the agent has compiled and written the datastore as it is now."""
        import time

        deadline = time.monotonic() + timeout
        while not self.status().policy_synced:
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent at {self.socket} did not sync policy in {timeout}s")
            time.sleep(0.02)

    def metrics(self) -> list[cilia_pb2.Metric]:
        return list(self._call("Metrics", cilia_pb2.MetricsRequest()).metrics)
