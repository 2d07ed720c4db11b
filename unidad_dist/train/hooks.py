"""Hooks: what runs around the loop's iterations without being loop code. Launchers and methods add their own.

Events, in the order a run meets them (every rank calls every hook; a hook decides what its rank does):

* ``on_sampler_initial(run)``: a fresh run, inside the method's ``prepare``, right before a warm start first
  changes the sampler's weights (the "initial" evaluation: the sampler as the run found it); not called when
  ``prepare`` leaves the sampler as it is;
* ``on_fresh_start(run)``: a fresh run, engines attached, before checkpoint 0 (the "before" evaluation);
* ``on_train_start(run, start)``: before the first iteration of this process (fresh or resumed);
* ``on_step_end(run, iteration, logs)``: after each iteration's step (``logs``: what the method logged);
* ``should_stop(run, done) -> bool``: asked after each iteration; the loop agrees on the answer over all
  ranks (any rank's True stops every rank), then checkpoints on all ranks and stops (e.g. preemption);
* ``on_checkpoint(run, path, iteration)``: after every checkpoint is published (e.g. to report it);
* ``on_train_end(run, finished)``: after the last checkpoint; ``finished`` is False when a hook stopped it;
* ``close(run)``: always, also after an error.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.core.images import save_grid
from unidad_dist.core.io import atomic_write_text
from unidad_dist.device import host_group
from unidad_dist.errors import UserError
from unidad_dist.eval import networks, paper
from unidad_dist.eval.metrics import PROXY_FEATURE, all_metrics
from unidad_dist.train.logging import RunLogger
from unidad_dist.train.perf import Perf
from unidad_dist.train.sampling import EVAL_DIST_TIMEOUT, eval_prompts, measure, sample_all


class Hook:
    def on_sampler_initial(self, run) -> None:
        pass

    def on_fresh_start(self, run) -> None:
        pass

    def on_train_start(self, run, start: int) -> None:
        pass

    def on_step_end(self, run, iteration: int, logs: dict) -> None:
        pass

    def should_stop(self, run, done: int) -> bool:
        return False

    def on_checkpoint(self, run, path: Path, iteration: int) -> None:
        pass

    def on_train_end(self, run, finished: bool) -> None:
        pass

    def close(self, run) -> None:
        pass


class Hooks(Hook):
    """A list of hooks called in order."""

    def __init__(self, hooks: list):
        self.hooks = list(hooks)
        self.can_stop = any(type(h).should_stop is not Hook.should_stop for h in self.hooks)

    def on_sampler_initial(self, run) -> None:
        for h in self.hooks:
            h.on_sampler_initial(run)

    def on_fresh_start(self, run) -> None:
        for h in self.hooks:
            h.on_fresh_start(run)

    def on_train_start(self, run, start: int) -> None:
        for h in self.hooks:
            h.on_train_start(run, start)

    def on_step_end(self, run, iteration: int, logs: dict) -> None:
        for h in self.hooks:
            h.on_step_end(run, iteration, logs)

    def should_stop(self, run, done: int) -> bool:
        return any([h.should_stop(run, done) for h in self.hooks])  # every hook is asked

    def on_checkpoint(self, run, path: Path, iteration: int) -> None:
        for h in self.hooks:
            h.on_checkpoint(run, path, iteration)

    def on_train_end(self, run, finished: bool) -> None:
        for h in self.hooks:
            h.on_train_end(run, finished)

    def close(self, run) -> None:
        for h in self.hooks:
            h.close(run)


class Heartbeat(Hook):
    """Keeps ``run.lock`` fresh (its mtime) so no other writer takes the run over."""

    def __init__(self, lock):
        self.lock = lock

    def on_step_end(self, run, iteration, logs) -> None:
        self.lock.heartbeat()


class Metrics(Hook):
    """metrics.jsonl, the progress bar and wandb (main rank): every ``logging.every`` iterations and the last,
    the method's logs of every side (a world collective in split placement), the data streams' counters and the
    window's speed, memory and utilisation (train/perf.py: time/, throughput/, memory/, perf/; a world gather)."""

    def __init__(self, perf: Optional[Perf] = None):
        self.logger = None
        self.perf = perf  # None: no time/, throughput/, memory/, perf/ keys

    def on_train_start(self, run, start) -> None:
        if self.perf is not None:
            self.perf.start(run)  # first: its FLOPs count stays out of the first window
        self.logger = RunLogger(run.dir, run.cfg, run.rt.is_main, run.cfg.train.iterations, start)

    def on_step_end(self, run, iteration, logs) -> None:
        self.logger.advance()
        if self.perf is not None:
            self.perf.step_end(iteration)
        if iteration % run.cfg.logging.every == 0 or iteration + 1 == run.cfg.train.iterations:
            logs = dict(logs)
            logs.update(run.models.data.logs())
            merged = dict(run.models.exchange.merge_logs(logs))
            if self.perf is not None:
                merged.update(self.perf.logs(run))
            self.logger.log(iteration, merged)

    def on_checkpoint(self, run, path, iteration) -> None:
        if self.perf is not None:
            self.perf.checkpoint(run.last_save_s)

    def close(self, run) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


class SampleGrids(Hook):
    """A grid of the sampler's samples every ``logging.sample_every`` iterations (samples/iter_N.png; wandb)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_step_end(self, run, iteration, logs) -> None:
        every, done = run.cfg.logging.sample_every, iteration + 1
        if not every or done % every or not run.samples_here:
            return
        perf = self.metrics.perf
        with perf.timer.phase("eval") if perf is not None else contextlib.nullcontext():  # time/eval_s
            x = run.method.sample(run.cfg.logging.grid_size)  # every such rank: a ZeRO-3 forward is a collective
            if run.rt.is_main:
                path = save_grid(run.models.to_pixels(x).cpu(), run.dir / "samples" / f"iter_{done:07d}.png")
        if run.rt.is_main:
            self.metrics.logger.image("samples", path, iteration)


class PeriodicEvaluation(Hook):
    """``eval.every``: every N iterations the ranks that hold the sampler draw ``eval.num_samples`` — each its
    share, in lockstep (train/sampling.py), gathered to rank 0 as uint8 — and rank 0 measures them (the proxies
    and the paper's metrics with the weights the recipe names; unavailable ones are recorded as such): the
    values go to metrics.jsonl and wandb as ``eval/<key>``, the whole record to ``eval/during_<N>.json`` (N iterations done).
    Meanwhile every other rank waits on a host group of its own with a long timeout (EVAL_DIST_TIMEOUT), never
    inside a training collective, so no wait trips ``run.dist_timeout``."""

    def __init__(self, metrics: Metrics, lock=None):
        self.metrics = metrics
        self.lock = lock  # run.lock: kept fresh while the evaluation lasts (it may outlast run.lock_stale_s)
        self.prompts = None
        self.wait_group = None

    def on_train_start(self, run, start: int) -> None:
        ev = run.cfg.eval
        if not ev.every:
            return
        # a bad prompt file, .npz or weight file the recipe names fails here, before the first iteration
        self.prompts = eval_prompts(run.cfg, run.models)
        if ev.fid_stats:
            paper.FidStats.load(ev.fid_stats)
        for name in networks.SPECS:
            named = getattr(ev.weights, name, None)
            found = networks.locate(name, named) if named else None
            if found is not None and not found.available:
                raise UserError(f"eval.every: {found.reason}")
        if run.rt.world_size > 1:
            self.wait_group = host_group(EVAL_DIST_TIMEOUT)

    def on_step_end(self, run, iteration, logs) -> None:
        every, done = run.cfg.eval.every, iteration + 1
        if not every or done % every:
            return
        t0 = time.time()
        ev, u8 = run.cfg.eval, None
        steps = ev.steps or run.method.sampling_info()["steps"]
        perf = self.metrics.perf
        with perf.timer.phase("eval") if perf is not None else contextlib.nullcontext(), _beating(self.lock):
            try:
                if run.samples_here:
                    placement = run.models.placement
                    u8 = sample_all(run.method, run.models, run.rt, ev.num_samples, steps=steps,
                                    seed=run.cfg.run.seed, prompts=self.prompts, batch=ev.batch,
                                    ranks=placement.side_ranks, group=placement.group_handles.get(placement.side),
                                    lockstep=True)
                if run.rt.is_main:
                    self._measure(run, iteration, u8, steps, t0)
            finally:  # every rank meets here, also when rank 0 failed (it then raises after the others go on)
                if self.wait_group is not None:
                    torch.distributed.barrier(group=self.wait_group)

    def _measure(self, run, iteration: int, u8, steps: int, t0: float) -> None:
        ev, done = run.cfg.eval, iteration + 1
        record = {"iteration": done, "steps": steps, "num_samples": ev.num_samples}  # iterations done, as checkpoints
        try:
            record.update(measure(run.cfg, run.models, u8, run.models.data.images, steps, self.prompts,
                                  run.rt.device))
        except Exception as e:  # noqa: BLE001 - a failed measurement never ends the training run
            record.update({"proxies": {}, "paper": [], "error": f"{type(e).__name__}: {e}"})
            warnings.warn(f"eval.every after iteration {done}: the measurement failed ({type(e).__name__}: {e}); "
                          f"training goes on, the error is in eval/during_{done}.json")
        record["seconds"] = round(time.time() - t0, 2)
        (run.dir / "eval").mkdir(exist_ok=True)
        atomic_write_text(run.dir / "eval" / f"during_{done}.json", json.dumps(record, indent=2))
        values = {f"eval/{k}": v for k, v in record["proxies"].items() if k != "label"}
        by_name = {r["metric"]: r for r in record["paper"]}
        values.update({f"eval/{key}": by_name[name]["value"] for key, name in paper.METRIC_KEYS.items()
                       if by_name.get(name, {}).get("available")})
        values["eval/seconds"] = record["seconds"]
        self.metrics.logger.log_values(iteration, values)


@contextlib.contextmanager
def _beating(lock, every_s: float = 30.0):
    """Keep ``lock`` (run.lock) fresh from a thread while the block runs (None: nothing to do)."""
    if lock is None:
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            lock.heartbeat()

    t = threading.Thread(target=beat, name="eval-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


class Evaluation(Hook):
    """The demo-scale proxies (eval/metrics.py) of the sampler before training and at the end, the grids
    (target shots, the method's own, the sampler before/after) and summary.json (main rank writes). With wandb:
    the grids as ``eval/<grid>`` images (the "before" ones at step 0, the "after" one at step
    ``train.iterations``), eval_before.json in the run's summary as ``eval_before/<key>``, summary.json as
    ``eval/<key>``."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._grids: list[Path] = []  # the "before" grids this process wrote (a fresh start), for wandb
        self._initial: dict = {}  # the sampler before its warm start (a fresh start whose prepare changes it)

    def _evaluate(self, run) -> tuple[torch.Tensor, dict]:
        """Every rank that holds the sampler samples (a ZeRO-3 forward is a collective); rank 0 measures."""
        x = run.method.sample(run.cfg.eval.num_samples, steps=run.cfg.eval.steps)
        pixels = run.models.to_pixels(x).cpu()
        return pixels, (all_metrics(pixels, run.models.data.images) if run.rt.is_main else {})

    def on_sampler_initial(self, run) -> None:
        """The sampler as the run found it, before a warm start changes it: what the summary's
        ``proxy_distance_ratio`` divides by (a warm start is adaptation too)."""
        t0 = time.time()
        if run.samples_here:
            pixels, initial = self._evaluate(run)
            if run.rt.is_main:
                grid = save_grid(pixels[:run.cfg.logging.grid_size],
                                 run.dir / "samples" / f"{run.method.sampler}_initial.png")
                self._grids.append(grid)
                self._initial = {f"initial_{k}": v for k, v in initial.items()}
        run.phases["eval_initial_s"] = time.time() - t0

    def on_fresh_start(self, run) -> None:
        t0 = time.time()
        g, samples = run.cfg.logging.grid_size, run.dir / "samples"
        grids, pixels, before = {}, None, {}
        if run.samples_here:
            grids = run.method.grids(g)
            pixels, before = self._evaluate(run)
        if run.rt.is_main:
            save_grid(run.models.data.images[:g], samples / "target_shots.png")
            for name, x in grids.items():
                save_grid(run.models.to_pixels(x).cpu(), samples / f"{name}.png")
            save_grid(pixels[:g], samples / f"{run.method.sampler}_before.png")
            self._grids = [samples / "target_shots.png", *(samples / f"{name}.png" for name in grids), *self._grids,
                           samples / f"{run.method.sampler}_before.png"]
            before.update(run.prepared)
            before.update(self._initial)
            atomic_write_text(run.dir / "eval_before.json", json.dumps(before, indent=2))
        run.phases["eval_before_s"] = time.time() - t0

    def on_train_start(self, run, start: int) -> None:
        logger = self.metrics.logger
        for path in self._grids:
            logger.image(f"eval/{path.stem}", path, 0)
        self._grids = []
        before_file = run.dir / "eval_before.json"
        if run.rt.is_main and before_file.is_file():
            logger.summary(json.loads(before_file.read_text()), "eval_before/")

    def on_train_end(self, run, finished: bool) -> None:
        if not finished:
            return
        t0 = time.time()
        pixels, after = None, {}
        if run.samples_here:
            pixels, after = self._evaluate(run)
        if not run.rt.is_main:
            return
        cfg = run.cfg
        after_grid = save_grid(pixels[: cfg.logging.grid_size], run.dir / "samples" / f"{run.method.sampler}_after.png")
        self.metrics.logger.image(f"eval/{after_grid.stem}", after_grid, cfg.train.iterations)
        before_file = run.dir / "eval_before.json"
        before = json.loads(before_file.read_text()) if before_file.is_file() else {}
        # no warm start changed the sampler: as it started training is as the run found it
        initial = ({k[len("initial_"):]: v for k, v in before.items() if k.startswith("initial_")}
                   if "initial_proxy_distance" in before else before)
        run.phases["eval_after_s"] = time.time() - t0
        run.phases["total_s"] = time.time() - run.t_start
        summary = {
            "iterations": cfg.train.iterations,
            **run.method.summary(),
            "proxy_feature": PROXY_FEATURE,
            # initial: the sampler as the run found it; before: as training starts (after any warm start)
            "proxy_distance_initial": initial.get("proxy_distance"),
            "proxy_distance_before": before.get("proxy_distance"),
            "proxy_distance_after": after["proxy_distance"],
            "shape_distance": after["shape_distance"],  # the foreground's shape alone (eval/metrics.py)
            "shape_distance_initial": initial.get("shape_distance"),
            "shape_distance_before": before.get("shape_distance"),
            "copy_rate": after["copy_rate"],
            "diversity": after["diversity"],
            "copy_rate_before": before.get("copy_rate"),
            "diversity_before": before.get("diversity"),
            "noise_level": after["noise_level"],  # beside the proxy: a noisy sample set shows here too
            "noise_level_initial": initial.get("noise_level"),
            "noise_level_before": before.get("noise_level"),
            "noise_level_shots": after["noise_level_shots"],
            "sharpness": after["sharpness"],
            "sharpness_before": before.get("sharpness"),
            "sharpness_shots": after["sharpness_shots"],
            "num_samples": cfg.eval.num_samples,
            "num_shots": int(run.models.data.num_shots),
            "wall_time_s": run.phases,
        }
        if initial.get("proxy_distance"):  # the whole run's adaptation, its warm starts included
            summary["proxy_distance_ratio"] = after["proxy_distance"] / initial["proxy_distance"]
        if before.get("proxy_distance"):  # the training phase's alone
            summary["proxy_distance_ratio_training"] = after["proxy_distance"] / before["proxy_distance"]
        atomic_write_text(run.dir / "summary.json", json.dumps(summary, indent=2))
        self.metrics.logger.summary(summary, "eval/")


def default_hooks(lock) -> list[Hook]:
    metrics = Metrics(Perf())
    return [Heartbeat(lock), metrics, SampleGrids(metrics), PeriodicEvaluation(metrics, lock), Evaluation(metrics)]
