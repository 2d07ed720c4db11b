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
  declares (``Method.passes``: Uni-DAD's student generation and its backward-simulation draws, DMD teachers
  with CFG, GAN passes, fake/target updates, the update ratio and gradient accumulation) — the passes the
  step makes, read from the same iteration plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from unidad_dist.errors import UserError
from unidad_dist.models.adapters import apply_train_filter, prepare_trainable
from unidad_dist.models.backbones import build_unet, resolve_backbone
from unidad_dist.models.roles import RoleNet
from unidad_dist.parallel.engines import bucket_elements
from unidad_dist.parallel.placement import resolve_groups

GIB = 1024 ** 3
_COST_CACHE: dict = {}


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


def _build_meta(cfg, role_spec, spec):
    """A role's network on the meta device, with its heads and its trainable-side options (LoRA, ...)."""
    rc = getattr(cfg, role_spec.name)
    rspec = resolve_backbone(rc.backbone, role_spec.name) if getattr(rc, "backbone", None) else spec
    with torch.device("meta"):
        unet = build_unet(rspec)
        heads = role_spec.heads(rspec.unet_config) if role_spec.heads is not None else None
    if role_spec.trainable:
        unet = prepare_trainable(unet, rc, role_spec.name, cfg.run.seed)
    net = RoleNet(unet, heads)
    if role_spec.trainable and role_spec.train_filter is not None:
        apply_train_filter(net, role_spec.train_filter, role_spec.name)
    return net, rspec


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


def make_plan(cfg, world_size: int, gpu_memory: Optional[int] = None) -> Plan:
    """Every role the recipe's method declares, sized from configs: parameters and model states (its ZeRO
    stage, precision, placement), and — from the method's ``passes`` over ``plan_period`` iterations — FLOPs
    per iteration and the activations each role's step holds."""
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    method = cfg.method
    groups = resolve_groups(cfg, world_size)
    try:
        spec = resolve_backbone(getattr(cfg, method.primary).backbone, method.primary)
    except UserError as e:
        raise UserError(f"{e} (to plan without the weights, point it at the shipped configs: "
                        f"{method.primary}.backbone=configs/sd15 or configs/sdxl)") from None
    text = _text_dims(spec)
    b = cfg.train.batch_size
    period = method.plan_period(cfg)
    schedules = [method.passes(cfg, it, text is not None) for it in range(period)]

    roles: dict[str, RolePlan] = {}
    costs: dict = {}  # role -> cost(grad, discriminate, batch)
    for rs in method.roles(cfg):
        role, rc = rs.name, getattr(cfg, rs.name)
        net, rspec = _build_meta(cfg, rs, spec)
        trainable = rs.trainable
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
                                         ema=rs.ema > 0)
        else:
            w = _weight_bytes(rc.precision)
            small_frozen = sum(p.numel() for p in net.parameters() if p.numel() < rc.zero3_persistence_threshold)
            ms = ((n_all - small_frozen) * w / n + small_frozen * w) if stage == 3 else n_all * w
            host = 0.0
        lora = getattr(rc, "lora", None)
        arch = (str(rspec.unet_dir), rs.heads is not None, trainable, lora.rank if lora else 0,
                tuple(lora.target_modules) if lora else (), getattr(rc, "activation_checkpointing", False), str(dtype),
                repr(text), rs.train_filter is not None and role)

        def cost(grad, disc=False, batch=b, net=net, rspec=rspec, arch=arch, dtype=dtype):
            key = arch + (grad, disc, batch)  # roles and plans with the same network share the meta passes
            if key not in _COST_CACHE:
                _COST_CACHE[key] = pass_cost(net, rspec, batch, text, grad, disc, dtype)
            return _COST_CACHE[key]

        costs[role] = (cost, trainable)
        notes = []
        if getattr(rc, "activation_checkpointing", False):
            notes.append("activation checkpointing on (activations as measured with it on the meta device)")
        roles[role] = RolePlan(role, ranks, n_all, n_train, rc.precision, stage, ms, host, 0.0, 0.0, notes)

    # FLOPs: every pass, averaged over the period; activations: per phase (the role whose step holds them),
    # the bytes saved by that phase's passes on each rank, the largest micro-batch of any iteration
    phase_bytes: dict = {}  # (phase, role running the pass) -> bytes, max over micro-batches
    for passes in schedules:
        for micro in passes:
            here: dict = {}
            for p in micro:
                cost, trainable = costs[p.role]
                c = cost(p.grad, p.discriminate, b * p.batch)
                roles[p.role].flops_per_iteration += p.count * (c.fwd + c.bwd) / period
                if p.grad == "none":
                    continue
                # a trainable network's forward saves tensors as for training, whatever the gradient is for
                saved = cost("both", p.discriminate, b * p.batch).saved if (p.grad == "input" and trainable) else c.saved
                key = (p.phase or p.role, p.role)
                here[key] = here.get(key, 0) + p.count * saved
            for key, v in here.items():
                phase_bytes[key] = max(phase_bytes.get(key, 0), v)
    for (phase, runner), v in phase_bytes.items():
        if phase in roles and set(roles[runner].ranks) & set(roles[phase].ranks):
            roles[phase].activation_bytes += v
        if runner != phase:
            roles[runner].notes.append(f"its passes in the {phase} step hold {v / 2 ** 20:.1f} MiB for backward "
                                       "(an input-gradient graph), on its ranks")
    helpers = _helpers_bytes(spec)
    per_rank = {}
    for r in range(world_size):
        held = [p for p in roles.values() if r in p.ranks]
        act = {}
        for (phase, runner), v in phase_bytes.items():
            if r in roles[runner].ranks:
                act[phase] = act.get(phase, 0) + v
        per_rank[r] = sum(p.model_state_bytes for p in held) + max(act.values(), default=0) + helpers
    plan = Plan(world_size, cfg.placement.mode, roles, helpers, per_rank, gpu_memory)
    if plan.fits is False:
        plan.recommendation = recommend(cfg, world_size, gpu_memory)
    return plan


def recommend(cfg, world_size: int, gpu_memory: int) -> str:
    """The first of a ladder of cheaper layouts that fits."""
    from dataclasses import replace

    specs = cfg.method.roles(cfg)

    def with_stage(c, stage, frozen3=False, offload=False, ckpt=False, split=False):
        changes = {}
        for rs in specs:
            rc = getattr(c, rs.name)
            if rs.trainable:
                changes[rs.name] = replace(rc, zero_stage=stage, offload_optimizer=offload and stage > 0,
                                           activation_checkpointing=ckpt or rc.activation_checkpointing)
            else:
                changes[rs.name] = replace(rc, zero_stage=3 if frozen3 else 0)
        groups = {r: None for r in cfg.method.role_sections()}
        changes["placement"] = replace(c.placement, mode="split" if split else "colocated", **groups)
        return replace(c, **changes)

    ladder = [
        ("ZeRO-2 for the trainable roles", dict(stage=2)),
        ("ZeRO-3 everywhere, the frozen roles partitioned", dict(stage=3, frozen3=True)),
        ("ZeRO-3 + activation checkpointing", dict(stage=3, frozen3=True, ckpt=True)),
        ("ZeRO-3 + activation checkpointing + optimizer offload", dict(stage=3, frozen3=True, ckpt=True, offload=True)),
        ("split placement, ZeRO-2 + activation checkpointing + optimizer offload",
         dict(stage=2, ckpt=True, offload=True, split=True)),
    ]
    for text, kw in ladder:
        if kw.get("split") and world_size < 2:
            continue
        if kw.get("stage") == 3 and any(rs.ema > 0 for rs in specs):
            continue
        try:
            p = make_plan(with_stage(cfg, **kw), world_size, None)
        except UserError:
            continue
        if max(p.per_rank_bytes.values()) <= 0.9 * gpu_memory:
            return text
    lora = " or use LoRA (" + ", ".join(f"{rs.name}.lora.rank" for rs in specs if rs.trainable) + ")"
    return f"nothing fits {gpu_memory / GIB:.0f} GiB per rank at {world_size} ranks; add ranks{lora}"


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
