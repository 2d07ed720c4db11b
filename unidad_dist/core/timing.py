"""Seconds by phase, without synchronising the device.

``PhaseTimer.phase(name)`` marks the start and the end of a phase (phases may nest: the time of an inner phase
is not counted in the outer one, so the phases partition the time they cover). On a CPU a mark is
``time.perf_counter()``. On CUDA it is a CUDA event recorded on the current stream: no synchronisation, so
timing changes nothing a run computes or when; the events are read when ``take()`` is asked for the totals
(once per logged iteration, where the logged losses synchronise anyway), and those already complete are folded
in as phases are entered so that the list stays short. An event's time is when the device reaches it, so a
phase's share is the device time between its marks (a device that waits for the host — data loading — counts
the wait in the phase that waits). ``add(name, seconds)`` adds host-measured time (a checkpoint's save).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Optional

import torch

from unidad_dist.device import queues_work


class PhaseTimer:
    def __init__(self, device: Optional[torch.device] = None):
        self.events = device is not None and queues_work(device)
        self.totals: dict[str, float] = defaultdict(float)
        self.seen: list[str] = []  # every phase name met so far, in order of first use
        self._stack: list[str] = []
        self._since = None  # the mark where the innermost open phase's current segment started
        self._pending: list = []  # CUDA: (name, start event, end event) not yet read

    def _mark(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _segment(self, name: str, a, b) -> None:
        if self.events:
            self._pending.append((name, a, b))
        else:
            self.totals[name] += b - a

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.seen:
            self.seen.append(name)
        if self.events and len(self._pending) > 64:
            self._fold(block=False)
        now = self._mark()
        if self._stack:
            self._segment(self._stack[-1], self._since, now)
        self._stack.append(name)
        self._since = now
        try:
            yield
        finally:
            now = self._mark()
            self._segment(self._stack.pop(), self._since, now)
            self._since = now if self._stack else None

    def add(self, name: str, seconds: float) -> None:
        if name not in self.seen:
            self.seen.append(name)
        self.totals[name] += float(seconds)

    def _fold(self, block: bool) -> None:
        keep = []
        for i, (name, a, b) in enumerate(self._pending):
            if block:
                b.synchronize()
                a.synchronize()
            elif not (a.query() and b.query()):
                keep = self._pending[i:]  # the rest later (events complete in order on a stream)
                break
            self.totals[name] += a.elapsed_time(b) / 1000.0
        self._pending = keep

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last ``take`` (every phase met so far, 0.0 when absent since), and reset."""
        if self.events:
            self._fold(block=True)
        out = {name: self.totals.get(name, 0.0) for name in self.seen}
        self.totals = defaultdict(float)
        return out
