"""Uni-DAD (docs/algorithm.md): one run that distils a many-step source teacher into a K-step student and adapts
it to a target domain from a few shots.

Roles: ``student`` (G, generator side), ``fake_teacher`` with its GAN heads (F, critic side),
``source_teacher`` (frozen, generator side; its backbone is the run's primary), ``target_teacher``
(``online`` / ``frozen`` / ``off``, critic side). One iteration (§5): the student on dual-domain DMD + the
GAN generator term, the fake teacher + heads on denoising + the GAN discriminator, the online target
teacher on the target shots.

Gradients reach only the role being stepped by construction: teacher predictions run under no_grad, the
GAN generator term is an input-gradient taken through the fake teacher's *activations*
(``torch.autograd.grad`` w.r.t. the sample only) and injected into the student's graph, and the fake and
target steps see detached student samples. No ``requires_grad`` is toggled. The step names no rank: the
exchange runs the generator's and the critic's pieces where those roles live and hands the student
samples one way and the critic's feedback the other.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from unidad_dist.core.draws import SampleDraws, global_indices, shared_randint
from unidad_dist.core.images import nearest_shot
from unidad_dist.core.progress import progress_bar
from unidad_dist.core.schema import choice, positive
from unidad_dist.core.sections import AlgorithmConfig, RoleConfig, TrainableRoleConfig, TrainConfig
from unidad_dist.device import CPU
from unidad_dist.errors import UserError
from unidad_dist.methods import losses
from unidad_dist.methods.base import IterationPlan, Method, NonFiniteLoss, Pass, RoleSpec, register_method
from unidad_dist.methods.generate import ddim, ddim_timesteps, generate, sample_by_index, student_timesteps
from unidad_dist.models.conditioning import cat_cond, strip_rare_token
from unidad_dist.models.gan_heads import GanHeads
from unidad_dist.models.schedule import cfg_combine, karras_index_timesteps

__all__ = ["UniDAD", "NonFiniteLoss", "select_cond"]


# --------------------------------------------------------------------------------------------------
# Its recipe sections
# --------------------------------------------------------------------------------------------------
@dataclass
class UniDADTrainConfig(TrainConfig):
    fake_updates_per_student: int = 5  # `ratio`: the student steps on iterations = 0 mod ratio


@dataclass
class StudentConfig(TrainableRoleConfig):
    steps: int = 1  # K
    timesteps: Optional[list[int]] = None  # explicit list, else t_k = T-1 - k*floor(T/K)
    unroll: str = "backward_simulation"  # or "full"
    prediction: str = "teacher"  # "x0": the network's output is x̂0; "teacher": read as the backbone's type
    warm_start: int = 0  # regression steps on (noise -> teacher's DDIM sample) pairs; 0 = off
    # warm start: whose samples — "source" (the source teacher's), or "target" (the online target teacher's after
    # its own warm start, or the frozen one's: the student starts drawing the target domain; beyond the paper)
    warm_start_teacher: str = "source"
    warm_start_pairs: int = 256  # warm start: (noise, teacher sample) pairs drawn once
    warm_start_teacher_steps: int = 25  # warm start: DDIM steps of the teacher's samples
    warm_start_lr: float = 1e-3  # warm start: learning rate
    warm_start_batch: int = 32  # warm start: pairs per step
    # warm start: the student's input at its steps after the first — "renoised" (the teacher's sample noised
    # afresh to t_k: step k learns the mean of x0 given x_t, a blur where x_t is noisy), or "trajectory" (the
    # teacher's own DDIM state at t_k on the way to that sample: step k learns the map from there to x0, sharp,
    # as progressive / consistency distillation regress; t_k not on the DDIM grid are added to it)
    warm_start_inputs: str = "renoised"
    # warm start: the weight of the last step's regression loss (the other steps' weigh 1; the loss is their
    # weighted mean). The last step draws the fine detail, where the regression leaves grain (beyond the paper)
    warm_start_last_weight: float = 1.0
    # warm start: decay of an EMA of its weights, which the student then takes (Polyak averaging, as
    # target_teacher.warm_start_ema; beyond the paper); 0 = off, it keeps the last step's weights
    warm_start_ema: float = 0.0
    # warm start: rounds of on-policy refinement after it (beyond the paper). Each runs the student's own chain on
    # the pairs' noise, as it samples (x̂0 re-noised to each later timestep with fresh noise), and regresses each
    # later step onto the teacher's DDIM completion from the student's own state there (the first step keeps its
    # pair), for warm_start_refine_steps steps: the warm start alone trains later steps on the teacher's states,
    # but at sampling time they see the student's (DAgger's remedy for exposure bias); 0 = off, as is
    # student.warm_start=0 (no warm start at all)
    warm_start_refine: int = 0
    warm_start_refine_steps: int = 150  # warm start: regression steps of each refinement round
    # warm start: decay of the EMA each refinement round leaves the student with (as warm_start_ema, from the
    # round's starting weights); 0 = off, the round's last step's weights (docs/heldout.md §7: off, the rounds fit
    # lilac_rings_light's t = 500 step faster; in whole runs the effect was mixed)
    warm_start_refine_ema: float = 0.0
    # warm start: leave out the pairs whose teacher sample copies a shot (closer to one, or to its mirror image, than
    # half the shots' median nearest-neighbour distance: the evaluation's copy test, in model space), and in each
    # refinement round those where any of the teacher's completions does, so the student is not taught the copies
    # of a target teacher that memorised its few shots (beyond the paper; data deduplication against memorisation)
    warm_start_drop_copies: bool = False
    ema: float = 0.0  # decay of the student EMA; 0 = off


@dataclass
class FakeTeacherConfig(TrainableRoleConfig):
    # Its UNet's starting weights: "source" (a copy of the source teacher, as the paper: the student starts as
    # that teacher), or "target" (after the warm starts, the target teacher's: the distribution the student
    # starts in when student.warm_start_teacher=target regressed it onto that teacher's samples; beyond the paper)
    start: str = "source"


@dataclass
class GanHeadsConfig:
    enabled: bool = True  # the multi-head GAN on the fake teacher's encoder (false: DMD only)
    lambda_d: float = 0.05  # weight of the discriminator loss in the fake-teacher step
    lambda_g: float = 0.015  # weight of the generator loss in the student step


@dataclass
class SourceTeacherConfig(RoleConfig):
    enabled: bool = True  # false only with algorithm.a = 1 (the target teacher alone)
    cfg: float = 1.0  # classifier-free guidance scale (text models); 1 = no CFG


@dataclass
class TargetTeacherConfig(TrainableRoleConfig):
    mode: str = "off"  # off | online | frozen (init: the target checkpoint; online: None = copy of the source)
    update_every: int = 1  # tt_every: step the online target teacher on iterations = 0 mod this
    cfg: float = 1.0  # its classifier-free guidance scale in the DMD loss (text models); 1 = no CFG
    cond_dropout: float = 0.1  # online: fraction of its training captions dropped (needed for cfg > 1)
    student_feedback: float = 0.0  # OPAD-style: fraction of its batch that is detached student samples
    feedback_start: int = 0  # iteration from which student_feedback applies
    # Steps of its own denoising loss on the target shots before the first iteration (online mode; 0 = off),
    # so the target branch of the DMD loss points at the target domain from the start (beyond the paper).
    warm_start: int = 0
    warm_start_lr: float = 5e-4  # learning rate of that warm start
    # decay of an EMA of that warm start's weights, which the target teacher then takes (Polyak averaging: its
    # samples lose the grain of the last Adam steps); 0 = off, it keeps the last step's weights
    warm_start_ema: float = 0.0


@dataclass
class UniDADAlgorithmConfig(AlgorithmConfig):
    a: float | str = 0.0  # weight of the target-teacher DMD term, or "auto" (moved by the auto_* controller)
    auto_min: float = 0.0  # a: auto — a at the start and when the teachers denoise the shots equally well
    auto_max: float = 0.75  # a: auto — a once the target teacher denoises the shots auto_gap better than the source
    auto_gap: float = 0.5  # a: auto — the relative loss gap 1 - L_target/L_source at which a reaches auto_max
    auto_every: int = 10  # a: auto — iterations between probes of the two teachers on the shots
    auto_rate: float = 0.2  # a: auto — each probe moves a this fraction of the way to its aim
    t_min: int = 20  # smallest noise timestep of the DMD draw (fake-teacher and GAN draws use 0..T-1)
    t_max: int = 980  # largest noise timestep of the DMD draw
    t_sampling: str = "uniform"  # uniform | karras_index (the DMD, fake-teacher and GAN noise levels)
    dmd: bool = True  # false: the student learns from the GAN term alone, no teacher is called (Distill-then-Adapt)


def a_bounds(cfg) -> tuple[float, float]:
    """The smallest and largest value a can take in this run (fixed a: that value twice)."""
    al = cfg.algorithm
    if not al.dmd:
        raise ValueError("a_bounds: algorithm.dmd=false runs no DMD branch")
    if al.a == "auto":
        return min(al.auto_min, al.auto_max), max(al.auto_min, al.auto_max)
    return float(al.a), float(al.a)


def auto_a_aim(cfg, loss_source: float, loss_target: float) -> tuple[float, float]:
    """The controller's aim for a from one probe (docs/algorithm.md §9): the relative gap g = 1 - L_t / L_s
    by which the target teacher denoises the shots better than the source teacher, mapped linearly from
    auto_min (g <= 0: the source already covers the target) to auto_max (g >= auto_gap). Returns (aim, g)."""
    al = cfg.algorithm
    g = 1.0 - loss_target / loss_source if loss_source > 0 else 0.0
    frac = min(1.0, max(0.0, g / al.auto_gap))
    return al.auto_min + (al.auto_max - al.auto_min) * frac, g


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


@register_method
class UniDAD(Method):
    name = "unidad"
    primary = "source_teacher"
    sampler = "student"
    components = ("schedule", "codec", "text")

    # -- declaration --------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type]:
        return {"train": UniDADTrainConfig, "student": StudentConfig, "fake_teacher": FakeTeacherConfig,
                "gan_heads": GanHeadsConfig, "source_teacher": SourceTeacherConfig,
                "target_teacher": TargetTeacherConfig, "algorithm": UniDADAlgorithmConfig}

    @classmethod
    def roles(cls, cfg) -> list[RoleSpec]:
        specs = [RoleSpec("student", True, "generator", copy_of="source_teacher", ema=cfg.student.ema),
                 RoleSpec("fake_teacher", True, "critic", copy_of="source_teacher", heads=GanHeads.for_backbone,
                          heads_key="gan_heads_init")]
        if cfg.source_teacher.enabled:
            specs.append(RoleSpec("source_teacher", False, "generator"))
        mode = cfg.target_teacher.mode
        if mode != "off":
            specs.append(RoleSpec("target_teacher", mode == "online", "critic", copy_of="source_teacher"))
        return specs

    @classmethod
    def validate(cls, cfg) -> None:
        tc = cfg.target_teacher
        choice("target_teacher.mode", tc.mode, ("off", "online", "frozen"))
        if cfg.algorithm.dmd:
            cls._validate_dmd(cfg)
        else:
            cls._validate_gan_only(cfg)
        st = cfg.student
        if st.steps < 1:
            raise UserError(f"student.steps must be >= 1, got {st.steps}")
        if st.timesteps is not None:
            if len(st.timesteps) != st.steps:
                raise UserError(
                    f"student.timesteps has {len(st.timesteps)} entries but student.steps={st.steps}; make them agree"
                )
            if any(t < 0 for t in st.timesteps):
                raise UserError(f"student.timesteps must be >= 0 (timestep indices of the noise schedule), got "
                                f"{st.timesteps}")
            if any(b >= a_ for a_, b in zip(st.timesteps, st.timesteps[1:])):
                raise UserError(f"student.timesteps must be strictly decreasing, got {st.timesteps}")
        choice("student.unroll", st.unroll, ("backward_simulation", "full"))
        choice("student.prediction", st.prediction, ("teacher", "x0"))
        if not 0.0 <= st.ema < 1.0:
            raise UserError(f"student.ema must be in [0, 1) (0 = off), got {st.ema}")
        positive("student.warm_start", st.warm_start, allow_zero=True)
        choice("student.warm_start_teacher", st.warm_start_teacher, ("source", "target"))
        choice("student.warm_start_inputs", st.warm_start_inputs, ("renoised", "trajectory"))
        if not st.warm_start_last_weight > 0:
            raise UserError(f"student.warm_start_last_weight must be > 0 (1 = every step weighs the same), got "
                            f"{st.warm_start_last_weight}")
        for key in ("warm_start_ema", "warm_start_refine_ema"):
            if not 0 <= getattr(st, key) < 1:
                raise UserError(f"student.{key} must be in [0, 1) (0 = off), got {getattr(st, key)}")
        positive("student.warm_start_refine", st.warm_start_refine, allow_zero=True)
        positive("student.warm_start_refine_steps", st.warm_start_refine_steps)
        if st.warm_start_refine > 0 and st.warm_start > 0 and st.steps < 2:
            raise UserError(f"student.warm_start_refine={st.warm_start_refine} refines the steps after the first, but "
                            f"the student takes one step; set student.steps >= 2 or student.warm_start_refine=0")
        choice("fake_teacher.start", cfg.fake_teacher.start, ("source", "target"))
        if cfg.fake_teacher.start == "target":
            cls._validate_fake_start(cfg)
        if st.warm_start > 0 and st.warm_start_teacher == "source" and not cfg.source_teacher.enabled:
            raise UserError("student.warm_start regresses the student onto the source teacher's samples, but "
                            "source_teacher.enabled=false; enable it, set student.warm_start_teacher=target or "
                            "student.warm_start=0")
        if st.warm_start > 0 and st.warm_start_teacher == "target":
            cls._validate_target_warm_start(cfg)
        positive("train.fake_updates_per_student", cfg.train.fake_updates_per_student)
        positive("target_teacher.update_every", tc.update_every)
        if not 0 <= tc.cond_dropout < 1:
            raise UserError(f"target_teacher.cond_dropout must be in [0, 1), got {tc.cond_dropout}")
        positive("target_teacher.warm_start", tc.warm_start, allow_zero=True)
        if not 0 <= tc.warm_start_ema < 1:
            raise UserError(f"target_teacher.warm_start_ema must be in [0, 1) (0 = off), got {tc.warm_start_ema}")
        if tc.warm_start > 0 and tc.mode != "online":
            raise UserError(f"target_teacher.warm_start trains the online target teacher on the shots, but "
                            f"target_teacher.mode={tc.mode}; set target_teacher.mode=online or target_teacher.warm_start=0")
        if not 0 <= tc.student_feedback < 1:
            raise UserError(f"target_teacher.student_feedback must be in [0, 1), got {tc.student_feedback}")
        al = cfg.algorithm
        choice("algorithm.t_sampling", al.t_sampling, ("uniform", "karras_index"))
        if not 0 <= al.t_min <= al.t_max:
            raise UserError(f"need 0 <= algorithm.t_min <= algorithm.t_max, got {al.t_min}, {al.t_max}")

    @staticmethod
    def _validate_target_warm_start(cfg) -> None:
        tc = cfg.target_teacher
        if tc.mode == "off":
            raise UserError("student.warm_start_teacher=target regresses the student onto the target teacher's "
                            "samples, but target_teacher.mode=off; set target_teacher.mode=online (with "
                            "target_teacher.warm_start > 0) or frozen, or student.warm_start_teacher=source")
        if tc.mode == "online" and tc.warm_start <= 0:
            raise UserError("student.warm_start_teacher=target with target_teacher.mode=online needs "
                            "target_teacher.warm_start > 0: before it the target teacher is still the source "
                            "teacher's copy (set e.g. target_teacher.warm_start=300, or "
                            "student.warm_start_teacher=source)")
        if tc.cfg != 1.0 and tc.mode == "online" and tc.cond_dropout == 0:
            raise UserError(f"student.warm_start_teacher=target samples the target teacher with "
                            f"target_teacher.cfg={tc.cfg}, but it trains with target_teacher.cond_dropout=0, so it "
                            "never learns the unconditional prediction CFG needs; set target_teacher.cond_dropout "
                            "(e.g. 0.1) or target_teacher.cfg=1")
        if cfg.placement.mode == "split":
            raise UserError("student.warm_start_teacher=target needs the student and the target teacher on the "
                            "same ranks, but placement.mode=split puts them on different sides; use "
                            "placement.mode=colocated or student.warm_start_teacher=source")

    @staticmethod
    def _validate_fake_start(cfg) -> None:
        if cfg.target_teacher.mode == "off":
            raise UserError("fake_teacher.start=target starts the fake teacher as the target teacher, but "
                            "target_teacher.mode=off; set target_teacher.mode=online or frozen, or "
                            "fake_teacher.start=source")
        if cfg.placement.mode == "split":
            raise UserError("fake_teacher.start=target copies the target teacher's weights into the fake teacher, "
                            "but placement.mode=split puts them on different sides; use placement.mode=colocated "
                            "or fake_teacher.start=source")
        if cfg.fake_teacher.lora.rank != cfg.target_teacher.lora.rank:
            ranks = (cfg.fake_teacher.lora.rank, cfg.target_teacher.lora.rank)
            raise UserError(f"fake_teacher.start=target needs the two roles' UNets alike, but fake_teacher.lora.rank="
                            f"{ranks[0]} and target_teacher.lora.rank={ranks[1]}; give them the same rank or set "
                            "fake_teacher.start=source")

    @staticmethod
    def _validate_dmd(cfg) -> None:
        """The DMD branches' teachers and the weight a."""
        a = cfg.algorithm.a
        tc = cfg.target_teacher
        if isinstance(a, str):
            if a != "auto":
                raise UserError(f"algorithm.a must be a number in [0, 1] (or 'auto'), got {a!r}")
            UniDAD._validate_auto(cfg)
        elif not 0.0 <= a <= 1.0:
            raise UserError(f"algorithm.a must be in [0, 1], got {a}; 0 = source teacher only, 1 = target only")
        lo, a = a_bounds(cfg)
        if a > 0 and tc.mode == "off":
            raise UserError(
                f"algorithm.a={a} needs a target teacher but target_teacher.mode=off; "
                "set target_teacher.mode=online (or frozen with target_teacher.init) or algorithm.a=0"
            )
        if lo < 1 and not cfg.source_teacher.enabled:
            raise UserError(
                f"algorithm.a={a} < 1 needs the source teacher but source_teacher.enabled=false; "
                "enable it or set algorithm.a=1"
            )
        if tc.mode == "frozen" and not tc.init:
            raise UserError("target_teacher.mode=frozen needs target_teacher.init (the target model's weights)")
        if a > 0 and tc.cfg != 1.0:  # CFG on the target teacher needs a model trained with condition dropout
            if tc.mode == "online" and tc.cond_dropout == 0:
                raise UserError(
                    f"target_teacher.cfg={tc.cfg} but the online target teacher trains with "
                    "target_teacher.cond_dropout=0, so it never learns the unconditional prediction CFG needs; set "
                    "target_teacher.cond_dropout (e.g. 0.1) or target_teacher.cfg=1"
                )
            if tc.mode == "frozen":
                warnings.warn(
                    f"target_teacher.cfg={tc.cfg} on a frozen target teacher: CFG is meaningful only if "
                    f"{tc.init} was trained with condition dropout (this cannot be checked here); otherwise set "
                    "target_teacher.cfg=1", UserWarning, stacklevel=2)

    @staticmethod
    def _validate_gan_only(cfg) -> None:
        a = cfg.algorithm.a
        if isinstance(a, str) and a != "auto":
            raise UserError(f"algorithm.a must be a number in [0, 1] (or 'auto'), got {a!r}")
        gan = cfg.gan_heads
        if not gan.enabled or gan.lambda_g <= 0:
            raise UserError("algorithm.dmd=false leaves the student the GAN term alone, but it is off (gan_heads.enabled="
                            f"{gan.enabled}, gan_heads.lambda_g={gan.lambda_g}); enable it or set algorithm.dmd=true")
        if cfg.target_teacher.mode != "off" or cfg.source_teacher.enabled:
            raise UserError("algorithm.dmd=false calls no teacher: set source_teacher.enabled=false and "
                            "target_teacher.mode=off (they would only take memory)")
        if cfg.algorithm.a == "auto":
            raise UserError("algorithm.a=auto weighs the DMD branches, but algorithm.dmd=false runs none")

    @staticmethod
    def _validate_auto(cfg) -> None:
        al, tc = cfg.algorithm, cfg.target_teacher
        if tc.mode == "off":
            raise UserError("algorithm.a=auto moves a by how much better the target teacher denoises the shots than the "
                            "source teacher, but target_teacher.mode=off; set target_teacher.mode=online (or frozen "
                            "with target_teacher.init), or give a number for algorithm.a")
        if not cfg.source_teacher.enabled:
            raise UserError("algorithm.a=auto compares the target teacher with the source teacher, but "
                            "source_teacher.enabled=false; enable it or give a number for algorithm.a")
        for key in ("auto_min", "auto_max"):
            if not 0.0 <= getattr(al, key) <= 1.0:
                raise UserError(f"algorithm.{key} must be in [0, 1], got {getattr(al, key)}")
        if not 0.0 < al.auto_gap <= 1.0:
            raise UserError(f"algorithm.auto_gap must be in (0, 1] (a relative loss gap), got {al.auto_gap}")
        if not 0.0 < al.auto_rate <= 1.0:
            raise UserError(f"algorithm.auto_rate must be in (0, 1] (1 = jump to each probe's aim), got {al.auto_rate}")
        positive("algorithm.auto_every", al.auto_every)

    @classmethod
    def iteration_plan(cls, cfg, iteration: int) -> IterationPlan:
        train_g = iteration % cfg.train.fake_updates_per_student == 0
        train_t = cfg.target_teacher.mode == "online" and iteration % cfg.target_teacher.update_every == 0
        micro = {"student": cfg.student.grad_accum if train_g else 0,
                 "fake_teacher": cfg.fake_teacher.grad_accum,
                 "target_teacher": cfg.target_teacher.grad_accum if train_t else 0}
        k_grad = None
        if cfg.student.unroll == "backward_simulation":
            k_grad = shared_randint(cfg.run.seed, iteration, "backward_simulation_k", 0, cfg.student.steps)
        return IterationPlan(micro, {"k_grad": k_grad})

    @classmethod
    def plan_period(cls, cfg) -> int:
        return cfg.train.fake_updates_per_student

    @classmethod
    def passes(cls, cfg, iteration: int, conditional: bool) -> list[list[Pass]]:
        ip = cls.iteration_plan(cfg, iteration)
        K, k_grad = cfg.student.steps, ip.extra["k_grad"]
        dmd = cfg.algorithm.dmd
        a_lo, a_hi = a_bounds(cfg) if dmd else (1.0, 0.0)  # GAN only: neither branch
        gan = cfg.gan_heads
        src_b = 2 if (cfg.source_teacher.cfg != 1.0 and conditional) else 1
        trg_b = 2 if (cfg.target_teacher.cfg != 1.0 and conditional) else 1
        out = []
        for micro in range(ip.n_micro):
            p: list[Pass] = []
            if micro < ip.micro["student"]:
                if k_grad is not None:  # backward simulation: steps 0 .. k-1 without grad, step k with
                    p += [Pass("student", "none", count=k_grad), Pass("student", "params")]
                else:
                    p.append(Pass("student", "both", count=K))
                if dmd:
                    p.append(Pass("fake_teacher", "none", phase="student"))
                if a_hi > 0:
                    p.append(Pass("target_teacher", "none", batch=trg_b, phase="student"))
                if a_lo < 1:
                    p.append(Pass("source_teacher", "none", batch=src_b, phase="student"))
                if gan.enabled and gan.lambda_g > 0:
                    p.append(Pass("fake_teacher", "input", discriminate=True, phase="student"))
            else:
                p.append(Pass("student", "none", count=(k_grad + 1) if k_grad is not None else K))
            if micro < ip.micro["fake_teacher"]:
                p.append(Pass("fake_teacher", "params"))
                if gan.enabled and gan.lambda_d > 0:
                    p.append(Pass("fake_teacher", "params", discriminate=True, count=2))
            if micro < ip.micro["target_teacher"]:
                p.append(Pass("target_teacher", "params"))
            out.append(p)
        return out

    # -- a run --------------------------------------------------------------------------------------
    def __init__(self, cfg, models, rt):
        super().__init__(cfg, models, rt)
        self.schedule = models.schedule
        self.T = self.schedule.T
        self.timesteps = student_timesteps(cfg.student.steps, self.T, cfg.student.timesteps)
        self.auto = cfg.algorithm.a == "auto" and cfg.algorithm.dmd
        self.dmd = cfg.algorithm.dmd
        lo, hi = a_bounds(cfg) if self.dmd else (1.0, 0.0)
        self.use_src, self.use_trg = lo < 1.0, hi > 0.0  # which DMD branches run (fixed for the run)
        # a: the recipe's, or the controller's current value (starts at auto_min; kept in checkpoints)
        self.a = float(cfg.algorithm.auto_min) if self.auto else float(cfg.algorithm.a) if self.dmd else 0.0
        self.auto_probe: dict = {}  # the last probe: iteration, the two teachers' losses, gap, aim
        # Teacher forwards for DMD in fp32 when √ᾱ at t_max is tiny (docs/algorithm.md §4, precision).
        self.dmd_fp32 = self.schedule.sqrt_alpha(min(cfg.algorithm.t_max, self.T - 1)) < 0.05
        self.karras = karras_index_timesteps(self.schedule) if cfg.algorithm.t_sampling == "karras_index" else None
        if self.karras is not None:
            lo, hi = cfg.algorithm.t_min, cfg.algorithm.t_max
            if not bool(((self.karras >= lo) & (self.karras <= hi)).any()):
                raise UserError(f"algorithm.t_sampling=karras_index: no timestep of the Karras grid lies in "
                                f"[algorithm.t_min, algorithm.t_max] = [{lo}, {hi}] on this schedule; widen the range "
                                "or use algorithm.t_sampling=uniform")
        self.calls = defaultdict(int)  # network calls per role (tests count them)

    def role(self, name: str):
        return self.m.roles[name]

    # -- network calls ---------------------------------------------------------------------------
    def student_x0(self, x_t, t, cond, module=None):
        """x̂0 of the student: through its engine (its own loss), or of ``module`` (sampling, EMA)."""
        self.calls["student"] += 1
        pred = self.role("student").output(x_t, t, cond, module)
        if self.cfg.student.prediction == "x0":
            return pred.float()
        return self.schedule.to_x0(pred, x_t, t)

    def teacher_x0(self, role_name: str, x_t, t, cond, uncond, scale: float, force_fp32: bool = False):
        """x̂0 of a teacher, with CFG when scale != 1 and the backbone is conditional; fp32 conversion."""
        self.calls[role_name] += 1
        role = self.role(role_name)
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
        """A noise level in [low, high): uniform in t, or (``algorithm.t_sampling: karras_index``) uniform over
        the indices of the Karras σ grid whose timestep lies in [low, high) — never clamped onto an end."""
        if self.karras is not None:
            grid = self.karras[(self.karras >= low) & (self.karras < high)]
            i = d.randint(0, len(grid), role, purpose).cpu()
            return grid[i].to(d.device)
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
        """What the student step needs from the critic side: the fake (and target) teacher's x̂0 at the DMD
        point and the GAN generator term's input-gradient. Runs where the fake teacher lives; nothing here can
        put a gradient into any parameter."""
        cfg = self.cfg
        x_t, t = self.dmd_point(x, d)
        fb = {}
        with torch.no_grad():
            if self.dmd:
                fb["x_fk"] = self.teacher_x0("fake_teacher", x_t, t, batch.cond, None, 1.0, self.dmd_fp32)
            if self.use_trg:
                fb["x_trg"] = self.teacher_x0("target_teacher", x_t, t, batch.cond, batch.uncond,
                                              cfg.target_teacher.cfg, self.dmd_fp32)
        if self.uses_gan_g:
            fb["g_gan"], fb["gan_g"] = self.gan_generator_input_grad(x, batch, d)
        return fb

    @property
    def uses_gan_g(self) -> bool:
        return self.cfg.gan_heads.enabled and self.cfg.gan_heads.lambda_g > 0

    def feedback_shapes(self, shape) -> dict:
        """The critic's feedback tensors and their shapes (the exchange packs them)."""
        out = {"x_fk": shape} if self.dmd else {}
        if self.use_trg:
            out["x_trg"] = shape
        if self.uses_gan_g:
            out["g_gan"] = shape
            out["gan_g"] = ()
        return out

    def student_loss(self, x, batch, d: SampleDraws, fb: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """Dual-domain DMD + the GAN generator term, given the critic side's feedback (computed here when
        not given: the fake teacher must then be on this rank)."""
        cfg = self.cfg
        if fb is None:
            fb = self.critic_feedback(x, batch, d)
        logs = {}
        loss = torch.zeros((), device=x.device)
        branches = []
        if self.use_src:
            x_t, t = self.dmd_point(x, d)
            with torch.no_grad():
                x_src = self.teacher_x0("source_teacher", x_t, t, batch.cond_src, batch.uncond,
                                        cfg.source_teacher.cfg, self.dmd_fp32)
            branches.append(("src", 1.0 - self.a, x_src))
        if self.use_trg:
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
        gradient can land in the fake teacher's or the heads' parameters (docs/design.md)."""
        # A fresh leaf copy of the *input*, not a module's parameter: the docs/design.md input-gradient pattern.
        x_in = x.detach().requires_grad_(True)
        t = self.draw_t(d, "student", "gan_t", 0, self.T)
        n = d.randn(self.m.sample_shape, "student", "gan_noise")
        self.calls["fake_teacher_features"] += 1
        logits = self.role("fake_teacher").discriminate(self.schedule.add_noise(x_in, n, t), t, batch.cond)
        l_g = losses.gan_generator_loss(logits)
        (grad,) = torch.autograd.grad(l_g, x_in)
        return grad, l_g.detach()

    def fake_loss(self, x, batch, d: SampleDraws) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x = x.detach()
        fake = self.role("fake_teacher")
        t = self.draw_t(d, "fake_teacher", "denoise_t", 0, self.T)
        n = d.randn(self.m.sample_shape, "fake_teacher", "denoise_noise")
        self.calls["fake_teacher"] += 1
        pred = fake.train_forward(self.schedule.add_noise(x, n, t), t, batch.cond)
        l_fake = losses.denoising_loss(pred, self.schedule.target(x, n, t))
        loss, logs = l_fake, {"fake_denoise": float(l_fake.detach())}
        if cfg.gan_heads.enabled and cfg.gan_heads.lambda_d > 0:
            t_r = self.draw_t(d, "fake_teacher", "gan_real_t", 0, self.T)
            n_r = d.randn(self.m.sample_shape, "fake_teacher", "gan_real_noise")
            t_f = self.draw_t(d, "fake_teacher", "gan_fake_t", 0, self.T)
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
        pred = self.role("target_teacher").train_forward(self.schedule.add_noise(real, n, t), t, cond)
        l_t = losses.denoising_loss(pred, self.schedule.target(real, n, t))
        return l_t, {"target_denoise": float(l_t.detach())}

    # -- the automatic a (docs/algorithm.md §9) ----------------------------------------------------
    @torch.no_grad()
    def probe_teachers(self) -> tuple[float, float]:
        """The source and the target teacher's denoising losses on the same noised shots: train.batch_size
        shots (with their flips) at noise levels of the DMD range, drawn by the same keys at every probe, so a
        change between probes is the target teacher's training, not the draw. Each loss is computed where its
        teacher lives and handed to the other side; every rank gets both."""
        cfg = self.cfg
        d = SampleDraws(self.seed, -1, range(cfg.train.batch_size), self.rt.device)

        data = self.m.data

        def loss(role_name: str, source: bool):
            def fn():
                batch = data.batch(d, augment=False)  # the shots themselves, not data.target.translate's shifts
                cond = batch.real_cond
                if source and cond:  # the source teacher sees the captions without the rare token (as in DMD)
                    cond = data.encode([strip_rare_token(p, data.rare) for p in batch.real_prompts])
                x = batch.real
                t = d.randint(cfg.algorithm.t_min, cfg.algorithm.t_max + 1, "auto_a", "t")
                n = d.randn(self.m.sample_shape, "auto_a", "noise")
                self.calls[role_name] += 1
                pred = self.role(role_name).forward(self.schedule.add_noise(x, n, t), t, cond)
                return {"loss": losses.denoising_loss(pred.float(), self.schedule.target(x, n, t)).reshape(())}
            return float(self.ex.run_at(role_name, fn, {"loss": ()})["loss"])

        return loss("source_teacher", True), loss("target_teacher", False)

    def update_auto_a(self, iteration: int) -> None:
        """On probe iterations (iteration = 0 mod algorithm.auto_every): move a a fraction auto_rate of the way
        to the probe's aim (``auto_a_aim``). A function of the run's state and the teachers' weights only, the
        same on every rank; between probes a stays."""
        al = self.cfg.algorithm
        if iteration % al.auto_every:
            return
        l_s, l_t = self.probe_teachers()
        aim, gap = auto_a_aim(self.cfg, l_s, l_t)
        self.a = self.a + al.auto_rate * (aim - self.a)
        self.auto_probe = {"iteration": iteration, "loss_source": l_s, "loss_target": l_t, "gap": gap, "aim": aim}

    # -- one iteration ---------------------------------------------------------------------------
    def step(self, iteration: int) -> dict:
        """One iteration (docs/algorithm.md §5), micro-batch by micro-batch: the student's samples are made where
        the student lives, the critic's feedback where the fake teacher lives; each role's loss is built and
        back-propagated where the role lives; then the roles that step this iteration take their step.

        Phases (``time/<phase>_s``): ``data`` (the micro-batch's draws and data), ``student`` (its samples —
        every iteration, the other roles train on them — and, when it updates, the critic's feedback, its loss,
        backward and optimizer step), ``fake_teacher`` and ``target_teacher`` (loss, backward, optimizer step). In
        split placement a rank waiting for the other side counts the wait in the phase that waits."""
        cfg, ex, timer = self.cfg, self.ex, self.timer
        ip = self.iteration_plan(cfg, iteration)
        ga_g, ga_f, ga_t = ip.micro["student"], ip.micro["fake_teacher"], ip.micro["target_teacher"]
        n_micro, k_grad = ip.n_micro, ip.extra["k_grad"]
        shape = self.sample_shape(cfg.train.batch_size)
        logs: dict = defaultdict(float)
        skipped: set = set()  # roles whose step this iteration is skipped (a non-finite loss on some rank)
        if self.auto:
            with timer.phase("auto_a"):
                self.update_auto_a(iteration)
            logs["algorithm/a"] = self.a
            if self.auto_probe.get("iteration") == iteration:
                logs["algorithm/a_gap"] = self.auto_probe["gap"]
        for micro in range(n_micro):
            with timer.phase("data"):
                idx = global_indices(iteration, micro, n_micro, ex.dp_rank, ex.dp_size, cfg.train.batch_size)
                d = SampleDraws(self.seed, iteration, idx, self.rt.device)
                batch = self.m.data.batch(d)

            def make_x(grad=micro < ga_g, d=d, batch=batch):
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    return {"x": self.generate_train(d, batch, k_grad)}

            with timer.phase("student"):
                x = ex.run_at("student", make_x, {"x": shape})["x"]
                if micro < ga_g:
                    fb = ex.run_at("fake_teacher",
                                   lambda d=d, batch=batch, x=x: self.critic_feedback(x.detach(), batch, d),
                                   self.feedback_shapes(shape))
                    if ex.holds("student"):
                        loss_g, lg = self.student_loss(x, batch, d, fb)
                        self.backward("student", loss_g, iteration, micro, skipped)
                        for k, v in lg.items():
                            logs[f"student/{k}"] += v / ga_g
            x = x.detach()
            if micro < ga_f and ex.holds("fake_teacher"):
                with timer.phase("fake_teacher"):
                    loss_f, lf = self.fake_loss(x, batch, d)
                    self.backward("fake_teacher", loss_f, iteration, micro, skipped)
                for k, v in lf.items():
                    logs[f"fake_teacher/{k}"] += v / ga_f
            if micro < ga_t and ex.holds("target_teacher"):
                with timer.phase("target_teacher"):
                    loss_t, lt = self.target_loss(x, batch, d, iteration)
                    self.backward("target_teacher", loss_t, iteration, micro, skipped)
                for k, v in lt.items():
                    logs[f"target_teacher/{k}"] += v / ga_t
        self.step_roles(iteration, [r for r in ("student", "fake_teacher", "target_teacher") if ip.steps(r)],
                        skipped, logs)
        return dict(logs)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, steps: Optional[int] = None, seed: Optional[int] = None, batch: int = 64,
               prompts: Optional[list[str]] = None, use_ema: bool = True,
               generator: Optional[torch.Generator] = None, first: int = 0) -> torch.Tensor:
        """Student samples ``first`` … ``first + n - 1`` in model space, each drawn from noise keyed by (seed,
        "sample", its index) and, for text models, with prompt ``index mod len(prompts)`` — so a rank that
        draws a share of the indices gets exactly those images of the whole set. With a (CPU) ``generator``:
        in one batch drawn as a diffusers pipeline draws it, the initial noise, then the re-noising noise of
        each step, in that order (so an exported pipeline gives the same images)."""
        steps = steps or len(self.timesteps)
        ts = self.timesteps if steps == len(self.timesteps) else student_timesteps(steps, self.T)
        with self.role("student").inference_weights(use_ema) as module:
            return sample_by_index(lambda x_t, t, cond: self.student_x0(x_t, t, cond, module=module), self.m, ts,
                                   self.seed if seed is None else seed, n, batch, self.rt.device, prompts, generator,
                                   first)

    @torch.no_grad()
    def teacher_sample(self, n: int, steps: int = 25, seed: Optional[int] = None, batch: int = 64,
                       purpose: str = "teacher_sample", role: str = "source_teacher",
                       states: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Deterministic DDIM (η = 0) samples of a teacher: returns (z, x0, prompts). The source teacher sees
        the prompts without the rare token and its CFG scale; the target teacher the prompts as they are and
        its own scale (as in the DMD loss, docs/algorithm.md §4). ``states``: a dict whose keys are timesteps
        (those not on the ``steps``-step grid are added to it); each is set to the trajectories' x_t there."""
        seed = self.seed if seed is None else seed
        ts = ddim_timesteps(steps, self.T)
        if states:
            ts = sorted(set(ts) | set(states), reverse=True)
        parts: dict[int, list] = {t: [] for t in states or {}}
        zs, xs, all_prompts = [], [], []
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            d = SampleDraws(seed, -1, idx, self.rt.device)
            z = d.randn(self.m.sample_shape, purpose, "z")
            call, ps = self._teacher_call(role, d)
            got = dict.fromkeys(parts)
            x = ddim(call, z, ts, self.schedule, states=got)
            for t in parts:
                parts[t].append(got[t])
            zs.append(z)
            xs.append(x)
            all_prompts.extend(ps or [])
        for t in parts:
            states[t] = torch.cat(parts[t])
        return torch.cat(zs), torch.cat(xs), all_prompts

    def _teacher_call(self, role: str, d: SampleDraws):
        """(call(x_t, t) -> x̂0 of the teacher ``role``, the prompts or None) for the samples of ``d``: the source
        teacher sees the prompts without the rare token and its CFG scale, the target teacher the prompts as they
        are and its own scale."""
        ps = cond = uncond = None
        if self.m.text is not None:
            b = self.m.data.batch(d, augment=False)  # only its prompts are read
            ps, uncond = b.prompts, b.uncond
            cond = b.cond_src if role == "source_teacher" else b.cond
        scale = self.cfg.source_teacher.cfg if role == "source_teacher" else self.cfg.target_teacher.cfg
        return (lambda x_t, tt: self.teacher_x0(role, x_t, tt, cond, uncond, scale)), ps

    @torch.no_grad()
    def _student_states(self, z: torch.Tensor, prompts: list, role: str, purpose: str, batch: int = 64):
        """The student's own chain on the warm start's noise ``z`` as it samples (x̂0 re-noised to each later
        timestep with fresh noise keyed by (seed, pair index, ``purpose``)), and the teacher ``role``'s DDIM
        completion from each of its states (over the warm start's DDIM grid below that timestep). Returns
        (inputs, targets): dicts over the student's timesteps after the first."""
        sc = self.cfg.student
        grid = ddim_timesteps(sc.warm_start_teacher_steps, self.T)
        inputs: dict[int, list] = {t: [] for t in self.timesteps[1:]}
        targets: dict[int, list] = {t: [] for t in self.timesteps[1:]}
        for start in range(0, z.shape[0], batch):
            idx = list(range(start, min(z.shape[0], start + batch)))
            d = SampleDraws(self.seed, -1, idx, self.rt.device)
            call, _ = self._teacher_call(role, d)
            cond = self.m.data.encode([prompts[i] for i in idx]) if prompts else None
            x_t = z[start:start + len(idx)]
            for k, t in enumerate(self.timesteps):
                tt = torch.full((len(idx),), t, dtype=torch.long, device=z.device)
                if k > 0:
                    x_t = self.schedule.add_noise(x0, d.randn(self.m.sample_shape, purpose, f"renoise_{k}"), tt)
                    y = ddim(call, x_t, [t] + [s for s in grid if s < t], self.schedule)
                    inputs[t].append(x_t)
                    targets[t].append(y.clamp(-1, 1) if self.m.codec is None else y)
                if k + 1 < len(self.timesteps):  # the last step's x̂0 re-noises nothing
                    x0 = self.student_x0(x_t, tt, cond)
        return {t: torch.cat(v) for t, v in inputs.items()}, {t: torch.cat(v) for t, v in targets.items()}

    def grids(self, n: int) -> dict[str, torch.Tensor]:
        """The source teacher's 25-step DDIM samples (its own domain, for comparison)."""
        if self.m.roles.get("source_teacher") is None:
            return {}
        return {"source_teacher": self.teacher_sample(n, steps=25, purpose="grid")[1]}

    def prepare(self, initial=None) -> dict:
        """The warm starts the recipe asks for, where their roles live: the student's (regression onto the
        source or the target teacher's samples) and the online target teacher's (denoising on the target shots),
        the target teacher's first when the student's regresses onto its samples. ``initial()`` (base.Method)
        runs right before the student's."""
        out = {}
        progress = self.cfg.logging.progress
        teacher = f"{self.cfg.student.warm_start_teacher}_teacher"
        student = self.ex.holds("student") and self.cfg.student.warm_start > 0

        def student_warm_start():
            self.m.to_device("student", teacher)  # staged in host memory until their engines
            if initial is not None:
                initial()
            out.update(self.warm_start(progress=progress))

        if student and teacher == "source_teacher":
            student_warm_start()
        if self.ex.holds("target_teacher") and self.cfg.target_teacher.warm_start > 0:
            self.m.to_device("target_teacher")
            out.update(self.target_warm_start(progress=progress))
        if student and teacher == "target_teacher":  # after the target teacher's own; colocated (validated)
            student_warm_start()
        if self.cfg.fake_teacher.start == "target" and self.ex.holds("fake_teacher"):  # colocated (validated)
            # after every warm start: the target teacher as it enters training; the GAN heads keep their init
            self.role("fake_teacher").unet.load_state_dict(self.role("target_teacher").unet.state_dict())
        return out

    def _fit(self, role_name: str, steps: int, lr: float, loss_fn, label: str, progress: bool,
             clip: Optional[float] = None, ema: float = 0.0) -> float:
        """``steps`` Adam steps of ``loss_fn(step)`` (a loss, or an iterator of micro-batch losses whose gradients
        add up) on a plain role, before its engine is built (a warm start; the role's training optimizer starts
        fresh afterwards). With ``ema`` > 0 the role ends with the EMA of its weights after each step (from its
        starting ones) instead of the last step's. Returns the last loss."""
        role = self.role(role_name)
        if role.engine is not None:
            raise RuntimeError(f"the {label} must run before parallel.engines.attach")
        opt = torch.optim.Adam(role.params, lr=lr)
        avg = [p.detach().clone() for p in role.params] if ema > 0 else None
        bar = progress_bar(steps, label, leave=False) if progress and self.rt.is_main else None
        last = 0.0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            parts = loss_fn(step)  # one loss, or an iterator of the step's micro-batch losses
            loss = None
            for part in ([parts] if isinstance(parts, torch.Tensor) else parts):
                part.backward()  # each micro-batch's graph is freed before the next is built
                loss = part.detach() if loss is None else loss + part.detach()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(role.params, clip)
            opt.step()
            if avg is not None:
                with torch.no_grad():
                    for a, p in zip(avg, role.params):
                        a.lerp_(p, 1 - ema)
            last = float(loss.detach())
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for p in role.params:
            p.grad = None
        if avg is not None:
            with torch.no_grad():
                for a, p in zip(avg, role.params):
                    p.copy_(a)
        return last

    def target_warm_start(self, progress: bool = True) -> dict:
        """``target_teacher.warm_start`` steps of the online target teacher's own loss (§4, target teacher
        denoising: shots with hflip, condition dropout) with its own Adam, before its engine is built.
        Step s draws as a training iteration would, keyed by iteration -2 - s (never a training one), over
        ``train.global_batch_size`` samples when set (else ``train.batch_size``): every rank computes the same
        steps, whatever the world size, and the engine broadcasts rank 0's weights."""
        tc = self.cfg.target_teacher
        # with train.global_batch_size, each step takes the global batch in micro-batches of this world size's
        # train.batch_size (which divides it), its gradient their mean: the same steps at any world size
        n, micro = self.cfg.train.global_batch_size or self.cfg.train.batch_size, self.cfg.train.batch_size

        def loss(step):  # the micro-batches' weighted losses, one at a time (each back-propagated before the next)
            for lo in range(0, n, micro):
                d = SampleDraws(self.seed, -2 - step, range(lo, min(n, lo + micro)), self.rt.device)
                part = self.target_loss(None, self.m.data.batch(d), d, iteration=-1)[0]
                yield part if micro >= n else part * (len(d.indices) / n)

        last = self._fit("target_teacher", tc.warm_start, tc.warm_start_lr, loss, "target teacher warm start",
                         progress, clip=10.0, ema=tc.warm_start_ema)
        return {"target_warm_start_loss": last}

    def warm_start(self, progress: bool = True) -> dict:
        """Regress the student onto (noise -> teacher's DDIM sample) pairs at each of its timesteps
        (docs/algorithm.md §3, "Student output and warm start"). Uses its own Adam; the student's training
        optimizer starts fresh afterwards. Runs on the plain student, before its engine is built (so the
        engine's fp32 master copies start from the warm-started weights); every rank computes the same
        pairs and steps, and the engine broadcasts rank 0's weights when it is built."""
        sc = self.cfg.student
        if sc.warm_start <= 0:
            return {}
        role = f"{sc.warm_start_teacher}_teacher"
        traj = dict.fromkeys(self.timesteps[1:]) if sc.warm_start_inputs == "trajectory" else None
        z, x0, prompts = self.teacher_sample(sc.warm_start_pairs, sc.warm_start_teacher_steps, purpose="warm_start",
                                             role=role, states=traj)
        if self.m.codec is None:
            x0 = x0.clamp(-1, 1)
        g = torch.Generator(device=CPU).manual_seed(self.seed + 17)
        weights = [1.0] * (len(self.timesteps) - 1) + [float(sc.warm_start_last_weight)]
        # each later step's input and target: the teacher's trajectory state (or x0 re-noised afresh: None) and the
        # pair's x0; in a refinement round, the student's own state and the teacher's completion from there
        inputs, targets = traj, dict.fromkeys(self.timesteps[1:], x0)
        # the pairs the steps draw from (student.warm_start_drop_copies: those whose teacher sample copies no shot)
        kept = self._not_copies([x0], torch.arange(z.shape[0]), "warm start", role)
        pool = kept
        out = {"warm_start_pairs_kept": len(kept)} if sc.warm_start_drop_copies else {}

        def loss_fn(step):
            idx = pool[torch.randint(0, len(pool), (min(sc.warm_start_batch, len(pool)),), generator=g)]
            cond = self.m.data.encode([prompts[i] for i in idx.tolist()]) if prompts else None
            loss = torch.zeros((), device=z.device)
            for k, t in enumerate(self.timesteps):
                tt = torch.full((idx.numel(),), t, dtype=torch.long, device=z.device)
                if k == 0:
                    x_in, target = z[idx], x0[idx]
                elif inputs is not None:  # a state on the way to the target: the map from there to it
                    x_in, target = inputs[t][idx], targets[t][idx]
                else:
                    noise = torch.randn(x0[idx].shape, generator=g).to(z.device)
                    x_in, target = self.schedule.add_noise(x0[idx], noise, tt), x0[idx]
                loss = loss + weights[k] * losses.denoising_loss(self.student_x0(x_in, tt, cond), target)
            return loss / sum(weights)

        out["warm_start_loss"] = self._fit("student", sc.warm_start, sc.warm_start_lr, loss_fn, "student warm start",
                                           progress, ema=sc.warm_start_ema)
        for r in range(sc.warm_start_refine):
            inputs, targets = self._student_states(z, prompts, role, f"warm_start_refine_{r}")
            pool = self._not_copies(list(targets.values()), kept, f"warm start refinement {r + 1}", role)
            if sc.warm_start_drop_copies:
                out[f"warm_start_refine_{r}_pairs_kept"] = len(pool)
            out["warm_start_refine_loss"] = self._fit("student", sc.warm_start_refine_steps, sc.warm_start_lr, loss_fn,
                                                      f"student warm start, refinement {r + 1}", progress,
                                                      ema=sc.warm_start_refine_ema)
        return out

    def _not_copies(self, samples: list, among: torch.Tensor, label: str, role: str) -> torch.Tensor:
        """The indices in ``among`` of the warm start's pairs none of whose ``samples`` (tensors over all pairs, in
        model space, from the teacher ``role``) copies a target shot, with student.warm_start_drop_copies; else
        ``among`` itself."""
        if not self.cfg.student.warm_start_drop_copies:
            return among
        data = self.m.data
        copy = torch.zeros(len(samples[0]), dtype=torch.bool)
        for x in samples:  # the distances in float64 (pairwise_l2): the same pairs on every rank and device
            copy |= nearest_shot(x.cpu(), data.model_space.cpu(), data.model_space_flipped.cpu())[0]
        kept = among[~copy[among]]
        if len(kept) == 0:
            fix = ("shorten target_teacher.warm_start (its fit to the shots)" if role == "target_teacher"
                   and self.cfg.target_teacher.mode == "online" else "regress onto another teacher "
                   "(student.warm_start_teacher)")
            raise UserError(f"student.warm_start_drop_copies: in the {label}, every one of the {len(among)} pairs "
                            f"copies a target shot ({role}'s samples reproduce the shots); {fix}, or set "
                            f"student.warm_start_drop_copies=false")
        return kept

    def summary(self) -> dict:
        out = {"student_steps": self.cfg.student.steps, "a": self.cfg.algorithm.a}
        if self.auto:
            out.update({"a_final": self.a, "a_last_probe": dict(self.auto_probe)})
        return out

    # -- its state: the controller's a --------------------------------------------------------------
    def state_dict(self) -> dict:
        out = super().state_dict()
        if self.auto:
            out["auto_a"] = {"a": self.a, "probe": dict(self.auto_probe)}
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.auto:
            if "auto_a" not in state:
                raise UserError("algorithm.a=auto, but the checkpoint holds no controller state (it was written "
                                "with a fixed a); resume with the a it was trained with, or start a new run")
            self.a = float(state["auto_a"]["a"])
            self.auto_probe = dict(state["auto_a"]["probe"])

    @classmethod
    def merge_state_dicts(cls, states: list[dict]) -> dict:
        out = super().merge_state_dicts(states)
        for st in states:  # the same on every rank
            if "auto_a" in st:
                out["auto_a"] = st["auto_a"]
                break
        return out

    def sampling_info(self) -> dict:
        st = self.cfg.student
        return {"steps": st.steps, "timesteps": list(self.timesteps), "explicit_timesteps": st.timesteps is not None,
                "output": "sample" if st.prediction == "x0" else self.schedule.prediction_type}
