"""The shipped recipes run on 2 ranks with a tiny model of the same structure swapped in through the
recipes' overridable paths (SDXL: two text encoders, ZeRO-2 bf16 engines, a ZeRO-3 source teacher)."""
import json
import subprocess
import sys

import pytest
import yaml

RECIPES = {
    "faces_babies": "pixel",
    "faces_metfaces": "pixel",
    "sd15_subject": "sd15",
    "sdxl_subject": "sdxl",
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_on_two_ranks_with_a_tiny_model(tmp_path, pipes, repo_root, name):
    form = RECIPES[name]
    pipe = pipes[form]
    recipe = repo_root / "recipes" / f"{name}.yaml"
    rec = yaml.safe_load(recipe.read_text())
    over = [f"source_teacher.backbone={pipe}", f"data.target.path={pipes['shots']}", "data.target.resolution=null",
            f"run.dir={tmp_path / 'run'}", "train.iterations=2", "train.batch_size=1", "checkpoint.every=0",
            "logging.progress=false", "logging.sample_every=0", "logging.grid_size=2", "eval.num_samples=2",
            "run.dist_timeout=120"]
    for role in ("student", "fake_teacher"):
        if rec.get(role, {}).get("init"):
            over.append(f"{role}.init={pipe / 'unet'}")
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                        str(recipe), *over], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the recipe's own settings survived (only paths and scale were overridden)
    assert saved["train"]["fake_updates_per_student"] == rec["train"]["fake_updates_per_student"]
    assert saved["algorithm"]["a"] == rec["algorithm"]["a"]
    assert saved["student"]["steps"] == rec["student"]["steps"]
    for role in ("student", "fake_teacher"):
        assert saved[role]["zero_stage"] == rec[role].get("zero_stage", 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 2
    ckpt = run / "checkpoints" / "iter_0000002"
    from unidad_dist.train.checkpoint import role_weights

    assert role_weights(ckpt, "student") and role_weights(ckpt, "fake_teacher")
    assert (ckpt / "target_teacher").is_dir() == (rec["target_teacher"]["mode"] == "online")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("student/grad_norm" in x for x in lines) and any("fake_teacher/grad_norm" in x for x in lines)
