"""The train loop: one function for every launcher (local, torchrun, SLURM, Ray all end here).

resume? -> build (all inputs checked) -> [warm start, "before" samples, checkpoint 0] -> iterate ->
checkpoint -> final samples, metrics, summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from unidad_dist import builtin
from unidad_dist.config import Config, config_from_dict, dump_yaml, run_dir, to_dict
from unidad_dist.device import Runtime, runtime_from_env
from unidad_dist.errors import UserError
from unidad_dist.eval.metrics import PROXY_FEATURE, all_metrics
from unidad_dist.methods.unidad import UniDAD
from unidad_dist.parallel import engines
from unidad_dist.parallel.placement import ROLES, setup_placement
from unidad_dist.train import checkpoint
from unidad_dist.train.build import build
from unidad_dist.train.logging import RunLogger, save_grid
from unidad_dist.train.faults import kill_point
from unidad_dist.train.runlock import RunLock

# Keys that may change between a run and its resumption (everything else must match). run.dir: a run folder
# that was moved (or copied) resumes where it now is.
RESUME_ALLOWED = ("train.iterations", "checkpoint.", "logging.", "eval.", "run.dist_timeout", "run.lock_stale_s",
                  "run.dir")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_compatible(saved: dict, new: Config) -> list[str]:
    """Keys that changed and may change (returned, for a log line); an error for any other change."""
    a, b = _flatten(saved), _flatten(to_dict(new))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
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


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def _evaluate(method: UniDAD, models, cfg: Config, rt: Runtime) -> tuple[torch.Tensor, dict]:
    """Every rank samples (a ZeRO-3 role's forward is a collective); rank 0 measures."""
    x = method.sample(cfg.eval.num_samples, steps=cfg.eval.steps)
    pixels = models.to_pixels(x).cpu()
    return pixels, (all_metrics(pixels, models.data.images) if rt.is_main else {})


def train(cfg: Config, rt: Runtime | None = None) -> Path:
    """Train (or resume) the run in ``run_dir(cfg)``, holding its lock file throughout."""
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    rdir = run_dir(cfg)
    existed = rdir.exists()
    lock = RunLock(rdir, cfg.run.lock_stale_s)
    lock.acquire(rt)
    try:
        return _train(cfg, rt, rdir, lock)
    finally:
        lock.release()
        if rt.is_main and not existed and rdir.is_dir() and not any(rdir.iterdir()):
            rdir.rmdir()  # a run that failed before writing anything leaves no folder behind


def _train(cfg: Config, rt: Runtime, rdir: Path, lock: RunLock) -> Path:
    t_start = time.time()
    resume_from = checkpoint.latest_complete(rdir) if rdir.exists() else None
    if resume_from is not None:
        saved_cfg = rdir / "config.yaml"
        if saved_cfg.is_file():
            changed = check_resume_compatible(yaml.safe_load(saved_cfg.read_text()), cfg)
            if changed and rt.is_main:
                print(f"resuming {rdir} with changed settings: {', '.join(changed)}")
    # the frozen teachers, by path + sha256 (rank 0 hashes; every rank stops on a mismatch)
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
            bad = "a frozen teacher's weights changed since this run started (see rank 0's message)"
    if bad:
        raise UserError(bad)
    phases: dict = {}
    t0 = time.time()
    placement = setup_placement(cfg, rt)  # bad groups fail here
    # every input problem surfaces here, before anything is written; each rank builds the roles it holds
    models = build(cfg, rt, roles={r for r in ROLES if placement.holds(r)},
                   dp=(placement.dp_rank, placement.dp_size))
    phases["build_s"] = time.time() - t0
    for name, secs in builtin.BUILD_SECONDS.items():
        phases[f"builtin_{name}_s"] = secs
    method = UniDAD(cfg, models, rt, placement)
    samples_here = placement.holds("student")  # the student's ranks sample (all ranks when colocated)
    if rt.is_main:
        (rdir / "samples").mkdir(parents=True, exist_ok=True)
        tmp = rdir / ".config.yaml.tmp"
        tmp.write_text(dump_yaml(cfg))
        tmp.replace(rdir / "config.yaml")
    _barrier(rt)
    before_file = rdir / "eval_before.json"

    def _save(iteration: int) -> None:
        checkpoint.save(rdir, models, iteration, rt, method.name, cfg.checkpoint.keep, placement,
                        data_state=models.data.state(), samples_seen=models.data.samples_seen(), frozen=frozen)

    ws: dict = {}
    if resume_from is None and samples_here and cfg.student.warm_start > 0:
        t0 = time.time()
        for role in (models.student, models.source_teacher):  # staged on the host until their engines
            if role is not None:
                role.module.to(rt.device)
        ws = method.warm_start(progress=cfg.logging.progress)  # on the plain student, before its engine
        phases["warm_start_s"] = time.time() - t0
    t0 = time.time()
    engines.attach(models, cfg, rt, placement)
    phases["engines_s"] = time.time() - t0
    if resume_from is not None:
        start = checkpoint.load(resume_from, models, rt)  # another world size: via the universal conversion
        saved = checkpoint.saved_state(resume_from)
        saved_world = int(saved["world_size"])
        if saved_world != rt.world_size:
            models.data.restore(None, global_counts=saved.get("samples_seen", {}))
        else:
            models.data.restore(checkpoint.load_data_state(resume_from, rt.rank))
        if rt.is_main:
            print(f"resumed from {resume_from} (iteration {start}"
                  + (f", written by {saved_world} ranks, now {rt.world_size})" if saved_world != rt.world_size else ")"))
    else:
        start = 0
        t0 = time.time()
        if samples_here:
            _, teacher_x, _ = method.teacher_sample(cfg.logging.grid_size, steps=25, purpose="grid")
            pixels, before = _evaluate(method, models, cfg, rt)
        if rt.is_main:
            save_grid(models.data.images[: cfg.logging.grid_size], rdir / "samples" / "target_shots.png")
            save_grid(models.to_pixels(teacher_x).cpu(), rdir / "samples" / "source_teacher.png")
            save_grid(pixels[: cfg.logging.grid_size], rdir / "samples" / "student_before.png")
            before.update(ws)
            before_file.write_text(json.dumps(before, indent=2))
        phases["eval_before_s"] = time.time() - t0
        _save(0)
    logger = RunLogger(rdir, cfg, rt.is_main, cfg.train.iterations, start)
    t0 = time.time()
    last_saved = start
    try:
        for it in range(start, cfg.train.iterations):
            kill_point(rt.rank, f"iter:{it}")
            logs = method.step(it)
            lock.heartbeat()
            logger.advance()
            done = it + 1
            if it % cfg.logging.every == 0 or done == cfg.train.iterations:
                logs.update(models.data.logs())
                logger.log(it, placement.merge_logs(logs))
            if cfg.logging.sample_every and done % cfg.logging.sample_every == 0 and samples_here:
                x = method.sample(cfg.logging.grid_size)  # every rank: a ZeRO-3 forward is a collective
                if rt.is_main:
                    logger.image("samples", save_grid(models.to_pixels(x).cpu(),
                                                      rdir / "samples" / f"iter_{done:07d}.png"))
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                _save(done)
                last_saved = done
    finally:
        logger.close()
        models.data.close()
    phases["train_s"] = time.time() - t0
    if last_saved != cfg.train.iterations and cfg.train.iterations > start:
        _save(cfg.train.iterations)
    t0 = time.time()
    if samples_here:
        pixels, after = _evaluate(method, models, cfg, rt)
    if rt.is_main:
        save_grid(pixels[: cfg.logging.grid_size], rdir / "samples" / "student_after.png")
        before = json.loads(before_file.read_text()) if before_file.is_file() else {}
        phases["eval_after_s"] = time.time() - t0
        phases["total_s"] = time.time() - t_start
        summary = {
            "iterations": cfg.train.iterations,
            "student_steps": cfg.student.steps,
            "a": cfg.algorithm.a,
            "proxy_feature": PROXY_FEATURE,
            "proxy_distance_before": before.get("proxy_distance"),
            "proxy_distance_after": after["proxy_distance"],
            "copy_rate": after["copy_rate"],
            "diversity": after["diversity"],
            "copy_rate_before": before.get("copy_rate"),
            "diversity_before": before.get("diversity"),
            "num_samples": cfg.eval.num_samples,
            "num_shots": int(models.data.num_shots),
            "wall_time_s": phases,
        }
        if before.get("proxy_distance"):
            summary["proxy_distance_ratio"] = after["proxy_distance"] / before["proxy_distance"]
        tmp = rdir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(rdir / "summary.json")
    _barrier(rt)
    return rdir


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
    """Rebuild a run's student (plain, on this process) from its folder and the whole weights in its latest
    complete checkpoint (or that of ``iteration``), for sample/export. Works whatever the placement, ZeRO
    stages and world size of the run were: it needs no engine."""
    from dataclasses import replace

    from unidad_dist.config import PlacementConfig

    rdir = Path(run)
    cfg_file = rdir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml); pass the run.dir of a training run")
    ckpt = pick_checkpoint(rdir, iteration)
    cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    cfg = replace(cfg, placement=PlacementConfig())  # one process holds the student
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    models = build(cfg, rt, roles={"student"}, checks=False)
    models.student.module.to(rt.device)
    models.student.module.load_state_dict(checkpoint.load_student_weights(ckpt, prefer_ema=use_ema, role_net=True))
    models.student.module.eval()
    return cfg, models, UniDAD(cfg, models, rt), ckpt
