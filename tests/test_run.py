"""End to end through the CLI: train, iterations=0, sample, export, resume, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.cli import main


def _write_recipe(tmp_path, pipes, form="pixel", name="r.yaml", **over):
    rec = testing.tiny_recipe(pipes[form], pipes["shots"], tmp_path / "run", **over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(rec))
    return path, Path(rec["run"]["dir"])


def _cli(*args, capsys=None) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("form", ["pixel", "sd15", "sdxl"])
def test_train_each_backbone(tmp_path, pipes, form):
    recipe, rdir = _write_recipe(tmp_path, pipes, form, **{"student.unroll": "backward_simulation",
                                                          "checkpoint.every": 1, "checkpoint.keep": 2,
                                                          "source_teacher.cfg": 2.0 if form != "pixel" else 1.0,
                                                          "target_teacher.cfg": 1.5 if form != "pixel" else 1.0})
    assert _cli("train", "--config", recipe) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples/student_before.png",
                 "samples/student_after.png", "samples/source_teacher.png", "checkpoints/latest"):
        assert (rdir / name).exists(), name
    lines = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["iteration"] == 0 and "seconds_per_iteration" in lines[0]
    assert any(k.startswith("student/dmd_src") for k in lines[0]) and "fake_teacher/lr" in lines[0]
    ckpts = sorted(p.name for p in (rdir / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert ckpts == ["iter_0000001", "iter_0000002"]  # keep=2
    summary = json.loads((rdir / "summary.json").read_text())
    for k in ("proxy_distance_before", "proxy_distance_after", "copy_rate", "diversity", "wall_time_s"):
        assert k in summary
    before = json.loads((rdir / "eval_before.json").read_text())
    assert summary["shape_distance_before"] == before["shape_distance"]
    assert summary["proxy_distance_before"] == before["proxy_distance"]


@pytest.mark.parametrize("teacher,form", [("source", "pixel"), ("target", "pixel"), ("source", "sd15")])
def test_the_ratio_is_the_whole_runs_from_the_student_before_its_warm_start(tmp_path, pipes, teacher, form, capsys):
    """The summary's ratio divides by the student as the run found it (its warm start is adaptation too): the
    "initial" evaluation runs before the warm start changes the student, so it equals the "before" evaluation of
    the same run without a warm start; ``proxy_distance_ratio_training`` keeps the training phase's alone."""
    warm = {"student.warm_start": 3, "student.warm_start_pairs": 4, "student.warm_start_batch": 2,
            "student.warm_start_teacher_steps": 2, "student.warm_start_teacher": teacher,
            "target_teacher.warm_start": 2, "train.iterations": 1}
    recipe, rdir = _write_recipe(tmp_path / "warm", pipes, form, **warm)
    assert _cli("train", "--config", recipe) == 0
    out = capsys.readouterr().out  # the phase is announced, its grid listed among the ones to look at
    assert "evaluating the student before its warm start" in out and "student_initial.png, student_before.png" in out
    recipe0, rdir0 = _write_recipe(tmp_path / "cold", pipes, form, **{**warm, "student.warm_start": 0})
    assert _cli("train", "--config", recipe0) == 0
    assert "before its warm start" not in capsys.readouterr().out
    s, s0 = (json.loads((d / "summary.json").read_text()) for d in (rdir, rdir0))
    before = json.loads((rdir / "eval_before.json").read_text())
    assert s["proxy_distance_initial"] == before["initial_proxy_distance"] == s0["proxy_distance_before"]
    assert s["shape_distance_initial"] == s0["shape_distance_before"]
    assert s["noise_level_initial"] == s0["noise_level_before"]
    assert s["proxy_distance_before"] != s["proxy_distance_initial"]  # the warm start changed the student
    assert s["proxy_distance_ratio"] == s["proxy_distance_after"] / s["proxy_distance_initial"]
    assert s["proxy_distance_ratio_training"] == s["proxy_distance_after"] / s["proxy_distance_before"]
    assert (rdir / "samples" / "student_initial.png").is_file()
    from unidad_dist.train.report import collect  # the report shows the initial grid; no initial_* proxy rows

    rep, _ = collect(rdir)
    assert [t for t, _ in rep["grids"]][:3] == ["target shots", "student initial", "student before"]
    assert not any(row[0].startswith("initial_") for row in rep["proxies"])
    assert rep["summary_values"]["proxy_distance_initial"] == s["proxy_distance_initial"]
    # no warm start changed the sampler: initial is as training started, and no second evaluation ran
    assert s0["proxy_distance_initial"] == s0["proxy_distance_before"]
    assert s0["proxy_distance_ratio"] == s0["proxy_distance_ratio_training"]
    assert not (rdir0 / "samples" / "student_initial.png").exists()
    assert not any(k.startswith("initial_") for k in json.loads((rdir0 / "eval_before.json").read_text()))


def test_iterations_zero_then_sample_and_export(tmp_path, pipes):
    from diffusers import UNet2DModel

    recipe, rdir = _write_recipe(tmp_path, pipes, **{"train.iterations": 0})
    assert _cli("train", "--config", recipe) == 0
    from unidad_dist.train.checkpoint import role_weights

    assert any(k.startswith("module.unet.") for k in role_weights(rdir / "checkpoints" / "iter_0000000", "student"))
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary["proxy_distance_before"] == pytest.approx(summary["proxy_distance_after"])
    assert _cli("sample", "--run", rdir, "--steps", 2, "--num", 5, "--out", tmp_path / "grid.png") == 0
    assert (tmp_path / "grid.png").is_file()
    assert _cli("sample", "--run", rdir, "--steps", 1, "--num", 3, "--out", tmp_path / "singles") == 0
    assert len(list((tmp_path / "singles").glob("*.png"))) == 3
    assert _cli("export", "--run", rdir, "--out", tmp_path / "export") == 0
    unet = UNet2DModel.from_pretrained(str(tmp_path / "export" / "unet"))
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from unidad_dist.train.loop import load_run

    cfg, models, method, _ = load_run(rdir)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([999, 10])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, models.student.module.unet(x, t).sample)
    meta = json.loads((tmp_path / "export" / "unidad_student.json").read_text())
    assert meta["timesteps"] == [999, 499]


def test_resume_is_bit_identical(tmp_path, pipes):
    """Stop after 2 iterations, rerun the same command with more iterations: same weights as a straight run."""
    from unidad_dist.train.checkpoint import role_weights

    # run.deterministic: on CUDA, cuDNN's default kernels are not run-to-run deterministic (GPU check, 2026-12-04)
    over = {"checkpoint.every": 2, "train.fake_updates_per_student": 2, "run.deterministic": True}
    straight, rdir_a = _write_recipe(tmp_path / "a", pipes, **{"train.iterations": 4, **over})
    assert _cli("train", "--config", straight) == 0
    part, rdir_b = _write_recipe(tmp_path / "b", pipes, **{"train.iterations": 2, **over})
    assert _cli("train", "--config", part) == 0
    assert _cli("train", "--config", part, "train.iterations=4") == 0  # allow-listed change
    for role in ("student", "fake_teacher", "target_teacher"):
        a = role_weights(rdir_a / "checkpoints" / "iter_0000004", role)
        b = role_weights(rdir_b / "checkpoints" / "iter_0000004", role)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role}.{k}"
    # a change outside the allow-list is refused and leaves the run as it was
    before = sorted(p.name for p in (rdir_b / "checkpoints").iterdir())
    assert _cli("train", "--config", part, "algorithm.a=0.25") == 2
    assert sorted(p.name for p in (rdir_b / "checkpoints").iterdir()) == before


def test_corrupt_checkpoint_falls_back(tmp_path, pipes):
    from unidad_dist.train import checkpoint

    recipe, rdir = _write_recipe(tmp_path, pipes, **{"train.iterations": 2, "checkpoint.every": 1,
                                                    "checkpoint.keep": 3})
    assert _cli("train", "--config", recipe) == 0
    newest = rdir / "checkpoints" / "iter_0000002" / "student" / "state" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        assert checkpoint.latest_complete(rdir).name == "iter_0000001"
    # the manifest: XXH3-128 of every file, computed while writing, equal to a fresh read of the file
    ck = rdir / "checkpoints" / "iter_0000001"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["checksum"] == "xxh3_128"
    for name, digest in manifest["files"].items():
        assert checkpoint.checksum_file(ck / name) == digest, name
    # an earlier version's manifest (a flat name -> sha256 map) is still checked
    (ck / "manifest.json").write_text(json.dumps({n: checkpoint.sha256_file(ck / n) for n in manifest["files"]}))
    assert checkpoint.is_complete(ck)
    (ck / "rng_rank0.pt").write_bytes(b"x")
    assert not checkpoint.is_complete(ck)
    for empty in ({}, {"checksum": "xxh3_128", "files": {}}, []):  # a manifest that lists nothing is no checkpoint
        (ck / "manifest.json").write_text(json.dumps(empty))
        assert not checkpoint.is_complete(ck), empty


def _tree(rdir):
    """Every file of a run folder and its bytes."""
    return {str(p.relative_to(rdir)): p.read_bytes() for p in sorted(rdir.rglob("*")) if p.is_file()}


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_not_restarted(tmp_path, pipes, capsys):
    """Issue 12 §2: no silent start over on top of a run; run.discard_damaged=true moves it aside."""
    from unidad_dist.train import checkpoint

    recipe, rdir = _write_recipe(tmp_path, pipes, **{"train.iterations": 2, "checkpoint.every": 1,
                                                    "checkpoint.keep": 3})
    assert _cli("train", "--config", recipe) == 0
    for ck in checkpoint.all_checkpoints(rdir):
        f = ck / "student" / "state" / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    before = _tree(rdir)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        # also with a setting the run never had: the compatibility check must not be skipped silently
        assert _cli("train", "--config", recipe, "algorithm.a=0.25") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(rdir) in err and "none is complete" in err, err
    assert "run.dir=" in err and "run.discard_damaged=true" in err, err
    assert _tree(rdir) == before  # nothing written, nothing overwritten
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        assert _cli("train", "--config", recipe, "run.discard_damaged=true") == 0
    aside = [p for p in rdir.iterdir() if p.name.startswith("damaged-")]
    assert len(aside) == 1
    assert _tree(aside[0]) == before  # the old run, byte for byte, beside the new one
    assert checkpoint.latest_complete(rdir).name == "iter_0000002"
    lines = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == sorted({x["iteration"] for x in lines})  # one run's metrics


def _run_cli_subprocess(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "unidad_dist", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["missing_recipe", "unknown_key", "wrong_type", "missing_model", "malformed_model",
                                  "missing_init", "bad_init", "empty_target", "unreadable_image", "missing_target"])
def test_bad_input_one_clear_line_and_no_run_folder(tmp_path, pipes, case):
    shots = tmp_path / "shots"
    shots.mkdir()
    for p in Path(pipes["shots"]).glob("*.png"):
        (shots / p.name).write_bytes(p.read_bytes())
    recipe, rdir = _write_recipe(tmp_path, pipes, **{"data.target.path": str(shots)})
    args = ["train", "--config", recipe]
    expect = ""
    if case == "missing_recipe":
        args, expect = ["train", "--config", tmp_path / "nope.yaml"], "not found"
    elif case == "unknown_key":
        args, expect = args + ["train.iteratons=3"], "did you mean 'train.iterations'"
    elif case == "wrong_type":
        args, expect = args + ["train.batch_size=two"], "expected int"
    elif case == "missing_model":
        args, expect = args + [f"source_teacher.backbone={tmp_path / 'nomodel'}"], "does not exist"
    elif case == "malformed_model":
        bad = tmp_path / "badmodel"
        (bad / "unet").mkdir(parents=True)
        (bad / "model_index.json").write_text("{}")
        (bad / "unet" / "config.json").write_text("{oops")
        args, expect = args + [f"source_teacher.backbone={bad}"], "not valid JSON"
    elif case == "missing_init":
        args, expect = args + [f"student.init={tmp_path / 'none.safetensors'}"], "student.init"
    elif case == "bad_init":
        (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
        args, expect = args + [f"student.init={tmp_path / 'bad.safetensors'}"], "cannot read weights"
    elif case == "empty_target":
        (tmp_path / "empty").mkdir()
        args, expect = args + [f"data.target.path={tmp_path / 'empty'}"], "holds no images"
    elif case == "unreadable_image":
        (shots / "broken.png").write_bytes(b"not a png")
        expect = "broken.png"
    elif case == "missing_target":
        args, expect = args + [f"data.target.path={tmp_path / 'nowhere'}"], "does not exist"
    proc = _run_cli_subprocess(args)
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and expect in err_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not rdir.exists(), "a failed start must not leave a run folder behind"


def test_config_command_prints_resolved_yaml(tmp_path, pipes, capsys):
    recipe, _ = _write_recipe(tmp_path, pipes)
    assert _cli("config", "--config", recipe, "student.steps=3") == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["student"]["steps"] == 3 and out["run"]["dir"].endswith("run")


def test_builtin_cache_built_once_and_waited_for(tmp_path, monkeypatch):
    import threading
    import time

    from unidad_dist import builtin

    monkeypatch.setenv("UNIDAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "1")
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("p", builtin.resolve("builtin:demo_target")))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # rank 1 waits for rank 0
    monkeypatch.setenv("RANK", "0")
    path = builtin.resolve("builtin:demo_target")
    waiter.join(timeout=10)
    assert result["p"] == path
    assert len(list(path.glob("*.png"))) == 10
    mtime = (path / ".complete").stat().st_mtime
    assert builtin.resolve("builtin:demo_target") == path and (path / ".complete").stat().st_mtime == mtime


def test_no_device_literals_outside_device_module(repo_root):
    import re

    pat = re.compile(r"""["'](cuda|nccl|gloo|cpu)(:\d+)?["']""")
    offenders = []
    for f in (repo_root / "unidad_dist").rglob("*.py"):
        if f.name == "device.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pat.search(line):
                offenders.append(f"{f.relative_to(repo_root)}:{i}: {line.strip()}")
    assert offenders == []


def test_wandb_offline_writes_run_files(tmp_path, pipes, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe, rdir = _write_recipe(tmp_path, pipes, **{"logging.wandb": True, "train.iterations": 2,
                                                    "logging.sample_every": 1})
    assert _cli("train", "--config", recipe) == 0
    runs = list((rdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").glob("*.png"))


def test_shipped_demo_teacher_is_used_when_intact_and_rebuilt_when_not(tmp_path, monkeypatch, capsys):
    """builtin:demo_teacher resolves to the weights shipped in the package (checked by sha256, no build); a
    missing, altered or out-of-date file falls back to building it into the cache, saying why."""
    import shutil

    from unidad_dist import builtin
    from unidad_dist.models.backbones import resolve_backbone

    assert builtin.shipped("demo_teacher")[0] == builtin.ASSETS / "demo_teacher", builtin.shipped("demo_teacher")
    monkeypatch.setenv("UNIDAD_CACHE", str(tmp_path / "cache"))
    built = []

    def fake_build(kind, cfg, out):  # the real one pretrains for tens of minutes
        built.append(out)
        (out / "model_index.json").write_text("{}")

    monkeypatch.setattr(builtin, "_build", fake_build)
    assert builtin.resolve("builtin:demo_teacher") == builtin.ASSETS / "demo_teacher" and not built
    spec = resolve_backbone("builtin:demo_teacher", "source_teacher")
    assert spec.kind == "pixel" and spec.scheduler_config["prediction_type"] == "v_prediction"

    real, copy = builtin.ASSETS / "demo_teacher", tmp_path / "assets"
    shutil.copytree(builtin.ASSETS, copy)
    monkeypatch.setattr(builtin, "ASSETS", copy)
    weights = copy / "demo_teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    cases = {
        "does not match the sha256": lambda: weights.write_bytes(weights.read_bytes()[:-1] + b"\0"),
        "is missing": lambda: weights.unlink(),
        "another configuration": lambda: monkeypatch.setitem(builtin.BUILTINS, "demo_teacher",
                                                             ("teacher", {**builtin.TEACHER, "steps": 1})),
    }
    for why, damage in cases.items():
        shutil.rmtree(copy / "demo_teacher")
        shutil.copytree(real, copy / "demo_teacher")
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        builtin._SHIPPED_OK.clear()
        damage()
        path = builtin.resolve("builtin:demo_teacher")
        assert path.parent == tmp_path / "cache" / "builtin" and built, why
        out = capsys.readouterr().out
        assert why in out and "pretraining it into" in out, (why, out)
        built.clear()
    builtin._SHIPPED_OK.clear()


def test_sample_and_export_read_no_training_data_and_survive_a_prune(tmp_path, pipes, monkeypatch):
    """Issue 12 §3-4: after the target shots and the prompt file are gone, sample and export still work
    (they read neither); a checkpoint pruned while it is read is replaced by the newest complete one."""
    import shutil

    from unidad_dist.train import checkpoint

    shots = tmp_path / "shots"
    shutil.copytree(pipes["shots"], shots)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prt cat on a sofa\n")
    recipe, rdir = _write_recipe(tmp_path, pipes, "sd15", **{
        "train.iterations": 2, "checkpoint.every": 1, "checkpoint.keep": 3, "data.source.prompt_file": str(prompts)})
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"]["target"]["path"] = str(shots)
    recipe.write_text(yaml.safe_dump(cfg))
    assert _cli("train", "--config", recipe) == 0
    assert json.loads((rdir / "sampling_prompts.json").read_text()) == ["a prt cat on a sofa"]
    shutil.rmtree(shots)
    prompts.unlink()
    assert _cli("sample", "--run", rdir, "--num", "2", "--out", tmp_path / "s.png") == 0
    gone = []
    real = checkpoint.role_weights

    def pruned_meanwhile(ckpt, name):  # the trainer prunes the chosen checkpoint as the reader opens it
        if not gone:
            gone.append(ckpt.name)
            os.replace(ckpt, ckpt.parent / f".trash-{ckpt.name}")
        return real(ckpt, name)

    monkeypatch.setattr(checkpoint, "role_weights", pruned_meanwhile)
    assert _cli("export", "--run", rdir, "--out", tmp_path / "export") == 0
    assert gone == ["iter_0000002"]
    assert json.loads((tmp_path / "export" / "unidad_student.json").read_text())["checkpoint"] == "iter_0000001"


def test_disk_full_read_only_and_tampered_checkpoints_are_one_line_or_a_fallback(tmp_path, pipes, capsys, monkeypatch):
    """Issue 12 §6: ENOSPC while checkpointing and a read-only run folder are one `error:` line (the state stays
    safe); a checkpoint whose file was replaced and whose manifest was re-hashed falls back to the previous
    one, as a checksum failure does, without running what the file holds."""
    import errno
    import pickle

    from unidad_dist.train import checkpoint

    recipe, rdir = _write_recipe(tmp_path, pipes, **{"train.iterations": 2, "checkpoint.every": 1,
                                                    "checkpoint.keep": 5, "logging.every": 1})
    real_save = checkpoint.save

    def full_disk(run_dir, models, iteration, *a, **k):
        if iteration == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(run_dir, models, iteration, *a, **k)

    monkeypatch.setattr(checkpoint, "save", full_disk)
    capsys.readouterr()
    assert _cli("train", "--config", recipe) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "iter_0000001 is intact" in err[0], err
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.latest_complete(rdir).name == "iter_0000001"
    assert _cli("train", "--config", recipe) == 0  # the same command resumes

    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))
                        if str(p).endswith("run.lock") else real_open(p, *a, **k))
    capsys.readouterr()
    assert _cli("train", "--config", recipe, "train.iterations=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "run.dir=" in err[0], err
    monkeypatch.setattr(os, "open", real_open)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = rdir / "checkpoints" / "iter_0000002"
    (ck / "rng_rank0.pt").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["rng_rank0.pt"] = checkpoint.checksum_file(ck / "rng_rank0.pt")  # re-hashed
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.is_complete(ck)
    with pytest.warns(UserWarning, match="iter_0000002 verifies but cannot be loaded"):
        assert _cli("train", "--config", recipe, "train.iterations=3") == 0
    assert "resumed from" in capsys.readouterr().out
    assert not marker.exists()
    its = [json.loads(line)["iteration"] for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert its == [0, 1, 2], its  # resumed from iteration 1: iteration 1 ran again, once in the log


def test_run_deterministic_sets_deterministic_kernels_for_the_run_only(monkeypatch):
    """run.deterministic: deterministic algorithms (strict), cuDNN deterministic without benchmark and cuBLAS's
    workspace setting while the run lasts; the process's settings come back afterwards."""
    from unidad_dist.device import deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_kernels(False):
        assert not torch.are_deterministic_algorithms_enabled()
