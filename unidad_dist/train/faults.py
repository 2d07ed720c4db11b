"""Fault injection for resume and stop tests, unset by default (then nothing happens):

* ``UNIDAD_KILL_AT=<rank>:<point>`` SIGKILLs that rank at that point;
* ``UNIDAD_SIGTERM_PARENT_AT=<rank>:<point>`` makes that rank send SIGTERM to its parent process (the
  launcher) at that point, as ``kill``, SLURM or Kubernetes would: the launcher's forwarding is exercised;
* ``UNIDAD_SIGTERM_SELF_AT=<rank>:<point>`` sends SIGTERM to that rank itself;
* ``UNIDAD_SCANCEL_AT=<rank>:<point>:<signal>`` makes that rank ask SLURM to send the signal to every task of
  its job (``scancel --signal``), as a preemption or a near time limit does — in the job's first start only
  (SLURM_RESTART_COUNT unset or 0), so the requeued job runs through.

``UNIDAD_FAULT_ONCE=<file>`` makes each of them happen once: the first time, the file is created; while it exists,
the point passes (a restarted worker group reaches the same point again and must run through).

Points: ``iter:N`` (before iteration N runs) and ``ckpt:N`` (while checkpoint N is being written: the
engine states are on disk in its temporary folder, nothing is published yet). They let a test act at an
exact, seeded place instead of racing a timer.
"""
from __future__ import annotations

import os
import signal

ENV = "UNIDAD_KILL_AT"
ENV_SIGTERM_PARENT = "UNIDAD_SIGTERM_PARENT_AT"
ENV_SIGTERM_SELF = "UNIDAD_SIGTERM_SELF_AT"
ENV_SCANCEL = "UNIDAD_SCANCEL_AT"
ENV_ONCE = "UNIDAD_FAULT_ONCE"


def _first_time() -> bool:
    once = os.environ.get(ENV_ONCE)
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def kill_point(rank: int, point: str) -> None:
    here = f"{rank}:{point}"
    if here not in {os.environ.get(v, "") for v in (ENV, ENV_SIGTERM_PARENT, ENV_SIGTERM_SELF)} | {
            os.environ.get(ENV_SCANCEL, "").rpartition(":")[0]} or not _first_time():
        return
    if os.environ.get(ENV) == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(ENV_SIGTERM_PARENT) == here:
        os.kill(os.getppid(), signal.SIGTERM)
    if os.environ.get(ENV_SIGTERM_SELF) == here:
        os.kill(os.getpid(), signal.SIGTERM)
    scancel = os.environ.get(ENV_SCANCEL, "")
    if scancel.rpartition(":")[0] == here and os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0"):
        import subprocess

        subprocess.run(["scancel", f"--signal={scancel.rpartition(':')[2]}", os.environ["SLURM_JOB_ID"]],
                       check=True, timeout=60)
