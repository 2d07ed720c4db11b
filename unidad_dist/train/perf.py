"""Speed, memory and utilisation of a run, for metrics.jsonl (and wandb): what the ``Metrics`` hook adds to each
logged line. All are over the window since the previous logged line (its iterations), per iteration:

* ``time/<phase>_s``: seconds by phase — the method's (``Method.timer``: e.g. the data wait and each role's
  step; core/timing.py, no device synchronisation), ``time/checkpoint_s`` (the saves, as ``Run.save`` measures
  them) and ``time/eval_s`` (the sample grids written during training) — as the busiest rank spent them (the
  most time in phases: the slowest rank, or in split placement the busier side; a rank of the other side
  waits for it outside its phases), so that they account for the iteration time;
* ``time/iteration_s``: wall seconds per iteration (everything: the step, hooks, checkpoints);
* ``throughput/samples_per_s``: samples of the whole job per wall second (``train.batch_size`` per rank and
  micro-batch x the method's micro-batches x the data-parallel ranks of a side);
* ``memory/rank<r>/rss_gib`` (every rank: the process's peak resident memory since it started, getrusage),
  ``memory/rank<r>/max_allocated_gib`` / ``max_reserved_gib`` (CUDA ranks: the allocator's peaks since the
  process started) — gathered from every rank (a world collective on logged iterations);
* ``perf/flops_per_iteration``: FLOPs of the whole job (every rank) per iteration, counted by
  ``parallel.plan.IterationFlops`` from the method's passes, exactly as ``unidad-dist plan`` counts them;
* ``perf/achieved_tflops``: those FLOPs per wall second, whole job;
* ``perf/mfu``: the time the job's FLOPs take at the devices' dense peaks (``core.hardware``: each role's math
  at its precision's peak) / the wall time of all its devices — only when every rank's device is in the table;
  never on a CPU or an unknown device.
"""
from __future__ import annotations

import resource
import sys
import time

import torch

from unidad_dist.core.hardware import device_peak, math_kind, peak_flops, tf32_enabled
from unidad_dist.core.timing import PhaseTimer
from unidad_dist.device import device_name, memory_peaks
from unidad_dist.parallel.plan import IterationFlops

GIB = 1024 ** 3
GENERIC_PHASES = ("checkpoint", "eval")  # measured around the step, not by the method


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes; Linux: KiB


def memory_here(device: torch.device) -> dict:
    return {"rss_gib": peak_rss_bytes() / GIB, **{f"{k}_gib": v / GIB for k, v in memory_peaks(device).items()}}


class Perf:
    """Collects a window's timings (``start`` when training starts, ``step_end`` after every iteration,
    ``checkpoint`` after every save) and turns them into metrics (``logs``, on every rank at logged iterations)."""

    def __init__(self):
        self.timer = None  # the generic phases (checkpoint, eval)
        self.flops = None
        self.window: list[int] = []

    def start(self, run) -> None:
        self.timer = PhaseTimer(run.rt.device)
        for name in GENERIC_PHASES:
            self.timer.add(name, 0.0)
        method_timer = getattr(run.method, "timer", None)
        if method_timer is not None:
            method_timer.take()  # nothing from before training
        self.flops = None
        if run.rt.is_main:
            try:
                self.flops = IterationFlops(run.cfg, run.rt.world_size)
            except Exception as e:  # noqa: BLE001 - a metric must not stop a run; say why it is absent
                print(f"warning: no FLOPs count for this run, so no perf/ metrics ({type(e).__name__}: {e})",
                      flush=True)
        self.window = []
        self._t = time.perf_counter()

    def step_end(self, iteration: int) -> None:
        self.window.append(iteration)

    def checkpoint(self, seconds: float) -> None:
        if self.timer is not None:  # checkpoint 0 is written before training starts
            self.timer.add("checkpoint", seconds)

    def logs(self, run) -> dict:
        """The window's metrics (main rank; the others return {}). Every rank must call it (a world gather)."""
        now = time.perf_counter()
        its, wall = self.window, now - self._t
        self.window, self._t = [], now
        method_timer = getattr(run.method, "timer", None)
        phases = method_timer.take() if method_timer is not None else {}
        generic = self.timer.take()
        clash = sorted(set(phases) & set(generic))
        if clash:
            raise RuntimeError(f"the method times a phase named {clash[0]!r}, which is reserved for the run's own "
                               f"time/{clash[0]}_s; give the phase another name")
        mine = {"memory": memory_here(run.rt.device), "device": device_name(run.rt.device),
                "phases": {**phases, **generic}}
        if run.rt.distributed:
            every = [None] * run.rt.world_size
            torch.distributed.all_gather_object(every, mine)
        else:
            every = [mine]
        if not run.rt.is_main or not its:
            return {}
        n = len(its)
        # the busiest rank's phases (the most time in phases), every phase any rank met
        busiest = max(every, key=lambda got: sum(got["phases"].values()))["phases"]
        names = [*dict.fromkeys(k for got in every for k in got["phases"] if k not in GENERIC_PHASES), *GENERIC_PHASES]
        out = {f"time/{k}_s": busiest.get(k, 0.0) / n for k in names}
        out["time/iteration_s"] = wall / n
        cfg = run.cfg
        samples = sum(cfg.method.iteration_plan(cfg, it).n_micro for it in its) * cfg.train.batch_size \
            * run.models.exchange.dp_size
        out["throughput/samples_per_s"] = samples / wall
        for r, got in enumerate(every):
            for k, v in got["memory"].items():
                out[f"memory/rank{r}/{k}"] = v
        if self.flops is not None:
            out.update(self._flops_logs(its, wall, [got["device"] for got in every]))
        return out

    def _flops_logs(self, its: list[int], wall: float, devices: list[str]) -> dict:
        tf32 = tf32_enabled()
        peaks = [device_peak(name) for name in devices]
        total, ideal, known = 0.0, 0.0, True  # ideal: seconds the FLOPs take at the peaks, summed over the ranks
        for it in its:
            for r, by_role in self.flops.ranks(it).items():
                for role, f in by_role.items():
                    total += f
                    flops_s = peak_flops(peaks[r], math_kind(self.flops.precision[role], tf32))
                    if flops_s is None:  # a CPU, an unknown device, or a precision it has no figure for
                        known = False
                    else:
                        ideal += f / flops_s
        out = {"perf/flops_per_iteration": total / len(its), "perf/achieved_tflops": total / wall / 1e12}
        if known:
            out["perf/mfu"] = ideal / (len(devices) * wall)
        return out
