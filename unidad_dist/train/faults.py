"""Fault injection for resume tests: ``UNIDAD_KILL_AT=<rank>:<point>`` SIGKILLs that rank at that point.

Points: ``iter:N`` (before iteration N runs) and ``ckpt:N`` (while checkpoint N is being written: the
engine states are on disk in its temporary folder, nothing is published yet). Unset (the default), this
does nothing. It lets a test kill a rank at an exact, seeded place instead of racing a timer.
"""
from __future__ import annotations

import os
import signal

ENV = "UNIDAD_KILL_AT"


def kill_point(rank: int, point: str) -> None:
    spec = os.environ.get(ENV)
    if spec and spec == f"{rank}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
