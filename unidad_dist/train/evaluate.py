"""``unidad-dist evaluate``: a run's checkpoints judged after (or beside) training, in a separate process.

Each checkpoint's sampler is rebuilt as ``sample`` does (train.loop.load_run: no engine, no training data),
samples ``eval.num_samples`` images (noise keyed by (run.seed, sample index)), and is measured: the
demo-scale proxies (labelled as proxies) and the paper's metrics (eval/paper.py; unavailable ones say which
file they need). The result goes to ``<run>/eval/<iteration>.json``; the run's checkpoints are only read,
and one pruned by ``checkpoint.keep`` while it is read is skipped with a note.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.builtin import resolve_path
from unidad_dist.config import deep_merge, from_dict, parse_overrides, to_dict
from unidad_dist.core.io import atomic_write_text
from unidad_dist.data.shards import decode_sample, is_shard_folder, open_shards
from unidad_dist.data.target import load_target_folder
from unidad_dist.errors import UserError
from unidad_dist.eval import paper
from unidad_dist.eval.metrics import PROXY_FEATURE, all_metrics
from unidad_dist.eval.reference import reference_photos
from unidad_dist.train import checkpoint
from unidad_dist.train.loop import load_run

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


def checkpoints_to_evaluate(rdir: Path, which: Optional[int], every: bool) -> list[Optional[int]]:
    if every:
        its = [int(p.name[len("iter_"):]) for p in checkpoint.all_checkpoints(rdir) if checkpoint.is_complete(p)]
        if not its:
            raise UserError(f"run '{rdir}' has no complete checkpoint to evaluate")
        return its
    return [which]


def with_eval_overrides(cfg, overrides: list[str]):
    """The run's config with ``eval.*`` overrides on top (weights, reference statistics; paths relative to
    the working directory); any other key is an error: evaluation does not change what was trained."""
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith("eval.")]
    if bad:
        raise UserError(f"evaluate takes only eval.* overrides (e.g. eval.fid_stats=stats.npz), not {', '.join(bad)}")
    if not overrides:
        return cfg
    section = deep_merge(to_dict(cfg)["eval"], parse_overrides(overrides).get("eval", {}))
    return replace(cfg, eval=from_dict(type(cfg.eval), section, "eval."))


def evaluate_checkpoint(rdir: Path, iteration: Optional[int], steps: Optional[int] = None,
                        num: Optional[int] = None, use_ema: bool = True, overrides: Optional[list[str]] = None) -> dict:
    """Sample from one checkpoint and measure; writes and returns the eval/<iteration>.json record."""
    t0 = time.time()
    cfg, models, method, ckpt = load_run(rdir, use_ema=use_ema, iteration=iteration)
    cfg = with_eval_overrides(cfg, list(overrides or []))
    if cfg.eval.fid_stats:
        paper.FidStats.load(cfg.eval.fid_stats)  # a bad reference file stops here, before any sampling
    it = int(ckpt.name[len("iter_"):])
    n = num or cfg.eval.num_samples
    k = steps or cfg.eval.steps or method.sampling_info()["steps"]
    with torch.no_grad():
        pixels = models.to_pixels(method.sample(n, steps=k, seed=cfg.run.seed)).cpu().float()
    shots = target_shots(cfg, models.resolution)
    # text models: sample i is drawn with the run's sampling prompt i mod len (UniDAD.sample)
    prompts = ([models.data.prompts[i % len(models.data.prompts)] for i in range(n)]
               if models.text is not None and models.data.prompts else None)
    inp = paper.Inputs(samples=pixels, shots=shots, steps=k, prompts=prompts, rare_token=cfg.data.target.rare_token,
                       references=reference_photos(cfg.eval.reference, models.resolution), fid_stats=cfg.eval.fid_stats)
    device = method.rt.device
    record = {
        "iteration": it, "checkpoint": ckpt.name, "steps": k, "num_samples": n, "weights": "ema" if use_ema else "raw",
        "proxies": {"label": PROXY_FEATURE, **all_metrics(pixels, shots)},
        "paper": paper.paper_metrics(inp, cfg.eval.weights, device=device, per_cluster=cfg.eval.lpips_per_cluster),
    }
    record["seconds"] = round(time.time() - t0, 2)
    out = rdir / EVAL_DIR / f"{it}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2))
    return record


def format_record(rec: dict) -> str:
    p = rec["proxies"]
    lines = [f"checkpoint {rec['checkpoint']} ({rec['num_samples']} samples, {rec['steps']} steps, {rec['weights']} weights)",
             f"  proxies ({p['label']}): proxy distance {p['proxy_distance']:.4f}, copy rate {p['copy_rate']:.3f}, "
             f"diversity {p['diversity']:.3f}, noise {p['noise_level']:.3f} (shots {p['noise_level_shots']:.3f})"]
    lines += ["  " + line for line in paper.format_results(rec["paper"]).splitlines()]
    return "\n".join(lines)
