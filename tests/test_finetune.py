"""The finetune method (issue 17 §2, Adapt-then-Distill's first stage): the teacher alone trains, on the shots
with their captions and, with prior preservation, on class images it drew itself before training (written to
a folder, re-read on resume); its DDIM samples are what the exported diffusers pipeline (DDIMScheduler) draws."""
import json

import numpy as np
import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.core.draws import SampleDraws


def _recipe(pipe, shots, run_dir, **over) -> dict:
    rec = {
        "run": {"name": "ft", "dir": str(run_dir), "seed": 0},
        "train": {"iterations": 2, "batch_size": 2},
        "algorithm": {"name": "finetune"},
        "target_teacher": {"backbone": str(pipe), "precision": "fp32", "sample_steps": 5,
                    "optimizer": {"lr": 1e-3, "warmup": 0}},
        "data": {"target": {"path": str(shots), "class_name": "cat"}},
        "logging": {"progress": False, "grid_size": 4},
        "eval": {"num_samples": 4},
    }
    return testing.apply_overrides(rec, over)


def _cfg(pipes, tmp_path, form="pixel", **over):
    from unidad_dist.config import config_from_dict

    return config_from_dict(_recipe(pipes[form], pipes["shots"], tmp_path / "run", **over))


def _write(tmp_path, rec, name="r.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(rec))
    return f


def test_the_teacher_learns_the_shots_with_their_captions(pipes, tmp_path, rt):
    """One step: every image its loss sees is a shot (or its mirror image) with the shot's caption, the
    target it regresses is diffusers' own (v / ε) for that noise and timestep, and the weights move."""
    from diffusers import DDPMScheduler

    from unidad_dist.methods.finetune import Finetune
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, "sd15", **{"data.target.rare_token": "sks",
                                           "data.source.prompts": ["a {rare} {cls} on a beach"]})
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    m = Finetune(cfg, models, rt)
    sched = DDPMScheduler.from_pretrained(pipes["sd15"], subfolder="scheduler")
    seen = []
    role = models.roles["target_teacher"]
    orig = role.train_forward

    def spy(x_t, t, cond):
        seen.append((x_t.clone(), t.clone(), cond["encoder_hidden_states"].clone()))
        return orig(x_t, t, cond)

    role.train_forward = spy
    before = {k: v.clone() for k, v in role.module.state_dict().items()}
    logs = m.step(0)
    assert len(seen) == 1 and logs["target_teacher/denoise"] > 0
    x_t, t, hidden = seen[0]
    d = SampleDraws(0, 0, [0, 1], rt.device)
    batch = models.data.batch(d)
    n = d.randn(models.sample_shape, "target_teacher", "shots_noise")
    torch.testing.assert_close(x_t, sched.add_noise(batch.real, n, t))
    allowed = torch.cat([models.data.model_space, models.data.model_space_flipped])
    assert all(any(torch.equal(r, a) for a in allowed) for r in batch.real)
    torch.testing.assert_close(hidden, models.data.conditioner.encode(batch.real_prompts)["encoder_hidden_states"])
    assert all("sks cat" in p for p in batch.real_prompts)
    after = role.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_loss_is_the_diffusers_target_for_each_prediction_type(pipes, tmp_path, rt):
    """The loss of a step equals an independent computation with diffusers' scheduler (ε: the noise; v:
    get_velocity), on the weights before the step."""
    from diffusers import DDPMScheduler

    from unidad_dist.methods.finetune import Finetune
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    for ptype in ("epsilon", "v_prediction"):
        pipe = testing.write_pixel_pipeline(tmp_path / f"pix_{ptype}", prediction_type=ptype)
        from unidad_dist.config import config_from_dict

        cfg = config_from_dict(_recipe(pipe, pipes["shots"], tmp_path / f"run_{ptype}"))
        models = build(cfg, rt)
        engines.attach(models, cfg, rt)
        m = Finetune(cfg, models, rt)
        sched = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
        net = models.roles["target_teacher"].module
        d = SampleDraws(0, 0, [0, 1], rt.device)
        batch = models.data.batch(d)
        t = d.randint(0, sched.config.num_train_timesteps, "target_teacher", "shots_t")
        n = d.randn(models.sample_shape, "target_teacher", "shots_noise")
        with torch.no_grad():
            pred = net(sched.add_noise(batch.real, n, t), t, None).float()
        target = sched.get_velocity(batch.real, n, t) if ptype == "v_prediction" else n
        expected = float(((pred - target) ** 2).mean())
        assert m.step(0)["target_teacher/denoise"] == pytest.approx(expected, rel=1e-5), ptype


def test_prior_preservation_draws_class_images_once_and_a_resume_reads_them(pipes, tmp_path):
    """algorithm.prior_images: before the first iteration the teacher draws them (class prompts: the rare token
    removed) into <run.dir>/prior_images; the loss adds prior_weight x the loss on them; a resume reads the
    same 8-bit images and ends bit-identical to a run never stopped; a missing folder on resume is one error."""
    from unidad_dist.train.checkpoint import role_weights

    over = {"algorithm.prior_images": 3, "algorithm.prior_weight": 0.5, "train.iterations": 4,
            "checkpoint.every": 2, "data.target.rare_token": "sks"}
    straight = _write(tmp_path, _recipe(pipes["sd15"], pipes["shots"], tmp_path / "straight", **over), "a.yaml")
    assert main(["train", "--config", str(straight)]) == 0
    prior = tmp_path / "straight" / "prior_images"
    assert sorted(p.name for p in prior.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert json.loads((prior / "prompts.json").read_text()) == ["a cat"] * 3
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["target_teacher/prior"] > 0 for r in lines)
    stopped = _write(tmp_path, _recipe(pipes["sd15"], pipes["shots"], tmp_path / "stopped",
                                       **{**over, "train.iterations": 2}), "b.yaml")
    assert main(["train", "--config", str(stopped)]) == 0
    for f in sorted(prior.glob("*.png")):
        assert (tmp_path / "stopped" / "prior_images" / f.name).read_bytes() == f.read_bytes()
    resumed = _write(tmp_path, _recipe(pipes["sd15"], pipes["shots"], tmp_path / "stopped", **over), "c.yaml")
    assert main(["train", "--config", str(resumed)]) == 0
    a = role_weights(tmp_path / "straight" / "checkpoints" / "iter_0000004", "target_teacher")
    b = role_weights(tmp_path / "stopped" / "checkpoints" / "iter_0000004", "target_teacher")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the prior term is in the loss: without it the weights end elsewhere
    plain = _write(tmp_path, _recipe(pipes["sd15"], pipes["shots"], tmp_path / "plain",
                                     **{**over, "algorithm.prior_weight": 0.0}), "d.yaml")
    assert main(["train", "--config", str(plain)]) == 0
    c = role_weights(tmp_path / "plain" / "checkpoints" / "iter_0000004", "target_teacher")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # resume without the class images: one clear error
    import shutil

    shutil.rmtree(tmp_path / "stopped" / "prior_images")
    more = _write(tmp_path, _recipe(pipes["sd15"], pipes["shots"], tmp_path / "stopped",
                                    **{**over, "train.iterations": 6}), "e.yaml")
    assert main(["train", "--config", str(more)]) != 0


def test_exported_ddim_pipeline_equals_sample(pipes, tmp_path):
    """export writes a DDIMScheduler; the plain diffusers pipeline with the same generator gives `sample`'s
    images to 1e-5 (trailing timesteps from T-1, diffusers' step rule, the model's own ε)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    rec = _recipe(pipes["pixel"], pipes["shots"], tmp_path / "run")
    assert main(["train", "--config", str(_write(tmp_path, rec))]) == 0
    out = tmp_path / "export"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    info = json.loads((out / "unidad_student.json").read_text())
    assert info["steps"] == 5 and info["pipeline_call"] == {"num_inference_steps": 5}
    f = tmp_path / "ours.safetensors"
    assert main(["sample", "--run", str(tmp_path / "run"), "--num", "3", "--generator-seed", "7", "--out", str(f)]) == 0
    ours = load_file(str(f))["images"]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.scheduler.set_timesteps(5)
    assert pipe.scheduler.timesteps.tolist() == info["timesteps"]
    img = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np", num_inference_steps=5).images
    theirs = torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0.01


def test_finetune_bad_input(pipes, tmp_path):
    from unidad_dist.errors import UserError

    with pytest.raises(UserError, match="nothing to split"):
        _cfg(pipes, tmp_path, **{"placement.mode": "split"})
    with pytest.raises(UserError, match="target_teacher.sample_steps"):
        _cfg(pipes, tmp_path, **{"target_teacher.sample_steps": 0})
    with pytest.raises(UserError, match="unknown config key 'student"):
        _cfg(pipes, tmp_path, **{"student.steps": 2})


def test_adapt_then_distill_by_hand_distils_the_exported_teacher(pipes, tmp_path):
    """The two stages as docs/algorithm.md §11 gives them: finetune, export, then Uni-DAD with a = 1 against the
    frozen exported teacher, the student and fake teacher starting from it (the source teacher off)."""
    from unidad_dist.train.checkpoint import role_weights

    assert main(["train", "--config", str(_write(tmp_path, _recipe(pipes["pixel"], pipes["shots"],
                                                                  tmp_path / "stage1")))]) == 0
    assert main(["export", "--run", str(tmp_path / "stage1"), "--out", str(tmp_path / "adapted")]) == 0
    unet = str(tmp_path / "adapted" / "unet")
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "stage2", **{
        "algorithm.a": 1.0, "source_teacher.enabled": False, "target_teacher.mode": "frozen",
        "target_teacher.init": unet, "student.init": unet, "fake_teacher.init": unet,
        "student.optimizer.lr": 1e-30})  # steps below fp32 resolution: the student shows where it started
    assert main(["train", "--config", str(_write(tmp_path, rec, "stage2.yaml"))]) == 0
    adapted = role_weights(tmp_path / "stage1" / "checkpoints" / "iter_0000002", "target_teacher")
    student = role_weights(tmp_path / "stage2" / "checkpoints" / "iter_0000002", "student")
    fake = role_weights(tmp_path / "stage2" / "checkpoints" / "iter_0000002", "fake_teacher")
    assert set(adapted) <= set(student) and all(torch.equal(adapted[k], student[k]) for k in adapted)
    assert any(not torch.equal(adapted[k], fake[k]) for k in adapted)  # the fake teacher trained from it
