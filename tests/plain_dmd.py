"""A method written only here, in the tests: plain one-step DMD distillation (no GAN, no target teacher,
no adaptation). It uses nothing but the Method interface — its own role names, sections, plan, passes,
step and sampler — and is selected by a recipe as ``algorithm.name: plain_dmd:PlainDMD`` (this folder on
PYTHONPATH) or, in-process, as ``plain_dmd`` once this module is imported.

Roles: ``generator`` (trainable, one step from pure noise at t = T-1), ``critic`` (trainable: tracks the
generator's distribution by denoising its detached samples), ``teacher`` (frozen: the primary backbone).
The generator steps every ``train.generator_every`` iterations on the DMD gradient (x̂_critic - x̂_teacher),
normalised by |x - x̂_teacher|.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from unidad_dist.core.draws import SampleDraws, global_indices
from unidad_dist.core.sections import AlgorithmConfig, RoleConfig, TrainableRoleConfig, TrainConfig
from unidad_dist.methods import losses
from unidad_dist.methods.base import IterationPlan, Method, Pass, RoleSpec, register_method
from unidad_dist.methods.generate import generate


@dataclass
class PlainTrain(TrainConfig):
    generator_every: int = 1


@dataclass
class GeneratorConfig(TrainableRoleConfig):
    pass


@dataclass
class CriticConfig(TrainableRoleConfig):
    pass


@dataclass
class TeacherConfig(RoleConfig):
    pass


@dataclass
class PlainAlgorithm(AlgorithmConfig):
    name: str = "plain_dmd"
    t_min: int = 20
    t_max: int = 980


@register_method
class PlainDMD(Method):
    name = "plain_dmd"
    primary = "teacher"
    sampler = "generator"

    @classmethod
    def sections(cls):
        return {"train": PlainTrain, "generator": GeneratorConfig, "critic": CriticConfig, "teacher": TeacherConfig,
                "algorithm": PlainAlgorithm}

    @classmethod
    def roles(cls, cfg):
        return [RoleSpec("generator", True, "g", copy_of="teacher"), RoleSpec("teacher", False, "g"),
                RoleSpec("critic", True, "c", copy_of="teacher")]

    @classmethod
    def iteration_plan(cls, cfg, iteration):
        return IterationPlan({"generator": int(iteration % cfg.train.generator_every == 0), "critic": 1})

    @classmethod
    def plan_period(cls, cfg):
        return cfg.train.generator_every

    @classmethod
    def passes(cls, cfg, iteration, conditional):
        ip = cls.iteration_plan(cfg, iteration)
        if ip.steps("generator"):
            return [[Pass("generator", "params"), Pass("critic", "none", phase="generator"),
                     Pass("teacher", "none", phase="generator"), Pass("critic", "params")]]
        return [[Pass("generator", "none"), Pass("critic", "params")]]

    def __init__(self, cfg, models, rt):
        super().__init__(cfg, models, rt)
        self.schedule = models.schedule
        self.T = self.schedule.T

    def _x0(self, role: str, x_t, t, cond, train: bool = False):
        r = self.m.roles[role]
        pred = r.train_forward(x_t, t, cond) if train else r.forward(x_t, t, cond)
        return self.schedule.to_x0(pred, x_t, t)

    def _generate(self, d: SampleDraws, cond, module=None):
        z = d.randn(self.m.sample_shape, "generator", "z")
        role = self.m.roles["generator"]

        def call(x_t, t):
            if module is None:
                return self._x0("generator", x_t, t, cond, train=True)
            with role.autocast():
                return self.schedule.to_x0(module(x_t, t, cond), x_t, t)
        return generate(call, z, [self.T - 1], self.schedule, lambda k: None)

    def _dmd_point(self, x, d):
        t = d.randint(self.cfg.algorithm.t_min, self.cfg.algorithm.t_max + 1, "generator", "dmd_t")
        return self.schedule.add_noise(x.detach(), d.randn(self.m.sample_shape, "generator", "dmd_noise"), t), t

    def step(self, iteration: int) -> dict:
        cfg, ex = self.cfg, self.ex
        ip = self.iteration_plan(cfg, iteration)
        shape = (cfg.train.batch_size,) + tuple(self.m.sample_shape)
        idx = global_indices(iteration, 0, 1, ex.dp_rank, ex.dp_size, cfg.train.batch_size)
        d = SampleDraws(self.seed, iteration, idx, self.rt.device)
        batch = self.m.data.batch(d)
        logs, skipped = defaultdict(float), set()
        train_g = ip.steps("generator")

        def make_x():
            with torch.set_grad_enabled(train_g):
                return {"x": self._generate(d, batch.cond)}

        x = ex.run_at("generator", make_x, {"x": shape})["x"]
        if train_g:
            def critic_x0():
                x_t, t = self._dmd_point(x, d)
                with torch.no_grad():
                    return {"x_fake": self._x0("critic", x_t, t, batch.cond)}
            fb = ex.run_at("critic", critic_x0, {"x_fake": shape})
            if ex.holds("generator"):
                x_t, t = self._dmd_point(x, d)
                with torch.no_grad():
                    x_real = self._x0("teacher", x_t, t, batch.cond)
                loss = losses.dmd_loss(x, losses.dmd_gradient(x, fb["x_fake"], x_real))
                self.backward("generator", loss, iteration, 0, skipped)
                logs["generator/dmd"] = float(loss.detach())
        if ex.holds("critic"):
            xd = x.detach()
            t = d.randint(0, self.T, "critic", "denoise_t")
            n = d.randn(self.m.sample_shape, "critic", "denoise_noise")
            pred = self.m.roles["critic"].train_forward(self.schedule.add_noise(xd, n, t), t, batch.cond)
            loss = losses.denoising_loss(pred, self.schedule.target(xd, n, t))
            self.backward("critic", loss, iteration, 0, skipped)
            logs["critic/denoise"] = float(loss.detach())
        self.step_roles(iteration, [r for r in ("generator", "critic") if ip.steps(r)], skipped, logs)
        return dict(logs)

    @torch.no_grad()
    def sample(self, n: int, steps: Optional[int] = None, seed: Optional[int] = None, prompts=None, use_ema=True,
               generator=None, **kw):
        d = SampleDraws(self.seed if seed is None else seed, -1, list(range(n)), self.rt.device)
        cond = None
        if self.m.text is not None:
            ps = prompts or self.m.data.prompts
            cond = self.m.data.encode([ps[i % len(ps)] for i in range(n)])
        return self._generate(d, cond, module=self.m.roles["generator"].inference_module()).float()

    def sampling_info(self) -> dict:
        return {"steps": 1, "timesteps": [self.T - 1], "explicit_timesteps": False,
                "output": self.schedule.prediction_type}

    def summary(self) -> dict:
        return {"method": self.name}
