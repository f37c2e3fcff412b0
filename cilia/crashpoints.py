"""Crash points for the crash tests: with CILIA_CRASH_AT=NAME in its environment, a
process kills itself with SIGKILL when it reaches the point NAME: a real crash at a
chosen step (no cleanup, no finally, no atexit), nothing emulated. Without the variable
a point costs one string comparison."""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("CILIA_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _AT and _AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
