"""The CLI's client of an agent's API."""

from __future__ import annotations

import os

import grpc

from cilia.api.v1 import cilia_pb2, cilia_pb2_grpc


class AgentUnreachable(RuntimeError):
    pass


class AgentQueryError(ValueError):
    """The agent understood the question and says what is wrong with it."""


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
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise AgentQueryError(err.details()) from err
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

    def policies(self) -> list[cilia_pb2.PolicyStatus]:
        return list(self._call("ListPolicies", cilia_pb2.StatusRequest()).policies)

    def endpoint_policy(self, namespace: str, name: str) -> cilia_pb2.EndpointPolicy:
        return self._call("GetEndpointPolicy", cilia_pb2.PodRef(namespace=namespace, name=name))

    def trace(self, request: cilia_pb2.TraceRequest) -> cilia_pb2.TraceResult:
        return self._call("Trace", request)

    def monitor(self, pod: str = "", verdict: str = ""):
        """Flow events as they happen, until the caller stops iterating."""
        if not os.path.exists(self.socket):
            self._call("Status", cilia_pb2.StatusRequest())  # raises AgentUnreachable
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        try:
            yield from cilia_pb2_grpc.AgentStub(channel).Monitor(
                cilia_pb2.MonitorRequest(pod=pod, verdict=verdict))
        finally:
            channel.close()

    def observe(self, request: cilia_pb2.ObserveRequest):
        """The agent's flow history that matches, then (request.follow) new flows as
        they come, until the caller stops iterating."""
        if not os.path.exists(self.socket):
            self._call("Status", cilia_pb2.StatusRequest())  # raises AgentUnreachable
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        try:
            try:
                yield from cilia_pb2_grpc.AgentStub(channel).Observe(request)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    raise AgentUnreachable(
                        f"agent not reachable at {self.socket}: {err.details()}") from err
                raise
        finally:
            channel.close()

    def prefilter(self) -> cilia_pb2.PrefilterList:
        return self._call("ListPrefilter", cilia_pb2.StatusRequest())

    def services(self) -> list[cilia_pb2.ServiceFrontend]:
        return list(self._call("ListServices", cilia_pb2.StatusRequest()).services)

    def ipcache(self) -> list[cilia_pb2.IpcacheEntry]:
        return list(self._call("ListIpcache", cilia_pb2.StatusRequest()).entries)

    def metrics(self) -> list[cilia_pb2.Metric]:
        return list(self._call("Metrics", cilia_pb2.MetricsRequest()).metrics)
