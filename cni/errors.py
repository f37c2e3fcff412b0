"""CNI error objects (CNI spec 1.1, "Error"): well-known codes and the exception that
carries one to stdout."""

from __future__ import annotations

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
