"""CNI versions cilia speaks and the result shapes they differ in."""

from __future__ import annotations

from cilia.cnispec import INCOMPATIBLE_VERSION, CNIError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def require(version: str, minimum: str, command: str) -> None:
    """Reject a command the configured version does not have (CHECK < 0.4.0, GC, STATUS)."""
    if _key(version) < _key(minimum):
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"{command} needs cniVersion {minimum} or newer; the network config says "
            f"{version}: raise cniVersion in the config",
        )


def validate(version: object) -> str:
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def shape_result(result: dict, version: str) -> dict:
    """A 1.x result, reshaped for older versions: 0.3.x/0.4.0 carry an IP "version"."""
    out = {"cniVersion": version, **result}
    if _key(version) < (1, 0, 0):
        out["ips"] = [{"version": "4", **ip} for ip in out.get("ips", [])]
    return out
