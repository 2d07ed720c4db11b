"""Build every role, helper and data source from a validated config — before any run folder exists.

All input problems (missing folders, malformed configs, unreadable images, weights that do not match)
surface here as ``UserError``s, so a failing start leaves nothing behind.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from unidad_dist.config import Config
from unidad_dist.data.target import DataSource, load_target_folder
from unidad_dist.device import Runtime
from unidad_dist.errors import UserError
from unidad_dist.methods.draws import key_seed
from unidad_dist.models.backbones import BackboneSpec, build_unet, load_unet, load_weights, resolve_backbone
from unidad_dist.models.conditioning import LatentCodec, TextConditioner
from unidad_dist.models.gan_heads import GanHeads
from unidad_dist.models.schedule import NoiseSchedule
from unidad_dist.train.roles import FrozenRole, TrainableRole


@dataclass
class Models:
    spec: BackboneSpec
    schedule: NoiseSchedule
    sample_shape: tuple
    student: TrainableRole
    fake_teacher: TrainableRole
    source_teacher: Optional[FrozenRole]
    target_teacher: Optional[object]  # TrainableRole (online) | FrozenRole (frozen) | None
    data: DataSource
    codec: Optional[LatentCodec]
    resolution: int  # pixel resolution of images

    def trainable_roles(self) -> dict[str, TrainableRole]:
        out = {"student": self.student, "fake_teacher": self.fake_teacher}
        if self.target_teacher is not None and self.target_teacher.trainable:
            out["target_teacher"] = self.target_teacher
        return out

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x) if self.codec is not None else x.clamp(-1, 1)


def _check_same_space(spec: BackboneSpec, other: BackboneSpec, role: str) -> None:
    if spec.in_channels != other.in_channels or spec.sample_size != other.sample_size:
        raise UserError(
            f"{role}.backbone '{other.given}' works in another space ({other.in_channels}ch, {other.sample_size}px) "
            f"than the source teacher ({spec.in_channels}ch, {spec.sample_size}px); all roles must share one latent space"
        )


def _role_unet(cfg_role, role: str, spec: BackboneSpec, source_unet: torch.nn.Module):
    """A role's UNet: its own backbone (architecture) if given, its init weights if given, else a copy
    of the source teacher."""
    rspec = spec
    if cfg_role.backbone:
        rspec = resolve_backbone(cfg_role.backbone, role)
        _check_same_space(spec, rspec, role)
    if cfg_role.init:
        unet = build_unet(rspec)
        load_weights(unet, cfg_role.init, cfg_role.strict, f"{role}.init")
        return unet, rspec
    if cfg_role.backbone:
        return load_unet(rspec, None, True, role), rspec
    return copy.deepcopy(source_unet), rspec


def build(cfg: Config, rt: Runtime) -> Models:
    spec = resolve_backbone(cfg.source_teacher.backbone, "source_teacher")
    if spec.scheduler_config is None:
        raise UserError(
            f"source_teacher.backbone '{spec.given}' has no scheduler config (scheduler/scheduler_config.json); "
            "give the pipeline folder, or put scheduler_config.json beside the UNet's config.json"
        )
    schedule = NoiseSchedule.from_scheduler_config(spec.scheduler_config)
    # Data first: it is cheap and the most common source of bad input.
    codec = LatentCodec(spec, rt.device) if spec.kind != "pixel" else None
    factor = 2 ** (len(codec.vae.config.block_out_channels) - 1) if codec is not None else 1
    resolution = cfg.data.target.resolution or spec.sample_size * factor
    if resolution != spec.sample_size * factor:
        raise UserError(
            f"data.target.resolution={resolution} does not match the backbone ({spec.sample_size * factor}px); "
            "leave it unset or set the backbone's resolution"
        )
    images, captions, _ = load_target_folder(cfg.data.target.path, resolution)
    flipped = images.flip(-1)
    if codec is not None:
        model_space = torch.cat([codec.encode(images[i:i + 8].to(rt.device)).cpu() for i in range(0, len(images), 8)])
        model_flipped = torch.cat([codec.encode(flipped[i:i + 8].to(rt.device)).cpu() for i in range(0, len(images), 8)])
    else:
        model_space, model_flipped = images, flipped
    conditioner = TextConditioner(spec, rt.device) if spec.text_conditioned else None
    data = DataSource(cfg, images, captions, model_space, model_flipped, conditioner)

    src_unet = load_unet(spec, cfg.source_teacher.init, cfg.source_teacher.strict, "source_teacher")
    source = None
    if cfg.source_teacher.enabled:
        source = FrozenRole("source_teacher", copy.deepcopy(src_unet), cfg.source_teacher.precision, rt.device)

    student_unet, _ = _role_unet(cfg.student, "student", spec, src_unet)
    student = TrainableRole("student", student_unet, cfg.student.precision, rt.device, cfg.student.optimizer,
                            cfg.student.grad_accum, rt.world_size, ema=cfg.student.ema)

    fake_unet, fspec = _role_unet(cfg.fake_teacher, "fake_teacher", spec, src_unet)
    with torch.random.fork_rng(devices=[]):  # heads start from a function of run.seed only
        torch.manual_seed(key_seed(cfg.run.seed, "gan_heads_init"))
        heads = GanHeads.for_backbone(fspec.unet_config)
    fake = TrainableRole("fake_teacher", torch.nn.ModuleDict({"unet": fake_unet, "heads": heads}),
                         cfg.fake_teacher.precision, rt.device, cfg.fake_teacher.optimizer,
                         cfg.fake_teacher.grad_accum, rt.world_size)

    target = None
    tc = cfg.target_teacher
    if tc.mode != "off":
        t_unet, _ = _role_unet(tc, "target_teacher", spec, src_unet)
        if tc.mode == "online":
            target = TrainableRole("target_teacher", t_unet, tc.precision, rt.device, tc.optimizer, tc.grad_accum,
                                   rt.world_size)
        else:
            target = FrozenRole("target_teacher", t_unet, tc.precision, rt.device)
    del src_unet
    sample_shape = (spec.in_channels, spec.sample_size, spec.sample_size)
    return Models(spec=spec, schedule=schedule, sample_shape=sample_shape, student=student, fake_teacher=fake,
                  source_teacher=source, target_teacher=target, data=data, codec=codec, resolution=resolution)
