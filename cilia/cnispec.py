"""What the CNI spec (1.1) fixes between the plugin and the agent, in one place both
import (the agent no longer reaches into the plugin's package): its error objects,
well-known codes and the exception that carries one to stdout; and the names a runtime
passes, checked by the spec's rules (and Kubernetes' for pod references) before anything
is made from them: a container id and an interface name together name the host veth and
the IPAM lease, and a pod reference names objects."""

from __future__ import annotations

import re

PLUGIN = "cilia-cni"

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
# Codes from 100 up are the plugin's own.
ENDPOINT_MISMATCH = 100
INTERNAL = 999


class CNIError(Exception):
    """An error the plugin reports as a spec error object."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg if msg.startswith(PLUGIN) else f"{PLUGIN}: {msg}"
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

# libcni's ValidateContainerID and ValidateInterfaceName (the CNI spec's rules).
_CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
IFNAMSIZ = 16
# Kubernetes: a namespace is a DNS-1123 label, a pod name a DNS-1123 subdomain.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_DNS_LABEL)
_POD_NAME = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def check_container_id(value: str) -> str:
    if not _CONTAINER_ID.fullmatch(value or ""):
        raise CNIError(INVALID_ENV, f"invalid CNI_CONTAINERID {value!r}",
                       "it must start with a letter or digit and hold only letters, digits, "
                       "'_', '.' and '-' (the CNI spec)")
    return value


def check_ifname(value: str) -> str:
    bad = (not value or len(value) >= IFNAMSIZ or value in (".", "..")
           or any(c in value for c in "/:") or any(c.isspace() for c in value))
    if bad:
        raise CNIError(INVALID_ENV, f"invalid CNI_IFNAME {value!r}",
                       f"an interface name has 1 to {IFNAMSIZ - 1} characters, is not '.' or "
                       "'..', and has no '/', ':' or whitespace (the CNI spec)")
    return value


def check_pod(namespace: str, name: str) -> tuple[str, str]:
    """K8S_POD_NAMESPACE and K8S_POD_NAME from CNI_ARGS: empty (not Kubernetes), or
    Kubernetes names."""
    if namespace and (len(namespace) > 63 or not _NAMESPACE.fullmatch(namespace)):
        raise CNIError(INVALID_ENV, f"invalid K8S_POD_NAMESPACE {namespace!r} in CNI_ARGS",
                       "a namespace is a DNS-1123 label: up to 63 of a-z, 0-9 and '-'")
    if name and (len(name) > 253 or not _POD_NAME.fullmatch(name)):
        raise CNIError(INVALID_ENV, f"invalid K8S_POD_NAME {name!r} in CNI_ARGS",
                       "a pod name is a DNS-1123 subdomain: up to 253 of a-z, 0-9, '-' and '.'")
    return namespace, name
