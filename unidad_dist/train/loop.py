"""The train loop: one function for every launcher (local, torchrun, SLURM, Ray all end here) and every method.

prepare (resume check, frozen checks, placement, roles, method) -> restore or initialise (the method's
``prepare``, engines, the "before" evaluation, checkpoint 0 | a checkpoint) -> loop {step; hooks;
checkpoint when due or when a hook asks to stop} -> the last checkpoint, ``on_train_end`` (summary).
Logging, grids, the lock heartbeat, evaluation and summary.json are hooks (train/hooks.py); launchers and
methods add theirs through ``train(cfg, hooks=[...])`` without editing this file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from unidad_dist import builtin
from unidad_dist.config import config_from_dict, dump_yaml, flatten, run_dir, to_dict
from unidad_dist.core.io import atomic_write_text
from unidad_dist.device import Runtime, runtime_from_env
from unidad_dist.errors import UserError
from unidad_dist.parallel import engines
from unidad_dist.parallel.placement import setup_placement
from unidad_dist.train import checkpoint
from unidad_dist.train.build import Models, build
from unidad_dist.train.faults import kill_point
from unidad_dist.train.hooks import Hook, Hooks, default_hooks
from unidad_dist.train.runlock import RunLock

# Keys that may change between a run and its resumption (everything else must match). run.dir: a run folder
# that was moved (or copied) resumes where it now is.
RESUME_ALLOWED = ("train.iterations", "checkpoint.", "logging.", "eval.", "run.dist_timeout", "run.lock_stale_s",
                  "run.dir")


@dataclass
class Run:
    """What the loop and its hooks share."""
    cfg: object
    rt: Runtime
    dir: Path
    models: Models
    method: object
    resume_from: Optional[Path]
    frozen: dict
    t_start: float
    phases: dict = field(default_factory=dict)  # wall time by phase (summary.json)
    prepared: dict = field(default_factory=dict)  # what the method's prepare measured

    @property
    def samples_here(self) -> bool:
        """This rank holds the sampler (all ranks when colocated; its side in split placement)."""
        return self.models.holds(self.method.sampler)

    def save(self, iteration: int, hooks: Hook) -> Path:
        path = checkpoint.save(self.dir, self.models, iteration, self.rt, self.method, self.cfg.checkpoint.keep,
                               frozen=self.frozen)
        hooks.on_checkpoint(self, path, iteration)
        return path


def train(cfg, rt: Runtime | None = None, hooks: Optional[list] = None) -> Path:
    """Train (or resume) the run in ``run_dir(cfg)``, holding its lock file throughout. ``hooks`` are added
    after the default ones (metrics, grids, heartbeat, evaluation)."""
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    rdir = run_dir(cfg)
    existed = rdir.exists()
    lock = RunLock(rdir, cfg.run.lock_stale_s)
    lock.acquire(rt)
    try:
        return _train(cfg, rt, rdir, Hooks(default_hooks(lock) + list(hooks or [])))
    finally:
        lock.release()
        if rt.is_main and not existed and rdir.is_dir() and not any(rdir.iterdir()):
            rdir.rmdir()  # a run that failed before writing anything leaves no folder behind


def _train(cfg, rt: Runtime, rdir: Path, hooks: Hooks) -> Path:
    run = prepare(cfg, rt, rdir)
    try:
        start = restore_or_initialise(run, hooks)
        hooks.on_train_start(run, start)
        t0, last_saved, stop = time.time(), start, False
        for it in range(start, cfg.train.iterations):
            kill_point(rt.rank, f"iter:{it}")
            logs = run.method.step(it)
            hooks.on_step_end(run, it, logs)
            done = it + 1
            if hooks.can_stop:  # every rank acts on the same decision
                stop = run.models.exchange.agree_world(hooks.should_stop(run, done))
            if stop or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                run.save(done, hooks)
                last_saved = done
            if stop:
                break
        run.phases["train_s"] = time.time() - t0
        if not stop and last_saved != cfg.train.iterations and cfg.train.iterations > start:
            run.save(cfg.train.iterations, hooks)
        hooks.on_train_end(run, finished=not stop or last_saved == cfg.train.iterations)
    finally:
        hooks.close(run)
        run.models.data.close()
    _barrier(rt)
    return rdir


def prepare(cfg, rt: Runtime, rdir: Path) -> Run:
    """Resume check, frozen-weight check, placement, the roles this rank holds and the method — every input
    problem surfaces here, before anything is written (then config.yaml is)."""
    t_start = time.time()
    resume_from = checkpoint.latest_complete(rdir) if rdir.exists() else None
    if resume_from is not None and (rdir / "config.yaml").is_file():
        changed = check_resume_compatible(yaml.safe_load((rdir / "config.yaml").read_text()), cfg)
        if changed and rt.is_main:
            print(f"resuming {rdir} with changed settings: {', '.join(changed)}")
    frozen = _check_frozen(cfg, rt, resume_from)
    t0 = time.time()
    placement = setup_placement(cfg, rt)  # bad groups fail here
    models = build(cfg, rt, placement=placement)  # each rank builds the roles it holds
    phases = {"build_s": time.time() - t0, **{f"builtin_{n}_s": s for n, s in builtin.BUILD_SECONDS.items()}}
    method = cfg.method(cfg, models, rt)
    if rt.is_main:
        (rdir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(rdir / "config.yaml", dump_yaml(cfg))
    _barrier(rt)
    return Run(cfg, rt, rdir, models, method, resume_from, frozen, t_start, phases)


def restore_or_initialise(run: Run, hooks: Hook) -> int:
    """A fresh run: the method's ``prepare`` (before the engines: a warm start trains the plain network),
    engines, ``on_fresh_start`` (the "before" evaluation), checkpoint 0. A resumed one: engines, then every
    role, the method's state, RNG and data positions from the checkpoint. Returns the first iteration."""
    rt, models = run.rt, run.models
    if run.resume_from is None:
        t0 = time.time()
        run.prepared = run.method.prepare()
        run.phases["prepare_s"] = time.time() - t0
    t0 = time.time()
    engines.attach(models, run.cfg, rt)
    run.phases["engines_s"] = time.time() - t0
    if run.resume_from is None:
        hooks.on_fresh_start(run)
        run.save(0, hooks)
        return 0
    start = checkpoint.load(run.resume_from, models, rt, run.method)  # another world size: universal conversion
    saved_world = int(checkpoint.saved_state(run.resume_from)["world_size"])
    if saved_world != rt.world_size:
        models.data.restore(None, global_counts=checkpoint.saved_state(run.resume_from).get("samples_seen", {}))
    else:
        models.data.restore(checkpoint.load_data_state(run.resume_from, rt.rank))
    if rt.is_main:
        print(f"resumed from {run.resume_from} (iteration {start}"
              + (f", written by {saved_world} ranks, now {rt.world_size})" if saved_world != rt.world_size else ")"))
    return start


def check_resume_compatible(saved: dict, new) -> list[str]:
    """Keys that changed and may change (returned, for a log line); an error for any other change."""
    a, b = flatten(saved), flatten(to_dict(new))
    defaults = flatten(to_dict(type(new)()))
    # a key the saved run did not have yet (an earlier version) is no change while it keeps its default
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not (k not in a and k in defaults and b.get(k) == defaults[k]))
    bad = [k for k in changed if not k.startswith(RESUME_ALLOWED)]
    if bad:
        stages = [k for k in bad if k.endswith(".zero_stage")]
        raise UserError(
            f"run folder already holds a run with different settings ({', '.join(bad[:6])}); "
            "use another run.dir, or restore those values to resume"
            + (f" (a ZeRO stage cannot change on resume: {', '.join(f'{k}={a.get(k)}' for k in stages)} "
               "in the saved run; another world size at the same stage is fine)" if stages else "")
        )
    return changed


def _check_frozen(cfg, rt: Runtime, resume_from: Optional[Path]) -> dict:
    """The frozen weights, by path + sha256 (rank 0 hashes; every rank stops on a mismatch with the run's)."""
    try:
        frozen = checkpoint.frozen_record(cfg) if rt.is_main else {}
    except (UserError, OSError):
        frozen = {}  # a bad path: build reports it, on every rank
    bad = ""
    if resume_from is not None and rt.is_main:
        try:
            checkpoint.check_frozen(checkpoint.saved_state(resume_from).get("frozen", {}), frozen)
        except UserError as e:
            bad = str(e)
    if rt.distributed:
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=rt.device)
        torch.distributed.all_reduce(flag)
        if int(flag.item()) and not bad:
            bad = "a frozen network's weights changed since this run started (see rank 0's message)"
    if bad:
        raise UserError(bad)
    return frozen


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def pick_checkpoint(rdir: Path, iteration: Optional[int] = None) -> Path:
    """The latest complete checkpoint of a run, or the one of ``iteration`` (checked complete)."""
    if iteration is None:
        ckpt = checkpoint.latest_complete(rdir)
        if ckpt is None:
            raise UserError(f"run '{rdir}' has no complete checkpoint yet; train it first "
                            "(train.iterations=0 writes one)")
        return ckpt
    ckpt = rdir / "checkpoints" / checkpoint.ckpt_name(iteration)
    if not ckpt.is_dir():
        have = sorted(int(p.name[5:]) for p in (rdir / "checkpoints").glob("iter_*") if p.is_dir()) \
            if (rdir / "checkpoints").is_dir() else []
        raise UserError(f"run '{rdir}' has no checkpoint of iteration {iteration}; it has {have or 'none'}")
    if not checkpoint.is_complete(ckpt):
        raise UserError(f"checkpoint {ckpt} is incomplete or corrupt (checksum mismatch); pick another --checkpoint")
    return ckpt


def load_run(run: str | Path, rt: Runtime | None = None, use_ema: bool = True, iteration: Optional[int] = None):
    """Rebuild a run's sampler role (plain, on this process) from its folder and the whole weights in its latest
    complete checkpoint (or that of ``iteration``), for sample/export. Works whatever the placement, ZeRO
    stages and world size of the run were: it needs no engine. Returns (cfg, models, method, checkpoint)."""
    rdir = Path(run)
    cfg_file = rdir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml); pass the run.dir of a training run")
    ckpt = pick_checkpoint(rdir, iteration)
    cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    cfg = replace(cfg, placement=type(cfg.placement)())  # one process holds the sampler
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    sampler = cfg.method.sampler
    models = build(cfg, rt, roles={sampler}, checks=False)
    models.to_device(sampler)
    net = models.roles[sampler].module
    net.load_state_dict(checkpoint.load_role_weights(ckpt, sampler, prefer_ema=use_ema, role_net=True))
    net.eval()
    return cfg, models, cfg.method(cfg, models, rt), ckpt
