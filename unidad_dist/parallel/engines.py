"""DeepSpeed engines for roles, applied from outside the models (docs/design.md "DeepSpeed with four networks").

* One engine per trainable role the method declares (Uni-DAD: the student; the fake teacher with its GAN
  heads, one module, so one engine and one optimizer; the online target teacher). ZeRO stage 0-3 per role.
* A frozen teacher is replicated (a plain role) or, with ``zero_stage: 3``, partitioned by a ZeRO-3
  engine without an optimizer.
* The DeepSpeed config is generated from the recipe. A user's JSON (``<role>.deepspeed_config``) may set
  any other field (bucket sizes, overlap, ...) and may repeat a recipe-derived field only with the same
  value: a contradiction is an error that names both.
* Another role's network is called through ``engine.module`` (under no_grad, or for an input-gradient
  with ``torch.autograd.grad(..., x)``): calling an engine inside another engine's graph breaks ZeRO's
  gradient hooks. A role's own loss goes through its engine.
* Each engine has its own gradient-accumulation boundary: ``backward`` runs DeepSpeed's micro-step for
  every micro-batch but the last, ``step(iteration)`` sets the LR (a pure function of the iteration) and
  takes the boundary step.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from unidad_dist import device as dev
from unidad_dist.errors import UserError
from unidad_dist.models.roles import Role
from unidad_dist.parallel.ds_io import (TAG, UNIVERSAL_TAG, import_deepspeed, make_safe_checkpoint_engine,
                                        safe_torch_load)


def warmup_lr(base_lr: float, warmup: int, iteration: int, schedule: str = "constant", total: int = 0,
              final_ratio: float = 0.0) -> float:
    """The learning rate of ``iteration`` (0-based): a linear warmup counted in iterations, then constant (the
    paper: docs/algorithm.md §5, §10.5) or, with ``schedule`` "linear" / "cosine", decayed from ``base_lr``
    after the warmup to ``base_lr * final_ratio`` at iteration ``total`` (and held there beyond it)."""
    if warmup > 0 and iteration + 1 < warmup:
        return base_lr * min(1.0, (iteration + 1) / warmup)  # this rounding order: results as before the schedules
    if schedule == "constant":
        return base_lr
    start = max(warmup - 1, 0)  # the first iteration at the full learning rate
    frac = min(1.0, max(0.0, (iteration - start) / max(total - start, 1)))
    shape = 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return base_lr * (final_ratio + (1.0 - final_ratio) * shape)


def init_distributed(rt) -> None:
    """DeepSpeed's comm layer on top of the process group ``runtime_from_env`` started (any launcher)."""
    import datetime

    ds = import_deepspeed()
    ds.init_distributed(dist_backend=rt.backend, auto_mpi_discovery=False, verbose=False,
                        timeout=datetime.timedelta(seconds=rt.dist_timeout))


# ------------------------------------------------------------------------------------------------
# Config generation and user overrides
# ------------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def recipe_fields(role: str, rc, cfg, dp_size: int, trainable: bool) -> dict:
    """The DeepSpeed fields that follow from the recipe (flat keys); a user JSON may not contradict them."""
    stage = rc.zero_stage
    gas = rc.grad_accum if trainable else 1
    f: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.train.batch_size * gas * dp_size,
        "zero_optimization.stage": stage,
        "bf16.enabled": rc.precision == "bf16",
        "fp16.enabled": rc.precision == "fp16",
        # its check is a world all-reduce (split groups save different engines); we keep our own pointer
        "checkpoint.tag_validation": "Ignore",
    }
    if stage == 3:
        f["zero_optimization.stage3_param_persistence_threshold"] = rc.zero3_persistence_threshold
    if trainable:
        opt = rc.optimizer
        f.update({
            "optimizer.type": "AdamW",
            "optimizer.params.lr": opt.lr,
            "optimizer.params.betas": list(opt.betas),
            "optimizer.params.eps": opt.eps,
            "optimizer.params.weight_decay": opt.weight_decay,
            "gradient_clipping": opt.clip_grad_norm if opt.clip_grad_norm > 0 else 0.0,
        })
        if stage > 0:
            f["zero_optimization.offload_optimizer.device"] = dev.CPU.type if rc.offload_optimizer else "none"
        if stage in (1, 2):  # DeepSpeed's switch to skip the norm there; every step logs it
            f["zero_optimization.compute_grad_norm"] = True
    return f


def bucket_elements(n_params: Optional[int]) -> int:
    """ZeRO communication buckets: 1/16 of the engine's parameters, but the whole engine up to 16 Mi elements
    (at least 64 Ki, at most DeepSpeed's default 5e8 elements). DeepSpeed's fixed default is 2 GB in fp32 and
    is allocated up front (whole, on every rank) under ZeRO-3, which would dominate the per-rank memory of any
    model below ~10 B params. Below 256 M parameters a sixteenth makes 16+ small reductions per backward,
    each a collective's fixed latency: one bucket per role took the 2-rank ZeRO-2 iteration from 1.09-1.24x
    a hand-written DDP loop to 1.06-1.09x (benchmarks/framework_overhead.py --nproc 2), for at most 64 MiB."""
    if n_params is None:
        return int(5e8)
    return int(max(2 ** 16, min(n_params, 2 ** 24), min(5e8, n_params // 16)) // 1024 * 1024)  # a multiple of every alignment ZeRO asks


def default_fields(trainable: bool, n_params: Optional[int] = None) -> dict:
    """Fields we choose but a user JSON may change."""
    bucket = bucket_elements(n_params)
    f: dict[str, Any] = {
        "zero_optimization.reduce_bucket_size": bucket,
        "zero_optimization.allgather_bucket_size": bucket,
        "zero_optimization.stage3_prefetch_bucket_size": bucket,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if trainable:
        # torch's AdamW: no JIT build of fused/CPU Adam (a user JSON may switch to them on GPUs)
        f["optimizer.params.torch_adam"] = True
        f["zero_force_ds_cpu_optimizer"] = False
    return f


def read_user_config(path: Optional[str], role: str) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{role}.deepspeed_config '{path}' not found; give a DeepSpeed JSON file or leave it unset")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{role}.deepspeed_config '{path}' is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{role}.deepspeed_config '{path}' must hold a JSON object")
    return data


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


RECIPE_KEY = {  # which recipe key a DeepSpeed field comes from, for the error message
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "{role}.grad_accum",
    "train_batch_size": "train.batch_size x {role}.grad_accum x ranks",
    "zero_optimization.stage": "{role}.zero_stage",
    "bf16.enabled": "{role}.precision",
    "fp16.enabled": "{role}.precision",
    "zero_optimization.stage3_param_persistence_threshold": "{role}.zero3_persistence_threshold",
    "optimizer.type": "(AdamW, the method's optimizer)",
    "optimizer.params.lr": "{role}.optimizer.lr",
    "optimizer.params.betas": "{role}.optimizer.betas",
    "optimizer.params.eps": "{role}.optimizer.eps",
    "optimizer.params.weight_decay": "{role}.optimizer.weight_decay",
    "gradient_clipping": "{role}.optimizer.clip_grad_norm",
    "zero_optimization.offload_optimizer.device": "{role}.offload_optimizer",
    "zero_optimization.compute_grad_norm": "(true: every step logs {role}/grad_norm, the norm before clipping)",
    "checkpoint.tag_validation": "(Ignore: the check is a world all-reduce; the run keeps its own pointer)",
}


def engine_config(role: str, rc, cfg, dp_size: int, trainable: bool, n_params: Optional[int] = None) -> dict:
    """The generated DeepSpeed config with the user's JSON merged in (contradictions are errors)."""
    fixed = recipe_fields(role, rc, cfg, dp_size, trainable)
    merged = {**default_fields(trainable, n_params), **fixed}
    user = read_user_config(getattr(rc, "deepspeed_config", None), role)
    for key in ("scheduler",):
        if key in user:
            raise UserError(
                f"{role}.deepspeed_config sets '{key}', but the LR schedule comes from the recipe "
                f"({role}.optimizer.lr and .warmup, counted in iterations); remove '{key}' from the JSON"
            )
    for key, value in _flatten(user).items():
        if value == "auto":  # the Hugging Face convention: take the value from the recipe
            continue
        if key in fixed and not _same(value, fixed[key]):
            raise UserError(
                f"{role}.deepspeed_config sets {key}={value!r} but the recipe gives {fixed[key]!r} "
                f"(from {RECIPE_KEY.get(key, key).format(role=role)}); change the recipe, or remove the field from the JSON"
            )
        if key.startswith("optimizer.") and key not in merged and key.split(".")[1] != "params":
            raise UserError(f"{role}.deepspeed_config: the optimizer is AdamW from the recipe; remove '{key}'")
        merged[key] = value
    return _unflatten(merged)


# ------------------------------------------------------------------------------------------------
# Roles behind engines
# ------------------------------------------------------------------------------------------------
def _initialize(net: nn.Module, config: dict, params=None, mpu=None):
    ds = import_deepspeed()
    kwargs: dict[str, Any] = {"model": net, "config": config, "dist_init_required": False}
    if params is not None:
        kwargs["model_parameters"] = params
    if mpu is not None:
        kwargs["mpu"] = mpu
    engine, optimizer, _, _ = ds.initialize(**kwargs)
    engine.checkpoint_engine = make_safe_checkpoint_engine(engine._config)
    return engine, optimizer


class EngineRole(Role):
    """A trainable role behind its own DeepSpeed engine (same interface as a plain role)."""

    def __init__(self, role: Role, rc, cfg, rt, dp_size: int, ema: float = 0.0, mpu=None):
        self.name = role.name
        self.precision = role.precision
        self.device = role.device
        self.trainable = True
        self.grad_accum = rc.grad_accum
        self.opt_cfg = rc.optimizer
        self.total_iterations = cfg.train.iterations  # where a decaying schedule reaches its final rate
        self.stage = rc.zero_stage
        net = role.module.train()
        self.ema_decay = ema
        self.ema: Optional[nn.Module] = None
        params = [p for p in net.parameters() if p.requires_grad]
        self.config = engine_config(role.name, rc, cfg, dp_size, trainable=True,
                                    n_params=sum(p.numel() for p in net.parameters()))
        self.engine, self.optimizer = _initialize(net, self.config, params, mpu)
        self.module = self.engine.module
        # the EMA: below ZeRO-3 an fp32 copy of the whole network (after the engine broadcast rank 0's weights);
        # at ZeRO-3 sharded like the weights: each rank the fp32 EMA of its own partition of each trainable parameter
        # (``ema_parts``), gathered only to sample, export and write the whole-weights file
        self.ema_parts: Optional[dict[str, torch.Tensor]] = None
        if ema > 0 and self.stage == 3:
            zero = self.config.get("zero_optimization", {})
            if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1 or (zero.get("offload_param") or {}).get(
                    "device", "none") not in ("none", None):
                raise UserError(f"{role.name}.ema at ZeRO-3 keeps the EMA in the weights' partitions, which "
                                "zero_hpz_partition_size > 1 and offload_param move elsewhere; remove them from "
                                f"{role.name}.deepspeed_config or set {role.name}.ema=0")
            self.ema_parts = {n: self._local_fp32(p).detach().clone() for n, p in self._trained()}
        elif ema > 0:
            self.ema = copy.deepcopy(self.module).float().eval().requires_grad_(False)
        self._micro = 0
        self.last_lr = self._lr(0)

    def _lr(self, iteration: int) -> float:
        o = self.opt_cfg
        return warmup_lr(o.lr, o.warmup, iteration, o.schedule, self.total_iterations, o.final_lr_ratio)

    def train_forward(self, x_t, t, cond) -> torch.Tensor:
        with self.autocast():
            return self.engine(x_t, t, cond)

    def train_discriminate(self, x_t, t, cond) -> torch.Tensor:
        with self.autocast():
            return self.engine(x_t, t, cond, discriminate=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self._micro += 1
        if self._micro % self.grad_accum:
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def step(self, iteration: int) -> dict:
        if self._micro % self.grad_accum:
            raise RuntimeError(f"{self.name}: step() after {self._micro % self.grad_accum} of {self.grad_accum} micro-batches")
        lr = self._lr(iteration)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        scale = self._grad_scale()
        own_norm = self._whole_grad_norm() / scale if self.stage == 0 else None
        self.engine.step()
        self.last_lr = lr
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.module.parameters()):
                    e.lerp_(p.detach().float(), 1 - self.ema_decay)
        if self.ema_parts is not None:
            with torch.no_grad():
                for n, p in self._trained():
                    self.ema_parts[n].lerp_(self._local_fp32(p), 1 - self.ema_decay)
        return {"grad_norm": own_norm if own_norm is not None else self._zero_grad_norm(scale), "lr": lr}

    # -- the logged gradient norm: the global 2-norm of the gradient the step applies, before clipping ----------
    def _grad_scale(self) -> float:
        """The factor the gradients carry before the step: the fp16 loss scale (DeepSpeed's fp16 optimizers,
        or its GradScaler under its own torch_autocast at stage 0); 1 for fp32 and bf16."""
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            return float(scaler.get_scale())
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0))

    def _whole_grad_norm(self) -> float:
        """Stage 0: every rank holds the whole gradient on the module, already averaged over the role's
        ranks (DeepSpeed all-reduces it in the boundary backward). DeepSpeed keeps no norm for an fp32 engine
        here (it clips without storing one: it was logged as 0.0), and its bf16/fp16 optimizer's norm is
        that of the loss-scaled low-precision gradients; so it is ours to take, in fp32."""
        grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads])
        return float(torch.linalg.vector_norm(norms, 2))

    def _zero_grad_norm(self, scale_before: float) -> float:
        """Stages 1-3: the ZeRO optimizer's norm, computed at the step before clipping over the partitioned
        gradients and all-reduced over the role's ranks (stage 1/2: ``scaled_global_norm``, kept on because
        ``compute_grad_norm`` is a recipe field; stage 3: ``_get_norm_groups``). Stage 3 divides by the
        loss scale after its update (fp16 only: a step that raises the scale would halve the norm), so undo that."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(f"{self.name}: DeepSpeed kept no gradient norm at ZeRO stage {self.stage} "
                               f"({type(self.engine.optimizer).__name__}); grad_norm cannot be logged")
        norm = float(norm)
        if self.stage == 3:
            norm *= self._grad_scale() / scale_before
        return norm

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self._micro = 0

    # -- the sharded EMA (ZeRO-3) ------------------------------------------------------------------------------
    def _trained(self):
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @staticmethod
    def _local_fp32(p) -> torch.Tensor:
        """This rank's fp32 master partition of a ZeRO-3 parameter (a flat slice of the flattened parameter)."""
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).detach().float().view(-1)

    @staticmethod
    def _gather_part(p, part: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's flat partition of ``p`` (a collective over its ZeRO-3 group)."""
        group = p.ds_process_group
        parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)

    @staticmethod
    def _own_part(p, whole: torch.Tensor) -> torch.Tensor:
        """This rank's flat partition of a whole tensor laid out as ZeRO-3 partitions ``p`` (padded with zeros)."""
        size = p.ds_tensor.numel()
        start = size * torch.distributed.get_rank(p.ds_process_group)
        flat = whole.detach().float().reshape(-1)[start:start + size]
        return torch.cat([flat, flat.new_zeros(size - flat.numel())]) if flat.numel() < size else flat.clone()

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA (a collective at ZeRO-3: every rank calls it), keys as the module's state_dict."""
        if self.ema is not None:
            return self.ema.state_dict()
        sd = gathered_state_dict(self.module, self.stage)  # frozen parameters and buffers: as they are
        for n, p in self._trained():
            sd[n] = self._gather_part(p, self.ema_parts[n].to(p.ds_tensor.device)).to(dev.CPU)
        return sd

    @contextlib.contextmanager
    def inference_weights(self, use_ema: bool = True):
        """The module to sample with: the EMA when kept and ``use_ema``, else the trained module. At ZeRO-3 the
        EMA partitions stand in for the weights' own inside the context (memory stays sharded; the layers
        gather them as in training), in the weights' dtype; every rank of the role must enter it."""
        if not use_ema or self.ema_parts is None:
            yield self.ema if (use_ema and self.ema is not None) else self.module
            return
        # every parameter, persistent ones included, is released to its partition: the layers gather the swapped
        # partitions, not weights they kept from training
        self.engine.empty_partition_cache()
        saved = []
        try:
            with torch.no_grad():
                for n, p in self._trained():
                    saved.append((p, p.ds_tensor.data))
                    p.ds_tensor.data = self.ema_parts[n].to(p.ds_tensor.device, p.ds_tensor.dtype)
            yield self.module
        finally:
            self.engine.empty_partition_cache()
            for p, ds_data in saved:
                p.ds_tensor.data = ds_data

    def inference_module(self) -> nn.Module:
        return self.ema if self.ema is not None else self.module

    def read_params(self, prefix: str) -> list[torch.Tensor]:
        if self.stage < 3:
            return super().read_params(prefix)
        params = [p for n, p in self.module.named_parameters() if n.startswith(prefix)]
        with import_deepspeed().zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().float().clone() for p in params]

    # -- state ----------------------------------------------------------------------------------
    def full_weights(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Whole (gathered) weights on every rank; a collective under ZeRO-3."""
        return gathered_state_dict(self.module, self.stage, copy)

    def extra_weights(self) -> dict[str, torch.Tensor]:
        """What the whole-weights file adds to the module's weights: the EMA (a collective at ZeRO-3)."""
        if self.ema is None and self.ema_parts is None:
            return {}
        return {f"ema.{k}": v for k, v in self.ema_state_dict().items()}

    @property
    def keeps_extra(self) -> bool:
        return self.ema is not None or self.ema_parts is not None

    def load_extra_weights(self, sd: dict[str, torch.Tensor]) -> None:
        ema = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
        if self.ema is not None:
            self.ema.load_state_dict(ema)
        if self.ema_parts is not None:  # re-partitioned for this world size, whatever the saving one was
            for n, p in self._trained():
                self.ema_parts[n] = self._own_part(p, ema[n]).to(self.ema_parts[n].device)

    def save_state(self, folder: Path) -> None:
        """All ranks: engine, optimizer, fp32 partitions and counters into ``folder`` (explicit tag), with the
        ``universal_checkpoint_info`` that DeepSpeed's universal checkpoint conversion (ds_to_universal)
        requires — no tensor or pipeline parallelism inside a role, so no merge patterns."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False,
                                    client_state={UNIVERSAL_CHECKPOINT_INFO: info})

    def load_state(self, folder: Path, universal: bool = False) -> None:
        """Load this role's state; ``universal``: from ``folder/universal`` (``to_universal``), written at
        another world size — weights, fp32 master copies and Adam moments, re-partitioned over this run's
        ranks (never ``load_module_only``, which under ZeRO-3 silently keeps the initial weights)."""
        self.engine._config.load_universal_checkpoint = universal
        try:
            with safe_torch_load():
                path, _ = self.engine.load_checkpoint(str(folder), tag=UNIVERSAL_TAG if universal else TAG,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"checkpoint of role {self.name} in {folder} could not be loaded; it is incomplete")
        self._micro = 0


class PartitionedRole(Role):
    """A frozen teacher partitioned over the ranks by a ZeRO-3 engine without an optimizer. Every rank
    must make the same calls (true in colocated placement: all ranks run the same network passes)."""

    def __init__(self, role: Role, rc, cfg, rt, dp_size: int, mpu=None):
        self.name = role.name
        self.precision = role.precision
        self.device = role.device
        self.trainable = False
        self.grad_accum = 1
        self.config = engine_config(role.name, rc, cfg, dp_size, trainable=False,
                                    n_params=sum(p.numel() for p in role.module.parameters()))
        self.engine, _ = _initialize(role.module, self.config, None, mpu)
        self.module = self.engine.module.eval()


def gathered_state_dict(module: nn.Module, stage: int, copy: bool = True) -> dict[str, torch.Tensor]:
    """The whole weights on the host. ``copy=False`` (below ZeRO-3) may return the parameters' own host
    storage: for a caller that only reads them before the next step (a checkpoint write)."""
    if stage < 3:
        if not copy:
            return {k: v.detach().to(dev.CPU) for k, v in module.state_dict().items()}
        return {k: v.detach().to(dev.CPU).clone() for k, v in module.state_dict().items()}
    ds = import_deepspeed()
    with ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().to(dev.CPU).clone() for k, v in module.state_dict().items()}


def engine_roles(cfg) -> dict[str, bool]:
    """Roles that get an engine -> trainable? Every trainable role, then every frozen role partitioned
    by ZeRO-3, in the method's declared order."""
    specs = cfg.method.roles(cfg)
    out = {s.name: True for s in specs if s.trainable}
    out.update({s.name: False for s in specs if not s.trainable and getattr(cfg, s.name).zero_stage == 3})
    return out


def check_engine_configs(cfg, groups: dict[str, list[int]]) -> None:
    """Generate every engine's config (reading the users' JSON files) before anything is built."""
    for role, trainable in engine_roles(cfg).items():
        engine_config(role, getattr(cfg, role), cfg, len(groups[role]), trainable)


def attach(models, cfg, rt, placement=None) -> None:
    """Put the trainable roles (and ZeRO-3 frozen roles) this rank holds behind engines, in place (in
    ``models.roles``). In split placement every engine's data-parallel group is its side's rank group (one
    shared mpu). ``placement``: default the one ``models`` was built for."""
    placement = placement if placement is not None else getattr(models, "placement", None)
    init_distributed(rt)
    mpu = placement.mpu if placement is not None else None
    from deepspeed.utils import groups as ds_groups

    ds_groups.mpu = mpu  # DeepSpeed keeps one module-level mpu: set it for this run (None: the world)
    specs = {s.name: s for s in cfg.method.roles(cfg)}
    for role, trainable in engine_roles(cfg).items():
        current = models.roles.get(role)
        if current is None:  # held by the other group
            continue
        dp = len(placement.groups[role]) if placement is not None else rt.world_size
        rc = getattr(cfg, role)
        if trainable:
            wrapped = EngineRole(current, rc, cfg, rt, dp, ema=specs[role].ema, mpu=mpu)
        else:
            wrapped = PartitionedRole(current, rc, cfg, rt, dp, mpu=mpu)
        models.roles[role] = wrapped
