"""A new user's first hour (issue 13 §2-3): recipe-relative paths and recipe names, documented keys (and the
README's generated reference), train.log with a line per phase, each engine's DeepSpeed config, `status`."""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.errors import UserError


def _cli(*args) -> int:
    return main([str(a) for a in args])


def test_relative_paths_in_a_recipe_resolve_against_the_recipe_file(tmp_path, pipes, monkeypatch):
    from unidad_dist.config import load_config

    home = tmp_path / "project"
    (home / "recipes").mkdir(parents=True)
    shutil.copytree(pipes["pixel"], home / "models" / "pixel")
    shutil.copytree(pipes["shots"], home / "data" / "shots")
    rec = testing.tiny_recipe(Path("../models/pixel"), Path("../data/shots"), tmp_path / "run")
    rec["student"]["init"] = "../models/pixel/unet"
    rec["data"]["target"]["shards"] = "pipe:cat ../x.tar"  # a command, not a path: left alone
    (home / "recipes" / "r.yaml").write_text(yaml.safe_dump(rec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter for paths written in the recipe
    cfg = load_config(home / "recipes" / "r.yaml", check=False)
    assert cfg.source_teacher.backbone == str((home / "models" / "pixel").resolve())
    assert cfg.student.init == str((home / "models" / "pixel" / "unet").resolve())
    assert cfg.data.target.path == str((home / "data" / "shots").resolve())
    assert cfg.data.target.shards == "pipe:cat ../x.tar"
    # an override is the user's own typing: relative to the working directory, as given
    cfg = load_config(home / "recipes" / "r.yaml", ["data.target.path=mine"], check=False)
    assert cfg.data.target.path == "mine"
    # a missing path given relative is named with where it was looked for
    from unidad_dist.data.target import load_target_folder
    from unidad_dist.models.backbones import resolve_backbone

    with pytest.raises(UserError) as e:
        resolve_backbone("models/nope", "source_teacher")
    assert str(elsewhere / "models" / "nope") in str(e.value)
    with pytest.raises(UserError) as e:
        load_target_folder("mine", 16)
    assert str(elsewhere / "mine") in str(e.value)
    # builtin: names stay names
    cfg = load_config("demo", check=False)
    assert cfg.source_teacher.backbone == "builtin:demo_teacher"


def test_a_shipped_recipe_by_name_and_a_missing_one_named(tmp_path, repo_root, monkeypatch, capsys):
    from unidad_dist.config import load_config, recipe_path

    monkeypatch.chdir(tmp_path)
    assert recipe_path("sd15_subject") == repo_root / "recipes" / "sd15_subject.yaml"
    assert recipe_path("sd15_subject.yaml") == repo_root / "recipes" / "sd15_subject.yaml"
    cfg = load_config("sdxl_subject", check=False)
    # the shipped recipe's model folder is relative to the recipe file: <repo>/models/...
    assert cfg.source_teacher.backbone == str(repo_root / "models" / "stable-diffusion-xl-base-1.0")
    with pytest.raises(UserError) as e:
        recipe_path("sd15_subjekt")
    assert "sd15_subject" in str(e.value) and str(tmp_path / "sd15_subjekt") in str(e.value)  # absolute in hint
    assert _cli("recipes") == 0
    out = capsys.readouterr().out
    assert "sd15_subject" in out and "DreamBooth-style subject on Stable Diffusion 1.5" in out


def test_every_key_is_documented_and_the_readme_reference_is_current(repo_root, capsys):
    import importlib.util

    from unidad_dist.config import key_reference

    keys = key_reference()
    assert not [k["key"] for k in keys if not k["doc"].strip()]
    by_key = {k["key"]: k for k in keys}
    assert by_key["student.optimizer.lr"]["type"] == "float" and by_key["student.optimizer.lr"]["default"] == 2e-6
    assert by_key["data.target.path"]["path"] and not by_key["run.dir"]["path"]
    assert _cli("config", "--keys") == 0
    out = capsys.readouterr().out
    assert "student.optimizer.lr  (float, default 2.0e-06)\n    AdamW learning rate" in out
    assert "placement.student  (list of int or null, default null)\n    split placement: the ranks holding student" in out
    spec = importlib.util.spec_from_file_location("update_readme_keys", repo_root / "tools" / "update_readme_keys.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = (repo_root / "README.md").read_text()
    assert tool.rendered(readme) == readme, "README's key reference is stale: run python tools/update_readme_keys.py"


def test_train_log_engine_configs_status_and_outcome(tmp_path, pipes, capsys):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run",
                              **{"student.zero_stage": 1, "logging.progress": True})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    rdir = tmp_path / "run"
    assert _cli("train", "--config", recipe) == 0
    printed = capsys.readouterr()
    log = (rdir / "train.log").read_text()
    assert log.startswith("=== ")
    phases = ["starting run", "building roles: student, fake_teacher, source_teacher, target_teacher",
              "built in", "preparing unidad", "starting DeepSpeed engines: student, fake_teacher, target_teacher",
              "evaluating before training", "training: iterations 1-2", "trained to iteration 2"]
    at = [log.find(p) for p in phases]
    assert -1 not in at and at == sorted(at), list(zip(phases, at))
    for p in phases:  # the user saw them too, as they happened
        assert p in printed.out
    # and, at the end, where to look and what to run next
    assert f"look at   {rdir}/samples/ (target_shots.png, student_before.png, student_after.png)" in printed.out
    for command in (f"unidad-dist sample --run {rdir}", f"unidad-dist export --run {rdir}",
                    f"unidad-dist train --config {recipe} train.iterations=<more>"):
        assert command in printed.out, command
    raw = (rdir / "train.log").read_bytes()  # bytes: text mode would turn a carriage return into a newline
    assert b"\r" not in raw and b"\x1b[" not in raw and b"it/s]" not in raw and b"s/it]" not in raw
    assert "\r" in printed.err and "it/s]" in printed.err  # the progress bar's frames stayed on the terminal
    ds = json.loads((rdir / "ds_config_student.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1
    assert json.loads((rdir / "ds_config_fake_teacher.json").read_text())["zero_optimization"]["stage"] == 0
    assert json.loads((rdir / "outcome.json").read_text())["outcome"] == "finished"

    assert _cli("status", "--run", rdir, "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "finished" and st["iterations_done"] == 2 and st["iterations"] == 2
    assert st["latest_checkpoint"] == "iter_0000002" and st["lock"] is None and st["eta_s"] == 0.0
    assert st["seconds_per_iteration"] > 0

    # a bad re-run is refused before anything is written: train.log and outcome.json untouched
    before = {p: p.read_bytes() for p in (rdir / "train.log", rdir / "outcome.json")}
    assert _cli("train", "--config", recipe, "algorithm.a=0.25") == 2
    assert {p: p.read_bytes() for p in before} == before

    # a writer that died holding the lock; then one that is alive (this process)
    (rdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "job": None}))
    assert _cli("status", "--run", rdir, "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"].startswith("died")
    (rdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": "SLURM_JOB_ID=7"}))
    assert _cli("status", "--run", rdir) == 0
    out = capsys.readouterr().out
    assert "state      live" in out and f"pid {os.getpid()} job SLURM_JOB_ID=7" in out
    (rdir / "run.lock").unlink()

    # more iterations: the same command resumes; train.log gets a second header, status an ETA before it ends
    assert _cli("train", "--config", recipe, "train.iterations=3") == 0
    capsys.readouterr()
    assert (rdir / "train.log").read_text().count("\n=== ") == 1 and "resuming run" in (rdir / "train.log").read_text()
    cfg = yaml.safe_load((rdir / "config.yaml").read_text())
    cfg["train"]["iterations"] = 10
    (rdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert _cli("status", "--run", rdir, "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["iterations_done"] == 3 and st["eta_s"] == pytest.approx(7 * st["seconds_per_iteration"])
    assert st["state"].startswith("not running")


def test_a_failed_run_is_recorded(tmp_path, pipes, monkeypatch, capsys):
    from unidad_dist.methods import unidad

    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))

    def boom(self, it):
        raise RuntimeError("planted failure at step")

    monkeypatch.setattr(unidad.UniDAD, "step", boom)
    with pytest.raises(RuntimeError):
        _cli("train", "--config", recipe)
    assert json.loads((tmp_path / "run" / "outcome.json").read_text())["outcome"] == "failed"
    assert "planted failure at step" in (tmp_path / "run" / "train.log").read_text()
    assert _cli("status", "--run", tmp_path / "run") == 0
    assert "state      failed: RuntimeError: planted failure at step" in capsys.readouterr().out
