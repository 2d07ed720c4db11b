"""Build the shared components, the data and the roles a method declares, from a validated config — before
any run folder exists.

All input problems (missing folders, malformed configs, unreadable images, weights that do not match)
surface here as ``UserError``s, so a failing start leaves nothing behind.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from unidad_dist import device as dev
from unidad_dist.core.draws import key_seed
from unidad_dist.data.target import DataSource
from unidad_dist.device import Runtime
from unidad_dist.errors import UserError
from unidad_dist.eval.alignment import build_features
from unidad_dist.methods.base import RoleSpec
from unidad_dist.models.adapters import apply_train_filter, prepare_trainable
from unidad_dist.models.backbones import BackboneSpec, build_unet, load_unet, load_weights, resolve_backbone
from unidad_dist.models.conditioning import LatentCodec, TextConditioner, TokenRows
from unidad_dist.models.roles import Role, RoleNet
from unidad_dist.models.schedule import NoiseSchedule
from unidad_dist.parallel.engines import check_engine_configs
from unidad_dist.parallel.exchange import Exchange
from unidad_dist.parallel.placement import Placement, colocated, resolve_groups


@dataclass
class Models:
    """What a method works with: the shared components (schedule, VAE codec, text conditioner, built from the
    primary backbone), the data, the roles this rank holds (``roles``; ``models.<role>`` is the role or None
    when it is not held here) and the exchange between placement sides."""
    spec: BackboneSpec  # the primary backbone
    schedule: NoiseSchedule
    sample_shape: tuple
    codec: Optional[LatentCodec]
    text: Optional[TextConditioner]
    resolution: int  # pixel resolution of images
    data: DataSource
    roles: dict  # name -> Role (plain after build; an EngineRole / PartitionedRole after parallel.engines.attach)
    specs: dict  # name -> RoleSpec, every role the recipe runs
    role_sections: tuple  # every role section of the method (some may be absent from this run)
    placement: Placement
    exchange: Exchange
    features: Optional[torch.nn.Module] = None  # feature networks the method trains against (Method.feature_networks)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("role_sections", ())
        if name in sections:
            return self.__dict__["roles"].get(name)
        raise AttributeError(name)

    def holds(self, name: str) -> bool:
        return name in self.roles

    def trainable_roles(self) -> dict:
        return {name: role for name, role in self.roles.items() if role.trainable}

    def to_device(self, *names: str) -> None:
        """Move roles staged in host memory (until their engines) to the compute device."""
        for name in names:
            role = self.roles.get(name)
            if role is not None:
                role.module.to(role.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x) if self.codec is not None else x.clamp(-1, 1)


def _check_same_space(spec: BackboneSpec, other: BackboneSpec, role: str, primary: str) -> None:
    if spec.in_channels != other.in_channels or spec.sample_size != other.sample_size:
        raise UserError(
            f"{role}.backbone '{other.given}' works in another space ({other.in_channels}ch, {other.sample_size}px) "
            f"than {primary}.backbone ({spec.in_channels}ch, {spec.sample_size}px); all roles must share one latent "
            "space"
        )
    keys = ("cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")
    mine, theirs = [spec.unet_config.get(k) for k in keys], [other.unet_config.get(k) for k in keys]
    if spec.text_conditioned and mine != theirs:
        diff = ", ".join(f"{k} {b} vs {a}" for k, a, b in zip(keys, mine, theirs) if a != b)
        raise UserError(
            f"{role}.backbone '{other.given}' reads another text conditioning than {primary}.backbone ({diff}); every "
            f"role takes its prompts from {primary}'s text encoder(s), so use a backbone of the same family (e.g. "
            "SD2.1 with SD-Turbo, SDXL with SDXL-Turbo)"
        )


def _check_same_schedule(spec: BackboneSpec, other: BackboneSpec, role: str, primary: str) -> None:
    """Every role's output is read with the primary's noise schedule and prediction type: a role whose own
    backbone was trained with another would be read wrongly."""
    if other.scheduler_config is None or other.unet_dir == spec.unet_dir:
        return  # no scheduler beside that UNet: it is read with the primary's, as documented
    mine, theirs = NoiseSchedule.from_scheduler_config(spec.scheduler_config), \
        NoiseSchedule.from_scheduler_config(other.scheduler_config)
    same_alphas = mine.T == theirs.T and torch.allclose(mine.alphas_cumprod, theirs.alphas_cumprod, atol=1e-7)
    if mine.prediction_type != theirs.prediction_type or not same_alphas:
        what = (f"prediction type {theirs.prediction_type}" if mine.prediction_type != theirs.prediction_type
                else "noise schedule (its alphas_cumprod differ)")
        raise UserError(
            f"{role}.backbone '{other.given}' was trained with another {what} than {primary}.backbone "
            f"('{spec.given}': {mine.prediction_type}, T = {mine.T}); every role's output is read with "
            f"{primary}'s schedule, so use a backbone of the same schedule or leave {role}.backbone unset"
        )


def _role_unet(rc, role: str, spec: BackboneSpec, template: torch.nn.Module, primary: str):
    """A role's UNet: its own backbone (architecture) if given, its init weights if given, else a copy of
    ``template``."""
    rspec = spec
    if rc.backbone:
        rspec = resolve_backbone(rc.backbone, role)
        _check_same_space(spec, rspec, role, primary)
        _check_same_schedule(spec, rspec, role, primary)
    if rc.init:
        unet = build_unet(rspec)
        load_weights(unet, rc.init, rc.strict, f"{role}.init")
        return unet, rspec
    if rc.backbone:
        return load_unet(rspec, None, True, role), rspec
    return copy.deepcopy(template), rspec


def check_runtime(cfg, rt: Runtime) -> None:
    """Settings that depend on the machine: checked before anything is loaded."""
    for role in cfg.method.role_sections():
        if getattr(cfg, role).precision == "fp16" and not dev.supports_dtype(rt.device, torch.float16):
            raise UserError(
                f"{role}.precision=fp16 needs a CUDA device, but this rank runs on {rt.device.type}; "
                "use bf16 or bf16_autocast (or fp32)"
            )
    groups = resolve_groups(cfg, rt.world_size)  # placement problems fail here
    check_engine_configs(cfg, groups)  # reads every user DeepSpeed JSON; contradictions fail here


def _build_role(cfg, spec: RoleSpec, pspec: BackboneSpec, template, rt: Runtime,
                text: Optional[TextConditioner] = None) -> Role:
    method = cfg.method
    rc = getattr(cfg, spec.name)
    if spec.copy_of is None and spec.name == method.primary:
        unet, rspec = copy.deepcopy(template[method.primary]), pspec
    elif spec.copy_of is None:
        rspec = resolve_backbone(rc.backbone, spec.name) if rc.backbone else pspec
        _check_same_space(pspec, rspec, spec.name, method.primary)
        _check_same_schedule(pspec, rspec, spec.name, method.primary)
        unet = load_unet(rspec, rc.init, rc.strict, spec.name)
    else:
        unet, rspec = _role_unet(rc, spec.name, pspec, template[spec.copy_of], method.primary)
    heads = None
    if spec.heads is not None:
        with torch.random.fork_rng(devices=[]):  # heads start from a function of run.seed only
            torch.manual_seed(key_seed(cfg.run.seed, spec.heads_key))
            heads = spec.heads(rspec.unet_config)
    if spec.trainable:
        unet = prepare_trainable(unet, rc, spec.name, cfg.run.seed)
    net = RoleNet(unet, heads)
    if spec.trainable and spec.train_filter is not None:
        apply_train_filter(net, spec.train_filter, spec.name, spec.train_filter_doc)
    if spec.tokens and text is not None and text.token is not None:
        net.tokens = TokenRows(text)  # trains beside what the filter selected
    return Role(spec.name, net, rc.precision, rt.device, trainable=spec.trainable,
                grad_accum=getattr(rc, "grad_accum", 1), staged=spec.trainable or rc.zero_stage == 3)


def build(cfg, rt: Runtime, roles: Optional[set] = None, checks: bool = True,
          dp: Optional[tuple[int, int]] = None, placement: Optional[Placement] = None,
          sampling_prompts: Optional[list[str]] = None) -> Models:
    """Components, data and the roles this rank holds: those of ``placement`` (default: colocated, every
    role), or ``roles`` when given (sample/export build the sampler alone).

    Networks that will get an engine (trainable roles, ZeRO-3 frozen roles) stay in host memory until
    ``parallel.engines.attach`` moves them, one at a time, to the device (so the build peak is one network,
    not all of them). ``checks=False`` (sample/export) skips the engine and machine checks. ``dp`` is this
    rank's (data-parallel rank, size) for the split data streams (default: the placement's).
    ``sampling_prompts`` (sample/export): no data source is read; the data holds these prompts only."""
    method = cfg.method
    if checks:
        check_runtime(cfg, rt)
    placement = placement if placement is not None else colocated(cfg, rt.rank, rt.world_size)
    specs = {s.name: s for s in method.roles(cfg)}
    held = {r for r in specs if placement.holds(r)} if roles is None else set(roles) & set(specs)
    primary = getattr(cfg, method.primary)
    spec = resolve_backbone(primary.backbone, method.primary)
    if spec.scheduler_config is None:
        raise UserError(
            f"{method.primary}.backbone '{spec.given}' has no scheduler config (scheduler/scheduler_config.json); "
            "give the pipeline folder, or put scheduler_config.json beside the UNet's config.json"
        )
    schedule = NoiseSchedule.from_scheduler_config(spec.scheduler_config)
    # Data first: it is cheap and the most common source of bad input.
    wants = set(method.components)
    codec = LatentCodec(spec, rt.device) if spec.latent and "codec" in wants else None
    resolution = cfg.data.target.resolution or spec.pixel_resolution
    if resolution != spec.pixel_resolution:
        raise UserError(
            f"data.target.resolution={resolution} does not match the backbone ({spec.pixel_resolution}px); "
            "leave it unset or set the backbone's resolution"
        )
    text = TextConditioner(spec, rt.device) if spec.text_conditioned and "text" in wants else None
    new_token = method.new_token(cfg)
    if new_token is not None:
        if text is None:
            raise UserError(f"{method.primary}.backbone '{spec.given}' has no text encoder, so the new token "
                            f"'{new_token[0]}' has no embedding to train; give a text-conditioned pipeline folder")
        text.add_token(*new_token)
    data = DataSource(cfg, spec, resolution, codec, text,
                      dp=dp or ((placement.dp_rank, placement.dp_size) if roles is None else (rt.rank, rt.world_size)),
                      sampling_prompts=sampling_prompts)

    features = None  # the method's feature networks: a training run only (checked before any role is built)
    kind = method.feature_networks(cfg)
    if kind is not None and roles is None:
        features = build_features(kind, cfg.eval.weights, cfg.run.seed, rt.device)
    # the networks roles are copies of, loaded once (the primary always: every role's default)
    template = {method.primary: load_unet(spec, primary.init, primary.strict, method.primary)}
    for name in sorted(held):
        src = specs[name].copy_of
        if src is not None and src not in template:
            sc = getattr(cfg, src)
            sspec = resolve_backbone(sc.backbone, src) if sc.backbone else spec
            template[src] = load_unet(sspec, sc.init, sc.strict, src)
    built = {name: _build_role(cfg, s, spec, template, rt, text) for name, s in specs.items() if name in held}
    del template
    sample_shape = (spec.in_channels, spec.sample_size, spec.sample_size)
    return Models(spec=spec, schedule=schedule, sample_shape=sample_shape, codec=codec, text=text,
                  resolution=resolution, data=data, roles=built, specs=specs,
                  role_sections=tuple(method.role_sections()), placement=placement,
                  exchange=Exchange(placement, rt.device), features=features)
