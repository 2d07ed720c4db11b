"""The train loop: one function for every launcher (local, torchrun, SLURM, Ray all end here) and every method.

prepare (resume check, frozen checks, placement, roles, method) -> restore or initialise (the method's
``prepare``, engines, the "before" evaluation, checkpoint 0 | a checkpoint) -> loop {step; hooks;
checkpoint when due or when a hook asks to stop} -> the last checkpoint, ``on_train_end`` (summary).
Logging, grids, the lock heartbeat, evaluation and summary.json are hooks (train/hooks.py); launchers and
methods add theirs through ``train(cfg, hooks=[...])`` without editing this file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from unidad_dist import builtin
from unidad_dist.config import batch_for_world, config_from_dict, data_parallel_size, dump_yaml, flatten, run_dir, to_dict
from unidad_dist.core.io import atomic_write_text
from unidad_dist.device import Runtime, deterministic_kernels, runtime_from_env
from unidad_dist.errors import CheckpointGone, StoppedBySignal, UserError
from unidad_dist.models.conditioning import fill_prompt
from unidad_dist.parallel import engines
from unidad_dist.parallel.placement import setup_placement
from unidad_dist.train import checkpoint
from unidad_dist.train.build import Models, build
from unidad_dist.train.faults import kill_point
from unidad_dist.train.hooks import Hook, Hooks, default_hooks
from unidad_dist.train.logging import TRAIN_LOG, TrainLog
from unidad_dist.train.runlock import RunLock
from unidad_dist.train.signals import SignalStop

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# Keys that may change between a run and its resumption (everything else must match). run.dir: a run folder
# that was moved (or copied) resumes where it now is.
RESUME_ALLOWED = ("train.iterations", "checkpoint.", "logging.", "eval.", "run.dist_timeout", "run.lock_stale_s",
                  "run.signal_grace_s", "run.discard_damaged", "run.dir", "run.deterministic")


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
    last_save_s: float = 0.0  # wall seconds training stood still for the latest save (time/checkpoint_s)

    writer: Optional[checkpoint.AsyncWriter] = None  # checkpoint.async: the background writer
    _waited_s: float = 0.0  # the last wait for a background write

    @property
    def samples_here(self) -> bool:
        """This rank holds the sampler (all ranks when colocated; its side in split placement)."""
        return self.models.holds(self.method.sampler)

    def save(self, iteration: int, hooks: Hook) -> None:
        """Checkpoint ``iteration`` (every rank). ``checkpoint.async``: the previous checkpoint is waited for
        (and reported to ``on_checkpoint``), this one is staged in host memory and written in the background —
        ``wait_saves`` publishes it. ``last_save_s``: how long training stood still for it."""
        self.wait_saves(hooks)
        t0 = time.perf_counter() - self._waited_s  # the stall: waiting for the previous write, staging this one
        with self._write_errors(iteration):
            if self.cfg.checkpoint.async_:
                if self.writer is None:
                    self.writer = checkpoint.AsyncWriter(self.rt)
                publish = checkpoint.stage(self.dir, self.models, iteration, self.rt, self.method,
                                           self.cfg.checkpoint.keep, frozen=self.frozen, stager=self.writer.stager,
                                           group=self.writer.group(), gate=self.writer.gate)
                self.writer.start(publish, iteration)
                self.last_save_s = time.perf_counter() - t0
                return
            path = checkpoint.save(self.dir, self.models, iteration, self.rt, self.method, self.cfg.checkpoint.keep,
                                   frozen=self.frozen)
        self.last_save_s = time.perf_counter() - t0
        hooks.on_checkpoint(self, path, iteration)

    def wait_saves(self, hooks: Optional[Hook]) -> None:
        """Every rank: wait for the checkpoint being written in the background, then report it to the hooks
        (``None``: a failing run only waits, so what is written gets published)."""
        self._waited_s = 0.0
        if self.writer is None or not self.writer.busy:
            return
        if hooks is None:
            try:
                self.writer.wait()
            except Exception as e:  # noqa: BLE001 - the error that ends the run is the one to show
                warnings.warn(f"the checkpoint being written when the run failed was not published ({e})")
            return
        t0 = time.perf_counter()
        with self._write_errors(self.writer.iteration):
            path, iteration = self.writer.wait()
        self._waited_s = time.perf_counter() - t0
        hooks.on_checkpoint(self, path, iteration)

    @contextlib.contextmanager
    def _write_errors(self, iteration: int):
        try:
            yield
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            last = checkpoint.latest_complete(self.dir)
            raise UserError(
                f"cannot write checkpoint {checkpoint.ckpt_name(iteration)} in {self.dir} ({e.strerror}); the run's "
                f"state is safe: {'checkpoint ' + last.name if last else 'no checkpoint'} is intact and nothing published was "
                "changed — free space (or make the folder writable) and run the same command again to resume"
            ) from None


def train(cfg, rt: Runtime | None = None, hooks: Optional[list] = None) -> Path:
    """Train (or resume) the run in ``run_dir(cfg)``, holding its lock file throughout. ``hooks`` are added
    after the default ones (metrics, grids, heartbeat, evaluation, the signal stop). A SIGTERM / SIGINT /
    SIGHUP stops every rank at the next iteration boundary (train/signals.py) and raises ``StoppedBySignal``
    once the checkpoint is written and the lock released. ``run.deterministic``: deterministic kernels throughout."""
    with deterministic_kernels(cfg.run.deterministic):
        return _train_in_folder(cfg, rt, hooks)


def _train_in_folder(cfg, rt: Runtime | None, hooks: Optional[list]) -> Path:
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    rdir = run_dir(cfg)
    existed = rdir.exists()
    stop_signal = SignalStop(rt.rank)
    with stop_signal.installed():
        lock = RunLock(rdir, cfg.run.lock_stale_s)
        lock.acquire(rt)
        # rank 0's output goes to <run>/train.log too, from the moment the run is accepted (prepare passed):
        # a start refused for bad input writes nothing into the folder
        log = TrainLog(rdir / TRAIN_LOG) if rt.is_main else None
        outcome = {"outcome": "failed"}
        try:
            with log or contextlib.nullcontext():
                try:
                    stopped_at = _train(cfg, rt, rdir, Hooks(default_hooks(lock) + [stop_signal] + list(hooks or [])),
                                        stop_signal, log)
                    outcome = {"outcome": "finished" if stopped_at is None else "stopped",
                               **({"signal": signal.Signals(stop_signal.signum).name}
                                  if stop_signal.stopped_at is not None and stop_signal.signum else {})}
                except BaseException as e:
                    outcome = {"outcome": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
                    raise
        finally:
            lock.release()
            if rt.is_main and not existed and rdir.is_dir() and not any(rdir.iterdir()):
                rdir.rmdir()  # a run that failed before writing anything leaves no folder behind
            if log is not None and log.committed:
                _record_outcome(rdir, outcome)
    if stop_signal.stopped_at is not None:
        signum = stop_signal.signum or signal.SIGTERM  # another rank received it
        saved = (f"checkpoint {checkpoint.ckpt_name(stop_signal.stopped_at)} written" if cfg.checkpoint.on_signal
                 else "no checkpoint written (checkpoint.on_signal=false)")
        raise StoppedBySignal(signum, f"stopped by {signal.Signals(signum).name} after iteration "
                                      f"{stop_signal.stopped_at} of {cfg.train.iterations}; {saved}; run the same "
                                      "command again to resume")
    return rdir


OUTCOME = "outcome.json"  # how the last process that held the run ended (`unidad-dist status`)


def _record_outcome(rdir: Path, outcome: dict) -> None:
    last = checkpoint.latest_complete(rdir)
    try:
        atomic_write_text(rdir / OUTCOME, json.dumps({**outcome, "time": time.time(), "checkpoint": last.name
                                                      if last else None}, indent=2))
    except OSError:
        pass  # a full or read-only disk: the error that ended the run says so


def say(rt: Runtime, text: str) -> None:
    """One line per phase from rank 0, so a start that takes minutes is never silent."""
    if rt.is_main:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _train(cfg, rt: Runtime, rdir: Path, hooks: Hooks, stop_signal: SignalStop,
           log: Optional[TrainLog] = None) -> Optional[int]:
    """The run; the iteration it stopped at when a hook stopped it (a signal, a launcher's request), else None."""
    run = prepare(cfg, rt, rdir)
    if log is not None:
        log.commit()  # the run is accepted: what was printed so far, and from now on, goes to train.log
    try:
        start = restore_or_initialise(run, hooks)
        if start < cfg.train.iterations:
            say(rt, f"training: iterations {start + 1}-{cfg.train.iterations}")
        hooks.on_train_start(run, start)
        t0, last_saved, stop, done = time.time(), start, False, start
        # a stop asked for before the first iteration (while building, warm starting) stops here
        if start < cfg.train.iterations and run.models.exchange.agree_world(stop_signal.signum is not None):
            stop_signal.stopped_at, stop = start, True
        for it in range(start, start if stop else cfg.train.iterations):
            kill_point(rt.rank, f"iter:{it}")
            logs = run.method.step(it)
            hooks.on_step_end(run, it, logs)
            done = it + 1
            if hooks.can_stop:  # every rank acts on the same decision
                stop = run.models.exchange.agree_world(hooks.should_stop(run, done))
            by_signal = stop and run.models.exchange.agree_world(stop_signal.signum is not None)
            save_at_stop = stop and (cfg.checkpoint.on_signal or not by_signal)
            if save_at_stop or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                run.save(done, hooks)
                last_saved = done
            if stop:
                if by_signal:
                    stop_signal.stopped_at = done
                break
        run.phases["train_s"] = time.time() - t0
        say(rt, f"{'stopped at' if stop else 'trained to'} iteration {done} ({run.phases['train_s']:.0f} s of "
                "training); writing the last checkpoint, evaluating, summarising")
        if not stop and last_saved != cfg.train.iterations and cfg.train.iterations > start:
            run.save(cfg.train.iterations, hooks)
        run.wait_saves(hooks)  # checkpoint.async: the last one is published before the run ends or stops
        hooks.on_train_end(run, finished=not stop or last_saved == cfg.train.iterations)
    except KeyboardInterrupt:
        if run.writer is not None:
            run.writer.abandon()  # a second signal interrupts at once: a checkpoint being written is not published
        raise
    except BaseException:
        run.wait_saves(None)  # a failing run: the checkpoint being written still gets published
        raise
    finally:
        hooks.close(run)
        run.models.data.close()
    _barrier(rt)
    return done if stop and done < cfg.train.iterations else None  # a stop at the last iteration finished it


def prepare(cfg, rt: Runtime, rdir: Path) -> Run:
    """Resume check, frozen-weight check, placement, the roles this rank holds and the method — every input
    problem surfaces here, before anything is written (then config.yaml is)."""
    t_start = time.time()
    resume_from = checkpoint.latest_complete(rdir) if rdir.exists() else None
    if resume_from is None and checkpoint.all_checkpoints(rdir):
        _damaged_run(cfg, rt, rdir)  # never silently start over on top of a run
    if resume_from is not None and (rdir / "config.yaml").is_file():
        changed = check_resume_compatible(yaml.safe_load((rdir / "config.yaml").read_text()), cfg)
        if changed and rt.is_main:
            print(f"resuming {rdir} with changed settings: {', '.join(changed)}")
    say(rt, f"{'resuming' if resume_from else 'starting'} run {rdir} ({cfg.method.name}, {rt.world_size} "
            f"rank{'s' if rt.world_size > 1 else ''} on {rt.device.type}, {rt.backend})")
    frozen = _check_frozen(cfg, rt, resume_from)
    recipe_cfg, cfg = cfg, batch_for_world(cfg, rt.world_size)  # config.yaml keeps the recipe's values
    if cfg is not recipe_cfg:
        dp = data_parallel_size(cfg, rt.world_size)
        say(rt, f"global batch {cfg.train.global_batch_size} = {dp} rank(s)"
                + (" per side" if dp != rt.world_size else "") + f" x micro-batch {cfg.train.batch_size} x "
                f"{cfg.train.global_batch_size // (dp * cfg.train.batch_size)} accumulation step(s) per trainable role")
    t0 = time.time()
    placement = setup_placement(cfg, rt)  # bad groups fail here
    say(rt, f"building roles: {', '.join(s.name for s in cfg.method.roles(cfg))}, and the data")
    models = build(cfg, rt, placement=placement)  # each rank builds the roles it holds
    phases = {"build_s": time.time() - t0, **{f"builtin_{n}_s": s for n, s in builtin.BUILD_SECONDS.items()}}
    say(rt, f"built in {phases['build_s']:.0f} s")
    method = cfg.method(cfg, models, rt)
    if rt.is_main:
        (rdir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(rdir / "config.yaml", dump_yaml(recipe_cfg))
        if models.text is not None:  # what sample/export draw with, without the data source
            atomic_write_text(rdir / SAMPLING_PROMPTS, json.dumps(models.data.prompts))
    _barrier(rt)
    return Run(cfg, rt, rdir, models, method, resume_from, frozen, t_start, phases)


def restore_or_initialise(run: Run, hooks: Hook) -> int:
    """A fresh run: the method's ``prepare`` (before the engines: a warm start trains the plain network),
    engines, ``on_fresh_start`` (the "before" evaluation), checkpoint 0. A resumed one: engines, then every
    role, the method's state, RNG and data positions from the checkpoint. Returns the first iteration."""
    rt, models = run.rt, run.models
    if run.resume_from is None:
        t0 = time.time()
        say(rt, f"preparing {run.cfg.method.name} (its warm starts, if the recipe asks for any)")

        def initial():  # the sampler as the run found it, before a warm start changes it
            say(rt, f"evaluating the {run.method.sampler} before its warm start")
            hooks.on_sampler_initial(run)

        run.prepared = run.method.prepare(initial=initial)
        run.phases["prepare_s"] = time.time() - t0
    t0 = time.time()
    say(rt, f"starting DeepSpeed engines: {', '.join(engines.engine_roles(run.cfg)) or 'none'}")
    engines.attach(models, run.cfg, rt)
    run.phases["engines_s"] = time.time() - t0
    _write_engine_configs(run)
    if run.resume_from is None:
        say(rt, "evaluating before training, writing checkpoint 0")
        hooks.on_fresh_start(run)
        run.save(0, hooks)
        return 0
    say(rt, f"loading {run.resume_from}")
    start = _load_or_fall_back(run)
    saved_world = int(checkpoint.saved_state(run.resume_from)["world_size"])
    if saved_world != rt.world_size:
        models.data.restore(None, global_counts=checkpoint.saved_state(run.resume_from).get("samples_seen", {}))
    else:
        models.data.restore(checkpoint.load_data_state(run.resume_from, rt.rank))
    if rt.is_main:
        print(f"resumed from {run.resume_from} (iteration {start}"
              + (f", written by {saved_world} ranks, now {rt.world_size})" if saved_world != rt.world_size else ")"))
    return start


def _write_engine_configs(run: Run) -> None:
    """``ds_config_<role>.json``: the DeepSpeed config each engine was started with (written by the role's
    first rank), so a ``<role>.deepspeed_config`` override starts from what is really there."""
    for name, role in run.models.roles.items():
        config = getattr(role, "config", None)
        placement = getattr(run.models, "placement", None)
        if config is not None and (placement.leader(name) if placement is not None else run.rt.is_main):
            atomic_write_text(run.dir / f"ds_config_{name}.json", json.dumps(config, indent=2, default=str) + "\n")


def _load_or_fall_back(run: Run) -> int:
    """Load the run's latest complete checkpoint; one that verifies but cannot be loaded (its files were
    replaced and the manifest re-hashed, say) is skipped, on every rank, for the next older complete one —
    as a checksum failure is. Nothing in it is executed: every file is loaded safely (weights_only)."""
    older = [c for c in reversed(checkpoint.all_checkpoints(run.dir)) if c.name < run.resume_from.name]
    for ckpt in [run.resume_from] + older:
        if ckpt is not run.resume_from and not checkpoint.is_complete(ckpt):
            continue
        why = ""
        try:
            start = checkpoint.load(ckpt, run.models, run.rt, run.method)  # another world size: universal conversion
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not run.models.exchange.agree_world(bool(why)):
            run.resume_from = ckpt
            return start
        warnings.warn(f"checkpoint {ckpt} verifies but cannot be loaded ({why or 'on another rank'}); falling back "
                      "to an older one")
    raise UserError(f"no checkpoint of {run.dir} can be loaded (see the warnings); start a fresh run with "
                    "run.dir=<new folder>, or run.discard_damaged=true to move this one aside")


def check_resume_compatible(saved: dict, new) -> list[str]:
    """Keys that changed and may change (returned, for a log line); an error for any other change."""
    a, b = flatten(saved), flatten(to_dict(new))
    defaults = flatten(to_dict(type(new)()))
    # a key the saved run did not have yet (an earlier version) is no change while it keeps its default
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not (k not in a and k in defaults and b.get(k) == defaults[k]))
    bad = [k for k in changed if not k.startswith(RESUME_ALLOWED)]
    decaying = sorted(k for k, v in b.items() if k.endswith(".optimizer.schedule") and v != "constant")
    if "train.iterations" in changed and decaying:
        raise UserError(
            f"train.iterations changed ({a.get('train.iterations')} -> {b.get('train.iterations')}) on resume, but "
            f"{', '.join(decaying)} decays the learning rate to train.iterations: the rate would jump where the run "
            "resumes. Restore train.iterations to resume, or start a fresh run (another run.dir) for the longer one")
    if bad:
        stages = [k for k in bad if k.endswith(".zero_stage")]
        raise UserError(
            f"run folder already holds a run with different settings ({', '.join(bad[:6])}); "
            "use another run.dir, or restore those values to resume"
            + (f" (a ZeRO stage cannot change on resume: {', '.join(f'{k}={a.get(k)}' for k in stages)} "
               "in the saved run; another world size at the same stage is fine)" if stages else "")
        )
    return changed


def _damaged_run(cfg, rt: Runtime, rdir: Path) -> None:
    """A run folder with checkpoints of which none verifies: stop, naming it (nothing is written), or with
    ``run.discard_damaged=true`` move everything it holds into ``<run>/damaged-<time>/`` and start fresh."""
    names = [p.name for p in checkpoint.all_checkpoints(rdir)]
    if not cfg.run.discard_damaged:
        raise UserError(
            f"run folder {rdir} holds checkpoints ({', '.join(names[-4:])}) but none is complete (missing files or "
            "checksum mismatch), so it cannot resume; nothing was changed. Start a fresh run in another folder with "
            f"run.dir=<new folder>, or set run.discard_damaged=true to move its contents into {rdir}/damaged-<time>/ "
            "and start over there")
    if rt.is_main:
        aside = rdir / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for p in sorted(rdir.iterdir()):
            if p != aside and p.name != "run.lock" and not p.name.startswith("damaged-"):
                p.rename(aside / p.name)
        print(f"run.discard_damaged: moved the damaged run ({', '.join(names[-4:])}) into {aside}; starting over")
    _barrier(rt)


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
        have = sorted(checkpoint.iteration_of(p) for p in (rdir / "checkpoints").glob("iter_*") if p.is_dir()) \
            if (rdir / "checkpoints").is_dir() else []
        raise CheckpointGone(f"run '{rdir}' has no checkpoint of iteration {iteration}; it has {have or 'none'}")
    if not checkpoint.is_complete(ckpt):
        if not ckpt.is_dir():  # pruned while its checksums were read
            raise CheckpointGone(f"checkpoint {ckpt} was removed while it was read (checkpoint.keep pruned it); "
                                 "pick a newer --checkpoint")
        raise UserError(f"checkpoint {ckpt} is incomplete or corrupt (checksum mismatch); pick another --checkpoint")
    return ckpt


def load_run(run: str | Path, rt: Runtime | None = None, use_ema: bool = True, iteration: Optional[int] = None):
    """Rebuild a run's sampler role (plain, on this process) from its folder and the whole weights in its latest
    complete checkpoint (or that of ``iteration``), for sample/export. Works whatever the placement, ZeRO
    stages and world size of the run were: it needs no engine, and no training data (the run's sampling
    prompts are read from its folder, so moved data or a ``pipe:`` source is never touched). On a live run,
    a checkpoint pruned while it is read is replaced by the newest complete one. Returns (cfg, models,
    method, checkpoint)."""
    rdir = Path(run)
    cfg_file = rdir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"'{run}' is not a run folder (no config.yaml); pass the run.dir of a training run")
    pick_checkpoint(rdir, iteration)  # a run with nothing to load fails before anything is built
    try:
        cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    except UserError as e:  # a folder written by another version (a key since removed or renamed)
        raise UserError(f"{cfg_file} does not load with this version of unidad_dist ({e}); sample or export the "
                        "run with the version that trained it, or change that entry in its config.yaml to this "
                        "version's (README, \"Recipe keys\")") from None
    cfg = replace(cfg, placement=type(cfg.placement)())  # one process holds the sampler
    rt = rt or runtime_from_env(cfg.run.dist_timeout)
    sampler = cfg.method.sampler
    models = build(cfg, rt, roles={sampler}, checks=False, sampling_prompts=sampling_prompts(rdir, cfg))
    models.to_device(sampler)
    net = models.roles[sampler].module
    for attempt in range(5):
        ckpt = pick_checkpoint(rdir, iteration)
        try:
            weights = checkpoint.load_role_weights(ckpt, sampler, prefer_ema=use_ema, role_net=True)
            # the method's state too (e.g. a trained token's embedding, which sampling reads), read with the
            # weights before a live run's pruning can remove the checkpoint
            method_state = checkpoint.read_method_state(ckpt, cfg.method, rt)
            break
        except FileNotFoundError:
            if ckpt.is_dir() and checkpoint.is_complete(ckpt):
                raise
            if iteration is not None:
                raise CheckpointGone(f"checkpoint {ckpt} was removed while it was read (checkpoint.keep pruned it); "
                                     "pick a newer --checkpoint") from None
    else:
        raise UserError(f"the checkpoints of {rdir} kept being pruned while they were read; try again, or pass "
                        "--checkpoint of one that checkpoint.keep retains")
    net.load_state_dict(weights)
    net.eval()
    method = cfg.method(cfg, models, rt)
    if method_state is not None:
        method.load_state_dict(method_state)
    return cfg, models, method, ckpt


SAMPLING_PROMPTS = "sampling_prompts.json"


def sampling_prompts(rdir: Path, cfg) -> list[str]:
    """The prompts a run's samples are drawn with: saved in its folder when it started (text models), else
    the recipe's own prompts (or the target prompt) — never read from its data source."""
    f = Path(rdir) / SAMPLING_PROMPTS
    if f.is_file():
        prompts = json.loads(f.read_text())
        if prompts:
            return list(prompts)
    t = cfg.data.target
    return [fill_prompt(p, t.rare_token, t.class_name) for p in cfg.data.source.prompts] or \
        [fill_prompt(t.prompt, t.rare_token, t.class_name)]
