"""One Uni-DAD iteration (algorithm.md §5): student (G) on dual-domain DMD + GAN generator term, fake
teacher + heads (F) on denoising + GAN discriminator, online target teacher (T) on the target shots.

Gradients reach only the role being stepped by construction: teacher predictions run under no_grad, the
GAN generator term is an input-gradient taken through the fake teacher's *activations*
(``torch.autograd.grad`` w.r.t. the sample only) and injected into the student's graph, and the fake and
target steps see detached student samples. No ``requires_grad`` is toggled.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from unidad_dist.device import CPU
from unidad_dist.errors import UserError
from unidad_dist.methods import losses
from unidad_dist.methods.draws import SampleDraws, global_indices, shared_randint
from unidad_dist.methods.generate import generate, student_timesteps
from unidad_dist.models.conditioning import cat_cond
from unidad_dist.models.schedule import cfg_combine, karras_index_timesteps


def select_cond(mask: torch.Tensor, a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """Row-wise choice between two conditions: rows where mask is true come from ``a``."""
    if not a:
        return a
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out[k] = select_cond(mask, a[k], b[k])
        else:
            m = mask.to(a[k].device).view((-1,) + (1,) * (a[k].ndim - 1))
            out[k] = torch.where(m, a[k], b[k])
    return out


@dataclass(frozen=True)
class IterationPlan:
    """Which roles step in an iteration and over how many micro-batches: a function of (config, seed,
    iteration) only, so every rank agrees (and `plan` counts the same passes the step makes)."""
    train_g: bool
    train_t: bool
    ga_g: int  # student micro-batches with gradient (0: the student does not step)
    ga_f: int
    ga_t: int
    n_micro: int
    k_grad: Optional[int]  # backward simulation: the student step that carries the gradient


def iteration_plan(cfg, iteration: int) -> IterationPlan:
    train_g = iteration % cfg.train.fake_updates_per_student == 0
    train_t = cfg.target_teacher.mode == "online" and iteration % cfg.target_teacher.update_every == 0
    ga_g = cfg.student.grad_accum if train_g else 0
    ga_f = cfg.fake_teacher.grad_accum
    ga_t = cfg.target_teacher.grad_accum if train_t else 0
    k_grad = None
    if cfg.student.unroll == "backward_simulation":
        k_grad = shared_randint(cfg.run.seed, iteration, "backward_simulation_k", 0, cfg.student.steps)
    return IterationPlan(train_g, train_t, ga_g, ga_f, ga_t, max(ga_g, ga_f, ga_t), k_grad)


class NonFiniteLoss(UserError):
    """A role's loss was NaN/inf on some rank and the run is configured (or forced) to stop."""


class UniDAD:
    name = "unidad"

    def __init__(self, cfg, models, rt, placement=None):
        from unidad_dist.parallel.placement import Placement, ROLES

        self.cfg = cfg
        self.m = models
        self.rt = rt
        self.placement = placement or Placement("colocated", {r: list(range(rt.world_size)) for r in ROLES},
                                                rt.rank, rt.world_size)
        self.schedule = models.schedule
        self.T = self.schedule.T
        self.timesteps = student_timesteps(cfg.student.steps, self.T, cfg.student.timesteps)
        self.a = float(cfg.algorithm.a)
        self.seed = cfg.run.seed
        # Teacher forwards for DMD in fp32 when √ᾱ at t_max is tiny (algorithm.md §4, precision).
        self.dmd_fp32 = self.schedule.sqrt_alpha(min(cfg.algorithm.t_max, self.T - 1)) < 0.05
        self.karras = karras_index_timesteps(self.schedule) if cfg.algorithm.t_sampling == "karras_index" else None
        self.calls = defaultdict(int)  # network calls per role (tests count them)
        self.nonfinite_run = defaultdict(int)  # consecutive iterations a role's step was skipped
        self.nonfinite_total = defaultdict(int)

    # -- network calls ---------------------------------------------------------------------------
    def student_x0(self, x_t, t, cond, module=None):
        """x̂0 of the student: through its engine (its own loss), or of ``module`` (sampling, EMA)."""
        self.calls["student"] += 1
        role = self.m.student
        if module is None:
            pred = role.train_forward(x_t, t, cond)
        else:
            with role.autocast():
                pred = module(x_t, t, cond)
        if self.cfg.student.prediction == "x0":
            return pred.float()
        return self.schedule.to_x0(pred, x_t, t)

    def teacher_x0(self, role_name: str, x_t, t, cond, uncond, scale: float, force_fp32: bool = False):
        """x̂0 of a teacher, with CFG when scale != 1 and the backbone is conditional; fp32 conversion."""
        self.calls[role_name] += 1
        role = getattr(self.m, role_name)
        if scale != 1.0 and cond:
            both = role.forward(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond([uncond, cond]), force_fp32)
            u, c = both.float().chunk(2)
            pred = cfg_combine(u, c, scale)
        else:
            pred = role.forward(x_t, t, cond, force_fp32).float()
        return self.schedule.to_x0(pred, x_t, t)

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        return (batch,) + tuple(self.m.sample_shape)

    def draw_t(self, d: SampleDraws, role: str, purpose: str, low: int, high: int) -> torch.Tensor:
        if self.karras is not None:  # uniform over the index of a Karras σ grid
            i = d.randint(0, len(self.karras), role, purpose).cpu()
            return self.karras[i].clamp(low, high - 1).to(d.device)
        return d.randint(low, high, role, purpose)

    def generate_train(self, d: SampleDraws, batch, k_grad: Optional[int]):
        z = d.randn(self.m.sample_shape, "student", "z")
        return generate(lambda x, t: self.student_x0(x, t, batch.cond), z, self.timesteps, self.schedule,
                        lambda k: d.randn(self.m.sample_shape, "student", f"renoise_{k}"), grad_step=k_grad)

    # -- losses ----------------------------------------------------------------------------------
    def dmd_point(self, x, d: SampleDraws):
        """The noised sample the DMD teachers see (same draws wherever it is computed)."""
        cfg = self.cfg
        t = self.draw_t(d, "student", "dmd_t", cfg.algorithm.t_min, cfg.algorithm.t_max + 1)
        n = d.randn(self.m.sample_shape, "student", "dmd_noise")
        return self.schedule.add_noise(x.detach(), n, t), t

    def critic_feedback(self, x, batch, d: SampleDraws) -> dict:
        """What the student step needs from the fake/target side: their x̂0 at the DMD point and the GAN
        generator term's input-gradient. Runs where the fake teacher lives; nothing here can put a
        gradient into any parameter."""
        cfg = self.cfg
        x_t, t = self.dmd_point(x, d)
        fb = {}
        with torch.no_grad():
            fb["x_fk"] = self.teacher_x0("fake_teacher", x_t, t, batch.cond, None, 1.0, self.dmd_fp32)
            if self.a > 0.0:
                fb["x_trg"] = self.teacher_x0("target_teacher", x_t, t, batch.cond, batch.uncond,
                                              cfg.target_teacher.cfg, self.dmd_fp32)
        if self.uses_gan_g:
            fb["g_gan"], fb["gan_g"] = self.gan_generator_input_grad(x, batch, d)
        return fb

    @property
    def uses_gan_g(self) -> bool:
        return self.cfg.gan_heads.enabled and self.cfg.gan_heads.lambda_g > 0

    def feedback_keys(self) -> list[str]:
        return ["x_fk"] + (["x_trg"] if self.a > 0.0 else []) + (["g_gan"] if self.uses_gan_g else [])

    def pack_feedback(self, fb: dict) -> torch.Tensor:
        parts = [fb[k].float().flatten() for k in self.feedback_keys()]
        if self.uses_gan_g:
            parts.append(fb["gan_g"].float().reshape(1).to(parts[0].device))
        return torch.cat(parts)

    def unpack_feedback(self, flat: torch.Tensor, shape) -> dict:
        n = int(torch.Size(shape).numel())
        fb = {k: flat[i * n:(i + 1) * n].view(shape) for i, k in enumerate(self.feedback_keys())}
        if self.uses_gan_g:
            fb["gan_g"] = flat[-1]
        return fb

    def feedback_numel(self, shape) -> int:
        return len(self.feedback_keys()) * int(torch.Size(shape).numel()) + (1 if self.uses_gan_g else 0)

    def student_loss(self, x, batch, d: SampleDraws, fb: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """Dual-domain DMD + the GAN generator term, given the critic side's feedback (computed here when
        the fake teacher is on this rank)."""
        cfg = self.cfg
        if fb is None:
            fb = self.critic_feedback(x, batch, d)
        logs = {}
        loss = torch.zeros((), device=x.device)
        branches = []
        if self.a < 1.0:
            x_t, t = self.dmd_point(x, d)
            with torch.no_grad():
                x_src = self.teacher_x0("source_teacher", x_t, t, batch.cond_src, batch.uncond,
                                        cfg.source_teacher.cfg, self.dmd_fp32)
            branches.append(("src", 1.0 - self.a, x_src))
        if self.a > 0.0:
            branches.append(("trg", self.a, fb["x_trg"]))
        for name, weight, x_k in branches:
            g = losses.dmd_gradient(x, fb["x_fk"], x_k)
            l_k = losses.dmd_loss(x, g)
            loss = loss + weight * l_k
            logs[f"dmd_{name}"] = float(l_k.detach())
        if self.uses_gan_g:
            loss = loss + cfg.gan_heads.lambda_g * losses.input_gradient_surrogate(x, fb["g_gan"])
            logs["gan_g"] = float(fb["gan_g"])
        return loss, logs

    def gan_generator_input_grad(self, x, batch, d: SampleDraws):
        """The GAN generator term's gradient on x, taken through the fake teacher's activations; no
        gradient can land in the fake teacher's or the heads' parameters (design.md)."""
        # A fresh leaf copy of the *input*, not a module's parameter: the design.md input-gradient pattern.
        x_in = x.detach().requires_grad_(True)
        t = d.randint(0, self.T, "student", "gan_t")
        n = d.randn(self.m.sample_shape, "student", "gan_noise")
        self.calls["fake_teacher_features"] += 1
        logits = self.m.fake_teacher.discriminate(self.schedule.add_noise(x_in, n, t), t, batch.cond)
        l_g = losses.gan_generator_loss(logits)
        (grad,) = torch.autograd.grad(l_g, x_in)
        return grad, l_g.detach()

    def fake_loss(self, x, batch, d: SampleDraws) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x = x.detach()
        fake = self.m.fake_teacher
        t = d.randint(0, self.T, "fake_teacher", "denoise_t")
        n = d.randn(self.m.sample_shape, "fake_teacher", "denoise_noise")
        self.calls["fake_teacher"] += 1
        pred = fake.train_forward(self.schedule.add_noise(x, n, t), t, batch.cond)
        l_fake = losses.denoising_loss(pred, self.schedule.target(x, n, t))
        loss, logs = l_fake, {"fake_denoise": float(l_fake.detach())}
        if cfg.gan_heads.enabled and cfg.gan_heads.lambda_d > 0:
            t_r = d.randint(0, self.T, "fake_teacher", "gan_real_t")
            n_r = d.randn(self.m.sample_shape, "fake_teacher", "gan_real_noise")
            t_f = d.randint(0, self.T, "fake_teacher", "gan_fake_t")
            n_f = d.randn(self.m.sample_shape, "fake_teacher", "gan_fake_noise")
            self.calls["fake_teacher_features"] += 2
            logit_real = fake.train_discriminate(self.schedule.add_noise(batch.real, n_r, t_r), t_r, batch.real_cond)
            logit_fake = fake.train_discriminate(self.schedule.add_noise(x, n_f, t_f), t_f, batch.cond)
            l_d = losses.gan_discriminator_loss(logit_real, logit_fake)
            loss = loss + cfg.gan_heads.lambda_d * l_d
            logs["gan_d"] = float(l_d.detach())
        return loss, logs

    def target_loss(self, x, batch, d: SampleDraws, iteration: int) -> tuple[torch.Tensor, dict]:
        tc = self.cfg.target_teacher
        real, cond = batch.real, batch.real_cond
        if tc.student_feedback > 0 and iteration >= tc.feedback_start:
            use_x = (d.rand("target_teacher", "feedback") < tc.student_feedback)
            real = torch.where(use_x.view(-1, 1, 1, 1), x.detach(), real)
            cond = select_cond(use_x, batch.cond, cond)
        if cond and tc.cond_dropout > 0:
            drop = d.rand("target_teacher", "cond_dropout") < tc.cond_dropout
            cond = select_cond(drop, batch.uncond, cond)
        t = d.randint(0, self.T, "target_teacher", "denoise_t")
        n = d.randn(self.m.sample_shape, "target_teacher", "denoise_noise")
        self.calls["target_teacher"] += 1
        pred = self.m.target_teacher.train_forward(self.schedule.add_noise(real, n, t), t, cond)
        l_t = losses.denoising_loss(pred, self.schedule.target(real, n, t))
        return l_t, {"target_denoise": float(l_t.detach())}

    # -- one iteration ---------------------------------------------------------------------------
    def step(self, iteration: int) -> dict:
        """One iteration. Colocated: this rank runs every role. Split: the generator side (student, source
        teacher) and the critic side (fake teacher + heads, target teacher) run their halves and exchange
        the student samples one way and the critic's feedback the other (placement.py)."""
        cfg, m, pl = self.cfg, self.m, self.placement
        gen, crit = pl.holds("student"), pl.holds("fake_teacher")
        ip = iteration_plan(cfg, iteration)
        train_g, train_t, ga_g, ga_f, ga_t = ip.train_g, ip.train_t, ip.ga_g, ip.ga_f, ip.ga_t
        n_micro, k_grad = ip.n_micro, ip.k_grad
        shape = self.sample_shape(cfg.train.batch_size)
        logs: dict = defaultdict(float)
        skipped: set = set()  # roles whose step this iteration is skipped (a non-finite loss on some rank)
        for micro in range(n_micro):
            idx = global_indices(iteration, micro, n_micro, pl.dp_rank, pl.dp_size, cfg.train.batch_size)
            d = SampleDraws(self.seed, iteration, idx, self.rt.device)
            batch = m.data.batch(d)
            if gen:
                if micro < ga_g:
                    x = self.generate_train(d, batch, k_grad)
                else:
                    with torch.no_grad():
                        x = self.generate_train(d, batch, k_grad)
                if pl.split:
                    pl.send(x.detach().float())
            else:
                x = pl.recv(shape, torch.float32, self.rt.device)
            if micro < ga_g:
                fb = None
                if crit:
                    fb = self.critic_feedback(x.detach(), batch, d)
                    if pl.split:
                        pl.send(self.pack_feedback(fb))
                else:
                    fb = self.unpack_feedback(pl.recv((self.feedback_numel(shape),), torch.float32, self.rt.device),
                                              shape)
                if gen:
                    loss_g, lg = self.student_loss(x, batch, d, fb)
                    self._backward("student", loss_g, iteration, micro, skipped)
                    for k, v in lg.items():
                        logs[f"student/{k}"] += v / ga_g
            x = x.detach()
            if crit and micro < ga_f:
                loss_f, lf = self.fake_loss(x, batch, d)
                self._backward("fake_teacher", loss_f, iteration, micro, skipped)
                for k, v in lf.items():
                    logs[f"fake_teacher/{k}"] += v / ga_f
            if crit and micro < ga_t:
                loss_t, lt = self.target_loss(x, batch, d, iteration)
                self._backward("target_teacher", loss_t, iteration, micro, skipped)
                for k, v in lt.items():
                    logs[f"target_teacher/{k}"] += v / ga_t
        for name, runs in (("student", gen and train_g), ("fake_teacher", crit), ("target_teacher", crit and train_t)):
            if not runs:
                continue
            if name in skipped:
                self.nonfinite_run[name] += 1
                self.nonfinite_total[name] += 1
                for k in [k for k in logs if k.startswith(f"{name}/")]:  # its non-finite losses
                    del logs[k]
                logs[f"{name}/skipped_nonfinite"] = 1.0
                limit = self.cfg.train.max_nonfinite_skips
                if self.nonfinite_run[name] > limit:
                    raise NonFiniteLoss(f"{name}: a non-finite loss made its step skip {self.nonfinite_run[name]} "
                                        f"iterations in a row (> train.max_nonfinite_skips = {limit}), last at "
                                        f"iteration {iteration}; stopping. Lower the learning rate, check the data, "
                                        "or resume from an earlier checkpoint")
                continue
            self.nonfinite_run[name] = 0
            for k, v in getattr(m, name).step(iteration).items():
                logs[f"{name}/{k}"] = v
        return dict(logs)

    def _backward(self, name: str, loss: torch.Tensor, iteration: int, micro: int, skipped: set) -> None:
        """Back-propagate a role's loss unless it is non-finite on any rank that steps the role (a flag
        all-reduced before any backward, so all those ranks skip together or all stop)."""
        if name in skipped:
            return
        bad = self.placement.any_rank(not bool(torch.isfinite(loss.detach()).all()), self.rt.device)
        if not bad:
            getattr(self.m, name).backward(loss)
            return
        where = f"{name}: non-finite loss at iteration {iteration} (micro-batch {micro}, on at least one rank)"
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLoss(f"{where}; stopping as train.nonfinite=stop (the last checkpoint is intact; "
                                "set train.nonfinite=skip to skip such steps)")
        if micro > 0:
            raise NonFiniteLoss(f"{where}; its earlier micro-batches' gradients are already accumulated in the "
                                "engine and cannot be dropped, so the step cannot be skipped; stopping (the last "
                                "checkpoint is intact)")
        skipped.add(name)
        if self.rt.is_main or self.placement.leader(name):
            print(f"warning: {where}; skipping its step (train.nonfinite=skip)")

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, steps: Optional[int] = None, seed: Optional[int] = None, batch: int = 64,
               prompts: Optional[list[str]] = None, use_ema: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n student samples in model space, drawn from noise keyed by (seed, "sample", index) — or, with a
        (CPU) ``generator``, in one batch drawn as a diffusers pipeline draws it: the initial noise, then the
        re-noising noise of each step, in that order (so an exported pipeline gives the same images)."""
        steps = steps or len(self.timesteps)
        ts = self.timesteps if steps == len(self.timesteps) else student_timesteps(steps, self.T)
        module = self.m.student.inference_module() if use_ema else self.m.student.module
        seed = self.seed if seed is None else seed
        out = []
        if generator is not None:
            batch = n
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            d = SampleDraws(seed, -1, idx, self.rt.device)
            if generator is not None:
                shape = (len(idx),) + tuple(self.m.sample_shape)
                z = torch.randn(shape, generator=generator, device=generator.device).to(self.rt.device)
                renoise = lambda k: torch.randn(shape, generator=generator, device=generator.device).to(self.rt.device)  # noqa: E731
            else:
                z = d.randn(self.m.sample_shape, "sample", "z")
                renoise = lambda k: d.randn(self.m.sample_shape, "sample", f"renoise_{k}")  # noqa: E731
            ps = None
            if self.m.data.conditioner is not None:
                ps = [(prompts or self.m.data.prompts)[i % len(prompts or self.m.data.prompts)] for i in idx]
            cond = self.m.data.encode(ps) if ps else None
            x = generate(lambda x_t, t: self.student_x0(x_t, t, cond, module=module), z, ts, self.schedule, renoise)
            out.append(x.float())
        return torch.cat(out)

    @torch.no_grad()
    def teacher_sample(self, n: int, steps: int = 25, seed: Optional[int] = None, batch: int = 64,
                       purpose: str = "teacher_sample") -> tuple[torch.Tensor, torch.Tensor, list]:
        """Deterministic DDIM (η = 0) samples of the source teacher: returns (z, x0, prompts)."""
        seed = self.seed if seed is None else seed
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        zs, xs, all_prompts = [], [], []
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            d = SampleDraws(seed, -1, idx, self.rt.device)
            z = d.randn(self.m.sample_shape, purpose, "z")
            ps = None
            cond_src = uncond = None
            if self.m.data.conditioner is not None:
                b = self.m.data.batch(d)
                ps, cond_src, uncond = b.prompts, b.cond_src, b.uncond
            x = z
            for i, t in enumerate(ts):
                tt = torch.full((len(idx),), t, dtype=torch.long, device=z.device)
                x0 = self.teacher_x0("source_teacher", x, tt, cond_src, uncond, self.cfg.source_teacher.cfg)
                if self.schedule.clip_sample is not None:
                    x0 = x0.clamp(-self.schedule.clip_sample, self.schedule.clip_sample)
                if i + 1 < len(ts):
                    tn = torch.full_like(tt, ts[i + 1])
                    a, s = self.schedule.coefficients(tt, x.ndim, x.device)
                    eps = (x.float() - a * x0) / s
                    a2, s2 = self.schedule.coefficients(tn, x.ndim, x.device)
                    x = a2 * x0 + s2 * eps
                else:
                    x = x0
            zs.append(z)
            xs.append(x)
            all_prompts.extend(ps or [])
        return torch.cat(zs), torch.cat(xs), all_prompts

    def warm_start(self, progress: bool = True) -> dict:
        """Regress the student onto (noise -> teacher's DDIM sample) pairs at each of its timesteps
        (algorithm.md §3, "Student output and warm start"). Uses its own Adam; the student's training
        optimizer starts fresh afterwards. Runs on the plain student, before its engine is built (so the
        engine's fp32 master copies start from the warm-started weights); every rank computes the same
        pairs and steps, and the engine broadcasts rank 0's weights when it is built."""
        sc = self.cfg.student
        if sc.warm_start <= 0:
            return {}
        z, x0, prompts = self.teacher_sample(sc.warm_start_pairs, sc.warm_start_teacher_steps, purpose="warm_start")
        if self.m.codec is None:
            x0 = x0.clamp(-1, 1)
        student = self.m.student
        if student.engine is not None:
            raise RuntimeError("warm_start must run before parallel.engines.attach")
        opt = torch.optim.Adam(student.params, lr=sc.warm_start_lr)
        bar = None
        if progress and self.rt.is_main:
            from unidad_dist.train.logging import progress_bar

            bar = progress_bar(sc.warm_start, "student warm start", leave=False)
        last = 0.0
        g = torch.Generator(device=CPU).manual_seed(self.seed + 17)
        for step in range(sc.warm_start):
            idx = torch.randint(0, z.shape[0], (min(sc.warm_start_batch, z.shape[0]),), generator=g)
            cond = self.m.data.encode([prompts[i] for i in idx.tolist()]) if prompts else None
            loss = torch.zeros((), device=z.device)
            for k, t in enumerate(self.timesteps):
                tt = torch.full((idx.numel(),), t, dtype=torch.long, device=z.device)
                if k == 0:
                    x_in = z[idx]
                else:
                    noise = torch.randn(x0[idx].shape, generator=g).to(z.device)
                    x_in = self.schedule.add_noise(x0[idx], noise, tt)
                loss = loss + losses.denoising_loss(self.student_x0(x_in, tt, cond), x0[idx])
            opt.zero_grad(set_to_none=True)
            (loss / len(self.timesteps)).backward()
            opt.step()
            last = float(loss.detach()) / len(self.timesteps)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for p in student.params:
            p.grad = None
        return {"warm_start_loss": last}
