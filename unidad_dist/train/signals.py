"""Stop requests: SIGTERM, SIGINT and SIGHUP (what ``kill``, ``timeout``, systemd, docker, Kubernetes, SLURM
and a terminal send) become a clean stop at the next iteration boundary, agreed by every rank.

The first signal only sets a flag: the loop finishes the iteration it is in, all ranks agree to stop (any
rank's flag stops all), write a checkpoint there when ``checkpoint.on_signal`` (the default), release the run
lock and exit with 128 + the signal's number, as a process killed by it would. Rerunning the same command
resumes. A second signal while stopping interrupts at once (the last complete checkpoint stays valid).
Handlers are installed only in the main thread (Python delivers signals there) and restored afterwards.
A launcher adds signals through ``UNIDAD_STOP_SIGNALS`` (names, comma-separated): ``launch slurm`` adds the one
SLURM sends before a time limit or a preemption (USR2 by default), so every rank stops with a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from unidad_dist.train.hooks import Hook

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP")) if s is not None)
STOP_SIGNALS_ENV = "UNIDAD_STOP_SIGNALS"


def signal_by_name(name: str) -> signal.Signals:
    """``USR2``, ``SIGUSR2`` or a number -> the signal; ValueError naming the known ones otherwise."""
    name = name.strip().upper()
    if name.isdigit():
        return signal.Signals(int(name))
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        known = ", ".join(s.name[3:] for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))
        raise ValueError(f"unknown signal {name!r}; e.g. {known}") from None


def stop_signals() -> tuple:
    """SIGNALS plus those a launcher named in UNIDAD_STOP_SIGNALS."""
    extra = [signal_by_name(n) for n in os.environ.get(STOP_SIGNALS_ENV, "").split(",") if n.strip()]
    return tuple(dict.fromkeys([*SIGNALS, *extra]))


class SignalStop(Hook):
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum: int | None = None
        self.received_at = 0.0
        self.stopped_at: int | None = None  # the iteration boundary where a signal stopped the run

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # A repeat within a second is the same request arriving twice (a terminal's Ctrl-C reaches the
            # process group and the launcher forwards it too); a later one means "now".
            if time.time() - self.received_at < 1.0:
                return
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: interrupting at once")
        self.signum, self.received_at = signum, time.time()
        if self.rank == 0:
            print(f"received {signal.Signals(signum).name}: stopping at the end of this iteration "
                  "(send it again to interrupt at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in stop_signals()}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def should_stop(self, run, done: int) -> bool:
        return self.signum is not None
