"""``unidad-dist launch local --nproc N --config FILE [overrides]``: N ranks on this host.

Each rank is ``python -m unidad_dist train --config FILE [overrides]`` with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, i.e. the same train loop every other launcher ends in. If a rank exits
non-zero, the others are given ``run.dist_timeout`` seconds to notice (their collectives time out) and
are then terminated; the launcher returns the first non-zero exit code.

Stopping: SIGTERM, SIGINT or SIGHUP to the launcher (``kill``, ``timeout``, systemd, docker, Kubernetes,
SLURM, Ctrl-C) is forwarded to every rank, which stop together at the next iteration boundary with a
checkpoint (train/signals.py); after ``run.signal_grace_s`` the ones still running are killed, and the
launcher exits 128 + the signal. A second signal is forwarded too (the ranks then interrupt at once). The
ranks run in their own session, so a terminal's Ctrl-C reaches them once, through the launcher, and on Linux
each rank is sent SIGTERM if the launcher itself dies (even by SIGKILL): no rank outlives it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from unidad_dist.config import batch_for_world
from unidad_dist.device import free_port
from unidad_dist.errors import UserError
from unidad_dist.launch.chain import launch_config
from unidad_dist.train.signals import SIGNALS

STOP_SIGNALS = SIGNALS  # what the ranks stop on, forwarded to them


def _die_with_launcher() -> None:
    """In the child before exec: ask Linux to send it SIGTERM when the launcher dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def launch_local(nproc: int, config: str, overrides: list[str], grace_s: float | None = None) -> int:
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    cfg = launch_config(config, overrides)  # bad input fails here, before any rank starts (every stage of a chain)
    batch_for_world(cfg, nproc)  # a global batch this many ranks cannot split
    grace = cfg.run.dist_timeout if grace_s is None else grace_s
    port = free_port()
    received: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    procs = []
    try:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            if nproc > 1:  # share the cores instead of oversubscribing them
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            procs.append(subprocess.Popen([sys.executable, "-m", "unidad_dist", "train", "--config", str(config),
                                           *overrides], env=env, start_new_session=True,
                                          preexec_fn=_die_with_launcher))
        return _supervise(procs, received, grace, cfg.run.signal_grace_s)
    finally:
        for p in procs:  # whatever happened to the launcher, no rank outlives it
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)


def _supervise(procs: list, received: list, grace: float, signal_grace: float) -> int:
    failed_at = stop_at = None
    code = forwarded = 0
    while True:
        while forwarded < len(received):  # forward every signal the launcher got, in order
            signum = received[forwarded]
            forwarded += 1
            if stop_at is None:
                stop_at = time.time()
                print(f"launch: {signal.Signals(signum).name}: asking the {len(procs)} ranks to stop at the next "
                      f"iteration boundary (killed after {signal_grace:.0f}s)", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad and failed_at is None and stop_at is None:
            failed_at, code = time.time(), bad[0]
            print(f"launch: a rank exited with code {code}; waiting up to {grace:.0f}s for the others",
                  file=sys.stderr)
        if all(c is not None for c in codes):
            if received:
                return 128 + received[0]
            return code or next((c for c in codes if c), 0)
        late = (failed_at is not None and time.time() - failed_at > grace) or \
            (stop_at is not None and time.time() - stop_at > signal_grace)
        if late:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM if stop_at is None else signal.SIGKILL)
            time.sleep(2)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return 128 + received[0] if received else code
        time.sleep(0.2)
