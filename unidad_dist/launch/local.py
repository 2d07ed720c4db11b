"""``unidad-dist launch local --nproc N --config FILE [overrides]``: N ranks on this host.

Each rank is ``python -m unidad_dist train --config FILE [overrides]`` with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, i.e. the same train loop every other launcher ends in. If a rank exits
non-zero, the others are given ``run.dist_timeout`` seconds to notice (their collectives time out) and
are then terminated; the launcher returns the first non-zero exit code.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from unidad_dist.config import load_config
from unidad_dist.device import free_port
from unidad_dist.errors import UserError


def launch_local(nproc: int, config: str, overrides: list[str], grace_s: float | None = None) -> int:
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    cfg = load_config(config, overrides)  # bad input fails here, before any rank starts
    grace = cfg.run.dist_timeout if grace_s is None else grace_s
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if nproc > 1:  # share the cores instead of oversubscribing them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs.append(subprocess.Popen([sys.executable, "-m", "unidad_dist", "train", "--config", str(config),
                                       *overrides], env=env))
    failed_at = None
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at, code = time.time(), bad[0]
                print(f"launch: a rank exited with code {code}; waiting up to {grace:.0f}s for the others",
                      file=sys.stderr)
            if all(c is not None for c in codes):
                return code or next((c for c in codes if c), 0)
            if failed_at is not None and time.time() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                time.sleep(2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                return code
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
