"""Tests that fail on the bugs an independent review planted (issue 10 §6): each checks a caller's arguments
or an update rule against an independent computation, not a pure function with whatever it is given."""
import math

import pytest
import torch

from unidad_dist.core.draws import SampleDraws
from unidad_dist.methods.unidad import UniDAD
from unidad_dist.parallel import engines
from unidad_dist.train.build import build


def _setup(make_cfg, rt, form="pixel", **over):
    cfg = make_cfg(form, **over)
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    return cfg, models, UniDAD(cfg, models, rt)


# ---------------------------------------------------------------------------------------------------
# The student's DMD gradient: the caller's arguments (x, not x_t), the (1 - a) / a weights, one x_t for all
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.3, 0.0, 1.0])
def test_student_loss_gradient_matches_an_independent_computation(make_cfg, rt, a):
    cfg, models, method = _setup(make_cfg, rt, **{"algorithm.a": a, "gan_heads.lambda_g": 0.0})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the fake and target teachers start as copies of the source: make them differ
        for name in ("fake_teacher", "target_teacher"):
            for p in models.roles[name].module.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    d = SampleDraws(0, 3, [0, 1, 2], rt.device)
    batch = models.data.batch(d)
    with torch.no_grad():
        x0 = method.generate_train(d, batch, None)
    x = x0.clone().requires_grad_(True)
    seen = {}
    for name in ("fake_teacher", "source_teacher", "target_teacher"):
        role = models.roles.get(name)
        orig = role.forward

        def spy(x_t, t, cond, force_fp32=False, name=name, orig=orig):
            seen[name] = (x_t.detach().clone(), t.clone())
            return orig(x_t, t, cond, force_fp32)
        role.forward = spy
    loss, _ = method.student_loss(x, batch, d)
    (grad,) = torch.autograd.grad(loss, x)
    # an independent computation from the same draws
    t = d.randint(cfg.algorithm.t_min, cfg.algorithm.t_max + 1, "student", "dmd_t")
    n = d.randn(models.sample_shape, "student", "dmd_noise")
    ab = models.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * n
    for name, (seen_xt, seen_t) in seen.items():  # every DMD teacher sees the same x_t (noised x, not x_t twice)
        torch.testing.assert_close(seen_xt, x_t, msg=name)
        assert torch.equal(seen_t, t)

    def x0_of(name):
        with torch.no_grad():
            eps = models.roles[name].module(x_t, t, None).float()
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    x_fk = x0_of("fake_teacher")
    expect = torch.zeros_like(x0)
    for name, w in (("source_teacher", 1 - a), ("target_teacher", a)):
        if w == 0:
            assert name not in seen, f"{name} was called with weight 0"
            continue
        x_k = x0_of(name)
        norm = (x0 - x_k).abs().mean(dim=(1, 2, 3), keepdim=True)  # |x - x̂|: the student sample, not x_t
        expect += w * (x_fk - x_k) / norm / x0.numel()
    assert expect.abs().max() > 1e-6  # a gradient to compare: the teachers differ
    torch.testing.assert_close(grad, expect, rtol=1e-3, atol=1e-3 * float(expect.abs().max()))


# ---------------------------------------------------------------------------------------------------
# ε / v / x0 conversions and targets against diffusers' own scheduler
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_conversions_match_diffusers(ptype):
    from diffusers import DDPMScheduler

    from unidad_dist.models.schedule import NoiseSchedule

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=ptype,
                          clip_sample=False)
    ours = NoiseSchedule.from_scheduler_config(sched.config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), x_t, rtol=1e-5, atol=1e-5)
    target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[ptype]
    torch.testing.assert_close(ours.target(x0, noise, t), target, rtol=1e-5, atol=1e-5)
    for i in range(3):  # diffusers' own x̂0 from a perfect prediction, one timestep at a time
        sched.set_timesteps(1000)
        out = sched.step(target[i:i + 1], int(t[i]), x_t[i:i + 1])
        torch.testing.assert_close(ours.to_x0(target[i:i + 1], x_t[i:i + 1], t[i:i + 1]), out.pred_original_sample,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pred_original_sample, x0[i:i + 1], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Backward simulation: k is uniform over {0 … K-1}, a function of (seed, iteration); the step makes k + 1 calls
# ---------------------------------------------------------------------------------------------------
def test_backward_simulation_k_is_uniform_and_the_step_follows_it(make_cfg, rt):
    K = 4
    cfg, models, method = _setup(make_cfg, rt, **{"student.steps": K, "student.unroll": "backward_simulation",
                                                  "train.fake_updates_per_student": 1})
    ks = [UniDAD.iteration_plan(cfg, it).extra["k_grad"] for it in range(800)]
    counts = [ks.count(k) for k in range(K)]
    assert all(abs(c / 800 - 1 / K) < 0.05 for c in counts), counts
    assert ks == [UniDAD.iteration_plan(cfg, it).extra["k_grad"] for it in range(800)]  # same on every call
    other = make_cfg(**{"student.steps": K, "student.unroll": "backward_simulation", "run.seed": 1})
    assert ks[:50] != [UniDAD.iteration_plan(other, it).extra["k_grad"] for it in range(50)]  # seeded
    for it in range(3):
        method.calls.clear()
        method.step(it)
        assert method.calls["student"] == ks[it] + 1, (it, ks[it])


# ---------------------------------------------------------------------------------------------------
# Re-noising between student steps: fresh noise for each step, on the detached x̂0 of the previous one
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unroll", ["backward_simulation", "full"])
def test_renoising_uses_fresh_noise_on_the_previous_x0(make_cfg, rt, unroll):
    K = 3
    cfg, models, method = _setup(make_cfg, rt, **{"student.steps": K, "student.unroll": unroll})
    student = models.student
    calls = []
    orig = student.train_forward

    def spy(x_t, t, cond):
        out = orig(x_t, t, cond)
        calls.append((x_t, t, out))
        return out
    student.train_forward = spy
    d = SampleDraws(0, 5, [0, 1], rt.device)
    batch = models.data.batch(d)
    x = method.generate_train(d, batch, K - 1 if unroll == "backward_simulation" else None)
    assert len(calls) == K
    torch.testing.assert_close(calls[0][0], d.randn(models.sample_shape, "student", "z"))
    noises = []
    for k in range(1, K):
        prev_x0 = models.schedule.to_x0(calls[k - 1][2], calls[k - 1][0], calls[k - 1][1])
        ab = models.schedule.alphas_cumprod[calls[k][1]].float().view(-1, 1, 1, 1)
        noise = (calls[k][0] - ab.sqrt() * prev_x0) / (1 - ab).sqrt()
        torch.testing.assert_close(noise, d.randn(models.sample_shape, "student", f"renoise_{k}"), rtol=1e-3, atol=1e-3)
        noises.append(noise)
        # backward simulation: the steps before the trained one build no graph and re-noise a detached x̂0;
        # full unroll keeps the graph through every step
        assert calls[k - 1][2].requires_grad == (unroll == "full")
        assert calls[k][0].requires_grad == (unroll == "full")
    assert not torch.allclose(noises[0], noises[1], atol=1e-2)  # fresh noise each step
    assert x.requires_grad


# ---------------------------------------------------------------------------------------------------
# The learning rate: a linear warmup counted in iterations, then constant — as the engines apply it
# ---------------------------------------------------------------------------------------------------
def test_warmup_lr_values_and_what_the_engine_sets(make_cfg, rt):
    from unidad_dist.parallel.engines import warmup_lr

    assert [warmup_lr(1.0, 4, i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # bit for bit the formula runs were trained with (the recipes' lr 2e-6 / 5e-6, warmup 500): a learning rate
    # rounded otherwise moves AdamW's weights in the last bit
    for lr in (2e-6, 5e-6, 1e-4):
        assert all(warmup_lr(lr, 500, i) == lr * min(1.0, (i + 1) / 500) for i in range(600))
        assert all(warmup_lr(lr, 500, i, "cosine", 1000) == lr * min(1.0, (i + 1) / 500) for i in range(499))
    assert warmup_lr(3e-4, 0, 0) == 3e-4 and warmup_lr(3e-4, 1, 0) == 3e-4
    cfg, models, method = _setup(make_cfg, rt, **{"fake_teacher.optimizer.warmup": 4,
                                                  "fake_teacher.optimizer.lr": 2e-4})
    for it in range(5):
        logs = method.step(it)
        lrs = [g["lr"] for g in models.fake_teacher.engine.optimizer.param_groups]
        assert lrs and all(lr == pytest.approx(2e-4 * min(1.0, (it + 1) / 4)) for lr in lrs), (it, lrs)
        assert logs["fake_teacher/lr"] == pytest.approx(2e-4 * min(1.0, (it + 1) / 4))
    assert math.isclose(models.student.engine.optimizer.param_groups[0]["lr"], cfg.student.optimizer.lr)


def test_decaying_lr_schedules_values_and_what_the_engine_sets(make_cfg, rt):
    """optimizer.schedule linear / cosine: after the warmup, from lr down to lr x final_lr_ratio at
    train.iterations, as diffusers' schedulers of those names (checked against a hand computation)."""
    from unidad_dist.parallel.engines import warmup_lr

    # warmup 3, total 11: full at iteration 2, final at iteration 11 (nine iterations later)
    lin = [warmup_lr(1.0, 3, i, "linear", 11, 0.2) for i in range(13)]
    want = [1 / 3, 2 / 3, 1.0] + [0.2 + 0.8 * (1 - k / 9) for k in range(1, 10)] + [0.2]
    assert lin == pytest.approx(want)
    cos = [warmup_lr(2.0, 0, i, "cosine", 4) for i in range(5)]
    assert cos == pytest.approx([2.0, 2.0 * (0.5 + 0.5 * math.cos(math.pi / 4)), 1.0,
                                 2.0 * (0.5 + 0.5 * math.cos(3 * math.pi / 4)), 0.0])
    assert [warmup_lr(1.0, 2, i, "constant", 4) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    cfg, models, method = _setup(make_cfg, rt, **{"student.optimizer.schedule": "cosine", "train.iterations": 4,
                                                  "student.optimizer.final_lr_ratio": 0.5,
                                                  "student.optimizer.warmup": 0, "student.optimizer.lr": 1e-3})
    got = []
    for it in range(4):
        logs = method.step(it)
        got.append(models.student.engine.optimizer.param_groups[0]["lr"])
        assert logs["student/lr"] == pytest.approx(got[-1])
    assert got == pytest.approx([1e-3 * (0.5 + 0.5 * (0.5 + 0.5 * math.cos(math.pi * k / 4))) for k in range(4)])
    assert models.fake_teacher.engine.optimizer.param_groups[0]["lr"] == cfg.fake_teacher.optimizer.lr  # constant


@pytest.mark.parametrize("key,value,message", [("student.optimizer.schedule", "step", "student.optimizer.schedule"),
                                               ("fake_teacher.optimizer.final_lr_ratio", 1.5, "final_lr_ratio must be in"),
                                               ("data.target.translate", 0.5, "data.target.translate must be in")])
def test_bad_lr_schedule_or_translate_is_refused(make_cfg, key, value, message):
    from unidad_dist.errors import UserError

    with pytest.raises(UserError, match=message):
        make_cfg(**{key: value})


# ---------------------------------------------------------------------------------------------------
# algorithm.t_sampling: karras_index — the DMD, fake-teacher and GAN noise levels, as the calls see them
# ---------------------------------------------------------------------------------------------------
def _ks(samples: torch.Tensor, support: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the draws and the uniform distribution over ``support``'s entries."""
    values = torch.unique(torch.cat([samples, support]))
    emp = torch.stack([(samples <= v).double().mean() for v in values])
    exp = torch.stack([(support <= v).double().mean() for v in values])
    return float((emp - exp).abs().max())


def test_karras_index_draws_of_every_noise_level(make_cfg, rt):
    from collections import defaultdict

    cfg, models, method = _setup(make_cfg, rt, **{"algorithm.t_sampling": "karras_index", "gan_heads.lambda_g": 0.5,
                                                  "algorithm.a": 0.0})
    grid = method.karras
    n = 2048
    d = SampleDraws(0, 1, list(range(n)), rt.device)
    batch = models.data.batch(d)
    seen = defaultdict(list)
    fake = models.fake_teacher  # cheap stand-ins that record the noise levels the calls receive

    def forward(x_t, t, cond, force_fp32=False):
        seen["dmd"].append(t.cpu())
        return torch.zeros_like(x_t)

    def discriminate(x_t, t, cond, key="gan_generator"):
        seen[key].append(t.cpu())
        return x_t.float().mean(dim=(1, 2, 3))

    def train_forward(x_t, t, cond):
        seen["fake_denoise"].append(t.cpu())
        return torch.zeros_like(x_t)

    fake.forward, fake.discriminate, fake.train_forward = forward, discriminate, train_forward
    models.source_teacher.forward = lambda x_t, t, cond, force_fp32=False: (seen["dmd_src"].append(t.cpu()),
                                                                           torch.zeros_like(x_t))[1]
    x = torch.zeros((n,) + tuple(models.sample_shape))
    method.critic_feedback(x, batch, d)
    method.student_loss(x.requires_grad_(True), batch, d, method.critic_feedback(x, batch, d))
    fake.train_discriminate = lambda x_t, t, cond: discriminate(  # real shots first, then the samples
        x_t, t, cond, "gan_real" if not seen["gan_real"] else "gan_fake")
    method.fake_loss(x.detach(), batch, d)
    lo, hi = cfg.algorithm.t_min, cfg.algorithm.t_max
    dmd_support = grid[(grid >= lo) & (grid <= hi)]
    assert len(dmd_support) < len(grid)  # the range cuts the grid: clamping would pile draws onto its ends
    t = seen["dmd"][0]
    assert int(t.min()) >= lo and int(t.max()) <= hi
    assert torch.equal(seen["dmd_src"][0], t)  # the source teacher sees the same noise level
    assert _ks(t, dmd_support) < 0.05
    ends = float(((t == int(dmd_support.min())) | (t == int(dmd_support.max()))).double().mean())
    expect_ends = float(((dmd_support == dmd_support.min()) | (dmd_support == dmd_support.max())).double().mean())
    assert abs(ends - expect_ends) < 0.03, (ends, expect_ends)
    for key in ("fake_denoise", "gan_generator", "gan_real", "gan_fake"):
        assert _ks(seen[key][0], grid) < 0.05, key
        assert _ks(seen[key][0], torch.arange(1000)) > 0.2, key  # not uniform in t
    assert not torch.equal(seen["gan_real"][0], seen["gan_fake"][0])  # independent draws per call


# ---------------------------------------------------------------------------------------------------
# Validation: CFG on a target teacher that never learnt the unconditional prediction; a role whose own
# backbone has another schedule or prediction type than the primary (every output is read with the primary's)
# ---------------------------------------------------------------------------------------------------
def test_target_cfg_needs_condition_dropout(make_cfg, pipes):
    from unidad_dist.errors import UserError

    over = {"algorithm.a": 0.5, "target_teacher.cfg": 3.0}
    with pytest.raises(UserError, match="target_teacher.cond_dropout=0, so it never learns the unconditional"):
        make_cfg("sd15", **over, **{"target_teacher.cond_dropout": 0.0})
    make_cfg("sd15", **over, **{"target_teacher.cond_dropout": 0.1})
    make_cfg("sd15", **{**over, "target_teacher.cond_dropout": 0.0, "algorithm.a": 0.0})  # unused at a = 0
    with pytest.warns(UserWarning, match="frozen target teacher: CFG is meaningful only if"):
        make_cfg("sd15", **over, **{"target_teacher.mode": "frozen", "target_teacher.init": str(pipes["sd15"])})


@pytest.mark.parametrize("other", ["v_prediction", "scaled_linear"])
def test_a_role_backbone_with_another_schedule_is_refused(make_cfg, rt, tmp_path, other):
    from unidad_dist import testing
    from unidad_dist.errors import UserError

    kw = {"prediction_type": "v_prediction"} if other == "v_prediction" else {}
    pipe = testing.write_pixel_pipeline(tmp_path / other, seed=5, **kw)
    if other == "scaled_linear":  # same prediction type, another beta schedule
        import json

        f = pipe / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "beta_schedule": "scaled_linear"}))
    cfg = make_cfg(**{"fake_teacher.backbone": str(pipe)})
    what = "prediction type v_prediction" if other == "v_prediction" else "noise schedule"
    with pytest.raises(UserError, match=f"fake_teacher.backbone .* was trained with another {what}"):
        build(cfg, rt)
    same = testing.write_pixel_pipeline(tmp_path / "same", seed=5)  # same schedule, other weights: fine
    build(make_cfg(**{"fake_teacher.backbone": str(same)}), rt)


def test_karras_index_with_no_grid_timestep_in_range_is_a_clear_error(make_cfg, rt):
    from unidad_dist.errors import UserError
    from unidad_dist.models.schedule import karras_index_timesteps

    cfg = make_cfg(**{"algorithm.t_sampling": "karras_index", "algorithm.t_min": 500, "algorithm.t_max": 500})
    models = build(cfg, rt)
    grid = karras_index_timesteps(models.schedule)
    assert not bool((grid == 500).any())  # the grid skips t = 500 on this schedule
    with pytest.raises(UserError, match=r"no timestep of the Karras grid lies in \[algorithm.t_min, algorithm.t_max\]"):
        UniDAD(cfg, models, rt)


def test_a_frozen_role_refuses_trainable_only_options(make_cfg, pipes):
    from unidad_dist.errors import UserError

    frozen = {"target_teacher.mode": "frozen", "target_teacher.init": str(pipes["pixel"])}
    for key, value in (("target_teacher.lora.rank", 4), ("target_teacher.activation_checkpointing", True)):
        with pytest.raises(UserError, match=f"{key}=.* applies to a role that trains, and this recipe keeps "
                                            "target_teacher frozen"):
            make_cfg(**{**frozen, key: value})
    make_cfg(**{"target_teacher.mode": "off", "algorithm.a": 0.0, "target_teacher.lora.rank": 4})  # not run: unread


def test_the_exchange_refuses_what_the_method_did_not_declare(rt):
    from unidad_dist.parallel.exchange import Exchange
    from unidad_dist.parallel.placement import Placement

    ex = Exchange(Placement("colocated", {"a": [0]}, 0, 1), rt.device)
    x = torch.zeros(2, 3)
    assert ex.run_at("a", lambda: {"x": x}, {"x": (2, 3)})["x"] is x
    with pytest.raises(RuntimeError, match=r"computed \['x', 'y'\] but declared \['x'\]"):
        ex.run_at("a", lambda: {"x": x, "y": x}, {"x": (2, 3)})
    with pytest.raises(RuntimeError, match="shapes differ"):
        ex.run_at("a", lambda: {"x": x}, {"x": (3, 2)})
