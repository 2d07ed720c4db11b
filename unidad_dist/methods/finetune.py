"""Fine-tuning: a diffusion model trained on the target shots with its own denoising loss — the first stage of
the paper's Adapt-then-Distill baseline (docs/algorithm.md §11), and a DreamBooth run of its own.

Role: ``target_teacher`` (trainable: the teacher of the target domain this run makes; the run's primary backbone, or ``target_teacher.init``; full, or LoRA through
``target_teacher.lora``). Each iteration: the standard loss (the backbone's own ε / v / x0 target) on the shots with
their captions (``data.target.prompt``, DreamBooth's ``a {rare} {cls}`` by default; ``target_teacher.cond_dropout``
drops a fraction of them for classifier-free guidance), plus, with ``algorithm.prior_images`` > 0, DreamBooth's
prior preservation: ``algorithm.prior_weight`` × the same loss on class images with their class prompts (the
source prompts with the rare token removed). The class images are read from ``algorithm.prior_dir`` (default
``<run.dir>/prior_images``); missing ones are drawn by the teacher itself before the first iteration
(deterministic DDIM, ``target_teacher.sample_steps``; image i from noise keyed by (run.seed, i), prompt i mod the
number of prompts) and written there as PNGs, and the run trains on the 8-bit images it wrote, so a resume
reads back exactly what a fresh start used. Samples, grids, evaluation and export: DDIM with
``target_teacher.sample_steps`` steps, "trailing" timesteps from T-1 (export writes the DDIMScheduler that
reproduces them).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from unidad_dist.core.draws import SampleDraws, global_indices
from unidad_dist.core.images import from_uint8, save_images, to_uint8
from unidad_dist.core.io import atomic_write_text
from unidad_dist.core.schema import path_field, positive
from unidad_dist.core.sections import AlgorithmConfig, TrainableRoleConfig
from unidad_dist.errors import UserError
from unidad_dist.methods import losses
from unidad_dist.methods.base import IterationPlan, Method, Pass, RoleSpec, register_method
from unidad_dist.methods.generate import ddim, ddim_timesteps
from unidad_dist.methods.unidad import select_cond
from unidad_dist.models.conditioning import strip_rare_token

__all__ = ["Finetune"]


@dataclass
class FinetuneTeacherConfig(TrainableRoleConfig):
    sample_steps: int = 25  # DDIM steps of its samples (grids, evaluation, sample, export)
    cond_dropout: float = 0.0  # fraction of its training captions replaced by the empty prompt (for CFG)


@dataclass
class FinetuneAlgorithmConfig(AlgorithmConfig):
    name: str = "finetune"
    prior_images: int = 0  # DreamBooth prior preservation: class images (0 = off)
    prior_weight: float = 1.0  # weight of the prior-preservation loss
    prior_dir: Optional[str] = path_field()  # where the class images are read / written (default <run.dir>/prior_images)


@register_method
class Finetune(Method):
    name = "finetune"
    primary = "target_teacher"
    sampler = "target_teacher"
    components = ("schedule", "codec", "text")

    # -- declaration --------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type]:
        return {"target_teacher": FinetuneTeacherConfig, "algorithm": FinetuneAlgorithmConfig}

    @classmethod
    def roles(cls, cfg) -> list[RoleSpec]:
        return [RoleSpec("target_teacher", True, "target_teacher")]

    @classmethod
    def validate(cls, cfg) -> None:
        al, tc = cfg.algorithm, cfg.target_teacher
        positive("target_teacher.sample_steps", tc.sample_steps)
        positive("algorithm.prior_images", al.prior_images, allow_zero=True)
        if not 0 <= tc.cond_dropout < 1:
            raise UserError(f"target_teacher.cond_dropout must be in [0, 1), got {tc.cond_dropout}")
        if al.prior_weight < 0:
            raise UserError(f"algorithm.prior_weight must be >= 0, got {al.prior_weight}")
        if cfg.placement.mode == "split":
            raise UserError("algorithm.name=finetune has one role (target_teacher), so there is nothing to split; set "
                            "placement.mode=colocated (ZeRO stages shard it across the ranks)")

    @classmethod
    def iteration_plan(cls, cfg, iteration: int) -> IterationPlan:
        return IterationPlan({"target_teacher": cfg.target_teacher.grad_accum})

    @classmethod
    def passes(cls, cfg, iteration: int, conditional: bool) -> list[list[Pass]]:
        count = 2 if cfg.algorithm.prior_images > 0 else 1
        return [[Pass("target_teacher", "params", count=count)] for _ in range(cfg.target_teacher.grad_accum)]

    # -- a run --------------------------------------------------------------------------------------
    def __init__(self, cfg, models, rt):
        super().__init__(cfg, models, rt)
        self.schedule = models.schedule
        self.T = self.schedule.T
        self.prior: Optional[torch.Tensor] = None  # the class images in model space
        self.prior_prompts: list[str] = []

    @property
    def prior_dir(self) -> Path:
        al = self.cfg.algorithm
        return Path(al.prior_dir) if al.prior_dir else self.cfg.run.folder() / "prior_images"

    def class_prompts(self) -> list[str]:
        data = self.m.data
        if self.m.text is None:
            return [""]
        return [strip_rare_token(p, data.rare) for p in data.prompts]

    def _model_space(self, images: torch.Tensor) -> torch.Tensor:
        codec = self.m.codec
        if codec is None:
            return images.to(self.rt.device)
        return torch.cat([codec.encode(images[i:i + 8].to(self.rt.device)) for i in range(0, len(images), 8)])

    def _read_prior(self, n: int) -> tuple[torch.Tensor, list[str]]:
        from PIL import Image

        files = sorted(p for p in self.prior_dir.glob("*.png") if not p.name.startswith("."))[:n]
        imgs = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1) for f in files]
        prompts_file = self.prior_dir / "prompts.json"
        prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else []
        cls_prompts = self.class_prompts()
        prompts = [prompts[i] if i < len(prompts) else cls_prompts[i % len(cls_prompts)] for i in range(len(files))]
        return (torch.stack(imgs) if imgs else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)), prompts

    def _load_prior(self, draw_missing: bool) -> None:
        n = self.cfg.algorithm.prior_images
        have, prompts = self._read_prior(n)
        size = self.m.data.images.shape[-1]
        if len(have) and tuple(have.shape[-2:]) != (size, size):
            raise UserError(f"algorithm.prior_dir {self.prior_dir}: its images are {have.shape[-1]}px but the run "
                            f"trains at {size}px; give a folder of {size}px class images or an empty one")
        if len(have) < n:
            if not draw_missing:
                raise UserError(f"algorithm.prior_dir {self.prior_dir} holds {len(have)} class images but the run "
                                f"trained with {n}; restore the folder (or give algorithm.prior_dir) to resume")
            more, more_prompts = self.draw_prior(len(have), n)
            if self.rt.is_main:  # each file written whole under a temporary name, then renamed
                self.prior_dir.mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(more):
                    tmp = save_images(img[None], self.prior_dir, pattern=f".{len(have) + i:05d}.png.tmp.png")[0]
                    os.replace(tmp, self.prior_dir / f"{len(have) + i:05d}.png")
                atomic_write_text(self.prior_dir / "prompts.json", json.dumps(prompts + more_prompts, indent=1))
            have = torch.cat([have.reshape((-1,) + tuple(more.shape[1:])), more]) if len(have) else more
            prompts = prompts + more_prompts
        # contiguous: the images drawn here come channels-last out of the VAE, those read back do not, and the
        # VAE encodes the two layouts 2.6e-7 apart (a resume would not be bit-identical)
        self.prior = self._model_space(from_uint8(have).contiguous())
        self.prior_prompts = prompts

    @torch.no_grad()
    def draw_prior(self, start: int, stop: int) -> tuple[torch.Tensor, list[str]]:
        """Class images ``start`` … ``stop - 1`` drawn by the teacher as it is now (uint8, pixels)."""
        prompts = self.class_prompts()
        ps = [prompts[i % len(prompts)] for i in range(start, stop)]  # image i takes prompt i mod len (sample's rule)
        x = self.sample(stop - start, first=start, prompts=None if self.m.text is None else prompts, seed=self.seed,
                        purpose="prior", use_ema=False)
        return to_uint8(self.m.to_pixels(x)), ps

    def prepare(self, initial=None) -> dict:  # draws the prior with the sampler; its weights stay as they are
        if self.cfg.algorithm.prior_images > 0:
            self.m.to_device("target_teacher")
            self._load_prior(draw_missing=True)
            return {"prior_images": len(self.prior)}
        return {}

    # -- one iteration ---------------------------------------------------------------------------
    def _loss(self, x0, cond, d: SampleDraws, purpose: str) -> torch.Tensor:
        t = d.randint(0, self.T, "target_teacher", f"{purpose}_t")
        n = d.randn(self.m.sample_shape, "target_teacher", f"{purpose}_noise")
        pred = self.m.roles["target_teacher"].train_forward(self.schedule.add_noise(x0, n, t), t, cond)
        return losses.denoising_loss(pred, self.schedule.target(x0, n, t))

    def step(self, iteration: int) -> dict:
        cfg, ex, timer = self.cfg, self.ex, self.timer
        al, tc = cfg.algorithm, cfg.target_teacher
        if al.prior_images > 0 and self.prior is None:  # a resumed run reads the images it wrote
            self._load_prior(draw_missing=False)
        ga = tc.grad_accum
        logs: dict = defaultdict(float)
        skipped: set = set()
        for micro in range(ga):
            with timer.phase("data"):
                idx = global_indices(iteration, micro, ga, ex.dp_rank, ex.dp_size, cfg.train.batch_size)
                d = SampleDraws(self.seed, iteration, idx, self.rt.device)
                batch = self.m.data.batch(d)
            with timer.phase("target_teacher"):
                cond = batch.real_cond
                if cond and tc.cond_dropout > 0:
                    cond = select_cond(d.rand("target_teacher", "cond_dropout") < tc.cond_dropout, batch.uncond, cond)
                loss = self._loss(batch.real, cond, d, "shots")
                logs["target_teacher/denoise"] += float(loss.detach()) / ga
                if al.prior_images > 0:
                    j = d.randint(0, len(self.prior), "target_teacher", "prior").cpu()
                    p_cond = self.m.data.encode([self.prior_prompts[i] for i in j.tolist()]) if self.m.text else None
                    l_p = self._loss(self.prior[j.to(self.prior.device)], p_cond, d, "prior")
                    logs["target_teacher/prior"] += float(l_p.detach()) / ga
                    loss = loss + al.prior_weight * l_p
                self.backward("target_teacher", loss, iteration, micro, skipped)
        self.step_roles(iteration, ["target_teacher"], skipped, logs)
        return dict(logs)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, steps: Optional[int] = None, seed: Optional[int] = None, batch: int = 64,
               prompts: Optional[list[str]] = None, use_ema: bool = True,
               generator: Optional[torch.Generator] = None, first: int = 0, purpose: str = "sample") -> torch.Tensor:
        """Deterministic DDIM samples ``first`` … ``first + n - 1`` (noise keyed by (seed, index); prompt
        index mod len(prompts)); with a (CPU) ``generator``, the initial noise in one batch as a diffusers
        pipeline draws it."""
        steps = steps or self.cfg.target_teacher.sample_steps
        ts = ddim_timesteps(steps, self.T, "trailing")
        prev = [t - self.T // steps for t in ts]  # diffusers' DDIMScheduler.step rule
        seed = self.seed if seed is None else seed
        role = self.m.roles["target_teacher"]
        out = []
        with role.inference_weights(use_ema) as module:
            if generator is not None:
                batch = n
            for start in range(first, first + n, batch):
                idx = list(range(start, min(first + n, start + batch)))
                if generator is not None:
                    shape = (len(idx),) + tuple(self.m.sample_shape)
                    z = torch.randn(shape, generator=generator, device=generator.device).to(self.rt.device)
                else:
                    z = SampleDraws(seed, -1, idx, self.rt.device).randn(self.m.sample_shape, purpose, "z")
                cond = None
                if self.m.text is not None:
                    ps = prompts or self.m.data.prompts
                    cond = self.m.data.encode([ps[i % len(ps)] for i in idx])

                def x0(x_t, t, cond=cond):
                    with role.autocast():
                        pred = module(x_t, t, cond).float()
                    return self.schedule.to_x0(pred, x_t, t), self.schedule.to_eps(pred, x_t, t)

                out.append(ddim(x0, z, ts, self.schedule, prev=prev, eps_from_clipped=False).float())
        return torch.cat(out)

    def summary(self) -> dict:
        return {"sample_steps": self.cfg.target_teacher.sample_steps, "prior_images": self.cfg.algorithm.prior_images}

    def sampling_info(self) -> dict:
        steps = self.cfg.target_teacher.sample_steps
        return {"steps": steps, "timesteps": ddim_timesteps(steps, self.T, "trailing"), "explicit_timesteps": False,
                "output": self.schedule.prediction_type, "scheduler": "ddim"}
