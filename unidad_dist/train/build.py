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
from unidad_dist.data.target import DataSource
from unidad_dist.device import Runtime
from unidad_dist.errors import UserError
from unidad_dist.methods.draws import key_seed
from unidad_dist.models.backbones import BackboneSpec, build_unet, load_unet, load_weights, resolve_backbone
from unidad_dist.models.conditioning import LatentCodec, TextConditioner
from unidad_dist.models.gan_heads import GanHeads
from unidad_dist.models.schedule import NoiseSchedule
from unidad_dist.train.roles import Role, RoleNet


@dataclass
class Models:
    spec: BackboneSpec
    schedule: NoiseSchedule
    sample_shape: tuple
    student: Optional[Role]  # plain after build; an EngineRole after parallel.engines.attach
    fake_teacher: Optional[Role]  # its RoleNet holds the UNet and the GAN heads (None: on another group)
    source_teacher: Optional[Role]
    target_teacher: Optional[Role]  # trainable (online), frozen, or None (off)
    data: DataSource
    codec: Optional[LatentCodec]
    resolution: int  # pixel resolution of images

    def trainable_roles(self) -> dict[str, Role]:
        out = {}
        for name in ("student", "fake_teacher", "target_teacher"):
            role = getattr(self, name)
            if role is not None and role.trainable:
                out[name] = role
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


def _prepare_trainable(unet: torch.nn.Module, rc, role: str, seed: int) -> torch.nn.Module:
    """Model-side options of a trainable role: a peft LoRA adapter, activation checkpointing."""
    lora = getattr(rc, "lora", None)
    if lora is not None and lora.rank > 0:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise UserError(f"{role}.lora.rank > 0 needs peft; pip install peft (it is in requirements-ci.txt)") from None
        unet.requires_grad_(False)  # the base stays frozen: only the adapter trains (before any engine wraps it)
        lc = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), init_lora_weights="gaussian")
        try:
            with torch.random.fork_rng(devices=[]):  # the adapter starts from a function of run.seed only
                torch.manual_seed(key_seed(seed, f"{role}_lora_init"))
                inject_adapter_in_model(lc, unet)  # works for pixel UNets too (no diffusers adapter mixin needed)
        except ValueError as e:
            raise UserError(f"{role}.lora.target_modules {lora.target_modules} do not fit the UNet ({e}); "
                            "name its Linear layers, e.g. to_q, to_k, to_v, to_out.0") from None
    if rc.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def check_runtime(cfg: Config, rt: Runtime) -> None:
    """Settings that depend on the machine: checked before anything is loaded."""
    from unidad_dist import device as dev
    from unidad_dist.parallel.engines import check_engine_configs
    from unidad_dist.parallel.placement import resolve_groups

    for role in ("student", "fake_teacher", "source_teacher", "target_teacher"):
        if getattr(cfg, role).precision == "fp16" and not dev.supports_dtype(rt.device, torch.float16):
            raise UserError(
                f"{role}.precision=fp16 needs a CUDA device, but this rank runs on {rt.device.type}; "
                "use bf16 or bf16_autocast (or fp32)"
            )
    groups = resolve_groups(cfg, rt.world_size)  # placement problems fail here
    check_engine_configs(cfg, groups)  # reads every user DeepSpeed JSON; contradictions fail here


def build(cfg: Config, rt: Runtime, roles: Optional[set] = None, checks: bool = True,
          dp: Optional[tuple[int, int]] = None) -> Models:
    """Data, schedule and the roles this rank holds (``roles``; default all: colocated placement).

    Networks that will get an engine (trainable roles, ZeRO-3 frozen teachers) stay in host memory until
    ``parallel.engines.attach`` moves them, one at a time, to the device (so the build peak is one network,
    not all of them). ``checks=False`` (sample/export) skips the engine and machine checks. ``dp`` is this
    rank's (data-parallel rank, size) for the split data streams (default: (rank, world size))."""
    if checks:
        check_runtime(cfg, rt)
    roles = {"student", "fake_teacher", "source_teacher", "target_teacher"} if roles is None else set(roles)
    spec = resolve_backbone(cfg.source_teacher.backbone, "source_teacher")
    if spec.scheduler_config is None:
        raise UserError(
            f"source_teacher.backbone '{spec.given}' has no scheduler config (scheduler/scheduler_config.json); "
            "give the pipeline folder, or put scheduler_config.json beside the UNet's config.json"
        )
    schedule = NoiseSchedule.from_scheduler_config(spec.scheduler_config)
    # Data first: it is cheap and the most common source of bad input.
    codec = LatentCodec(spec, rt.device) if spec.kind != "pixel" else None
    resolution = cfg.data.target.resolution or spec.pixel_resolution
    if resolution != spec.pixel_resolution:
        raise UserError(
            f"data.target.resolution={resolution} does not match the backbone ({spec.pixel_resolution}px); "
            "leave it unset or set the backbone's resolution"
        )
    conditioner = TextConditioner(spec, rt.device) if spec.text_conditioned else None
    data = DataSource(cfg, spec, resolution, codec, conditioner, dp=dp or (rt.rank, rt.world_size))

    src_unet = load_unet(spec, cfg.source_teacher.init, cfg.source_teacher.strict, "source_teacher")
    source = None
    if cfg.source_teacher.enabled and "source_teacher" in roles:
        source = Role("source_teacher", RoleNet(copy.deepcopy(src_unet)), cfg.source_teacher.precision, rt.device,
                      trainable=False, staged=cfg.source_teacher.zero_stage == 3)

    student = fake = target = None
    if "student" in roles:
        student_unet, _ = _role_unet(cfg.student, "student", spec, src_unet)
        student = Role("student", RoleNet(_prepare_trainable(student_unet, cfg.student, "student", cfg.run.seed)),
                       cfg.student.precision, rt.device, trainable=True, grad_accum=cfg.student.grad_accum,
                       staged=True)

    if "fake_teacher" in roles:
        fake_unet, fspec = _role_unet(cfg.fake_teacher, "fake_teacher", spec, src_unet)
        with torch.random.fork_rng(devices=[]):  # heads start from a function of run.seed only
            torch.manual_seed(key_seed(cfg.run.seed, "gan_heads_init"))
            heads = GanHeads.for_backbone(fspec.unet_config)
        fake = Role("fake_teacher", RoleNet(_prepare_trainable(fake_unet, cfg.fake_teacher, "fake_teacher", cfg.run.seed), heads),
                    cfg.fake_teacher.precision, rt.device, trainable=True, grad_accum=cfg.fake_teacher.grad_accum,
                    staged=True)

    tc = cfg.target_teacher
    if tc.mode != "off" and "target_teacher" in roles:
        t_unet, _ = _role_unet(tc, "target_teacher", spec, src_unet)
        online = tc.mode == "online"
        if online:
            t_unet = _prepare_trainable(t_unet, tc, "target_teacher", cfg.run.seed)
        target = Role("target_teacher", RoleNet(t_unet), tc.precision, rt.device, trainable=online,
                      grad_accum=tc.grad_accum, staged=online or tc.zero_stage == 3)
    del src_unet
    sample_shape = (spec.in_channels, spec.sample_size, spec.sample_size)
    return Models(spec=spec, schedule=schedule, sample_shape=sample_shape, student=student, fake_teacher=fake,
                  source_teacher=source, target_teacher=target, data=data, codec=codec, resolution=resolution)
