"""``unidad-dist evaluate``: a run's checkpoints judged after (or beside) training, in a separate process.

Each checkpoint's sampler is rebuilt as ``sample`` does (train.loop.load_run: no engine, no training data),
samples ``eval.num_samples`` images (noise keyed by (run.seed, sample index)), and is measured: the
demo-scale proxies (labelled as proxies) and the paper's metrics (eval/paper.py; unavailable ones say which
file they need). The result goes to ``<run>/eval/<iteration>.json``; the run's checkpoints are only read,
and one pruned by ``checkpoint.keep`` while it is read is skipped with a note.

Started on several ranks (torchrun, srun), every rank draws its share of the samples (train/sampling.py: the
same images as one rank) and rank 0 measures and writes; rank 0 also picks the checkpoints (``--all``,
``--watch``), so every rank evaluates the same ones. The others wait for rank 0's metrics inside a
collective, hence the long process-group timeout (EVAL_DIST_TIMEOUT).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.builtin import resolve_path
from unidad_dist.config import SELECTABLE, deep_merge, from_dict, parse_overrides, to_dict, validate_eval
from unidad_dist.core.io import atomic_write_text
from unidad_dist.data.shards import decode_sample, is_shard_folder, open_shards
from unidad_dist.data.target import load_target_folder
from unidad_dist.device import Runtime, runtime_from_env
from unidad_dist.errors import CheckpointGone, UserError
from unidad_dist.eval import paper
from unidad_dist.train import checkpoint
from unidad_dist.train.loop import load_run, pick_checkpoint
from unidad_dist.train.sampling import EVAL_DIST_TIMEOUT, any_rank, eval_prompts, from_rank0, measure, sample_all
from unidad_dist.train.status import run_status

EVAL_DIR = "eval"


def target_shots(cfg, resolution: int) -> torch.Tensor:
    """The run's few-shot target images in [-1, 1] (a folder, or the first 64 samples of a shard folder, as
    the run's own evaluation reads them)."""
    t = cfg.data.target
    if t.path is None:
        raise UserError("the run's recipe names no data.target.path: the few-shot metrics need the target shots")
    path = resolve_path(t.path)
    if path.exists() and is_shard_folder(path):
        shards = open_shards(t.path, t.shards, "images", "data.target.path")
        images = []
        for i in range(shards.num_shards):
            images += [s["image"] for s in map(decode_sample, shards.read_shard(i)) if "image" in s]
            if len(images) >= 64:
                break
        if not images:
            raise UserError(f"data.target.path '{t.path}': no readable image in its shards")
        return torch.stack(images[:64])
    return load_target_folder(t.path, resolution)[0]


def checkpoints_to_evaluate(rdir: Path, which: Optional[int], every: bool,
                            rt: Optional[Runtime] = None) -> list[Optional[int]]:
    """``[which]``, or with ``every`` the complete checkpoints as rank 0 sees them."""
    if every:
        its = [checkpoint.iteration_of(p) for p in checkpoint.all_checkpoints(rdir) if checkpoint.is_complete(p)]
        its = from_rank0(rt, its) if rt is not None else its
        if not its:
            raise UserError(f"run '{rdir}' has no complete checkpoint to evaluate")
        return its
    return [which]


def load_sampler(rdir: Path, rt: Runtime, use_ema: bool = True, iteration: Optional[int] = None):
    """``load_run`` on every rank, of one checkpoint: rank 0's choice (the latest complete one when
    ``iteration`` is None), and a checkpoint pruned under any rank is CheckpointGone on all of them."""
    if rt.world_size == 1:
        return load_run(rdir, rt=rt, use_ema=use_ema, iteration=iteration)
    picked = None
    if rt.rank == 0:  # rank 0 alone looks (another node's view may lag), every rank gets its answer
        try:
            picked = (checkpoint.iteration_of(pick_checkpoint(rdir, iteration)), None)
        except (CheckpointGone, UserError) as e:
            picked = (None, e)
    iteration, error = from_rank0(rt, picked)
    if error is not None:
        raise error
    gone = None
    try:
        loaded = load_run(rdir, rt=rt, use_ema=use_ema, iteration=iteration)
    except CheckpointGone as e:
        gone = e
    if any_rank(rt, gone is not None):
        raise gone or CheckpointGone(f"checkpoint {checkpoint.ckpt_name(iteration)} of {rdir} was removed while "
                                     "another rank read it (checkpoint.keep pruned it)")
    return loaded


def with_eval_overrides(cfg, overrides: list[str]):
    """The run's config with ``eval.*`` overrides on top (weights, reference statistics; paths relative to
    the working directory); any other key is an error: evaluation does not change what was trained."""
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("eval.")]
    if bad:
        raise UserError(f"evaluate takes only eval.* overrides (e.g. eval.fid_stats=stats.npz), not {', '.join(bad)}")
    if not overrides:
        return cfg
    section = deep_merge(to_dict(cfg)["eval"], parse_overrides(overrides).get("eval", {}))
    ev = from_dict(type(cfg.eval), section, "eval.")
    validate_eval(ev)
    return replace(cfg, eval=ev)


def evaluate_checkpoint(rdir: Path, iteration: Optional[int], steps: Optional[int] = None,
                        num: Optional[int] = None, use_ema: bool = True, overrides: Optional[list[str]] = None,
                        rt: Optional[Runtime] = None) -> Optional[dict]:
    """Sample from one checkpoint on every rank (train/sampling.py) and measure on rank 0; writes and returns
    the eval/<iteration>.json record there (None on the other ranks)."""
    t0 = time.time()
    rt = rt or runtime_from_env(EVAL_DIST_TIMEOUT)
    cfg, models, method, ckpt = load_sampler(rdir, rt, use_ema=use_ema, iteration=iteration)
    cfg = with_eval_overrides(cfg, list(overrides or []))
    if cfg.eval.fid_stats:
        paper.FidStats.load(cfg.eval.fid_stats)  # a bad reference file stops here, before any sampling
    it = checkpoint.iteration_of(ckpt)
    n = num or cfg.eval.num_samples
    k = steps or cfg.eval.steps or method.sampling_info()["steps"]
    prompts = eval_prompts(cfg, models)  # text models: sample i takes prompt i mod len
    u8 = sample_all(method, models, rt, n, steps=k, seed=cfg.run.seed, prompts=prompts, batch=cfg.eval.batch,
                    use_ema=use_ema)
    if rt.rank != 0:
        return None
    record = {
        "iteration": it, "checkpoint": ckpt.name, "steps": k, "num_samples": n, "weights": "ema" if use_ema else "raw",
        "ranks": rt.world_size, "sample_bits": 8,  # measured on the 8-bit images (as saved PNGs)
        **measure(cfg, models, u8, target_shots(cfg, models.resolution), k, prompts, rt.device),
    }
    record["seconds"] = round(time.time() - t0, 2)
    # the recipe's own settings write eval/<iteration>.json (what best.json is chosen from); a quick look with
    # other --steps/--num/--raw gets a name of its own and never moves the best
    default = (n, k, use_ema) == (cfg.eval.num_samples, cfg.eval.steps or method.sampling_info()["steps"], True)
    out = rdir / EVAL_DIR / (f"{it}.json" if default else f"{it}-k{k}-n{n}-{record['weights']}.json")
    record["record"] = str(out.relative_to(rdir))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2))
    if cfg.eval.select:
        record["best"] = update_best(rdir, record, cfg.eval.select) if default else {
            "note": "not a candidate: measured with other --steps/--num/--raw than the recipe's eval settings"}
    return record


def selected_value(record: dict, metric: str) -> tuple[Optional[float], str, dict]:
    """eval.select's ``metric`` in an eval record: (value or None, why none, what it was measured against —
    weights and reference — so that only like is compared with like)."""
    if metric == "proxy_distance":
        value, why, against = float(record["proxies"]["proxy_distance"]), "", {}
    else:
        r = next(r for r in record["paper"] if r["metric"] == paper.METRIC_KEYS[metric])
        if not r.get("available"):
            return None, r.get("reason", "unavailable"), {}
        value, why = float(r["value"]), ""
        against = {k: r.get(k) for k in ("weights_sha256", "reference", "reference_count", "num_references",
                                           "per_cluster")}
    if not math.isfinite(value):
        return None, f"{metric} is {value}", {}
    return value, why, {"steps": record["steps"], "num_samples": record["num_samples"],
                        "weights": record["weights"], "sample_bits": record.get("sample_bits"), **against}


def update_best(rdir: Path, record: dict, metric: str) -> dict:
    """<run>/eval/best.json: the best on ``metric`` of the eval/<iteration>.json records measured like
    ``record`` (same settings, weights and reference) whose checkpoint still exists. Returns it with a note."""
    value, why, against = selected_value(record, metric)
    if value is None:
        return {"note": f"eval.select={metric} is unavailable for this checkpoint: {why}"}
    lower = SELECTABLE[metric]
    candidates = []
    for f in (rdir / EVAL_DIR).glob("*.json"):
        if not f.stem.isdigit():
            continue
        try:
            rec = json.loads(f.read_text())
            v, _, a = selected_value(rec, metric)
        except (OSError, ValueError, KeyError, StopIteration, TypeError):
            continue
        if v is not None and a == against and (rdir / "checkpoints" / rec["checkpoint"]).is_dir():
            candidates.append((v if lower else -v, rec["iteration"], rec))
    if not candidates:
        return {"note": f"checkpoint {record['checkpoint']} is gone (pruned before it was evaluated): not a candidate"}
    _, _, rec = min(candidates, key=lambda c: (c[0], -c[1]))  # ties: the later checkpoint
    v, _, _ = selected_value(rec, metric)
    new = {"metric": metric, "value": v, "lower_is_better": lower, "iteration": rec["iteration"],
           "checkpoint": rec["checkpoint"], "measured_with": against, "candidates": len(candidates),
           "chosen_on": f"eval.select={metric} (named in the recipe), over the {len(candidates)} evaluated checkpoint(s) "
                        "still kept and measured alike"}
    atomic_write_text(rdir / checkpoint.BEST, json.dumps(new, indent=2))
    return {**new, "note": "this checkpoint" if rec["checkpoint"] == record["checkpoint"] else "unchanged"}


def best_checkpoint(rdir: Path) -> tuple[int, bool]:
    """(iteration, use_ema) of the checkpoint <run>/eval/best.json names (export --best); an error when there
    is none or it is gone."""
    path = rdir / checkpoint.BEST
    try:
        best = json.loads(path.read_text())
        it, weights = int(best["iteration"]), best["measured_with"]["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: no best checkpoint recorded; set eval.select (e.g. eval.select=fid) and run "
                        f"`unidad-dist evaluate --run {rdir} --all eval.select=fid`") from None
    if not (rdir / "checkpoints" / best["checkpoint"]).is_dir():
        raise UserError(f"the best checkpoint {best['checkpoint']} ({best['metric']} {best['value']:.4f}) is no longer "
                        f"in {rdir / 'checkpoints'}; run `unidad-dist evaluate --run {rdir} --all` to choose among those "
                        "kept, or pick one with --checkpoint")
    return it, weights == "ema"


def watch(rdir: Path, interval: float, evaluate, log=print, rt: Optional[Runtime] = None) -> list[dict]:
    """Evaluate each complete checkpoint without an eval record, as it appears, until the run has ended
    (finished, stopped or failed, with no live process) and nothing is left; a checkpoint pruned meanwhile
    is skipped. ``evaluate(iteration)`` -> record (None on ranks other than 0). On several ranks, rank 0's
    view of the folder decides what every rank evaluates and when they stop."""
    records, skipped = [], set()
    main = rt is None or rt.rank == 0
    while True:
        todo, ended, state = None, None, None
        if main:
            st = run_status(rdir)  # read before the scan: a checkpoint published after it is seen next round
            done = {int(p.stem) for p in (rdir / EVAL_DIR).glob("*.json") if p.stem.isdigit()} | skipped
            todo = [checkpoint.iteration_of(c) for c in checkpoint.all_checkpoints(rdir)
                    if checkpoint.iteration_of(c) not in done and checkpoint.is_complete(c)]
            ended = st["state"] != "live" and (st["last_outcome"] is not None or st["state"].startswith("died"))
            state = st["state"].split(";")[0]
        if rt is not None:
            todo, ended, state = from_rank0(rt, (todo, ended, state))
        for it in todo:
            try:
                rec = evaluate(it)
                if rec is not None:
                    records.append(rec)
            except CheckpointGone:
                skipped.add(it)
                if main:
                    log(f"skipped iteration {it}: pruned by checkpoint.keep before it was read")
        if ended and not todo:
            if main:
                log(f"the run is {state}; evaluated {len(records)} checkpoint(s)")
            return records
        if not todo:
            time.sleep(interval)


def format_record(rec: dict) -> str:
    p = rec["proxies"]
    lines = [f"checkpoint {rec['checkpoint']} ({rec['num_samples']} samples, {rec['steps']} steps, {rec['weights']} weights)",
             f"  proxies ({p['label']}): proxy distance {p['proxy_distance']:.4f}, "
             + (f"shape distance {p['shape_distance']:.3f}, " if "shape_distance" in p else "")  # older records lack it
             + f"copy rate {p['copy_rate']:.3f}, "
             f"diversity {p['diversity']:.3f}, noise {p['noise_level']:.3f} (shots {p['noise_level_shots']:.3f})"]
    lines += ["  " + line for line in paper.format_results(rec["paper"]).splitlines()]
    if "best" in rec:
        b = rec["best"]
        head = f"  best ({b['metric']}): {b['checkpoint']} = {b['value']:.4f}" if "checkpoint" in b else "  best: none yet"
        lines.append(f"{head} ({b['note']})")
    return "\n".join(lines)
