"""The Uni-DAD iteration: who gets gradients, who is called, what changes."""

import pytest
import torch

from unidad_dist.core.draws import SampleDraws
from unidad_dist.errors import UserError
from unidad_dist.methods.generate import generate, student_timesteps
from unidad_dist.methods.unidad import UniDAD
from unidad_dist.parallel import engines
from unidad_dist.train.build import build


def _setup(make_cfg, rt, form="pixel", **over):
    cfg = make_cfg(form, **over)
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    return cfg, models, UniDAD(cfg, models, rt)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _draws(rt, it=0, n=2):
    return SampleDraws(0, it, list(range(n)), rt.device)


def _roles(models):
    out = {"fake_teacher": models.fake_teacher.module, "source_teacher": models.source_teacher.module}
    if models.target_teacher is not None:
        out["target_teacher"] = models.target_teacher.module
    return out


@pytest.mark.parametrize("form", ["pixel", "sd15"])
def test_student_step_touches_only_the_student(make_cfg, rt, form):
    cfg, models, method = _setup(make_cfg, rt, form, **{"gan_heads.lambda_g": 0.5})
    before = {k: _params(m) for k, m in _roles(models).items()}
    student_before = _params(models.student.module)
    d = _draws(rt)
    batch = models.data.batch(d)
    x = method.generate_train(d, batch, None)
    loss, _ = method.student_loss(x, batch, d)
    models.student.backward(loss)
    for name, module in _roles(models).items():
        assert all(p.grad is None for p in module.parameters()), f"{name} received gradients in the student step"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.student.module.parameters())
    models.student.step(0)
    for name, module in _roles(models).items():
        assert _same(before[name], _params(module)), f"{name} changed in the student step"
    assert not _same(student_before, _params(models.student.module))


def test_gan_generator_term_reaches_the_student(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"gan_heads.lambda_g": 1.0})
    d = _draws(rt)
    batch = models.data.batch(d)
    x = method.generate_train(d, batch, None)
    grad, _ = method.gan_generator_input_grad(x, batch, d)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in models.fake_teacher.module.parameters())

    def student_grads(lambda_g):
        method.cfg.gan_heads.lambda_g = lambda_g
        models.student.zero_grad()
        xx = method.generate_train(d, batch, None)
        loss, _ = method.student_loss(xx, batch, d)
        models.student.backward(loss)
        return torch.cat([p.grad.flatten() for p in models.student.params])

    assert not torch.allclose(student_grads(0.0), student_grads(1.0))


def test_fake_step_does_not_change_student_or_teachers(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt)
    student_before = _params(models.student.module)
    src_before = _params(models.source_teacher.module)
    fake_before = _params(models.fake_teacher.module)
    d = _draws(rt)
    batch = models.data.batch(d)
    with torch.no_grad():
        x = method.generate_train(d, batch, None)
    loss, logs = method.fake_loss(x, batch, d)
    models.fake_teacher.backward(loss)
    assert all(p.grad is None for p in models.student.module.parameters())
    models.fake_teacher.step(0)
    assert _same(student_before, _params(models.student.module))
    assert _same(src_before, _params(models.source_teacher.module))
    assert not _same(fake_before, _params(models.fake_teacher.module))
    assert "gan_d" in logs


def test_frozen_source_teacher_never_changes(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"train.fake_updates_per_student": 2})
    src = _params(models.source_teacher.module)
    tgt = _params(models.target_teacher.module)
    for it in range(4):
        method.step(it)
    assert _same(src, _params(models.source_teacher.module))
    assert not _same(tgt, _params(models.target_teacher.module))  # online: it trains
    assert all(not p.requires_grad for p in models.source_teacher.module.parameters())


def _forbid(role):
    def boom(*a, **k):
        raise AssertionError(f"{role.name} must not be called")
    role.forward = boom


def test_a0_never_calls_target_teacher(make_cfg, rt, pipes):
    cfg, models, method = _setup(make_cfg, rt, **{"algorithm.a": 0.0, "target_teacher.mode": "frozen",
                                                  "target_teacher.init": str(pipes["pixel"])})
    _forbid(models.target_teacher)
    for it in range(2):
        method.step(it)
    assert method.calls["target_teacher"] == 0 and method.calls["source_teacher"] > 0


def test_a1_never_calls_source_teacher(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"algorithm.a": 1.0})
    _forbid(models.source_teacher)
    for it in range(2):
        method.step(it)
    assert method.calls["source_teacher"] == 0 and method.calls["target_teacher"] > 0


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("unroll", ["full", "backward_simulation"])
def test_k_step_generation_makes_k_calls(make_cfg, rt, K, unroll):
    cfg, models, method = _setup(make_cfg, rt, **{"student.steps": K, "student.unroll": unroll})
    d = _draws(rt)
    batch = models.data.batch(d)
    method.calls.clear()
    with torch.no_grad():
        method.sample(2)
    assert method.calls["student"] == K
    method.calls.clear()
    x = method.generate_train(d, batch, None if unroll == "full" else K - 1)
    assert method.calls["student"] == K
    assert x.requires_grad


def test_backward_simulation_grad_only_in_last_step(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"student.steps": 3})
    calls = []
    ts = student_timesteps(3, 1000)

    def call(x_t, t):
        calls.append(torch.is_grad_enabled())
        return x_t * 0.5

    z = torch.randn(2, 3, 4, 4)
    generate(call, z, ts, method.schedule, lambda k: torch.randn_like(z), grad_step=2)
    assert calls == [False, False, True]
    assert ts == [999, 666, 333]
    assert student_timesteps(4, 1000) == [999, 749, 499, 249]


def test_source_teacher_gets_prompt_without_rare_token(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, "sd15", **{"data.source.prompts": ["a {rare} {cls} on a beach"],
                                                          "data.target.rare_token": "sks", "algorithm.a": 0.5})
    seen = []
    orig = models.source_teacher.forward

    def spy(x_t, t, cond, force_fp32=False):
        seen.append(cond["encoder_hidden_states"].detach().clone())
        return orig(x_t, t, cond, force_fp32)

    models.source_teacher.forward = spy
    d = _draws(rt)
    batch = models.data.batch(d)
    assert batch.prompts == ["a sks cat on a beach"] * 2
    assert batch.prompts_src == ["a cat on a beach"] * 2
    x = method.generate_train(d, batch, None)
    method.student_loss(x, batch, d)
    expected = models.data.conditioner.encode(["a cat on a beach"] * 2)["encoder_hidden_states"]
    with_rare = models.data.conditioner.encode(["a sks cat on a beach"] * 2)["encoder_hidden_states"]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], with_rare)


@pytest.mark.parametrize("form", ["pixel", "sd15"])
def test_translate_shifts_each_target_image_by_its_own_draw(make_cfg, rt, form):
    """data.target.translate: each real image is its shot (or flip) moved by (dx, dy) whole cells drawn per
    sample, the border reflected — checked against an index computation, not the padding code; 0: unchanged."""
    d = SampleDraws(0, 3, list(range(8)), rt.device)
    _, plain, _ = _setup(make_cfg, rt, form, **{"data.target.hflip": True})
    cfg, models, _ = _setup(make_cfg, rt, form, **{"data.target.translate": 0.25, "data.target.hflip": True})
    real, unshifted = models.data.batch(d).real, plain.data.batch(d).real
    shot = d.randint(0, models.data.num_shots, "target", "shot").cpu()
    flip = (d.rand("target", "flip") < 0.5).cpu()
    base = torch.where(flip[:, None, None, None], models.data.model_space_flipped[shot], models.data.model_space[shot])
    torch.testing.assert_close(unshifted, base.to(unshifted.device), rtol=0, atol=0)  # translate 0: as before
    h, w = base.shape[-2:]
    m = int(0.25 * w)
    dx = d.randint(-m, m + 1, "target", "shift_x").cpu()
    dy = d.randint(-m, m + 1, "target", "shift_y").cpu()
    assert (dx != 0).any() and (dy != 0).any()

    def reflect(k, n):
        k = k.abs()
        return torch.where(k > n - 1, 2 * (n - 1) - k, k)

    for b in range(8):
        rows = reflect(torch.arange(h) - dy[b], h)
        cols = reflect(torch.arange(w) - dx[b], w)
        want = base[b][:, rows][:, :, cols]
        torch.testing.assert_close(real[b].cpu(), want, rtol=0, atol=0)
    assert any(not torch.equal(real[b].cpu(), base[b]) for b in range(8))


def test_draws_do_not_depend_on_batch_split(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt)
    whole = SampleDraws(0, 7, [0, 1, 2, 3], rt.device)
    parts = [SampleDraws(0, 7, [0, 1], rt.device), SampleDraws(0, 7, [2, 3], rt.device)]
    torch.testing.assert_close(whole.randn((3, 4, 4), "student", "z"),
                               torch.cat([p.randn((3, 4, 4), "student", "z") for p in parts]))
    torch.testing.assert_close(whole.randint(0, 1000, "student", "dmd_t"),
                               torch.cat([p.randint(0, 1000, "student", "dmd_t") for p in parts]))
    b_whole = models.data.batch(whole)
    b_parts = [models.data.batch(p) for p in parts]
    torch.testing.assert_close(b_whole.real, torch.cat([b.real for b in b_parts]))  # shot choice and flips
    # different role/purpose/iteration -> different draws
    assert not torch.equal(whole.randn((3,), "student", "z"), whole.randn((3,), "fake_teacher", "z"))
    assert not torch.equal(whole.randn((3,), "student", "z"), SampleDraws(0, 8, [0, 1, 2, 3], rt.device).randn((3,), "student", "z"))


def test_grad_accumulation_equals_larger_batch(tmp_path, pipes, rt):
    """batch 2b in one micro-batch and batch b over 2 accumulated micro-batches see the same samples
    (global sample indices) and so produce the same gradient for every role. A v-prediction backbone is
    used: converting ε to x̂0 on a linear pixel schedule divides by √ᾱ_t ≈ 0.006, which turns
    batch-size-dependent float rounding into differences larger than the tolerance."""
    from unidad_dist import testing
    from unidad_dist.config import config_from_dict

    pipe = testing.write_pixel_pipeline(tmp_path / "v", prediction_type="v_prediction")

    def run(batch, accum):
        rec = testing.tiny_recipe(pipe, pipes["shots"], tmp_path / "run", **{
            "train.batch_size": batch, "student.grad_accum": accum, "fake_teacher.grad_accum": accum,
            "target_teacher.grad_accum": accum})
        cfg = config_from_dict(rec)
        models = build(cfg, rt)
        engines.attach(models, cfg, rt)
        method = UniDAD(cfg, models, rt)
        grads = {}
        for name, role in models.trainable_roles().items():
            orig = role.step

            def record(it, role=role, name=name, orig=orig):
                grads[(name, it)] = torch.cat([p.grad.flatten() for p in role.params if p.grad is not None])
                return orig(it)
            role.step = record
        for it in range(2):
            method.step(it)
        return grads

    a, b = run(4, 1), run(2, 2)
    assert {name for name, _ in a} == {"student", "fake_teacher", "target_teacher"}
    for key in a:
        err = float((a[key] - b[key]).abs().max())
        assert err <= 1e-4 * float(a[key].abs().max()) + 1e-8, (key, err, float(a[key].abs().max()))


def test_student_steps_every_ratio_iterations(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"train.fake_updates_per_student": 3})
    stepped = []
    orig = models.student.step
    models.student.step = lambda it: stepped.append(it) or orig(it)
    for it in range(7):
        method.step(it)
    assert stepped == [0, 3, 6]


def test_precision_modes_run(make_cfg, rt):
    for prec in ("bf16_autocast", "bf16"):
        cfg, models, method = _setup(make_cfg, rt, **{"student.precision": prec, "fake_teacher.precision": prec,
                                                      "target_teacher.precision": prec})
        logs = method.step(0)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
        if prec == "bf16":
            assert next(models.student.module.parameters()).dtype == torch.bfloat16
            # DeepSpeed's bf16 mode: bf16 weights in the module, fp32 master copies in the optimizer
            inner = models.student.engine.optimizer.optimizer
            assert all(p.dtype == torch.float32 for g in inner.param_groups for p in g["params"])


def test_ema_tracks_student(make_cfg, rt):
    """The EMA follows e <- decay * e + (1 - decay) * w at every student step (not merely "differs")."""
    decay = 0.7
    cfg, models, method = _setup(make_cfg, rt, **{"student.ema": decay})
    student = models.student
    for it in range(2):
        before = _params(student.ema)
        method.step(it)
        ema, live = _params(student.ema), _params(student.module)
        assert not _same(ema, live) and not _same(ema, before)
        for k, e in ema.items():
            if e.dtype.is_floating_point:
                torch.testing.assert_close(e, decay * before[k] + (1 - decay) * live[k].float(), rtol=1e-6,
                                           atol=1e-7, msg=f"iteration {it}: {k}")
    assert models.student.inference_module() is models.student.ema
    with models.student.inference_weights() as m, models.student.inference_weights(use_ema=False) as live:
        assert m is models.student.ema and live is models.student.module


@pytest.mark.parametrize("ptype", ["v_prediction", "sample"])
def test_other_prediction_types(tmp_path, rt, pipes, ptype):
    from unidad_dist import testing
    from unidad_dist.config import config_from_dict

    pipe = testing.write_pixel_pipeline(tmp_path / ptype, prediction_type=ptype)
    cfg = config_from_dict(testing.tiny_recipe(pipe, pipes["shots"], tmp_path / "run"))
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    assert models.schedule.prediction_type == ptype
    logs = UniDAD(cfg, models, rt).step(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def test_karras_index_sampling_matches_the_face_setting(make_cfg, rt):
    """σ = 80, 6.32, 0.5 on the linear pixel schedule sit at t ≈ 933, 605, 144 (docs/algorithm.md §5)."""
    from unidad_dist.models.schedule import karras_index_timesteps

    cfg, models, method = _setup(make_cfg, rt, **{"algorithm.t_sampling": "karras_index"})
    grid = karras_index_timesteps(models.schedule)
    assert len(grid) == 1000 and bool((grid[1:] <= grid[:-1]).all())
    assert abs(int(grid[0]) - 933) <= 5 and int(grid[-1]) == 0
    t = method.draw_t(SampleDraws(0, 3, list(range(64)), rt.device), "student", "dmd_t", 20, 981)
    assert set(t.tolist()) <= set(grid.clamp(20, 980).tolist()) and int(t.min()) >= 20 and int(t.max()) <= 980


def test_target_teacher_steps_every_update_every_iterations(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, **{"target_teacher.update_every": 2})
    stepped = []
    orig = models.target_teacher.step
    models.target_teacher.step = lambda it: stepped.append(it) or orig(it)
    for it in range(5):
        method.step(it)
    assert stepped == [0, 2, 4]


def test_teacher_cfg_combines_uncond_and_cond(make_cfg, rt):
    cfg, models, method = _setup(make_cfg, rt, "sd15")
    d = _draws(rt)
    batch = models.data.batch(d)
    x_t = d.randn(models.sample_shape, "t", "x")
    t = torch.tensor([500, 900])
    with torch.no_grad():
        guided = method.teacher_x0("source_teacher", x_t, t, batch.cond_src, batch.uncond, 3.0)
        cond = method.teacher_x0("source_teacher", x_t, t, batch.cond_src, batch.uncond, 1.0)
        uncond = method.teacher_x0("source_teacher", x_t, t, batch.uncond, batch.uncond, 1.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_student_feedback_and_condition_dropout(make_cfg, rt):
    """OPAD feedback puts detached student samples into the target teacher's batch (after feedback_start);
    condition dropout swaps in the empty prompt — both as per-sample keyed draws."""
    cfg, models, method = _setup(make_cfg, rt, "sd15", **{"target_teacher.student_feedback": 0.5,
                                                          "target_teacher.feedback_start": 1,
                                                          "target_teacher.cond_dropout": 0.5})
    seen = []
    orig = models.target_teacher.train_forward
    models.target_teacher.train_forward = lambda x_t, t, cond: seen.append((x_t, cond)) or orig(x_t, t, cond)
    d = SampleDraws(0, 5, list(range(8)), rt.device)
    batch = models.data.batch(d)
    x = torch.randn_like(batch.real)
    n = d.randn(models.sample_shape, "target_teacher", "denoise_noise")
    t = d.randint(0, 1000, "target_teacher", "denoise_t")
    use_x = d.rand("target_teacher", "feedback") < 0.5
    drop = d.rand("target_teacher", "cond_dropout") < 0.5
    assert 0 < int(use_x.sum()) < 8 and 0 < int(drop.sum()) < 8
    for iteration, expect_x in ((0, torch.zeros_like(use_x)), (5, use_x)):
        seen.clear()
        method.target_loss(x, batch, d, iteration)
        x_t, cond = seen[0]
        src = torch.where(expect_x.view(-1, 1, 1, 1), x, batch.real)
        torch.testing.assert_close(x_t, models.schedule.add_noise(src, n, t))
        ehs = cond["encoder_hidden_states"]
        for i in range(8):
            want = batch.uncond if drop[i] else (batch.cond if expect_x[i] else batch.real_cond)
            torch.testing.assert_close(ehs[i], want["encoder_hidden_states"][i])


def _fake_step_grad_norm(make_cfg, rt, stage, precision):
    """(logged grad_norm, norm of the gradients before the step where they are whole on the module, else None)
    of one fake-teacher step clipped at 1e-3."""
    cfg, models, method = _setup(make_cfg, rt, **{"fake_teacher.zero_stage": stage,
                                                  "fake_teacher.precision": precision,
                                                  "fake_teacher.optimizer.clip_grad_norm": 1e-3})
    d = _draws(rt)
    batch = models.data.batch(d)
    x = method.generate_train(d, batch, None).detach()
    loss, _ = method.fake_loss(x, batch, d)
    fake = models.fake_teacher
    fake.backward(loss)
    grads = [p.grad.detach().float().clone() for p in fake.module.parameters() if p.grad is not None]
    expected = float(torch.stack([g.norm() for g in grads]).norm()) if grads else None
    return fake.step(0)["grad_norm"], expected


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16"])
def test_logged_grad_norm_is_the_norm_of_the_gradients(make_cfg, rt, precision):
    """grad_norm is the norm of the role's gradients before clipping (an fp32 engine at stage 0 keeps none,
    and it was logged as 0.0), and ZeRO-2 logs the same norm."""
    logged, expected = _fake_step_grad_norm(make_cfg, rt, 0, precision)
    assert expected > 1e-2  # clipping at 1e-3 acts: the log must be the norm before it
    tol = 2e-2 if precision == "bf16" else 1e-5
    assert abs(logged - expected) <= tol * expected, (logged, expected)
    if precision == "fp32":
        logged_z2, none = _fake_step_grad_norm(make_cfg, rt, 2, precision)
        assert none is None and abs(logged_z2 - expected) <= 1e-5 * expected, (logged_z2, expected)


def test_with_a_global_batch_the_target_warm_start_is_the_same_at_any_world_size(make_cfg, rt):
    """train.global_batch_size=4 with micro-batches of at most 4: one rank trains 1 x 4 and two ranks 1 x 2 each
    (batch_for_world at world 1 and 2); the target teacher's warm start takes the same 4 samples per step either
    way (in this world size's micro-batches) and ends at the same weights, to float rounding."""
    from unidad_dist.config import batch_for_world

    over = {"target_teacher.mode": "online", "algorithm.a": 0.75, "train.batch_size": 4,
            "train.global_batch_size": 4, "target_teacher.warm_start": 3, "target_teacher.warm_start_lr": 2e-3}
    weights, sizes = {}, {}
    for world in (1, 2):
        cfg = batch_for_world(make_cfg("pixel", **over), world)
        models = build(cfg, rt)
        m = UniDAD(cfg, models, rt)
        init = _params(models.target_teacher.module)
        seen, real_loss = [], m.target_loss
        m.target_loss = lambda x, batch, d, iteration: seen.append(list(d.indices)) or real_loss(x, batch, d, iteration)
        m.prepare()
        sizes[world] = seen
        weights[world] = _params(models.target_teacher.module)
    assert sizes[1] == [[0, 1, 2, 3]] * 3 and sizes[2] == [[0, 1], [2, 3]] * 3, sizes
    moved = max(float((weights[1][k] - init[k]).abs().max()) for k in init)
    apart = max(float((weights[1][k] - weights[2][k]).abs().max()) for k in init)
    # Adam (eps 1e-8) turns rounding in a near-zero gradient into a visible step: at most a few % of the
    # movement; drawing 2 samples per step instead of 4 (the world size's micro-batch) moves them apart by ~all
    assert moved > 1e-3 and apart < 0.05 * moved, (apart, moved)


def test_target_teacher_warm_start_fits_the_shots_and_nothing_else(make_cfg, rt, pipes):
    """target_teacher.warm_start: before the first iteration the online target teacher is trained on the
    target shots (every image its loss sees is a shot or its mirror image, one batch per step) and then
    denoises them much better than the source teacher it was copied from (measured with diffusers' own
    scheduler, fixed noise and timesteps); no other role changes; 0 leaves it a copy of the source."""
    from diffusers import DDPMScheduler

    from unidad_dist.errors import UserError

    over = {"target_teacher.mode": "online", "algorithm.a": 0.75, "train.batch_size": 4,
            "target_teacher.warm_start_lr": 2e-3}
    sched = DDPMScheduler.from_pretrained(pipes["pixel"], subfolder="scheduler")

    def shot_loss(module, shots):
        g = torch.Generator().manual_seed(3)
        x0 = shots.repeat(4, 1, 1, 1)
        n = torch.randn(x0.shape, generator=g)
        t = torch.tensor([100, 300, 500, 700, 900, 200, 400, 600][: len(x0)] * (len(x0) // 8 + 1))[: len(x0)]
        target = sched.get_velocity(x0, n, t) if sched.config.prediction_type == "v_prediction" else n
        with torch.no_grad():
            return float(((module(sched.add_noise(x0, n, t), t, None).float() - target) ** 2).mean())

    for steps in (0, 40):
        cfg = make_cfg("pixel", **over, **{"target_teacher.warm_start": steps})
        models = build(cfg, rt)
        m = UniDAD(cfg, models, rt)
        before = {r: _params(getattr(models, r).module) for r in ("student", "fake_teacher", "source_teacher")}
        seen, real_loss = [], m.target_loss
        m.target_loss = lambda x, batch, d, iteration: seen.append(batch.real.clone()) or real_loss(x, batch, d, iteration)
        out = m.prepare()
        assert len(seen) == steps
        allowed = torch.cat([models.data.model_space, models.data.model_space_flipped])
        for real in seen:
            assert real.shape[0] == 4 and all(any(torch.equal(r, a) for a in allowed) for r in real)
        for r, p in before.items():
            assert _same(p, _params(getattr(models, r).module)), r
        shots = models.data.model_space
        src, trg = shot_loss(models.source_teacher.module, shots), shot_loss(models.target_teacher.module, shots)
        if steps == 0:
            assert _same(_params(models.source_teacher.module), _params(models.target_teacher.module))
            assert "target_warm_start_loss" not in out
        else:
            assert trg < 0.7 * src, (trg, src)
            assert out["target_warm_start_loss"] > 0
    with pytest.raises(UserError, match="target_teacher.mode=online"):
        make_cfg("pixel", **{"target_teacher.mode": "off", "algorithm.a": 0.0, "target_teacher.warm_start": 5})


@pytest.mark.parametrize("role", ["target_teacher", "student"])
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_warm_start_ema(make_cfg, rt, role, ema, monkeypatch):
    """<role>.warm_start_ema: the role (the target teacher, the student) leaves its warm start with the EMA of
    its weights after each step, started from its weights before the first — computed here from the weights
    each Adam step left — not the last step's; 0 leaves the last step's. Out of [0, 1): an error naming the
    key. Only that role's warm start runs, so every Adam step is its."""
    steps = 4
    over = ({"target_teacher.mode": "online", "algorithm.a": 0.75} if role == "target_teacher" else
            {"student.warm_start_pairs": 8, "student.warm_start_batch": 4, "student.warm_start_teacher_steps": 2})
    cfg = make_cfg("pixel", **over, **{f"{role}.warm_start": steps, f"{role}.warm_start_lr": 2e-3,
                                       f"{role}.warm_start_ema": ema})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    params = [p for p in getattr(models, role).module.parameters() if p.requires_grad]
    want = [p.detach().clone().double() for p in params]
    last, real_step = [], torch.optim.Adam.step

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        last[:] = [p.detach().clone() for p in params]
        for w, p in zip(want, last):
            w.mul_(ema).add_(p.double(), alpha=1 - ema)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    m.prepare()
    got = [p.detach() for p in params]
    assert all(torch.allclose(g.double(), w, atol=1e-6) for g, w in zip(got, want))
    # the average is not the last step's weights (nor the start's): the EMA moved, and lags
    assert all(torch.equal(g, lw) for g, lw in zip(got, last)) == (ema == 0)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match=f"{role}.warm_start_ema"):
            make_cfg("pixel", **{f"{role}.warm_start_ema": bad})


@pytest.mark.parametrize("teacher", ["source", "target"])
def test_student_warm_start_regresses_onto_the_named_teachers_ddim_samples(make_cfg, rt, pipes, teacher):
    """student.warm_start: its pairs are (z, the named teacher's DDIM sample from z) — checked against a DDIM
    written here with the teacher's module and the scheduler's alphas — and with warm_start_teacher=target the
    target teacher is sampled after its own warm start; the student moves, the other roles do not."""
    from diffusers import DDPMScheduler

    cfg = make_cfg("pixel", **{"target_teacher.mode": "online", "algorithm.a": 0.75, "train.batch_size": 4,
                               "target_teacher.warm_start": 6, "target_teacher.warm_start_lr": 2e-3,
                               "student.warm_start": 3, "student.warm_start_pairs": 3,
                               "student.warm_start_teacher_steps": 3, "student.warm_start_batch": 3,
                               "student.warm_start_teacher": teacher})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    init = {r: _params(getattr(models, r).module) for r in ("student", "fake_teacher", "source_teacher", "target_teacher")}
    got, real_sample = {}, m.teacher_sample

    def spy(*args, **kw):
        got["target_then"] = _params(models.target_teacher.module)
        got["z"], got["x0"], _ = out = real_sample(*args, **kw)
        return out

    m.teacher_sample = spy
    out = m.prepare()
    assert out["warm_start_loss"] > 0 and out["target_warm_start_loss"] > 0
    trg_now = _params(models.target_teacher.module)
    assert not _same(init["target_teacher"], trg_now)  # its own warm start ran
    # the target teacher's samples are those of its warm-started weights: its warm start came first
    assert _same(got["target_then"], trg_now if teacher == "target" else init["target_teacher"])
    assert not _same(init["student"], _params(models.student.module))
    for r in ("fake_teacher", "source_teacher"):
        assert _same(init[r], _params(getattr(models, r).module)), r

    sched = DDPMScheduler.from_pretrained(pipes["pixel"], subfolder="scheduler")
    ab = sched.alphas_cumprod.double()
    module = getattr(models, f"{teacher}_teacher").module
    x = got["z"].double()
    ts = torch.linspace(sched.config.num_train_timesteps - 1, 0, 3).round().long().tolist()
    for i, t in enumerate(ts):
        with torch.no_grad():
            pred = module(x.float(), torch.full((x.shape[0],), t), None).double()
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        x0 = a * x - s * pred if sched.config.prediction_type == "v_prediction" else (x - s * pred) / a
        if sched.config.clip_sample:
            x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
        if i + 1 < len(ts):
            x = ab[ts[i + 1]].sqrt() * x0 + (1 - ab[ts[i + 1]]).sqrt() * (x - a * x0) / s
    assert torch.allclose(got["x0"].double(), x0, atol=1e-4), float((got["x0"].double() - x0).abs().max())


def _spy_warm_start(m, monkeypatch):
    """Record each student call of the warm start (input, t, output, grad on) and each regression's target."""
    from unidad_dist.methods import unidad

    calls, targets = [], []
    real_x0, real_loss = m.student_x0, unidad.losses.denoising_loss

    def student_x0(x, t, cond, module=None):
        out = real_x0(x, t, cond, module)
        calls.append((x.detach().clone(), int(t[0]), out.detach().clone(), torch.is_grad_enabled()))
        return out

    def loss(pred, target, *a, **kw):
        targets.append(target.detach().clone())
        return real_loss(pred, target, *a, **kw)

    m.student_x0 = student_x0
    monkeypatch.setattr(unidad.losses, "denoising_loss", loss)
    return calls, targets


def _teacher_ddim(models, pipe, x, ts):
    """The source teacher's deterministic DDIM from x at ts[0] over ts (x0 clipped), written with the
    scheduler's own alphas; returns (x0, {t: the trajectory's state there})."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    ab = sched.alphas_cumprod.double()
    x, states = x.double(), {}
    for i, t in enumerate(ts):
        states[t] = x.clone()
        with torch.no_grad():
            pred = models.source_teacher.module(x.float(), torch.full((x.shape[0],), t), None).double()
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        x0 = (a * x - s * pred if sched.config.prediction_type == "v_prediction" else (x - s * pred) / a).clamp(-1, 1)
        if i + 1 < len(ts):
            x = ab[ts[i + 1]].sqrt() * x0 + (1 - ab[ts[i + 1]]).sqrt() * (x - a * x0) / s
    return x0, states


@pytest.mark.parametrize("inputs", ["renoised", "trajectory"])
def test_student_warm_start_inputs_after_the_first_step(make_cfg, rt, pipes, inputs, monkeypatch):
    """student.warm_start_inputs: the student's input at each later step t_k is, with "trajectory", the teacher's
    own DDIM state at t_k on the way to the pair's x0 (t_k off the DDIM grid added to it) — checked against a DDIM
    written here over the grid with t_k inserted — and the regression's target is that same trajectory's x0; with
    "renoised", x0 noised afresh (no trajectory state)."""
    from diffusers import DDPMScheduler

    cfg = make_cfg("pixel", **{"student.steps": 3, "student.timesteps": [999, 700, 300], "student.warm_start": 2,
                               "student.warm_start_pairs": 3, "student.warm_start_teacher_steps": 3,
                               "student.warm_start_batch": 3, "student.warm_start_inputs": inputs})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    calls, targets = _spy_warm_start(m, monkeypatch)
    m.prepare()
    assert [t for _, t, _, _ in calls] == [999, 700, 300] * 2 and len(targets) == 6

    # the source teacher's DDIM over its 3-step grid (999, 500, 0), with 700 and 300 added for "trajectory"
    ab = DDPMScheduler.from_pretrained(pipes["pixel"], subfolder="scheduler").alphas_cumprod.double()
    d = SampleDraws(cfg.run.seed, -1, range(3), rt.device)
    z = d.randn(m.m.sample_shape, "warm_start", "z").double()
    x0, states = _teacher_ddim(models, pipes["pixel"], z, [999, 700, 500, 300, 0] if inputs == "trajectory"
                               else [999, 500, 0])

    def row(of: torch.Tensor, rows: torch.Tensor):  # the index of the row of `rows` that `of` is, else None
        hit = [j for j in range(rows.shape[0]) if torch.allclose(of.double(), rows[j], atol=1e-4)]
        return hit[0] if hit else None

    for (x_in, t, _, _), target in zip(calls, targets):
        for r in range(x_in.shape[0]):
            j = row(target[r], x0)
            assert j is not None, "the regression's target is not one of the teacher's samples"
            if t == 999:
                assert row(x_in[r], z) == j  # the pair's own noise
            elif inputs == "trajectory":
                assert row(x_in[r], states[t]) == j, t  # that trajectory's state at t
            else:
                assert all(row(x_in[r], states[u]) is None for u in states), t
                assert (x_in[r].double() - ab[t].sqrt() * x0[j]).std() > 0.5 * (1 - ab[t]).sqrt()
    with pytest.raises(UserError, match="student.warm_start_inputs"):
        make_cfg("pixel", **{"student.warm_start_inputs": "ode"})


def test_student_warm_start_refinement_regresses_the_students_own_states_onto_teacher_completions(make_cfg, rt, pipes,
                                                                                                monkeypatch):
    """student.warm_start_refine: after the warm start, each round runs the student's own chain on the pairs'
    noise (its x̂0 re-noised to the next timestep with noise keyed by (seed, pair, "warm_start_refine_<r>")) and
    regresses each later step from that state onto the teacher's DDIM completion from it — written here over the
    grid below t with the scheduler's own alphas (t = 500 lies on the 3-step grid, 300 off it); the first step keeps
    its pair (z -> the teacher's sample). Planted: the pair's x0 as the later steps' target, the teacher's trajectory
    states as their inputs, the pair's x0 re-noised instead of the student's x̂0, or one noise for every round each
    fail; the states do not depend on how the pairs are batched."""
    from diffusers import DDPMScheduler

    cfg = make_cfg("pixel", **{"student.steps": 3, "student.timesteps": [999, 500, 300], "student.warm_start": 1,
                               "student.warm_start_pairs": 3, "student.warm_start_teacher_steps": 3,
                               "student.warm_start_batch": 3, "student.warm_start_inputs": "trajectory",
                               "student.warm_start_refine": 2, "student.warm_start_refine_steps": 1})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    calls, targets = _spy_warm_start(m, monkeypatch)  # (input, t, output, grad on) of each student call
    m.prepare()
    # warm start (3, grad) | round 0: chain (2, no grad: the last x̂0 re-noises nothing), fit (3) | round 1: chain, fit
    fit, chain = [(999, True), (500, True), (300, True)], [(999, False), (500, False)]
    assert [(t, g) for _, t, _, g in calls] == fit + (chain + fit) * 2
    assert len(targets) == 9
    ab = DDPMScheduler.from_pretrained(pipes["pixel"], subfolder="scheduler").alphas_cumprod.double()

    def teacher_ddim(x, ts):
        return _teacher_ddim(models, pipes["pixel"], x, ts)[0]

    d = SampleDraws(cfg.run.seed, -1, range(3), rt.device)
    z = d.randn(m.m.sample_shape, "warm_start", "z")
    pair_x0 = teacher_ddim(z, [999, 500, 300, 0])  # "trajectory": its t_k added to the grid
    for r in range(2):
        chain = calls[3 + 5 * r: 5 + 5 * r]
        fit, fit_targets = calls[5 + 5 * r: 8 + 5 * r], targets[3 + 3 * r: 6 + 3 * r]
        assert torch.equal(chain[0][0], z)  # the chain starts at the pairs' noise
        want_in, want_target = {}, {}
        for k, (t, grid) in enumerate([(500, [500, 0]), (300, [300, 0])], start=1):
            noise = d.randn(m.m.sample_shape, f"warm_start_refine_{r}", f"renoise_{k}").double()
            x_t = ab[t].sqrt() * chain[k - 1][2].double() + (1 - ab[t]).sqrt() * noise  # the student's own x̂0
            want_in[t], want_target[t] = x_t, teacher_ddim(x_t, grid)
        assert torch.allclose(chain[1][0].double(), want_in[500], atol=1e-5), r
        order = fit[0][0]  # the fit's batch draws pairs by index: find each row's pair from its step-0 input
        rows = [next(j for j in range(3) if torch.equal(order[i], z[j])) for i in range(3)]
        assert torch.allclose(fit_targets[0].double(), pair_x0[rows], atol=1e-4)  # the first step keeps its pair
        for k, t in ((1, 500), (2, 300)):
            assert torch.allclose(fit[k][0].double(), want_in[t][rows], atol=1e-5), (r, t)
            assert torch.allclose(fit_targets[k].double(), want_target[t][rows], atol=1e-4), (r, t)
            assert not torch.allclose(fit_targets[k].double(), pair_x0[rows], atol=1e-3)  # not the pair's x0
    whole = m._student_states(z, [], "source_teacher", "p")
    parts = m._student_states(z, [], "source_teacher", "p", batch=2)  # pairs 0-1, then 2: the same states
    for t in (500, 300):
        for a, b in zip(whole, parts):  # inputs, targets (batched float sums differ in the last digits)
            assert torch.allclose(a[t], b[t], rtol=1e-4, atol=1e-4), t
    for bad in ("student.warm_start_refine", "student.warm_start_refine_steps"):
        with pytest.raises(UserError, match=bad):
            make_cfg("pixel", **{bad: -1})
    with pytest.raises(UserError, match="student.steps >= 2"):
        make_cfg("pixel", **{"student.steps": 1, "student.warm_start": 1, "student.warm_start_refine": 1})


@pytest.mark.parametrize("refine_ema", [0.0, 0.5])
def test_student_refinement_rounds_leave_their_own_ema_not_the_warm_starts(make_cfg, rt, refine_ema, monkeypatch):
    """student.warm_start_refine_ema: each refinement round leaves the student with the EMA of its weights after
    each of the round's steps, started from the round's first weights (computed here from what each Adam step left),
    whatever student.warm_start_ema (0.9 here) the warm start before it used; 0 leaves the round's last step's
    weights. Out of [0, 1): an error naming the key."""
    cfg = make_cfg("pixel", **{"student.steps": 2, "student.warm_start": 2, "student.warm_start_pairs": 4,
                               "student.warm_start_batch": 2, "student.warm_start_teacher_steps": 2,
                               "student.warm_start_ema": 0.9, "student.warm_start_refine": 2,
                               "student.warm_start_refine_steps": 3, "student.warm_start_refine_ema": refine_ema})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    params = [p for p in models.student.module.parameters() if p.requires_grad]
    starts, steps, real_step, real_fit = [], [], torch.optim.Adam.step, m._fit

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        steps.append([p.detach().clone() for p in params])
        return out

    def fit(*a, **kw):
        starts.append(([p.detach().clone() for p in params], len(steps)))
        return real_fit(*a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(m, "_fit", fit)
    m.prepare()
    assert [n for _, n in starts] == [0, 2, 5] and len(steps) == 8  # warm start 2 steps, two rounds of 3
    got = [p.detach() for p in params]
    # each round: its end (the next round's start, then the student's final weights) is the EMA of its own steps
    for (start, first), (end, last) in zip(starts[1:], [starts[2], (got, len(steps))]):
        want = [w.double() for w in start]
        for weights in steps[first:last]:
            for w, p in zip(want, weights):
                w.mul_(refine_ema).add_(p.double(), alpha=1 - refine_ema)
        assert all(torch.allclose(e.double(), w, atol=1e-6) for e, w in zip(end, want))
    assert all(torch.equal(g, lw) for g, lw in zip(got, steps[-1])) == (refine_ema == 0)
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="student.warm_start_refine_ema"):
            make_cfg("pixel", **{"student.warm_start_refine_ema": bad})


@pytest.mark.parametrize("form, drop", [("pixel", False), ("pixel", True), ("sd15", True)])
def test_student_warm_start_drop_copies_leaves_out_the_pairs_that_copy_a_shot(make_cfg, rt, form, drop, monkeypatch):
    """student.warm_start_drop_copies: the warm start's steps never draw a pair whose teacher sample copies a target
    shot or its mirror image (the data's shots in model space and their flips), and each refinement round none whose
    first-step pair or any of that round's completions (at any of its timesteps) copies one; off, they draw every
    pair. Every pair a copy, in the warm start or in a round: an error naming the key, before any step of it. On a
    latent backbone the mirror images are the flipped shots' latents, not flipped latents."""
    n = 8
    over = {"student.steps": 3, "student.warm_start": 40, "student.warm_start_pairs": n, "student.warm_start_batch": 2,
            "student.warm_start_teacher_steps": 2, "student.warm_start_refine": 2,
            "student.warm_start_refine_steps": 40, "student.warm_start_drop_copies": drop}
    cfg = make_cfg(form, **over)
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    shots, mirrors = models.data.model_space, models.data.model_space_flipped
    assert not torch.equal(mirrors, shots) and torch.equal(mirrors, shots.flip(-1)) == (form == "pixel")
    g = torch.Generator().manual_seed(0)
    z = torch.randn((n,) + tuple(shots.shape[1:]), generator=g)
    x0 = torch.rand((n,) + tuple(shots.shape[1:]), generator=g) * 2 - 1  # uniform noise: far from every shot
    x0[1] = shots[0] + 0.01 * torch.randn(shots[0].shape, generator=g)
    x0[4] = mirrors[2]
    middle, last = m.timesteps[1], m.timesteps[-1]
    rounds = [{t: torch.rand(x0.shape, generator=g) * 2 - 1 for t in m.timesteps[1:]} for _ in range(2)]
    rounds[0][middle][6] = mirrors[3]  # pair 6 copies only in round 1, at the middle step
    rounds[1][last][7] = shots[5]  # pair 7 only in round 2, at the last
    phases, real_fit, real_x0, calls = [], m._fit, m.student_x0, iter(rounds)

    def fit(*a, **kw):
        phases.append(set())
        return real_fit(*a, **kw)

    def student_x0(x, t, cond, module=None):
        if torch.is_grad_enabled() and int(t[0]) == m.timesteps[0]:  # a step's first-step inputs: which pairs
            phases[-1].update(int((z - row).flatten(1).abs().sum(1).argmin()) for row in x)
        return real_x0(x, t, cond, module)

    prompts = [models.data.prompts[0]] * n if form != "pixel" else []
    monkeypatch.setattr(m, "teacher_sample", lambda *a, **kw: (z, x0, prompts))
    monkeypatch.setattr(m, "_student_states", lambda *a, **kw: ({t: z for t in m.timesteps[1:]}, next(calls)))
    m._fit, m.student_x0 = fit, student_x0
    out = m.warm_start(progress=False)
    every = set(range(n))
    assert phases == ([every - {1, 4}, every - {1, 4, 6}, every - {1, 4, 7}] if drop else [every] * 3)
    kept = [out.get(k) for k in ("warm_start_pairs_kept", "warm_start_refine_0_pairs_kept",
                                 "warm_start_refine_1_pairs_kept")]
    assert kept == ([6, 5, 5] if drop else [None] * 3)
    if drop:  # every completion of the first round a copy: the error, before that round's first step
        rounds[0][middle][:] = shots[torch.arange(n) % len(shots)]
        phases.clear()
        calls = iter(rounds)
        with pytest.raises(UserError, match="refinement 1.*student.warm_start_drop_copies=false"):
            m.warm_start(progress=False)
        assert len(phases) == 1  # the warm start ran; the round did not
        x0[:] = shots[torch.arange(n) % len(shots)]  # every pair's sample a copy: before the warm start's first step
        phases.clear()
        with pytest.raises(UserError, match="student.warm_start_drop_copies"):
            m.warm_start(progress=False)
        assert phases == []


@pytest.mark.parametrize("form", ["sd15", "sdxl"])
def test_student_warm_start_refinement_on_text_backbones(make_cfg, rt, form, monkeypatch):
    """The refinement on latent text backbones: the student's chain sees each pair's own prompt encoded (SDXL's
    added embeddings included), the teacher's completions the target teacher's conditioning for those prompts, and a
    round moves the student's weights."""
    cfg = make_cfg(form, **{"student.steps": 2, "student.warm_start": 1, "student.warm_start_pairs": 2,
                            "student.warm_start_teacher_steps": 2, "student.warm_start_batch": 2,
                            "student.warm_start_refine": 1, "student.warm_start_refine_steps": 1})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    seen, real_fit, real_x0, real_teacher = [], m._fit, m.student_x0, m.teacher_x0
    chain_conds, teacher_conds = [], []

    def fit(role_name, steps, *a, **kw):
        seen.append(_params(models.student.module))
        return real_fit(role_name, steps, *a, **kw)

    def student_x0(x, t, cond, module=None):
        if not torch.is_grad_enabled():  # the refinement's chain
            chain_conds.append(cond)
        return real_x0(x, t, cond, module)

    def teacher_x0(role, x, t, cond, uncond, scale, **kw):
        teacher_conds.append((role, cond))
        return real_teacher(role, x, t, cond, uncond, scale, **kw)

    m._fit, m.student_x0, m.teacher_x0 = fit, student_x0, teacher_x0
    got, real_states = {}, m._student_states

    def states(z, prompts, role, purpose, **kw):
        got["prompts"] = prompts
        n = len(teacher_conds)
        got["out"] = real_states(z, prompts, role, purpose, **kw)
        got["teacher"] = teacher_conds[n:]
        return got["out"]

    m._student_states = states
    m.prepare()
    prompts = got["prompts"]
    assert prompts and len(prompts) == 2  # the pairs' prompts reach the chain
    want = m.m.data.encode(prompts)
    assert len(chain_conds) == 1 and _same_cond(chain_conds[0], want)  # each pair's own prompt, in order
    batch = m.m.data.batch(SampleDraws(cfg.run.seed, -1, [0, 1], rt.device), augment=False)
    assert batch.prompts == prompts
    assert got["teacher"] and all(r == "source_teacher" and _same_cond(c, batch.cond_src) for r, c in got["teacher"])
    inputs, targets = got["out"]
    t1 = m.timesteps[1]
    assert inputs[t1].shape == targets[t1].shape == (2, *m.m.sample_shape)
    assert len(seen) == 2 and not _same(seen[1], _params(models.student.module))  # the round trained the student


def _same_cond(a, b) -> bool:
    """Two conditionings (tensors, or dicts / tuples of them) hold the same values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_cond(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_cond(x, y) for x, y in zip(a, b))
    return torch.allclose(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_student_warm_start_last_weight(make_cfg, rt, weight, monkeypatch):
    """student.warm_start_last_weight: the warm start's loss is the weighted mean of its steps' regression losses,
    the weight on the last step (t = 300 here), not the first. Each step's loss is made a different constant
    (1 / 10 / 100 at t = 999 / 700 / 300), so a weight on the wrong step, or a plain mean, reads differently."""
    from unidad_dist.methods import unidad

    cfg = make_cfg("pixel", **{"student.steps": 3, "student.timesteps": [999, 700, 300], "student.warm_start": 1,
                               "student.warm_start_pairs": 3, "student.warm_start_teacher_steps": 3,
                               "student.warm_start_batch": 3, "student.warm_start_last_weight": weight})
    m = UniDAD(cfg, build(cfg, rt), rt)
    ts, real_x0 = [], m.student_x0
    per_t = {999: 1.0, 700: 10.0, 300: 100.0}

    def student_x0(x, t, cond, module=None):
        ts.append(int(t[0]))
        return real_x0(x, t, cond, module)

    m.student_x0 = student_x0
    monkeypatch.setattr(unidad.losses, "denoising_loss", lambda pred, target, *a, **kw: pred.sum() * 0 + per_t[ts[-1]])
    got = m.warm_start(progress=False)["warm_start_loss"]
    assert ts == [999, 700, 300]
    assert got == pytest.approx((1.0 + 10.0 + weight * 100.0) / (2.0 + weight), rel=1e-6)
    for bad in (0.0, -1.0):
        with pytest.raises(UserError, match="student.warm_start_last_weight"):
            make_cfg("pixel", **{"student.warm_start_last_weight": bad})


@pytest.mark.parametrize("start", ["source", "target"])
def test_fake_teacher_start(make_cfg, rt, start):
    """fake_teacher.start=target: after the warm starts its UNet holds the target teacher's weights as they
    enter training (its own warm start done), its GAN heads their init; "source": the source teacher's copy."""
    cfg = make_cfg("pixel", **{"target_teacher.mode": "online", "algorithm.a": 0.75, "train.batch_size": 4,
                               "target_teacher.warm_start": 3, "target_teacher.warm_start_lr": 2e-3,
                               "fake_teacher.start": start})
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)
    heads = _params(models.fake_teacher.module.heads)
    src = _params(models.source_teacher.module.unet)
    m.prepare()
    trg = _params(models.target_teacher.module.unet)
    assert not _same(src, trg)  # the target teacher's warm start ran
    assert _same(_params(models.fake_teacher.module.unet), trg if start == "target" else src)
    assert _same(heads, _params(models.fake_teacher.module.heads))
    with pytest.raises(UserError, match="fake_teacher.start=target .* target_teacher.mode=off"):
        make_cfg("pixel", **{"target_teacher.mode": "off", "algorithm.a": 0.0, "fake_teacher.start": "target"})
    with pytest.raises(UserError, match="placement.mode=split"):
        make_cfg("pixel", **{"target_teacher.mode": "online", "algorithm.a": 0.75, "fake_teacher.start": "target",
                             "placement.mode": "split"})
    with pytest.raises(UserError, match="fake_teacher.lora.rank=4 and target_teacher.lora.rank=0"):
        make_cfg("pixel", **{"target_teacher.mode": "online", "algorithm.a": 0.75, "fake_teacher.start": "target",
                             "fake_teacher.lora.rank": 4})


def test_student_warm_start_from_the_target_teacher_needs_a_fitted_colocated_one(make_cfg):
    from unidad_dist.errors import UserError

    over = {"student.warm_start": 5, "student.warm_start_teacher": "target"}
    with pytest.raises(UserError, match="target_teacher.mode=off"):
        make_cfg("pixel", **over, **{"target_teacher.mode": "off", "algorithm.a": 0.0})
    with pytest.raises(UserError, match="needs target_teacher.warm_start > 0"):
        make_cfg("pixel", **over, **{"target_teacher.mode": "online", "algorithm.a": 0.75})
    with pytest.raises(UserError, match="placement.mode=split puts them on different sides"):
        make_cfg("pixel", **over, **{"target_teacher.mode": "online", "algorithm.a": 0.75,
                                     "target_teacher.warm_start": 5, "placement.mode": "split"})
    with pytest.raises(UserError, match="never learns the unconditional prediction"):
        make_cfg("pixel", **over, **{"target_teacher.mode": "online", "algorithm.a": 0.0,
                                     "target_teacher.warm_start": 5, "target_teacher.cfg": 3.0,
                                     "target_teacher.cond_dropout": 0.0})
    with pytest.raises(UserError, match="is not one of source, target"):
        make_cfg("pixel", **{"student.warm_start_teacher": "teacher"})
    make_cfg("pixel", **over, **{"target_teacher.mode": "online", "algorithm.a": 0.75, "target_teacher.warm_start": 5})


# -- algorithm.a: auto (docs/algorithm.md §9) ----------------------------------------------------------
AUTO = {"algorithm.a": "auto", "target_teacher.mode": "online", "gan_heads.lambda_g": 0.0}


def test_auto_a_follows_the_controller_rule_on_probe_iterations_only(make_cfg, rt):
    """a starts at auto_min; on iterations = 0 mod auto_every it moves auto_rate of the way to the aim
    auto_min + (auto_max - auto_min) * clamp((1 - L_t/L_s) / auto_gap, 0, 1); between probes it stays; it is
    logged, and the student's loss weighs the two DMD branches with it."""
    cfg, models, m = _setup(make_cfg, rt, **AUTO, **{"algorithm.auto_min": 0.1, "algorithm.auto_max": 0.9,
                                                    "algorithm.auto_gap": 0.5, "algorithm.auto_rate": 0.5,
                                                    "algorithm.auto_every": 2})
    assert m.a == 0.1
    probes = iter([(1.0, 0.8), (2.0, 0.5), (1.0, 1.3)])  # gaps 0.2, 0.75 (beyond auto_gap), -0.3 (clamped to 0)
    m.probe_teachers = lambda: next(probes)
    expected, a = [], 0.1
    for it in range(6):
        if it % 2 == 0:
            l_s, l_t = {0: (1.0, 0.8), 2: (2.0, 0.5), 4: (1.0, 1.3)}[it]
            aim = 0.1 + 0.8 * min(1.0, max(0.0, (1 - l_t / l_s) / 0.5))
            a = a + 0.5 * (aim - a)
        expected.append(a)
        logs = m.step(it)
        assert logs["algorithm/a"] == pytest.approx(a, abs=1e-12), it
        assert ("algorithm/a_gap" in logs) == (it % 2 == 0)
    assert expected[0] == pytest.approx(0.26) and expected[2] == pytest.approx(0.58) and expected[4] == pytest.approx(0.34)
    # the student's loss takes the current a: (1 - a) * DMD_src + a * DMD_trg
    m.a = 0.3
    d = _draws(rt, it=7)
    batch = models.data.batch(d)
    x = m.generate_train(d, batch, None)
    loss, logs = m.student_loss(x, batch, d)
    assert logs["dmd_src"] != pytest.approx(logs["dmd_trg"])
    assert float(loss.detach()) == pytest.approx(0.7 * logs["dmd_src"] + 0.3 * logs["dmd_trg"], rel=1e-5)


def _spy_forwards(models, seen):
    for name in ("source_teacher", "target_teacher"):
        role = getattr(models, name)

        def spy(x_t, t, cond, force_fp32=False, orig=role.forward, name=name):
            seen[name] = (x_t.clone(), t.clone(), None if cond is None else cond["encoder_hidden_states"].clone())
            return orig(x_t, t, cond, force_fp32)

        role.forward = spy


def test_auto_a_probe_compares_the_two_teachers_on_the_shots(make_cfg, rt):
    """The probe: equal losses while the online target teacher is still a copy of the source (a stays at
    auto_min), a lower target loss once it has fitted the shots (a rises by the rule); the same noised shots
    at every probe."""
    over = {**AUTO, "train.batch_size": 4, "algorithm.auto_rate": 1.0, "algorithm.auto_max": 0.8,
            "target_teacher.warm_start": 30, "target_teacher.warm_start_lr": 2e-3}
    cfg = make_cfg("pixel", **over)
    models = build(cfg, rt)
    m = UniDAD(cfg, models, rt)  # before the engines: the target teacher's warm start below trains it
    seen: dict = {}
    _spy_forwards(models, seen)
    l_s, l_t = m.probe_teachers()
    assert l_s > 0 and l_t == pytest.approx(l_s, rel=1e-6)
    assert torch.equal(seen["source_teacher"][0], seen["target_teacher"][0])
    assert torch.equal(seen["source_teacher"][1], seen["target_teacher"][1])
    m.update_auto_a(0)
    assert m.a == pytest.approx(0.0, abs=1e-6)
    first_x = seen["source_teacher"][0]
    m.prepare()  # the target teacher learns the shots
    l_s2, l_t2 = m.probe_teachers()
    assert l_s2 == pytest.approx(l_s, rel=1e-6) and l_t2 < 0.9 * l_s2, (l_s2, l_t2)
    assert torch.equal(seen["source_teacher"][0], first_x)
    m.update_auto_a(10)
    assert m.a == pytest.approx(0.8 * min(1.0, (1 - l_t2 / l_s2) / 0.5), rel=1e-6) and m.a > 0


def test_auto_a_probe_reads_the_shots_unshifted_while_training_reads_them_shifted(make_cfg, rt):
    """data.target.translate shifts what the discriminator and the target teacher train on, not the shots the
    auto-a probe measures the two teachers on: its noised input is the same as without translation."""
    seen = {}
    for shift in (0.0, 0.25):
        cfg = make_cfg("pixel", **AUTO, **{"train.batch_size": 4, "data.target.translate": shift})
        models = build(cfg, rt)
        m = UniDAD(cfg, models, rt)
        spied: dict = {}
        _spy_forwards(models, spied)
        m.probe_teachers()
        seen[shift] = spied["source_teacher"][0]
        d = SampleDraws(0, 0, [0, 1, 2, 3], rt.device)
        assert torch.equal(models.data.batch(d, augment=False).real, models.data.batch(d).real) == (shift == 0)
    assert torch.equal(seen[0.0], seen[0.25])


def test_auto_a_probe_gives_the_source_teacher_the_captions_without_the_rare_token(make_cfg, rt):
    cfg, models, m = _setup(make_cfg, rt, "sd15", **AUTO, **{"train.batch_size": 2, "data.target.rare_token": "sks"})
    seen: dict = {}
    _spy_forwards(models, seen)
    m.probe_teachers()
    prompts = models.data.batch(SampleDraws(0, -1, range(2), rt.device)).real_prompts
    assert len(prompts) == 2 and all("sks" in p for p in prompts)
    enc = models.data.conditioner.encode
    torch.testing.assert_close(seen["target_teacher"][2], enc(prompts)["encoder_hidden_states"])
    torch.testing.assert_close(seen["source_teacher"][2],
                               enc([p.replace("sks ", "") for p in prompts])["encoder_hidden_states"])


def test_auto_a_is_kept_in_the_method_state(make_cfg, rt):
    cfg, models, m = _setup(make_cfg, rt, **AUTO)
    m.probe_teachers = lambda: (1.0, 0.6)
    m.step(0)
    state = m.state_dict()
    assert state["auto_a"]["a"] == m.a > 0 and state["auto_a"]["probe"]["gap"] == pytest.approx(0.4)
    again = UniDAD(cfg, models, rt)
    assert again.a == 0.0
    again.load_state_dict(state)
    assert again.a == m.a and again.auto_probe == m.auto_probe
    assert UniDAD.merge_state_dicts([state, {**state, "auto_a": {"a": 0.5, "probe": {}}}])["auto_a"] == state["auto_a"]
    from unidad_dist.errors import UserError

    with pytest.raises(UserError, match="holds no controller state"):
        again.load_state_dict({k: v for k, v in state.items() if k != "auto_a"})
    assert m.summary()["a"] == "auto" and m.summary()["a_final"] == m.a
