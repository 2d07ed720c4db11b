"""Faults (issue 5 §8): a NaN loss on one rank makes every rank skip that role's step (or all stop), and
nothing already published is overwritten by a failing run."""
import json
import subprocess
import sys

import torch
import yaml

from unidad_dist import testing
from unidad_dist.data import shards as sh
from unidad_dist.data.make_shards import make_shards
from unidad_dist.core.draws import SampleDraws, global_indices


def _nan_target_shards(tmp_path, pipes):
    """Precomputed SD1.5-form target shards of 3 shots whose first shot has NaN latents (bad data)."""
    from unidad_dist.config import config_from_dict, to_dict

    rec = testing.tiny_recipe(pipes["sd15"], pipes["shots"], tmp_path / "x")
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(config_from_dict(rec))))
    good = tmp_path / "good"
    m = make_shards(str(good), images=str(pipes["shots"]), config=str(recipe), precompute=True)
    ss = sh.open_shards(str(good), None, "images", "t")
    raw = [s for i in range(ss.num_shards) for s in ss.read_shard(i)][:3]
    samples = []
    for j, s in enumerate(raw):
        lat = sh.bytes_to_tensors(s["latents.safetensors"])
        if j == 0:
            lat = {k: torch.full_like(v, float("nan")) for k, v in lat.items()}
        samples.append({"png": s["png"], "txt": s["txt"].decode(), "latents.safetensors": lat,
                        "emb.safetensors": sh.bytes_to_tensors(s["emb.safetensors"])})
    meta = {k: m[k] for k in ("kind", "precomputed", "rare_token", "class_name", "backbone", "encoders", "resolution")}
    out = tmp_path / "nan_shards"
    sh.write_shards(out, samples, 10, meta)
    return out


def _launch(recipe, *over):
    return subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                           str(recipe), *over], capture_output=True, text=True, timeout=400)


def test_nan_on_one_rank_skips_the_step_on_all_ranks_or_stops_all(tmp_path, pipes):
    target = _nan_target_shards(tmp_path, pipes)
    iters = 4
    rec = testing.tiny_recipe(pipes["sd15"], target, tmp_path / "run", **{
        "train.iterations": iters, "train.batch_size": 1, "train.fake_updates_per_student": 1,
        "target_teacher.mode": "off", "algorithm.a": 0.0, "logging.every": 1, "run.dist_timeout": 60.0})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    r = _launch(recipe)
    assert r.returncode == 0, r.stderr[-3000:]
    # which iterations drew the NaN shot on some rank: the same per-sample draws the run makes
    bad = []
    for it in range(iters):
        shots = [int(SampleDraws(0, it, global_indices(it, 0, 1, rank, 2, 1), torch.device("cpu"))
                     .randint(0, 3, "target", "shot")[0]) for rank in range(2)]
        bad.append(0 in shots)
    assert any(bad) and not all(bad), bad  # the seed gives both kinds of iteration
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln.get("fake_teacher/skipped_nonfinite", 0.0) == 1.0 for ln in lines] == bad
    assert all("student/dmd_src" in ln for ln in lines)  # the student's loss saw no NaN: it stepped
    from unidad_dist.train.checkpoint import role_weights

    fake = role_weights(tmp_path / "run" / "checkpoints" / f"iter_{iters:07d}", "fake_teacher")
    assert all(torch.isfinite(v).all() for v in fake.values())
    # train.nonfinite=stop: every rank stops at the first bad iteration, naming the role and the iteration;
    # the published checkpoints are left as they were
    rec["run"]["dir"] = str(tmp_path / "stop")
    rec["train"]["nonfinite"] = "stop"
    recipe.write_text(yaml.safe_dump(rec))
    r = _launch(recipe)
    assert r.returncode != 0
    first = bad.index(True)
    assert f"fake_teacher: non-finite loss at iteration {first}" in r.stderr
    ck = tmp_path / "stop" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000000"]
    assert not (tmp_path / "stop" / "run.lock").exists()
