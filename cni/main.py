"""cilia-cni: CNI spec 1.1 — ADD, DEL, CHECK, STATUS, GC, VERSION.

The runtime starts this process for every pod, so it does as little as it can: parse
the environment and the network config, ask the agent over its unix socket, print the
result. Every failure leaves as a spec error object on stdout with exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from cilia.cni import version as cniversion
from cilia.cnispec import (
    DECODE_FAILURE,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    CNIError,
    check_container_id,
    check_ifname,
    check_pod,
)

DEFAULT_SOCKET = "/run/cilia/cilia.sock"


class Invocation:
    """One call of the plugin: the environment and the parsed network config."""

    def __init__(self, env: dict[str, str], stdin: bytes):
        self.env = env
        self.command = env.get("CNI_COMMAND", "")
        self.raw_config = stdin
        self.config = self._parse(stdin)
        self.cni_version = cniversion.validate(self.config.get("cniVersion"))

    @staticmethod
    def _parse(stdin: bytes) -> dict:
        try:
            config = json.loads(stdin or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise CNIError(
                DECODE_FAILURE,
                "cannot parse the network config on stdin as JSON",
                f"{err}; the runtime passes the network config (a JSON object) on stdin",
            ) from err
        if not isinstance(config, dict):
            raise CNIError(
                DECODE_FAILURE,
                "the network config on stdin must be a JSON object",
                f"got {type(config).__name__}",
            )
        return config

    def need(self, var: str) -> str:
        value = self.env.get(var, "")
        if not value:
            raise CNIError(
                INVALID_ENV,
                f"{var} is not set",
                f"the runtime must set {var} for {self.command}",
            )
        return value

    @property
    def socket(self) -> str:
        sock = self.config.get("socket", DEFAULT_SOCKET)
        if not isinstance(sock, str) or not sock.startswith("/"):
            raise CNIError(INVALID_CONFIG, f"invalid \"socket\" {sock!r}: must be an absolute path")
        return sock

    @property
    def network_name(self) -> str:
        name = self.config.get("name")
        if not isinstance(name, str) or not name:
            raise CNIError(INVALID_CONFIG, 'the network config has no "name"')
        return name

    def cni_args(self) -> dict[str, str]:
        """CNI_ARGS: "K1=V1;K2=V2" (K8S_POD_NAMESPACE, K8S_POD_NAME, ...)."""
        out = {}
        for pair in filter(None, self.env.get("CNI_ARGS", "").split(";")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise CNIError(INVALID_ENV, f"CNI_ARGS entry {pair!r} is not KEY=VALUE")
            out[key] = value
        return out

    def args_message(self, netns_required: bool):
        from cilia.api.v1 import cilia_pb2

        cni_args = self.cni_args()
        pod_namespace, pod_name = check_pod(cni_args.get("K8S_POD_NAMESPACE", ""),
                                            cni_args.get("K8S_POD_NAME", ""))
        return cilia_pb2.CNIArgs(
            container_id=check_container_id(self.need("CNI_CONTAINERID")),
            netns=self.need("CNI_NETNS") if netns_required else self.env.get("CNI_NETNS", ""),
            ifname=check_ifname(self.need("CNI_IFNAME")),
            network_name=self.network_name,
            cni_version=self.cni_version,
            pod_namespace=pod_namespace,
            pod_name=pod_name,
            config=self.raw_config,
        )


def cmd_add(inv: Invocation) -> dict:
    from cilia.cni.client import AgentClient

    resp = AgentClient(inv.socket).call("Add", inv.args_message(netns_required=True))
    return cniversion.shape_result(_result_dict(resp.result), inv.cni_version)


def cmd_del(inv: Invocation) -> None:
    from cilia.cni.client import AgentClient

    AgentClient(inv.socket).call("Del", inv.args_message(netns_required=False))


def cmd_check(inv: Invocation) -> None:
    from cilia.cni.client import AgentClient

    cniversion.require(inv.cni_version, "0.4.0", "CHECK")
    AgentClient(inv.socket).call("Check", inv.args_message(netns_required=True))


def cmd_status(inv: Invocation) -> None:
    from cilia.api.v1 import cilia_pb2
    from cilia.cni.client import AgentClient

    cniversion.require(inv.cni_version, "1.1.0", "STATUS")
    AgentClient(inv.socket, status=True).call("Status", cilia_pb2.StatusRequest())


def cmd_gc(inv: Invocation) -> None:
    from cilia.api.v1 import cilia_pb2
    from cilia.cni.client import AgentClient

    cniversion.require(inv.cni_version, "1.1.0", "GC")
    valid = inv.config.get("cni.dev/valid-attachments", [])
    if not isinstance(valid, list) or not all(
        isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in valid
    ):
        raise CNIError(
            INVALID_CONFIG,
            '"cni.dev/valid-attachments" must be a list of {"containerID", "ifname"}',
        )
    args = cilia_pb2.GCArgs(
        network_name=inv.network_name,
        valid_attachments=[
            cilia_pb2.Attachment(container_id=a["containerID"], ifname=a.get("ifname", ""))
            for a in valid
        ],
    )
    AgentClient(inv.socket).call("GC", args)


def cmd_version(inv: Invocation) -> dict:
    return {"cniVersion": inv.cni_version, "supportedVersions": list(cniversion.SUPPORTED_VERSIONS)}


def _result_dict(result) -> dict:
    return {
        "interfaces": [
            {
                k: v
                for k, v in (
                    ("name", i.name),
                    ("mac", i.mac),
                    ("mtu", i.mtu),
                    ("sandbox", i.sandbox),
                )
                if v
            }
            for i in result.interfaces
        ],
        "ips": [
            {"address": ip.address, "gateway": ip.gateway, "interface": ip.interface}
            for ip in result.ips
        ],
        "routes": [
            {k: v for k, v in (("dst", r.dst), ("gw", r.gw)) if v} for r in result.routes
        ],
    }


COMMANDS: dict[str, Callable[[Invocation], dict | None]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
    "VERSION": cmd_version,
}


def run(env: dict[str, str], stdin: bytes) -> tuple[int, dict | None]:
    """Runs one invocation; returns (exit status, JSON object for stdout or None)."""
    cni_version = cniversion.LATEST
    try:
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            raise CNIError(
                INVALID_ENV,
                f"unknown CNI_COMMAND {command!r}",
                f"expected one of {', '.join(COMMANDS)}",
            )
        if command == "VERSION" and not stdin.strip():
            stdin = json.dumps({"cniVersion": cniversion.LATEST}).encode()
        inv = Invocation(env, stdin)
        cni_version = inv.cni_version
        return 0, COMMANDS[command](inv)
    except CNIError as err:
        return 1, err.to_dict(cni_version)
    except Exception as err:  # a bug: still a well-formed error object for the runtime
        return 1, CNIError(INTERNAL, f"internal error: {err!r}").to_dict(cni_version)


def main() -> None:
    status, out = run(dict(os.environ), sys.stdin.buffer.read() if not sys.stdin.isatty() else b"")
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.exit(status)


if __name__ == "__main__":
    main()
