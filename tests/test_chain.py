"""Chained recipes (issue 17 §2): the two-stage baselines as stages that run one after another through run
folders, a stage's export the next one's weights; the same command resumes at the stage and iteration where
it stopped; bad chains fail before anything runs, naming the stage. Also Uni-DAD's GAN-only mode
(algorithm.dmd=false), Distill-then-Adapt's second stage."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.errors import UserError


def _finetune(pipes) -> dict:
    return {"algorithm": {"name": "finetune"}, "train": {"iterations": 2, "batch_size": 2},
            "target_teacher": {"backbone": str(pipes["pixel"]), "precision": "fp32", "sample_steps": 3,
                               "optimizer": {"lr": 1e-3, "warmup": 0}},
            "data": {"target": {"path": str(pipes["shots"])}}, "logging": {"progress": False, "grid_size": 4},
            "eval": {"num_samples": 4}}


def _distill(pipes, **over) -> dict:
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], "unused", **{
        "train.iterations": 4, "checkpoint.every": 1, "algorithm.a": 1.0, "source_teacher.enabled": False,
        "target_teacher.mode": "frozen", **over})
    del rec["run"]
    return rec


def _chain(tmp_path, stages, name="chain.yaml", run_dir=None) -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump({"run": {"dir": str(run_dir or tmp_path / "chain")}, "stages": stages}))
    return str(f)


def _train(recipe, *over, env=None):
    e = {k: v for k, v in os.environ.items() if k != "UNIDAD_KILL_AT"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "unidad_dist", "train", "--config", recipe, *over],
                          capture_output=True, text=True, timeout=900, env=e)


def test_adapt_then_distill_chain_runs_its_stages_and_resumes_where_it_stopped(pipes, tmp_path):
    from unidad_dist.train.checkpoint import role_weights

    ref = "{stage:adapt}/unet"
    chain = _chain(tmp_path, [
        {"name": "adapt", "recipe": _finetune(pipes)},
        {"name": "distill", "recipe": _distill(pipes),
         "overrides": {"target_teacher.init": ref, "student.init": ref, "fake_teacher.init": ref,
                       "student.optimizer.lr": 1e-30}},  # steps below fp32 resolution: the student stays its start
    ])
    r = _train(chain, env={"UNIDAD_KILL_AT": "0:iter:3"})  # dies in stage 2 before its iteration 3
    assert r.returncode != 0
    out = tmp_path / "chain"
    assert (out / "adapt" / "export" / "unidad_student.json").is_file()
    assert not (out / "distill" / "export").exists()
    assert (out / "distill" / "checkpoints" / "iter_0000003").is_dir()
    adapt_ckpts = sorted(p.name for p in (out / "adapt" / "checkpoints").iterdir())
    r = _train(chain)  # the same command: stage 1 is skipped, stage 2 resumes at iteration 3
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1/2 'adapt' is done" in r.stdout and "stage 2/2 'distill'" in r.stdout
    assert f"resumed from {out / 'distill' / 'checkpoints' / 'iter_0000003'}" in r.stdout, r.stdout[-3000:]
    assert sorted(p.name for p in (out / "adapt" / "checkpoints").iterdir()) == adapt_ckpts
    assert (out / "distill" / "export" / "unidad_student.json").is_file()
    assert json.loads((out / "chain.json").read_text())["done"] == ["adapt", "distill"]
    adapted = role_weights(out / "adapt" / "checkpoints" / "iter_0000002", "target_teacher")
    student = role_weights(out / "distill" / "checkpoints" / "iter_0000004", "student")
    assert all(torch.equal(adapted[k], student[k]) for k in adapted)  # stage 2 started from stage 1's weights
    r = _train(chain)  # everything exported: nothing runs
    assert r.returncode == 0 and "stage 2/2 'distill' is done" in r.stdout


def test_a_chain_runs_on_two_ranks_through_launch_local(pipes, tmp_path):
    chain = _chain(tmp_path, [
        {"name": "adapt", "recipe": _finetune(pipes), "overrides": {"train.iterations": 1}},
        {"name": "distill", "recipe": _distill(pipes), "overrides": {"train.iterations": 1,
                                                                     "target_teacher.init": "{stage:adapt}/unet"}},
    ])
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config", chain,
                        "run.dist_timeout=120"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("adapt", "distill"):
        assert (tmp_path / "chain" / stage / "export" / "unidad_student.json").is_file()
        assert json.loads((tmp_path / "chain" / stage / "summary.json").read_text())["iterations"] == 1


@pytest.mark.slow
def test_a_chain_runs_on_two_workers_through_launch_ray(pipes, tmp_path):
    """The cluster launchers run a chain through the same entry as `train`: here `launch ray` on a private local
    Ray cluster, both stages on 2 workers, each exported, chain.json listing both as done."""
    from test_ray import _clean_env, _ray_missing

    if _ray_missing():
        pytest.skip(_ray_missing())
    chain = _chain(tmp_path, [
        {"name": "adapt", "recipe": _finetune(pipes), "overrides": {"train.iterations": 1}},
        {"name": "distill", "recipe": _distill(pipes), "overrides": {"train.iterations": 1,
                                                                     "target_teacher.init": "{stage:adapt}/unet"}},
    ])
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "ray", "--config", chain, "--address", "local",
                        "--num-workers", "2", "run.dist_timeout=120"], capture_output=True, text=True, timeout=900,
                       env=_clean_env(), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for stage in ("adapt", "distill"):
        assert (tmp_path / "chain" / stage / "export" / "unidad_student.json").is_file()
        assert json.loads((tmp_path / "chain" / stage / "summary.json").read_text())["iterations"] == 1
    assert json.loads((tmp_path / "chain" / "chain.json").read_text())["done"] == ["adapt", "distill"]


@pytest.mark.slow
def test_a_chain_runs_as_one_slurm_job_on_two_tasks(pipes, tmp_path):
    """`launch slurm` submits a chain as one job (submitit, local SLURM): both stages on 2 tasks, in order,
    each exported."""
    from test_slurm import _clean_env, _slurm_up

    why = _slurm_up()
    if why:
        pytest.skip(why)
    chain = _chain(tmp_path, [
        {"name": "adapt", "recipe": _finetune(pipes), "overrides": {"train.iterations": 1}},
        {"name": "distill", "recipe": _distill(pipes), "overrides": {"train.iterations": 1,
                                                                     "target_teacher.init": "{stage:adapt}/unet"}},
    ])
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "slurm", "--config", chain,
                        "--tasks-per-node", "2", "--time", "10", "run.dist_timeout=120"], capture_output=True,
                       text=True, timeout=900, cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "launch slurm: submitted job" in r.stdout and "2 ranks" in r.stdout, r.stdout[-3000:]
    for stage in ("adapt", "distill"):
        assert (tmp_path / "chain" / stage / "export" / "unidad_student.json").is_file()
        assert json.loads((tmp_path / "chain" / stage / "outcome.json").read_text())["outcome"] == "finished"
    assert json.loads((tmp_path / "chain" / "chain.json").read_text())["done"] == ["adapt", "distill"]


def test_bad_chains_fail_before_anything_runs_naming_the_stage(pipes, tmp_path, rt):
    from unidad_dist.launch.chain import load_chain

    with pytest.raises(UserError, match=r"stage 'distill' refers to \{stage:adpt\}, which is not an earlier stage"):
        load_chain(_chain(tmp_path, [{"name": "adapt", "recipe": _finetune(pipes)},
                                     {"name": "distill", "recipe": _distill(pipes),
                                      "overrides": {"target_teacher.init": "{stage:adpt}/unet"}}]))
    with pytest.raises(UserError, match=r"stage 'distill' of .*target_teacher.mode=frozen needs target_teacher.init"):
        load_chain(_chain(tmp_path, [{"name": "adapt", "recipe": _finetune(pipes)},
                                     {"name": "distill", "recipe": _distill(pipes)}]))
    with pytest.raises(UserError, match="stage 'adapt' of .*unknown config key 'student"):
        load_chain(_chain(tmp_path, [{"name": "adapt", "recipe": _finetune(pipes)}]), ["student.steps=2"])
    with pytest.raises(UserError, match="must be unique"):
        load_chain(_chain(tmp_path, [{"name": "a", "recipe": _finetune(pipes)}, {"name": "a", "recipe": _finetune(pipes)}]))
    with pytest.raises(UserError, match="unknown top-level keys"):
        f = tmp_path / "x.yaml"
        f.write_text(yaml.safe_dump({"stages": [{"name": "a", "recipe": _finetune(pipes)}], "train": {}}))
        load_chain(f)
    # paths in a stage's overrides are relative to the chain file, those in its recipe file to that file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "stage.yaml").write_text(yaml.safe_dump({**_finetune(pipes), "data": {"target": {"path": "shots"}}}))
    c = load_chain(_chain(tmp_path, [{"name": "a", "recipe": "sub/stage.yaml"},
                                     {"name": "b", "recipe": "sub/stage.yaml", "overrides": {"data.target.path": "mine"}}]))
    assert c.stages[0].cfg.data.target.path == str(tmp_path / "sub" / "shots")
    assert c.stages[1].cfg.data.target.path == str(tmp_path / "mine")
    # an earlier stage's export gone while a later one needs it: one error naming both
    from unidad_dist.launch.chain import Chain, run_chain

    c = load_chain(_chain(tmp_path, [{"name": "adapt", "recipe": _finetune(pipes)},
                                     {"name": "distill", "recipe": _distill(pipes),
                                      "overrides": {"target_teacher.init": "{stage:adapt}/unet"}}]))
    only_second = Chain(c.name, c.dir, c.stages[1:])  # as if stage 1 had run and its export were then removed
    with pytest.raises(UserError, match=r"stage 'distill' needs the output of stage 'adapt' .* which is missing"):
        run_chain(only_second, rt)


def test_gan_only_student_step_calls_no_teacher_and_moves_the_student(make_cfg, rt):
    """algorithm.dmd=false: the student learns from the GAN generator term alone; no teacher (source, target,
    nor the fake teacher's DMD x̂0) is called."""
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    with pytest.raises(UserError, match="calls no teacher"):
        make_cfg("pixel", **{"algorithm.dmd": False})
    cfg = make_cfg("pixel", **{"algorithm.dmd": False, "source_teacher.enabled": False,
                               "target_teacher.mode": "off", "algorithm.a": 0.0, "gan_heads.lambda_g": 0.5})
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    m = UniDAD(cfg, models, rt)
    assert "source_teacher" not in models.roles or models.roles["source_teacher"] is None
    before = {k: v.clone() for k, v in models.student.module.state_dict().items()}
    logs = m.step(0)
    assert m.calls["fake_teacher"] == 1  # its own denoising step only: no DMD x̂0
    assert m.calls["source_teacher"] == 0 and m.calls["target_teacher"] == 0
    assert "student/dmd_src" not in logs and "student/gan_g" in logs
    after = models.student.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UserError, match="GAN term alone, but it is off"):
        make_cfg("pixel", **{"algorithm.dmd": False, "source_teacher.enabled": False, "target_teacher.mode": "off",
                             "gan_heads.lambda_g": 0.0})


@pytest.mark.parametrize("name", ["adapt_then_distill", "distill_then_adapt"])
def test_the_shipped_baseline_chains_run(repo_root, tmp_path, name):
    """recipes/<name>.yaml at 2 iterations a stage, on the built-in demo teacher and shots."""
    r = _train(str(repo_root / "recipes" / f"{name}.yaml"), f"run.dir={tmp_path / name}", "train.iterations=2",
               "logging.progress=false", "eval.num_samples=4", "logging.grid_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    stages = json.loads((tmp_path / name / "chain.json").read_text())["done"]
    assert len(stages) == 2
    for stage in stages:
        assert (tmp_path / name / stage / "export" / "unidad_student.json").is_file()
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "plan", "--world-size", "1", "--config",
                        str(repo_root / "recipes" / f"{name}.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is a chained recipe" in r.stderr
