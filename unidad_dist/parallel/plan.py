"""``unidad-dist plan``: memory and FLOPs per role and per rank, from model configs alone (meta device).

* Parameters: every role's network is built from its config on the meta device.
* Model states per rank: the bytes per trainable parameter of each DeepSpeed 0.19 engine layout, measured
  once on real engines (fp32 and bf16, ZeRO 0-3, 1 and 2 ranks; benchmarks/plan_check.py re-measures):

      stage 0        w + w + m + 8                 (weights, grads, fp32 master when w = 2, Adam)
      stage 1, 2     w + (4 + 8 + w) / N           (fp32 partition, Adam and grads partitioned)
      stage 3        (w + 4 + 8 + w) / N, + w * B once per engine (everything partitioned; the reduce
                     bucket of B elements is whole on every rank)

  per trainable parameter, with w = 2 for bf16/fp16 weights and 4 otherwise, N the engine's
  data-parallel size, B the reduce bucket (elements; parallel.engines.bucket_elements). Under ZeRO-3 a parameter smaller than ``zero3_persistence_threshold`` stays whole on
  every rank (DeepSpeed's persistence rule). Frozen weights count w (replicated) or w / N (ZeRO-3).
  ``offload_optimizer`` moves the fp32 partition and Adam moments to host memory.
* Activations: bytes autograd saves for backward, counted with saved-tensor hooks while each kind of
  network pass runs on meta tensors at the recipe's micro-batch and resolution.
* FLOPs: ``torch.utils.flop_counter`` over the same meta passes, times the number of passes the method
  makes (student generation and its backward-simulation draws, DMD teachers with CFG, GAN passes,
  fake/target updates, the update ratio and gradient accumulation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from unidad_dist.errors import UserError

GIB = 1024 ** 3
_COST_CACHE: dict = {}
ROLE_ORDER = ("student", "fake_teacher", "source_teacher", "target_teacher")


def parse_bytes(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1024 ** 4), ("GB", GIB), ("MB", 1024 ** 2), ("KB", 1024), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise UserError(f"--gpu-memory '{text}' is not a size like 80GB or 40960MB")


# ------------------------------------------------------------------------------------------------
# Costs of one network pass, on the meta device
# ------------------------------------------------------------------------------------------------
@dataclass
class PassCost:
    fwd: float
    bwd: float
    saved: int  # bytes saved for backward (0 without grad)


def _meta_inputs(spec, batch: int, text_dims: Optional[dict]):
    hw = spec.sample_size
    x = torch.zeros(batch, spec.in_channels, hw, hw, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond = None
    if text_dims is not None:
        cond = {"encoder_hidden_states": torch.zeros(batch, text_dims["seq"], text_dims["dim"], device="meta")}
        if text_dims.get("pooled"):
            cond["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text_dims["pooled"], device="meta"),
                                         "time_ids": torch.zeros(batch, 6, device="meta")}
    return x, t, cond


def pass_cost(net, spec, batch: int, text_dims, grad: str, discriminate: bool = False,
              dtype: torch.dtype = torch.float32) -> PassCost:
    """grad: none | params | input | both."""
    from torch.utils.flop_counter import FlopCounterMode

    for p in net.parameters():
        p.requires_grad_(grad in ("params", "both"))
    x, t, cond = _meta_inputs(spec, batch, text_dims)
    x = x.to(dtype)
    if cond is not None:
        cond = {k: (v.to(dtype) if torch.is_tensor(v) else {kk: vv.to(dtype) for kk, vv in v.items()})
                for k, v in cond.items()}
    if grad in ("input", "both"):
        x.requires_grad_(True)
    saved = [0]
    params = {id(p) for p in net.parameters()}

    def pack(tensor):
        if id(tensor) not in params:
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with FlopCounterMode(display=False) as fc:
        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda q: q) if grad != "none" else torch.no_grad()
        with ctx:
            out = net(x, t, cond, discriminate=discriminate)
    fwd = fc.get_total_flops()
    bwd = 0
    if grad != "none":
        with FlopCounterMode(display=False) as fc2:
            out.float().sum().backward()
        bwd = fc2.get_total_flops()
    for p in net.parameters():
        p.grad = None
    return PassCost(float(fwd), float(bwd), int(saved[0]))


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class RolePlan:
    name: str
    ranks: list[int]
    params: int  # all parameters of the role's network
    trainable: int
    precision: str
    zero_stage: Optional[int]  # None: replicated frozen
    model_state_bytes: float  # per rank holding the role
    host_bytes: float  # offloaded to host memory per rank
    activation_bytes: float  # saved for backward, per micro-batch
    flops_per_iteration: float  # per rank holding the role, averaged over `ratio` iterations
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    world_size: int
    placement: str
    roles: dict[str, RolePlan]
    frozen_helpers_bytes: float  # text encoders + VAE, replicated
    per_rank_bytes: dict[int, float]
    gpu_memory: Optional[int]
    recommendation: Optional[str] = None

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu_memory is None:
            return None
        return max(self.per_rank_bytes.values()) <= 0.9 * self.gpu_memory


def _weight_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(trainable: int, frozen: int, small: int, precision: str, stage: int, n: int,
                      bucket: int, offload: bool = False, ema: bool = False) -> tuple[float, float]:
    """(device bytes, host bytes) per rank for one engine; ``small``: parameters below the ZeRO-3
    persistence threshold (kept whole)."""
    w = _weight_bytes(precision)
    master = 4 if w == 2 else 0
    opt = 4 + 8  # fp32 partition + Adam moments (ZeRO); stage 0 keeps a master copy only for 16-bit weights
    host = 0.0
    if stage == 0:
        dev = trainable * (w + w + master + 8) + frozen * w
        if offload:
            dev -= trainable * (master + 8)
            host = trainable * (master + 8)
    elif stage in (1, 2):
        dev = trainable * (w + (opt + w) / n) + frozen * w
        if offload:
            dev -= trainable * opt / n
            host = trainable * opt / n
    else:
        part = trainable - min(small, trainable)
        dev = part * w / n + min(small, trainable) * w + trainable * (opt + w) / n + w * bucket
        dev += frozen * w / n
        if offload:
            dev -= trainable * opt / n
            host = trainable * opt / n
    if ema:
        dev += 4 * (trainable + frozen)
    return float(dev), float(host)


def _build_meta(cfg, role: str, spec):
    from unidad_dist.models.backbones import build_unet, resolve_backbone
    from unidad_dist.models.gan_heads import GanHeads
    from unidad_dist.train.build import _prepare_trainable
    from unidad_dist.train.roles import RoleNet

    rc = getattr(cfg, role)
    rspec = resolve_backbone(rc.backbone, role) if getattr(rc, "backbone", None) else spec
    with torch.device("meta"):
        unet = build_unet(rspec)
        heads = GanHeads.for_backbone(rspec.unet_config) if role == "fake_teacher" else None
    trainable = role in ("student", "fake_teacher") or (role == "target_teacher" and cfg.target_teacher.mode == "online")
    if trainable:
        unet = _prepare_trainable(unet, rc, role, cfg.run.seed)
    return RoleNet(unet, heads), rspec, trainable


def _text_dims(spec) -> Optional[dict]:
    import json

    if not spec.text_conditioned:
        return None
    root = spec.root
    if root is None:
        raise UserError(f"plan needs the pipeline folder of '{spec.given}' (text encoder configs)")
    cfg1 = json.loads((root / "text_encoder" / "config.json").read_text())
    seq = cfg1.get("max_position_embeddings", 77)
    tok = root / "tokenizer" / "tokenizer_config.json"
    if tok.is_file():
        seq = json.loads(tok.read_text()).get("model_max_length", seq)
        seq = seq if seq < 10 ** 6 else cfg1.get("max_position_embeddings", 77)
    dim = cfg1["hidden_size"]
    pooled = None
    if spec.kind == "sdxl":
        cfg2 = json.loads((root / "text_encoder_2" / "config.json").read_text())
        dim += cfg2["hidden_size"]
        pooled = cfg2.get("projection_dim", cfg2["hidden_size"])
    return {"seq": int(seq), "dim": int(dim), "pooled": pooled}


def _helpers_bytes(spec) -> float:
    """Frozen text encoders + VAE, replicated (their own dtype: we keep them in fp32)."""
    if spec.kind == "pixel" or spec.root is None:
        return 0.0
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    with torch.device("meta"):
        for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (spec.root / sub / "config.json").is_file():
                total += sum(p.numel() for p in cls(CLIPTextConfig.from_pretrained(spec.root / sub)).parameters())
        if (spec.root / "vae" / "config.json").is_file():
            total += sum(p.numel() for p in AutoencoderKL.from_config(AutoencoderKL.load_config(spec.root / "vae")).parameters())
    return 4.0 * total


def pass_schedule(cfg, iteration: int) -> dict:
    """How many passes of each kind one rank makes in one iteration (per micro-batch counts x micros)."""
    from unidad_dist.methods.unidad import iteration_plan

    K = cfg.student.steps
    ip = iteration_plan(cfg, iteration)  # the same schedule the step follows
    ga_g, ga_f, ga_t, n_micro = ip.ga_g, ip.ga_f, ip.ga_t, ip.n_micro
    bs = ip.k_grad is not None
    k = ip.k_grad if bs else K - 1
    a = float(cfg.algorithm.a)
    gan_g = cfg.gan_heads.enabled and cfg.gan_heads.lambda_g > 0
    gan_d = cfg.gan_heads.enabled and cfg.gan_heads.lambda_d > 0
    c = {"student_grad_both": 0, "student_grad_params": 0, "student_nograd": 0, "fake_nograd": 0,
         "fake_features_input": 0, "fake_train": 0, "fake_features_train": 0, "source_nograd": 0,
         "target_nograd": 0, "target_train": 0}
    for micro in range(n_micro):
        if micro < ga_g:
            if bs:
                c["student_nograd"] += k
                c["student_grad_params"] += 1
            else:
                c["student_grad_both"] += K
            c["fake_nograd"] += 1
            if a > 0:
                c["target_nograd"] += 1
            if a < 1:
                c["source_nograd"] += 1
            if gan_g:
                c["fake_features_input"] += 1
        else:
            c["student_nograd"] += (k + 1) if bs else K
        if micro < ga_f:
            c["fake_train"] += 1
            if gan_d:
                c["fake_features_train"] += 2
        if micro < ga_t:
            c["target_train"] += 1
    return c


def make_plan(cfg, world_size: int, gpu_memory: Optional[int] = None) -> Plan:
    from unidad_dist.models.backbones import resolve_backbone
    from unidad_dist.parallel.engines import bucket_elements
    from unidad_dist.parallel.placement import resolve_groups

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    groups = resolve_groups(cfg, world_size)
    try:
        spec = resolve_backbone(cfg.source_teacher.backbone, "source_teacher")
    except UserError as e:
        raise UserError(f"{e} (to plan without the weights, point it at the shipped configs: "
                        "source_teacher.backbone=configs/sd15 or configs/sdxl)") from None
    text = _text_dims(spec)
    b = cfg.train.batch_size
    conditional = text is not None
    ratio = cfg.train.fake_updates_per_student
    scheds = [pass_schedule(cfg, it) for it in range(ratio)]
    count = {k: sum(s[k] for s in scheds) / ratio for k in scheds[0]}

    present = ["student", "fake_teacher"]
    if cfg.source_teacher.enabled:
        present.append("source_teacher")
    if cfg.target_teacher.mode != "off":
        present.append("target_teacher")
    roles: dict[str, RolePlan] = {}
    roles_extra = 0
    for role in present:
        rc = getattr(cfg, role)
        net, rspec, trainable = _build_meta(cfg, role, spec)
        dtype = torch.bfloat16 if rc.precision in ("bf16", "fp16", "bf16_autocast") else torch.float32
        net = net.to(dtype)  # bf16 autocast is modelled as bf16 activations
        n_all = sum(p.numel() for p in net.parameters())
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad) if trainable else 0
        ranks = groups[role]
        n = len(ranks)
        stage = rc.zero_stage if (trainable or rc.zero_stage == 3) else None
        small = sum(p.numel() for p in net.parameters() if p.requires_grad and p.numel() < rc.zero3_persistence_threshold)
        if trainable:
            ms, host = model_state_bytes(n_train, n_all - n_train, small, rc.precision, rc.zero_stage, n,
                                         bucket_elements(n_all), getattr(rc, "offload_optimizer", False),
                                         ema=role == "student" and cfg.student.ema > 0)
        else:
            w = _weight_bytes(rc.precision)
            small_frozen = sum(p.numel() for p in net.parameters() if p.numel() < rc.zero3_persistence_threshold)
            ms = ((n_all - small_frozen) * w / n + small_frozen * w) if stage == 3 else n_all * w
            host = 0.0

        lora = getattr(rc, "lora", None)
        arch = (str(rspec.unet_dir), role == "fake_teacher", trainable, lora.rank if lora else 0,
                tuple(lora.target_modules) if lora else (), getattr(rc, "activation_checkpointing", False), str(dtype),
                repr(text))

        def cost(grad, disc=False, batch=b, net=net, rspec=rspec, arch=arch, dtype=dtype):
            key = arch + (grad, disc, batch)  # roles and plans with the same network share the meta passes
            if key not in _COST_CACHE:
                _COST_CACHE[key] = pass_cost(net, rspec, batch, text, grad, disc, dtype)
            return _COST_CACHE[key]

        flops = 0.0
        act = 0.0
        notes = []
        if role == "student":
            cb = cost("both") if count["student_grad_both"] else None
            cp = cost("params") if count["student_grad_params"] else None
            c0 = cost("none")
            flops = count["student_nograd"] * c0.fwd
            if cb:
                flops += count["student_grad_both"] * (cb.fwd + cb.bwd)
                act = cfg.student.steps * cb.saved
            if cp:
                flops += count["student_grad_params"] * (cp.fwd + cp.bwd)
                act = max(act, cp.saved)
        elif role == "fake_teacher":
            c0 = cost("none")
            ct = cost("params")
            flops = count["fake_nograd"] * c0.fwd + count["fake_train"] * (ct.fwd + ct.bwd)
            act = ct.saved
            if count["fake_features_input"]:
                ci = cost("input", True)  # FLOPs: autograd.grad w.r.t. the sample only
                # saved tensors: the fake teacher's parameters require grad, so its forward saves as for training
                ci_saved = cost("both", True).saved
                flops += count["fake_features_input"] * (ci.fwd + ci.bwd)
                notes.append(f"GAN input-gradient graph {ci_saved / 2 ** 20:.1f} MiB, held during the student step")
                roles_extra = ci_saved
            if count["fake_features_train"]:
                cf = cost("params", True)
                flops += count["fake_features_train"] * (cf.fwd + cf.bwd)
                act += 2 * cf.saved
        elif role == "source_teacher":
            mult = 2 if (cfg.source_teacher.cfg != 1.0 and conditional) else 1
            flops = count["source_nograd"] * cost("none", batch=b * mult).fwd
        elif role == "target_teacher":
            mult = 2 if (cfg.target_teacher.cfg != 1.0 and conditional) else 1
            flops = count["target_nograd"] * cost("none", batch=b * mult).fwd
            if trainable:
                ct = cost("params")
                flops += count["target_train"] * (ct.fwd + ct.bwd)
                act = ct.saved
        if getattr(rc, "activation_checkpointing", False):
            notes.append("activation checkpointing on (activations as measured with it on the meta device)")
        roles[role] = RolePlan(role, ranks, n_all, n_train, rc.precision, stage, ms, host, act, flops, notes)
    if "fake_teacher" in roles and "student" in roles:
        # the GAN generator term's graph is built during the student's step, on the fake teacher's ranks
        holder = "fake_teacher" if cfg.placement.mode == "split" else "student"
        roles[holder].activation_bytes += roles_extra
    helpers = _helpers_bytes(spec)
    per_rank = {}
    for r in range(world_size):
        held = [p for p in roles.values() if r in p.ranks]
        per_rank[r] = sum(p.model_state_bytes for p in held) + max([p.activation_bytes for p in held] or [0]) + helpers
    plan = Plan(world_size, cfg.placement.mode, roles, helpers, per_rank, gpu_memory)
    if plan.fits is False:
        plan.recommendation = recommend(cfg, world_size, gpu_memory)
    return plan


def recommend(cfg, world_size: int, gpu_memory: int) -> str:
    """The first of a ladder of cheaper layouts that fits."""
    from dataclasses import replace

    def with_stage(c, stage, frozen3=False, offload=False, ckpt=False, split=False):
        new = replace(c)
        roles = {}
        for r in ("student", "fake_teacher", "target_teacher"):
            roles[r] = replace(getattr(c, r), zero_stage=stage, offload_optimizer=offload and stage > 0,
                               activation_checkpointing=ckpt or getattr(c, r).activation_checkpointing)
        src = replace(c.source_teacher, zero_stage=3 if frozen3 else 0)
        new = replace(new, student=roles["student"], fake_teacher=roles["fake_teacher"],
                      target_teacher=roles["target_teacher"], source_teacher=src,
                      placement=replace(c.placement, mode="split" if split else "colocated",
                                        student=None, fake_teacher=None, source_teacher=None, target_teacher=None))
        return new

    ladder = [
        ("ZeRO-2 for the trainable roles", dict(stage=2)),
        ("ZeRO-3 everywhere, the source teacher partitioned", dict(stage=3, frozen3=True)),
        ("ZeRO-3 + activation checkpointing", dict(stage=3, frozen3=True, ckpt=True)),
        ("ZeRO-3 + activation checkpointing + optimizer offload", dict(stage=3, frozen3=True, ckpt=True, offload=True)),
        ("split placement, ZeRO-2 + activation checkpointing + optimizer offload",
         dict(stage=2, ckpt=True, offload=True, split=True)),
    ]
    for text, kw in ladder:
        if kw.get("split") and world_size < 2:
            continue
        if kw.get("stage") == 3 and cfg.student.ema > 0:
            continue
        try:
            p = make_plan(with_stage(cfg, **kw), world_size, None)
        except UserError:
            continue
        if max(p.per_rank_bytes.values()) <= 0.9 * gpu_memory:
            return text
    return f"nothing fits {gpu_memory / GIB:.0f} GiB per rank at {world_size} ranks; add ranks or use LoRA (student.lora.rank)"


def format_plan(plan: Plan) -> str:
    lines = [f"plan: {plan.world_size} ranks, placement {plan.placement}"]
    lines.append(f"{'role':15} {'ranks':>9} {'params':>9} {'train':>9} {'prec':>13} {'ZeRO':>5} "
                 f"{'states/rank':>12} {'host/rank':>10} {'activ.':>10} {'TFLOP/it':>9}")
    for r in plan.roles.values():
        ranks = f"{min(r.ranks)}-{max(r.ranks)}" if len(r.ranks) > 1 else str(r.ranks[0])
        stage = "-" if r.zero_stage is None else str(r.zero_stage)
        lines.append(f"{r.name:15} {ranks:>9} {r.params / 1e6:8.1f}M {r.trainable / 1e6:8.1f}M {r.precision:>13} "
                     f"{stage:>5} {r.model_state_bytes / GIB:10.2f}Gi {r.host_bytes / GIB:8.2f}Gi "
                     f"{r.activation_bytes / GIB:8.2f}Gi {r.flops_per_iteration / 1e12:9.3f}")
        for n in r.notes:
            lines.append(f"{'':15}   {n}")
    lines.append(f"text encoders + VAE (replicated, fp32): {plan.frozen_helpers_bytes / GIB:.2f} GiB per rank")
    worst = max(plan.per_rank_bytes, key=plan.per_rank_bytes.get)
    lines.append(f"largest rank: {worst} with {plan.per_rank_bytes[worst] / GIB:.2f} GiB "
                 "(model states + the largest role's activations + helpers)")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.gpu_memory / GIB:.0f} GiB per rank (90 % usable)")
        if plan.recommendation:
            lines.append(f"recommended: {plan.recommendation}")
    return "\n".join(lines)
