"""OPAD — adversarial concept distillation for one-step personalisation (arXiv 2510.20512; docs/algorithm.md §12):
a multi-step teacher (role ``concept_teacher``) and a one-step ``student`` learn a new concept jointly from a few images.

Roles: ``concept_teacher`` (the paper's teacher; trainable; the run's primary backbone), ``student`` (trainable; its own backbone, e.g. an
SD-Turbo-form UNet, else a copy of the teacher's), ``discriminator`` (trainable heads on a frozen copy of the
teacher's initial UNet encoder). Teacher and student read one text encoder — the run's one text conditioner,
built once from the teacher's pipeline and shared by every call — and, with ``algorithm.kv_only`` (the
default, Custom-Diffusion style), only their cross-attention key/value projections (``attn2.to_k``,
``attn2.to_v``; with LoRA: the adapters on them) train; every other weight is frozen.

One iteration, in this order (each role's optimizer steps before the next role's loss is built):

1. teacher: its own denoising loss (the backbone's ε / v / x0 target) on the concept images with their prompts;
2. student: its sample x_s (one step; K steps by backward simulation) is forward-diffused to a random
   t ∈ [t_min, t_max] and denoised by the teacher (no gradient) to x̂0_tc; the alignment loss against
   sg(x̂0_tc), in image space (latent backbones decode through the frozen VAE, with gradients to x_s), is
   ``w_identity`` (1 − cos of identity embeddings) + ``w_lpips`` perceptual distance + ``w_mse`` pixel MSE,
   plus ``w_adv`` × the non-saturating adversarial term through the discriminator (an input-gradient taken
   where the discriminator lives: no gradient reaches its weights);
3. discriminator: the reverse (hinge-free, logistic) loss — concept images real, detached student samples
   fake — on an ensemble of heads, one per encoder level of its frozen UNet (the mean of their logits), at
   noise levels t ∈ [0, discriminator.t_max].

The identity and perceptual networks are ``models.features`` (``algorithm.features``: ``paper`` = CLIP
ViT-B/32 + LPIPS-VGG from the user's evaluation weights, checked by hash; ``stand_in`` = a fixed random conv
net, reported as a stand-in). A missing weight file is an error before any role is built — no term is dropped.

Collaborative phase (``algorithm.collab_start`` >= 0): from that iteration, every ``collab_every`` iterations, the
student draws ``collab_pool`` one-step samples of the concept prompts (noise keyed by (seed, iteration)); each
sample of the teacher's and the discriminator's real batch is then, with probability ``collab_fraction``, one of
them (with its prompt) — extra training data for the teacher, and for the student through the real set its
adversarial term is measured against. The pool is kept in checkpoints (a resume is bit-identical).

New token (``algorithm.train_token``; Custom Diffusion's modifier token, the paper's option): the rare token
(``data.target.rare_token``, e.g. ``<new1>``) is appended to the shared tokenizer(s) as a new token, its embedding
starting from that of ``algorithm.token_init`` (default: the class name). The embedding is a trainable module of
the teacher (its engine steps it with the K/V projections, from the teacher's denoising loss: the teacher encodes
its prompts itself, with gradients to it); after each teacher step its value is put into the shared encoder
(sent from the teacher's ranks in split placement), where the student, the discriminator, sampling and export
read it. The rest of the encoder stays frozen.
"""
from __future__ import annotations

import base64
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from unidad_dist.core.draws import SampleDraws, global_indices, shared_randint
from unidad_dist.core.schema import choice, positive
from unidad_dist.core.sections import AlgorithmConfig, TrainableRoleConfig
from unidad_dist.errors import UserError
from unidad_dist.methods import losses
from unidad_dist.methods.base import IterationPlan, Method, Pass, RoleSpec, register_method
from unidad_dist.methods.generate import ddim, ddim_timesteps, generate, sample_by_index, student_timesteps
from unidad_dist.models.gan_heads import GanHeads

__all__ = ["OPAD", "kv_projection"]

KV_DOC = ("the cross-attention key/value projections (attn2.to_k, attn2.to_v): this backbone has none (an "
          "unconditional or pixel UNet); OPAD learns a text concept and needs a text-conditioned backbone "
          "(SD1.5/SD2.1/SDXL form), or set algorithm.kv_only=false to train every weight")


def kv_projection(name: str, _param=None) -> bool:
    """A parameter of a cross-attention key/value projection (diffusers' ``attn2.to_k`` / ``attn2.to_v``; with
    LoRA, the adapters on them)."""
    return ".attn2.to_k." in name or ".attn2.to_v." in name


@dataclass
class OpadTeacherConfig(TrainableRoleConfig):
    sample_steps: int = 25  # DDIM steps of its own samples (the "before" grid)
    cond_dropout: float = 0.0  # fraction of its training prompts replaced by the empty prompt


@dataclass
class OpadStudentConfig(TrainableRoleConfig):
    steps: int = 1  # K: 1 (the paper), 2 or 4 also work (backward simulation: one step with gradient)
    timesteps: Optional[list[int]] = None  # explicit list, else t_k = T-1 - k*floor(T/K)
    ema: float = 0.0  # decay of the student EMA; 0 = off


@dataclass
class OpadDiscriminatorConfig(TrainableRoleConfig):
    t_max: int = 500  # its inputs are noised to t in [0, t_max]


@dataclass
class OpadAlgorithmConfig(AlgorithmConfig):
    name: str = "opad"
    kv_only: bool = True  # teacher and student train only cross-attention K/V (false: every weight, or LoRA)
    features: str = "paper"  # identity + perceptual networks: paper (CLIP + LPIPS, eval.weights) | stand_in
    w_identity: float = 1.0  # weight of 1 - cos(identity embeddings)
    w_lpips: float = 1.0  # weight of the perceptual distance
    w_mse: float = 1.0  # weight of the pixel MSE
    w_adv: float = 0.1  # weight of the adversarial term in the student's loss
    t_min: int = 20  # student step: x_s is forward-diffused to t in [t_min, t_max]
    t_max: int = 980
    collab_start: int = -1  # collaborative phase from this iteration (-1: off)
    collab_every: int = 50  # iterations between refreshes of the student-sample pool
    collab_pool: int = 8  # student samples in the pool
    collab_fraction: float = 0.25  # probability that a real sample is replaced by a pool sample
    train_token: bool = False  # data.target.rare_token becomes a new token whose embedding trains with the teacher
    token_init: str = ""  # word(s) whose mean embedding starts the new token's (empty: data.target.class_name)


@register_method
class OPAD(Method):
    name = "opad"
    primary = "concept_teacher"
    sampler = "student"
    components = ("schedule", "codec", "text")

    # -- declaration --------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type]:
        return {"concept_teacher": OpadTeacherConfig, "student": OpadStudentConfig,
                "discriminator": OpadDiscriminatorConfig, "algorithm": OpadAlgorithmConfig}

    @classmethod
    def roles(cls, cfg) -> list[RoleSpec]:
        kv = kv_projection if cfg.algorithm.kv_only else None
        specs = [
            RoleSpec("student", True, "generator", copy_of="concept_teacher", train_filter=kv, train_filter_doc=KV_DOC,
                     ema=cfg.student.ema),
            RoleSpec("concept_teacher", True, "critic", train_filter=kv, train_filter_doc=KV_DOC,
                     tokens=cfg.algorithm.train_token),
        ]
        if cfg.algorithm.w_adv > 0:  # without the adversarial term the discriminator would train for nothing
            specs.append(RoleSpec("discriminator", True, "critic", copy_of="concept_teacher", heads=GanHeads.for_backbone,
                                  heads_key="opad_discriminator_heads", train_filter=lambda n, p: n.startswith("heads.")))
        return specs

    @classmethod
    def feature_networks(cls, cfg) -> Optional[str]:
        return cfg.algorithm.features

    @classmethod
    def new_token(cls, cfg) -> Optional[tuple[str, str]]:
        if not cfg.algorithm.train_token:
            return None
        t = cfg.data.target
        return t.rare_token, cfg.algorithm.token_init or t.class_name

    @classmethod
    def validate(cls, cfg) -> None:
        al, st = cfg.algorithm, cfg.student
        choice("algorithm.features", al.features, ("paper", "stand_in"))
        for key in ("w_identity", "w_lpips", "w_mse", "w_adv"):
            if getattr(al, key) < 0:
                raise UserError(f"algorithm.{key} must be >= 0, got {getattr(al, key)}")
        if not 0 <= al.t_min <= al.t_max:
            raise UserError(f"need 0 <= algorithm.t_min <= algorithm.t_max, got {al.t_min}, {al.t_max}")
        if cfg.discriminator.t_max < 0:
            raise UserError(f"discriminator.t_max must be >= 0, got {cfg.discriminator.t_max}")
        if st.steps < 1:
            raise UserError(f"student.steps must be >= 1, got {st.steps}")
        if st.timesteps is not None and len(st.timesteps) != st.steps:
            raise UserError(f"student.timesteps has {len(st.timesteps)} entries but student.steps={st.steps}; "
                            "make them agree")
        if not 0.0 <= st.ema < 1.0:
            raise UserError(f"student.ema must be in [0, 1) (0 = off), got {st.ema}")
        positive("concept_teacher.sample_steps", cfg.concept_teacher.sample_steps)
        if not 0 <= cfg.concept_teacher.cond_dropout < 1:
            raise UserError(f"concept_teacher.cond_dropout must be in [0, 1), got {cfg.concept_teacher.cond_dropout}")
        if al.train_token:
            t = cfg.data.target
            if not t.rare_token or any(c.isspace() for c in t.rare_token):
                raise UserError(f"algorithm.train_token=true trains the embedding of data.target.rare_token as a new "
                                f"token, but it is {t.rare_token!r}; give one word, e.g. data.target.rare_token='<new1>'")
            if not (al.token_init or t.class_name).strip():
                raise UserError("algorithm.train_token=true needs a word to start the new token's embedding from: "
                                "set algorithm.token_init (or data.target.class_name)")
        if al.collab_start >= 0:
            positive("algorithm.collab_every", al.collab_every)
            positive("algorithm.collab_pool", al.collab_pool)
            if not 0 < al.collab_fraction <= 1:
                raise UserError(f"algorithm.collab_fraction must be in (0, 1], got {al.collab_fraction}")
        elif al.collab_start != -1:
            raise UserError(f"algorithm.collab_start must be >= 0 (the collaborative phase's first iteration) or -1 "
                            f"(off), got {al.collab_start}")

    @classmethod
    def iteration_plan(cls, cfg, iteration: int) -> IterationPlan:
        k_grad = shared_randint(cfg.run.seed, iteration, "backward_simulation_k", 0, cfg.student.steps)
        micro = {"concept_teacher": cfg.concept_teacher.grad_accum, "student": cfg.student.grad_accum,
                 "discriminator": cfg.discriminator.grad_accum if cfg.algorithm.w_adv > 0 else 0}
        return IterationPlan(micro,
                             {"k_grad": k_grad, "refresh": cls.refreshes(cfg, iteration)})

    @staticmethod
    def refreshes(cfg, iteration: int) -> bool:
        """The collaborative pool is drawn at the start of this iteration."""
        al = cfg.algorithm
        return al.collab_start >= 0 and iteration >= al.collab_start and (iteration - al.collab_start) % al.collab_every == 0

    @classmethod
    def passes(cls, cfg, iteration: int, conditional: bool) -> list[list[Pass]]:
        ip = cls.iteration_plan(cfg, iteration)
        k = ip.extra["k_grad"]
        out = []
        for micro in range(ip.n_micro):
            p: list[Pass] = []
            if micro < ip.micro["concept_teacher"]:
                p.append(Pass("concept_teacher", "params"))
            if micro < ip.micro["student"]:
                p += [Pass("student", "none", count=k)] if k else []
                p += [Pass("student", "params"), Pass("concept_teacher", "none", phase="student")]
                if cfg.algorithm.w_adv > 0:
                    p.append(Pass("discriminator", "input", discriminate=True, phase="student"))
            elif micro < ip.micro["discriminator"]:  # samples for the discriminator only
                p.append(Pass("student", "none", count=k + 1))
            if micro < ip.micro["discriminator"]:
                p.append(Pass("discriminator", "params", discriminate=True, count=2))
            out.append(p)
        if ip.extra["refresh"]:
            out[0].append(Pass("student", "none", batch=max(1, cfg.algorithm.collab_pool // cfg.train.batch_size),
                               count=cfg.student.steps))
        return out

    # -- a run --------------------------------------------------------------------------------------
    def __init__(self, cfg, models, rt):
        super().__init__(cfg, models, rt)
        self.schedule = models.schedule
        self.T = self.schedule.T
        self.timesteps = student_timesteps(cfg.student.steps, self.T, cfg.student.timesteps)
        if models.text is None:
            raise UserError(f"algorithm.name=opad learns a text concept, but concept_teacher.backbone '{models.spec.given}' is "
                            "not text-conditioned; give an SD1.5/SD2.1/SDXL-form pipeline folder")
        self.features = models.features  # None in sample/export (no loss is computed there)
        for key, t_max in (("algorithm.t_max", cfg.algorithm.t_max), ("discriminator.t_max", cfg.discriminator.t_max)):
            if t_max >= self.T:
                raise UserError(f"{key}={t_max} but this noise schedule has timesteps 0..{self.T - 1}; set it below {self.T}")
        self.token = models.text.token if cfg.algorithm.train_token else None  # the new token (train_token)
        if self.token is not None and models.data.num_shots and not any(  # (training: the shots' prompts)
                self.token.lower() in p.lower() for p in models.data.real_prompts):
            raise UserError(f"algorithm.train_token=true, but no concept prompt holds the new token '{self.token}' "
                            f"(they read e.g. '{models.data.real_prompts[0]}'): it would train nothing; put {{rare}} in "
                            "data.target.prompt (or the token in the images' captions)")
        self.pool: Optional[torch.Tensor] = None  # the collaborative pool (model space) and its prompts
        self.pool_prompts: list[str] = []
        self.pool_iteration = -1
        self.calls = defaultdict(int)  # network calls per role (tests count them)

    def role(self, name: str):
        return self.m.roles[name]

    def student_x0(self, x_t, t, cond, module=None):
        self.calls["student"] += 1
        pred = self.role("student").output(x_t, t, cond, module)
        return self.schedule.to_x0(pred.float(), x_t, t)

    def teacher_x0(self, x_t, t, cond):
        self.calls["concept_teacher"] += 1
        return self.schedule.to_x0(self.role("concept_teacher").forward(x_t, t, cond).float(), x_t, t)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Image space with gradients (latents through the frozen VAE)."""
        return self.m.codec.decode_differentiable(x) if self.m.codec is not None else x

    # -- the collaborative pool ---------------------------------------------------------------------
    def refresh_pool(self, iteration: int) -> None:
        al, data = self.cfg.algorithm, self.m.data
        prompts = [data.prompts[i % len(data.prompts)] for i in range(al.collab_pool)]
        shape = (al.collab_pool,) + tuple(self.m.sample_shape)

        def draw():
            with torch.no_grad(), self.role("student").inference_weights(use_ema=False) as module:
                d = SampleDraws(self.seed, iteration, range(al.collab_pool), self.rt.device)
                z = d.randn(self.m.sample_shape, "collab", "z")
                cond = data.encode(prompts)
                x = generate(lambda x_t, t: self.student_x0(x_t, t, cond, module=module), z, self.timesteps,
                             self.schedule, lambda k: d.randn(self.m.sample_shape, "collab", f"renoise_{k}"))
            return {"pool": x.float()}

        self.pool = self.ex.run_at("student", draw, {"pool": shape})["pool"]
        self.pool_prompts = prompts
        self.pool_iteration = iteration

    def real_batch(self, batch, d: SampleDraws, role: str):
        """The concept images and their prompts, with pool samples (and theirs) mixed in during the
        collaborative phase; also returns the mask of mixed samples."""
        real, prompts = batch.real, list(batch.real_prompts)
        if self.pool is None:
            return real, prompts, None
        frac = self.cfg.algorithm.collab_fraction
        mask = d.rand(role, "collab") < frac
        j = d.randint(0, len(self.pool), role, "collab_index").cpu()
        real = torch.where(mask.view(-1, 1, 1, 1), self.pool[j.to(self.pool.device)], real)
        prompts = [self.pool_prompts[i] if m else p for m, i, p in zip(mask.tolist(), j.tolist(), prompts)]
        return real, prompts, mask

    # -- the new token (algorithm.train_token) -----------------------------------------------------
    def share_token(self, draws) -> None:
        """After the teacher's step: its new-token embedding into the shared encoder (from the teacher's ranks
        to the others in split placement), and this iteration's conditions encoded again with it."""
        text = self.m.text
        shapes = {f"row{i}": tuple(r.shape) for i, r in enumerate(text.token_rows())}
        rows = self.ex.run_at("concept_teacher", lambda: {f"row{i}": r for i, r in enumerate(
            self.role("concept_teacher").read_params("tokens."))}, shapes)
        text.set_token_rows([rows[f"row{i}"] for i in range(len(shapes))])
        self.m.data.forget(self.token)
        for _, batch in draws:
            batch.cond = self.m.data.encode(batch.prompts)
            batch.real_cond = self.m.data.encode(batch.real_prompts)

    # -- losses ------------------------------------------------------------------------------------
    def teacher_loss(self, batch, d: SampleDraws):
        real, prompts, mask = self.real_batch(batch, d, "concept_teacher")
        tc = self.cfg.concept_teacher
        if tc.cond_dropout > 0:
            drop = (d.rand("concept_teacher", "cond_dropout") < tc.cond_dropout).tolist()
            prompts = ["" if k else p for k, p in zip(drop, prompts)]
        # with a new token the teacher encodes its prompts itself, with gradients to the token's embedding
        cond = self.m.text.tokenize(prompts) if self.token is not None else self.m.data.encode(prompts)
        t = d.randint(0, self.T, "concept_teacher", "denoise_t")
        n = d.randn(self.m.sample_shape, "concept_teacher", "denoise_noise")
        self.calls["concept_teacher"] += 1
        pred = self.role("concept_teacher").train_forward(self.schedule.add_noise(real, n, t), t, cond)
        loss = losses.denoising_loss(pred, self.schedule.target(real, n, t))
        logs = {"denoise": float(loss.detach())}
        if mask is not None:
            logs["collab_fraction"] = float(mask.float().mean())
        return loss, logs

    def teacher_feedback(self, x, batch, d: SampleDraws) -> dict:
        """Where the teacher and the discriminator live: sg(x̂0_tc) of the forward-diffused student sample and
        the adversarial term's input-gradient on x (nothing here puts a gradient into a parameter)."""
        al = self.cfg.algorithm
        t = d.randint(al.t_min, al.t_max + 1, "student", "align_t")
        n = d.randn(self.m.sample_shape, "student", "align_noise")
        with torch.no_grad():
            fb = {"x_tc": self.teacher_x0(self.schedule.add_noise(x, n, t), t, batch.cond)}
        if al.w_adv > 0:
            x_in = x.detach().requires_grad_(True)
            t_g = d.randint(0, self.cfg.discriminator.t_max + 1, "student", "adv_t")
            n_g = d.randn(self.m.sample_shape, "student", "adv_noise")
            self.calls["discriminator_features"] += 1
            logits = self.role("discriminator").discriminate(self.schedule.add_noise(x_in, n_g, t_g), t_g, batch.cond)
            l_g = losses.gan_generator_loss(logits)
            (fb["g_adv"],) = torch.autograd.grad(l_g, x_in)
            fb["adv"] = l_g.detach()
        return fb

    def feedback_shapes(self, shape) -> dict:
        out = {"x_tc": shape}
        if self.cfg.algorithm.w_adv > 0:
            out.update(g_adv=shape, adv=())
        return out

    def student_loss(self, x, fb: dict):
        """The alignment loss against sg(x̂0_tc) in image space, plus the adversarial term."""
        al = self.cfg.algorithm
        p_s = self.pixels(x)
        with torch.no_grad():
            p_tc = self.pixels(fb["x_tc"])
        mse = F.mse_loss(p_s, p_tc)
        loss = al.w_mse * mse
        logs = {"mse": float(mse.detach())}
        if al.w_lpips > 0:
            lp = self.features.perceptual(p_s, p_tc).mean()
            loss = loss + al.w_lpips * lp
            logs["lpips"] = float(lp.detach())
        if al.w_identity > 0:
            with torch.no_grad():
                e_tc = self.features.identity(p_tc)
            ident = (1 - (self.features.identity(p_s) * e_tc).sum(dim=-1)).mean()
            loss = loss + al.w_identity * ident
            logs["identity"] = float(ident.detach())
        if al.w_adv > 0:
            loss = loss + al.w_adv * losses.input_gradient_surrogate(x, fb["g_adv"])
            logs["adv"] = float(fb["adv"])
        return loss, logs

    def discriminator_loss(self, x, batch, d: SampleDraws):
        real, real_prompts, _ = self.real_batch(batch, d, "discriminator")
        real_cond = self.m.data.encode(real_prompts)
        tm = self.cfg.discriminator.t_max + 1
        t_r, t_f = d.randint(0, tm, "discriminator", "real_t"), d.randint(0, tm, "discriminator", "fake_t")
        n_r = d.randn(self.m.sample_shape, "discriminator", "real_noise")
        n_f = d.randn(self.m.sample_shape, "discriminator", "fake_noise")
        disc = self.role("discriminator")
        self.calls["discriminator_features"] += 2
        logit_real = disc.train_discriminate(self.schedule.add_noise(real, n_r, t_r), t_r, real_cond)
        logit_fake = disc.train_discriminate(self.schedule.add_noise(x.detach(), n_f, t_f), t_f, batch.cond)
        loss = losses.gan_discriminator_loss(logit_real, logit_fake)
        return loss, {"gan_d": float(loss.detach())}

    # -- one iteration ---------------------------------------------------------------------------
    def step(self, iteration: int) -> dict:
        """Teacher, student, discriminator — each role's micro-batches, then its optimizer step, before the next
        role's loss. Phases: ``data``, ``collab`` (a pool refresh), ``concept_teacher``, ``student``, ``discriminator``."""
        cfg, ex, timer = self.cfg, self.ex, self.timer
        ip = self.iteration_plan(cfg, iteration)
        n_micro, k_grad = ip.n_micro, ip.extra["k_grad"]
        logs: dict = defaultdict(float)
        skipped: set = set()
        if ip.extra["refresh"]:
            with timer.phase("collab"):
                self.refresh_pool(iteration)
        draws = []
        with timer.phase("data"):
            for micro in range(n_micro):
                idx = global_indices(iteration, micro, n_micro, ex.dp_rank, ex.dp_size, cfg.train.batch_size)
                d = SampleDraws(self.seed, iteration, idx, self.rt.device)
                draws.append((d, self.m.data.batch(d)))
        ga = ip.micro["concept_teacher"]
        if ex.holds("concept_teacher"):
            with timer.phase("concept_teacher"):
                for micro in range(ga):
                    d, batch = draws[micro]
                    loss, lt = self.teacher_loss(batch, d)
                    self.backward("concept_teacher", loss, iteration, micro, skipped)
                    for k, v in lt.items():
                        logs[f"concept_teacher/{k}"] += v / ga
        self.step_roles(iteration, ["concept_teacher"], skipped, logs)
        if self.token is not None:
            self.share_token(draws)
        ga, ga_d = ip.micro["student"], ip.micro["discriminator"]
        shape = (cfg.train.batch_size,) + tuple(self.m.sample_shape)
        samples = []
        with timer.phase("student"):
            for micro in range(max(ga, ga_d)):  # the student's micro-batches and the samples the discriminator needs
                d, batch = draws[micro]
                grad = micro < ga

                def make_x(d=d, batch=batch, grad=grad):
                    z = d.randn(self.m.sample_shape, "student", "z")
                    with torch.set_grad_enabled(grad):
                        x = generate(lambda x_t, t: self.student_x0(x_t, t, batch.cond), z, self.timesteps,
                                     self.schedule, lambda k: d.randn(self.m.sample_shape, "student", f"renoise_{k}"),
                                     grad_step=k_grad)
                    return {"x": x}

                x = ex.run_at("student", make_x, {"x": shape})["x"]
                if grad:
                    fb = ex.run_at("concept_teacher", lambda d=d, batch=batch, x=x: self.teacher_feedback(x.detach(), batch, d),
                                   self.feedback_shapes(shape))
                    if ex.holds("student"):
                        loss, ls = self.student_loss(x, fb)
                        self.backward("student", loss, iteration, micro, skipped)
                        for k, v in ls.items():
                            logs[f"student/{k}"] += v / ga
                samples.append(x.detach())
        self.step_roles(iteration, ["student"], skipped, logs)
        ga = ga_d
        if ga and ex.holds("discriminator"):
            with timer.phase("discriminator"):
                for micro in range(ga):
                    d, batch = draws[micro]
                    loss, ld = self.discriminator_loss(samples[micro], batch, d)
                    self.backward("discriminator", loss, iteration, micro, skipped)
                    for k, v in ld.items():
                        logs[f"discriminator/{k}"] += v / ga
        self.step_roles(iteration, ["discriminator"], skipped, logs)
        return dict(logs)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, steps: Optional[int] = None, seed: Optional[int] = None, batch: int = 64,
               prompts: Optional[list[str]] = None, use_ema: bool = True,
               generator: Optional[torch.Generator] = None, first: int = 0) -> torch.Tensor:
        """Student samples ``first`` … ``first + n - 1`` (noise keyed by (seed, index); prompt index mod
        len(prompts)); with a (CPU) ``generator``, drawn in one batch as a diffusers pipeline draws them."""
        steps = steps or len(self.timesteps)
        ts = self.timesteps if steps == len(self.timesteps) else student_timesteps(steps, self.T)
        with self.role("student").inference_weights(use_ema) as module:
            return sample_by_index(lambda x_t, t, cond: self.student_x0(x_t, t, cond, module=module), self.m, ts,
                                   self.seed if seed is None else seed, n, batch, self.rt.device, prompts, generator,
                                   first)

    @torch.no_grad()
    def grids(self, n: int) -> dict[str, torch.Tensor]:
        """The teacher's DDIM samples of the concept prompts (``concept_teacher.sample_steps``)."""
        if self.m.roles.get("concept_teacher") is None:
            return {}
        steps = self.cfg.concept_teacher.sample_steps
        d = SampleDraws(self.seed, -1, range(n), self.rt.device)
        ps = self.m.data.prompts
        cond = self.m.data.encode([ps[i % len(ps)] for i in range(n)])
        z = d.randn(self.m.sample_shape, "grid", "z")
        x = ddim(lambda x_t, t: self.teacher_x0(x_t, t, cond), z, ddim_timesteps(steps, self.T), self.schedule)
        return {"concept_teacher": x}

    def summary(self) -> dict:
        return {"student_steps": self.cfg.student.steps,
                "features": getattr(self.features, "name", None) if self.features is not None else None,
                "collab_pool_iteration": self.pool_iteration}

    def sampling_info(self) -> dict:
        st = self.cfg.student
        return {"steps": st.steps, "timesteps": list(self.timesteps), "explicit_timesteps": st.timesteps is not None,
                "output": self.schedule.prediction_type}

    # -- its state: the collaborative pool ----------------------------------------------------------
    def state_dict(self) -> dict:
        out = super().state_dict()
        if self.token is not None:  # what sample and export read (the teacher's engine holds the trained copy)
            out["token"] = {"token": self.token, "rows": [_b64(r) for r in self.m.text.token_rows()]}
        if self.pool is not None:
            arr = self.pool.detach().float().cpu().numpy()
            out["collab"] = {"iteration": self.pool_iteration, "prompts": list(self.pool_prompts), **_b64(self.pool)}
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.token is not None:
            tk = state.get("token")
            if tk is None or tk.get("token") != self.token:
                raise UserError(f"algorithm.train_token=true with the new token '{self.token}', but the checkpoint "
                                f"holds {'no trained token' if tk is None else repr(tk.get('token'))}; resume with "
                                "the settings it was trained with, or start a new run")
            self.m.text.set_token_rows([_unb64(r) for r in tk["rows"]])
            self.m.data.forget(self.token)
        c = state.get("collab")
        if c is None:
            self.pool, self.pool_prompts, self.pool_iteration = None, [], -1
            return
        self.pool = _unb64(c).to(self.rt.device)
        self.pool_prompts = list(c["prompts"])
        self.pool_iteration = int(c["iteration"])

    @classmethod
    def merge_state_dicts(cls, states: list[dict]) -> dict:
        out = super().merge_state_dicts(states)
        for key in ("collab", "token"):  # the same on every rank
            for st in states:
                if key in st:
                    out[key] = st[key]
                    break
        return out


def _b64(t: torch.Tensor) -> dict:
    arr = t.detach().float().cpu().numpy()
    return {"shape": list(arr.shape), "float32_b64": base64.b64encode(arr.tobytes()).decode()}


def _unb64(d: dict) -> torch.Tensor:
    arr = np.frombuffer(base64.b64decode(d["float32_b64"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(arr.copy())
