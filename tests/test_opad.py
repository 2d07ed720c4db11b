"""OPAD (issue 17 §1, docs/algorithm.md §12): teacher and student trained jointly on one shared text encoder,
only cross-attention K/V training; the teacher step changes no student weight and vice versa, the discriminator
step neither; the student's alignment loss is measured against the teacher's x̂0 of its own forward-diffused
sample; the collaborative phase; bit-identical resume; split placement; bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.core.draws import SampleDraws
from unidad_dist.errors import UserError


def _recipe(pipe, shots, run_dir, **over) -> dict:
    rec = {
        "run": {"name": "opad", "dir": str(run_dir), "seed": 0},
        "train": {"iterations": 2, "batch_size": 2},
        "algorithm": {"name": "opad", "features": "stand_in", "w_adv": 0.5},
        "concept_teacher": {"backbone": str(pipe), "precision": "fp32", "sample_steps": 3,
                    "optimizer": {"lr": 1e-2, "warmup": 0}},
        "student": {"precision": "fp32", "optimizer": {"lr": 1e-2, "warmup": 0}},
        "discriminator": {"precision": "fp32", "optimizer": {"lr": 1e-2, "warmup": 0}},
        "data": {"target": {"path": str(shots), "class_name": "cat"}},
        "logging": {"progress": False, "grid_size": 4},
        "eval": {"num_samples": 4},
    }
    return testing.apply_overrides(rec, over)


def _cfg(pipes, tmp_path, form="sd15", **over):
    from unidad_dist.config import config_from_dict

    return config_from_dict(_recipe(pipes[form], pipes["shots"], tmp_path / "run", **over))


def _method(cfg, rt):
    from unidad_dist.methods.opad import OPAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    return OPAD(cfg, models, rt), models


def _weights(models) -> dict:
    return {r: {k: v.detach().clone() for k, v in role.module.state_dict().items()} for r, role in models.roles.items()}


def _changed(before: dict, after: dict) -> dict:
    return {r: sorted(k for k in before[r] if not torch.equal(before[r][k], after[r][k])) for r in before}


def _kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def test_each_step_moves_only_its_own_role_and_only_cross_attention_kv(pipes, tmp_path, rt):
    """Teacher step: teacher K/V only; student step: student K/V only; discriminator step: its heads only."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    steps, stray = [], []

    def grads(role):
        return [n for n, p in models.roles[role].module.named_parameters() if p.grad is not None and p.grad.any()]

    for name in ("concept_teacher", "student", "discriminator"):
        orig = models.roles[name].step

        def spy(it, name=name, orig=orig):
            steps.append((name, _weights(models)))
            if name == "student":  # the student's backward put no gradient into the teacher or the discriminator
                stray.extend(grads("concept_teacher") + grads("discriminator"))
            return orig(it)

        models.roles[name].step = spy
    before = _weights(models)
    logs = m.step(0)
    after = _weights(models)
    assert [s[0] for s in steps] == ["concept_teacher", "student", "discriminator"]
    assert stray == []
    # between the teacher's step and the student's step only the teacher changed, and so on
    snaps = [s[1] for s in steps] + [after]
    expect = {"concept_teacher": 1, "student": 2, "discriminator": 3}
    for role, k in expect.items():
        for j in range(1, 4):
            ch = _changed(snaps[j - 1], snaps[j])
            if j == k:
                assert ch[role], f"{role} did not change in its own step"
            else:
                assert not ch[role], f"{role} changed in step {j}: {ch[role][:3]}"
    ch = _changed(before, after)
    assert ch["concept_teacher"] and all(_kv(k) for k in ch["concept_teacher"])
    assert ch["student"] and all(_kv(k) for k in ch["student"])
    assert ch["discriminator"] and all(k.startswith("heads.") for k in ch["discriminator"])
    trainable = [n for n, p in models.roles["student"].module.named_parameters() if p.requires_grad]
    assert trainable and all(_kv(n) for n in trainable)
    for key in ("concept_teacher/denoise", "student/mse", "student/lpips", "student/identity", "student/adv",
                "discriminator/gan_d"):
        assert key in logs, key


def test_one_text_encoder_serves_teacher_and_student(pipes, tmp_path, rt):
    """Both roles' conditions come from the one text conditioner (one module object); the run has no second
    copy of the encoder."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    conds = {}
    for name in ("concept_teacher", "student"):
        role = models.roles[name]
        for attr in ("train_forward", "forward"):
            orig = getattr(role, attr)

            def spy(x_t, t, cond, *a, name=name, orig=orig):
                conds.setdefault(name, []).append(cond["encoder_hidden_states"])
                return orig(x_t, t, cond, *a)

            setattr(role, attr, spy)
    calls = []
    enc = models.text.encode

    def spy_encode(prompts):
        calls.append(list(prompts))
        return enc(prompts)

    models.text.encode = spy_encode
    m.step(0)
    assert conds["concept_teacher"] and conds["student"] and calls
    n_encoders = [mod for mod in [models.text] + [r.module for r in models.roles.values()]
                  if any(type(x).__name__ == "CLIPTextModel" for x in mod.modules())]
    assert n_encoders == [models.text]


def test_the_student_is_pulled_toward_the_teachers_x0_of_its_own_noised_sample(pipes, tmp_path, rt):
    """The caller's arguments: the teacher sees the student's sample noised with the step's own draws, and the
    alignment terms compare the student's pixels with the teacher's x̂0 decoded — checked by recomputing the
    loss independently."""
    cfg = _cfg(pipes, tmp_path, **{"algorithm.w_adv": 0.0})
    m, models = _method(cfg, rt)
    seen = {}
    orig_tx = m.teacher_x0

    def spy_tx(x_t, t, cond):
        out = orig_tx(x_t, t, cond)
        seen.update(x_t=x_t.clone(), t=t.clone(), x_tc=out.clone())
        return out

    m.teacher_x0 = spy_tx
    orig_sl = m.student_loss

    def spy_sl(x, fb):
        seen["x"] = x.detach().clone()
        loss, logs = orig_sl(x, fb)
        seen["loss"] = float(loss.detach())
        return loss, logs

    m.student_loss = spy_sl
    m.step(0)
    d = SampleDraws(0, 0, [0, 1], rt.device)
    t = d.randint(cfg.algorithm.t_min, cfg.algorithm.t_max + 1, "student", "align_t")
    n = d.randn(models.sample_shape, "student", "align_noise")
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], models.schedule.add_noise(seen["x"], n, t))
    with torch.no_grad():
        p_s, p_tc = models.codec.decode_differentiable(seen["x"]), models.codec.decode_differentiable(seen["x_tc"])
        f = models.features
        want = (F.mse_loss(p_s, p_tc) + f.perceptual(p_s, p_tc).mean()
                + (1 - (f.identity(p_s) * f.identity(p_tc)).sum(-1)).mean())
    assert seen["loss"] == pytest.approx(float(want), rel=1e-5)
    assert float(want) > 0


def test_the_adversarial_term_labels_real_and_fake_the_right_way(pipes, tmp_path, rt):
    """With non-zero logits: the discriminator loss is softplus(-D(real)) + softplus(D(fake)) on the shots and the
    student's samples, and the student's term pushes D(fake) up (its input-gradient descends softplus(-D))."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    disc = models.roles["discriminator"]
    with torch.no_grad():
        for h in disc.module.heads.heads:
            h.bias.fill_(1.5)
    got = []
    orig = disc.train_discriminate

    def spy(x_t, t, cond):
        out = orig(x_t, t, cond)
        got.append(out.detach().clone())
        return out

    disc.train_discriminate = spy
    logs = m.step(0)
    real, fake = got
    want = float(F.softplus(-real).mean() + F.softplus(fake).mean())
    assert logs["discriminator/gan_d"] == pytest.approx(want, rel=1e-5)
    assert logs["student/adv"] == pytest.approx(float(F.softplus(-fake).mean()), rel=0.2)


def test_the_collaborative_phase_starts_where_configured_and_mixes_its_fraction(pipes, tmp_path, rt):
    cfg = _cfg(pipes, tmp_path, **{"train.batch_size": 8, "algorithm.collab_start": 2, "algorithm.collab_every": 3,
                                   "algorithm.collab_pool": 4, "algorithm.collab_fraction": 0.25,
                                   "algorithm.w_identity": 0.0, "algorithm.w_lpips": 0.0})
    m, models = _method(cfg, rt)
    refreshed, fractions = [], []
    orig = m.refresh_pool

    def spy(it):
        refreshed.append(it)
        orig(it)

    m.refresh_pool = spy
    for it in range(9):
        logs = m.step(it)
        fractions.append(logs.get("concept_teacher/collab_fraction"))
    assert refreshed == [2, 5, 8]
    assert fractions[:2] == [None, None]
    mixed = fractions[2:]
    assert all(f is not None for f in mixed)
    assert 0.1 <= sum(mixed) / len(mixed) <= 0.4  # 7 x 8 Bernoulli(0.25) draws (sd 0.06)
    # the mixed samples are the pool's: the teacher's real batch holds pool images where the mask says so
    d = SampleDraws(0, 8, list(range(8)), rt.device)
    batch = models.data.batch(d)
    pool = m.pool
    for role in ("concept_teacher", "discriminator"):  # the teacher's data and the student's real set
        real, _, mask = m.real_batch(batch, d, role)
        assert mask.any() and (~mask).any(), role
        assert all(any(torch.equal(r, p) for p in pool) for r in real[mask])
        assert not any(any(torch.equal(r, p) for p in pool) for r in real[~mask])
    state = json.loads(json.dumps(m.state_dict()))
    m2, _ = _method(cfg, rt)
    m2.load_state_dict(state)
    assert torch.equal(m2.pool, m.pool) and m2.pool_prompts == m.pool_prompts


def test_a_backbone_without_cross_attention_is_refused(pipes, tmp_path, rt):
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, form="pixel")
    with pytest.raises(UserError, match="cross-attention key/value"):
        build(cfg, rt)


def test_paper_features_without_weights_name_the_files_and_the_stand_in(pipes, tmp_path, rt, monkeypatch):
    from unidad_dist.train.build import build

    for env in ("UNIDAD_CLIP", "UNIDAD_LPIPS_VGG16"):
        monkeypatch.delenv(env, raising=False)
    cfg = _cfg(pipes, tmp_path, **{"algorithm.features": "paper"})
    with pytest.raises(UserError) as e:
        build(cfg, rt)
    msg = str(e.value)
    assert "clip-vit-base-patch32" in msg and "vgg16-397923af.pth" in msg and "algorithm.features=stand_in" in msg


def _train(tmp_path, rec, *extra):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(rec))
    return main(["train", "--config", str(f), *extra])


@pytest.mark.slow
def test_opad_resumes_bit_identically_and_exports(pipes, tmp_path):
    """4 iterations with the collaborative phase refreshing at 1 and 3, stopped after 2 and resumed, equal the
    uninterrupted run bit for bit (every role, the pool); the student exports as a diffusers pipeline."""
    over = {"train.iterations": 4, "checkpoint.every": 2, "algorithm.collab_start": 1, "algorithm.collab_every": 2,
            "algorithm.collab_pool": 2, "algorithm.collab_fraction": 0.5, "student.ema": 0.9, "run.deterministic": True}
    full = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "full", **over)
    assert _train(tmp_path, full) == 0
    part = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "part", **over)
    assert _train(tmp_path, part, "train.iterations=2") == 0
    assert _train(tmp_path, part) == 0
    from unidad_dist.train.checkpoint import role_weights

    ck = "checkpoints/iter_0000004"
    for role in ("student", "concept_teacher", "discriminator"):
        a, b = role_weights(tmp_path / "full" / ck, role), role_weights(tmp_path / "part" / ck, role)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), role
    sa = json.loads((tmp_path / "full" / ck / "method_rank0.json").read_text())
    sb = json.loads((tmp_path / "part" / ck / "method_rank0.json").read_text())
    assert sa["collab"] == sb["collab"] and sa["collab"]["iteration"] == 3
    assert main(["export", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "unet").is_dir()


@pytest.mark.slow
def test_opad_in_split_placement_on_2_ranks_equals_one_rank(pipes, tmp_path):
    """Split placement (student on rank 0; teacher and discriminator on rank 1, the exchange carrying the samples
    one way and x̂0_tc + the adversarial input-gradient the other) trains as the colocated 1-rank run does."""
    import subprocess
    import sys

    from unidad_dist.train.checkpoint import role_weights

    over = {"train.iterations": 3, "algorithm.collab_start": 1, "algorithm.collab_every": 1,
            "algorithm.collab_pool": 2, "algorithm.collab_fraction": 0.5}
    for role in ("concept_teacher", "student", "discriminator"):  # Adam with eps 1e-8 turns rounding into lr-sized steps
        over.update({f"{role}.optimizer.lr": 1e-4, f"{role}.optimizer.eps": 1e-3})
    one = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "one", **over)
    assert _train(tmp_path, one) == 0
    split = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "split", **{**over, "placement.mode": "split"})
    f = tmp_path / "split.yaml"
    f.write_text(yaml.safe_dump(split))
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config", str(f)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = "checkpoints/iter_0000003"
    for role in ("student", "concept_teacher", "discriminator"):
        a, b = role_weights(tmp_path / "one" / ck, role), role_weights(tmp_path / "split" / ck, role)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=f"{role}.{k}")
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert any("student/mse" in r_ and "concept_teacher/denoise" in r_ and "discriminator/gan_d" in r_ for r_ in lines)


@pytest.mark.slow
def test_the_shipped_recipe_runs_with_a_tiny_model(pipes, tmp_path, repo_root):
    """recipes/opad_subject.yaml with its paths swapped for a tiny SD-form pipeline (teacher and student),
    the stand-in feature networks (no CLIP/LPIPS weights here) and 2 iterations; its own settings survive."""
    recipe = repo_root / "recipes" / "opad_subject.yaml"
    rec = yaml.safe_load(recipe.read_text())
    pipe = pipes["sd15"]
    over = [f"concept_teacher.backbone={pipe}", f"student.backbone={pipe}", f"data.target.path={pipes['shots']}",
            f"run.dir={tmp_path / 'run'}", "train.iterations=2", "checkpoint.every=0", "logging.progress=false",
            "logging.sample_every=0", "logging.grid_size=2", "eval.num_samples=2", "algorithm.features=stand_in",
            "algorithm.collab_start=1", "algorithm.collab_pool=2"]
    assert main(["train", "--config", str(recipe), *over]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["algorithm"]["name"] == "opad" and saved["algorithm"]["kv_only"] is True
    assert saved["algorithm"]["w_adv"] == rec["algorithm"]["w_adv"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and "stand-in" in summary["features"]
    assert summary["collab_pool_iteration"] == 1


def test_paper_features_are_the_evaluation_networks_and_pass_gradients(tmp_path, monkeypatch):
    """algorithm.features=paper: the identity embedding is CLIP's image embedding as evaluation computes it (the
    processor's resize/crop/normalisation done in torch), the perceptual distance is evaluation's LPIPS-VGG, and
    both pass gradients to the images."""
    from eval_fixtures import seeded_images, seeded_state
    from test_eval_networks import FIXTURE, _file, _located, _tiny_clip

    from unidad_dist.core.images import to_uint8
    from unidad_dist.eval import alignment, networks, paper

    clip_dir = _tiny_clip(tmp_path / "clip")
    trunk = _file(tmp_path, "vgg.pth", seeded_state(FIXTURE["vgg16_keys"]))
    heads = _file(tmp_path, "heads.pth", seeded_state(FIXTURE["lpips_heads_keys"]))
    found = {"clip": networks.locate("clip", str(clip_dir), check=(("model_type", "clip"),)),
             "vgg16": _located("vgg16", trunk), "lpips_heads": _located("lpips_heads", heads)}
    monkeypatch.setattr(alignment, "locate", lambda name, configured=None: found[name])
    feats = alignment.build_features("paper", None, 0, torch.device("cpu"))
    x = to_uint8(seeded_images(4, 32, 1)).float() / 127.5 - 1  # 8-bit images: the processor's input exactly
    y = to_uint8(seeded_images(4, 32, 2)).float() / 127.5 - 1
    model, proc, _ = networks.load_clip(found["clip"])
    want = paper.clip_image_embeddings(model, proc, to_uint8(x))
    torch.testing.assert_close(feats.identity(x), want, atol=1e-5, rtol=1e-4)
    lp = networks.load_lpips(found["vgg16"], found["lpips_heads"])
    torch.testing.assert_close(feats.perceptual(x, y), lp(x, y))
    xg = x.clone().requires_grad_(True)
    ((1 - (feats.identity(xg) * feats.identity(y)).sum(-1)).mean() + feats.perceptual(xg, y).mean()).backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in feats.parameters())
    assert set(feats.sha256) == {"clip", "vgg16", "lpips_heads"}


@pytest.mark.parametrize("shape, size", [((2, 3, 96, 80), (40, 34)), ((1, 3, 32, 32), (56, 48))])
def test_the_clip_resize_is_bicubic_interpolation_as_matrices(shape, size):
    """PaperFeatures resizes with two matrix products (a deterministic CUDA backward) that equal PyTorch's
    antialiased bicubic interpolate, down and up."""
    from unidad_dist.eval.alignment import resize_bicubic

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_bicubic(x, *size), want, atol=1e-4, rtol=0)


def test_a_student_backbone_of_another_text_family_and_a_t_max_beyond_the_schedule_are_refused(pipes, tmp_path, rt):
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, **{"student.backbone": str(pipes["sdxl"])})
    with pytest.raises(UserError, match="another text conditioning.*cross_attention_dim 64 vs 32"):
        build(cfg, rt)
    with pytest.raises(UserError, match="algorithm.t_max=1000 .* timesteps 0..999"):
        _method(_cfg(pipes, tmp_path, **{"algorithm.t_max": 1000}), rt)


def test_without_the_adversarial_term_there_is_no_discriminator(pipes, tmp_path, rt):
    cfg = _cfg(pipes, tmp_path, **{"algorithm.w_adv": 0.0, "discriminator.grad_accum": 2})
    m, models = _method(cfg, rt)
    assert set(models.roles) == {"concept_teacher", "student"}
    logs = m.step(0)
    assert "student/adv" not in logs and not any(k.startswith("discriminator/") for k in logs)
    assert m.calls["student"] == 1  # one micro-batch of samples: none made for an absent discriminator
