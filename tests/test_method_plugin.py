"""Methods are plug-ins (issue 10 §5): a method written only in tests/ (plain_dmd.py: one-step DMD without
GAN or target teacher, with role names of its own) is selected by a recipe, sized by `plan`, and trains
through the real loop on 2 ranks — checkpoints, a SIGKILL and a bit-identical resume, split placement,
export — with no edit to train/, parallel/, launch/ or data/: this test proves it by existing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unidad_dist import testing


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plain_dmd  # noqa: E402  (registers "plain_dmd" in this process)

ITERS = 4


def _recipe(pipes, run_dir, **over) -> dict:
    rec = {
        "run": {"name": "plain", "dir": str(run_dir), "seed": 0, "dist_timeout": 20.0},
        "train": {"iterations": ITERS, "batch_size": 1, "generator_every": 2},
        "algorithm": {"name": "plain_dmd:PlainDMD"},
        "teacher": {"backbone": str(pipes["pixel"]), "precision": "fp32"},
        "generator": {"precision": "fp32", "optimizer": {"lr": 1e-4, "warmup": 0, "eps": 1e-3}},
        "critic": {"precision": "fp32", "optimizer": {"lr": 1e-4, "warmup": 0, "eps": 1e-3}},
        "data": {"target": {"path": str(pipes["shots"])}},
        "checkpoint": {"every": 2},
        "logging": {"progress": False, "grid_size": 4, "every": 1},
        "eval": {"num_samples": 4},
    }
    return testing.apply_overrides(rec, over)


def _launch(recipe: Path, kill: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "UNIDAD_KILL_AT"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if kill:
        env["UNIDAD_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                           str(recipe)], capture_output=True, text=True, timeout=600, env=env)


def test_the_recipe_selects_the_plugin_and_its_own_sections(pipes, tmp_path):
    from unidad_dist.config import all_keys, config_from_dict
    from unidad_dist.errors import UserError

    cfg = config_from_dict(_recipe(pipes, tmp_path / "r", **{"algorithm.name": "plain_dmd"}))
    assert cfg.method is plain_dmd.PlainDMD and cfg.generator.optimizer.lr == 1e-4
    keys = set(all_keys(plain_dmd.PlainDMD))
    assert {"generator.zero_stage", "critic.lora.rank", "teacher.init", "placement.critic", "train.generator_every",
            "algorithm.t_max"} <= keys and not any(k.startswith("student.") for k in keys)
    with pytest.raises(UserError, match="unknown config key 'generator.stpes'"):
        config_from_dict(_recipe(pipes, tmp_path / "r", **{"generator.stpes": 2}))
    with pytest.raises(UserError, match="not a known method"):
        config_from_dict(_recipe(pipes, tmp_path / "r", **{"algorithm.name": "nope"}))


def test_plan_sizes_the_plugin_within_10_percent_of_a_measured_run(pipes, tmp_path, rt):
    from unidad_dist.config import config_from_dict
    from unidad_dist.parallel.plan import make_plan
    from unidad_dist.train.measure import compare_with_plan

    cfg = config_from_dict(_recipe(pipes, tmp_path / "r"))
    plan = make_plan(cfg, 2)
    assert set(plan.roles) == {"generator", "teacher", "critic"}
    assert plan.roles["generator"].trainable > 0 and plan.roles["teacher"].trainable == 0
    assert plan.roles["critic"].flops_per_iteration > plan.roles["teacher"].flops_per_iteration > 0
    ratios = compare_with_plan(cfg, rt)
    assert {"flops", "states/generator", "states/critic", "activations/generator", "activations/critic"} <= set(ratios)
    bad = {k: round(v, 3) for k, v in ratios.items() if not 0.9 <= v <= 1.1}
    assert not bad, ratios


def test_the_plugin_trains_on_2_ranks_resumes_bit_identically_after_sigkill_and_runs_split(pipes, tmp_path):
    from safetensors.torch import load_file

    from unidad_dist.cli import main
    from unidad_dist.train.checkpoint import role_weights

    recipes = {}
    for name, over in (("straight", {}), ("killed", {}),
                       ("split", {"placement.mode": "split", "train.batch_size": 2})):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(_recipe(pipes, tmp_path / name, **over)))
    r = _launch(recipes["straight"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch(recipes["killed"], kill="1:iter:3")  # rank 1 dies before iteration 3 (after checkpoint 2)
    assert r.returncode != 0
    r = _launch(recipes["killed"])  # the same command: resumes from iteration 2 and finishes
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a = tmp_path / "straight" / "checkpoints" / f"iter_{ITERS:07d}"
    b = tmp_path / "killed" / "checkpoints" / f"iter_{ITERS:07d}"
    init = role_weights(tmp_path / "straight" / "checkpoints" / "iter_0000002", "generator")
    for role in ("generator", "critic"):
        wa, wb = role_weights(a, role), role_weights(b, role)
        assert set(wa) == set(wb)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), role
    assert any(not torch.equal(init[k], role_weights(a, "generator")[k]) for k in init), "the generator did not train"
    # split placement (generator + teacher on rank 0, critic on rank 1; the same global batch of 2)
    r = _launch(recipes["split"])
    assert r.returncode == 0, r.stderr[-3000:]
    c = tmp_path / "split" / "checkpoints" / f"iter_{ITERS:07d}"
    for role in ("generator", "critic"):
        wa, wc = role_weights(a, role), role_weights(c, role)
        for k in wa:
            torch.testing.assert_close(wc[k], wa[k], rtol=1e-4, atol=2e-6, msg=f"split {role}.{k}")
    summary = yaml.safe_load((tmp_path / "split" / "summary.json").read_text())
    assert summary["method"] == "plain_dmd" and summary["iterations"] == ITERS
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == ITERS and "critic/denoise" in lines[0] and "generator/dmd" in lines[0]
    # export and sample the plugin's sampler role
    sys.path.insert(0, str(HERE))
    assert main(["export", "--run", str(tmp_path / "straight"), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = role_weights(a, "generator")
    assert all(torch.equal(exported[k], trained[f"module.unet.{k}"]) for k in exported)
