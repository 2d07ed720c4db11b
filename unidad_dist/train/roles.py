"""Roles own their networks, precision and optimizers behind one interface.

The train loop and the method only call ``role.forward``/``role.features``, ``role.autocast()``,
``role.backward(loss)``, ``role.step(iteration)`` and ``role.state_dict()``; a DeepSpeed engine per role
implements the same interface (``parallel/``), so the loop does not change when engines slot in.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from unidad_dist import device as dev
from unidad_dist.config import OptimizerConfig
from unidad_dist.models.backbones import encoder_features, unet_forward


class Role:
    """A network with a name and a precision policy (frozen or trainable)."""

    trainable = False

    def __init__(self, name: str, module: nn.Module, precision: str, device: torch.device):
        self.name = name
        self.precision = precision
        self.device = device
        if precision == "bf16":
            module = module.to(torch.bfloat16)
        self.module = module.to(device)

    @property
    def unet(self) -> nn.Module:
        return self.module["unet"] if isinstance(self.module, nn.ModuleDict) else self.module

    @property
    def heads(self) -> nn.Module:
        return self.module["heads"]

    def autocast(self, force_fp32: bool = False):
        if force_fp32:
            return dev.no_autocast(self.device)
        return dev.autocast(self.device, enabled=self.precision == "bf16_autocast")

    def forward(self, x_t, t, cond, force_fp32: bool = False) -> torch.Tensor:
        with self.autocast(force_fp32):
            return unet_forward(self.unet, x_t, t, cond)

    def discriminate(self, x_t, t, cond) -> torch.Tensor:
        with self.autocast():
            return self.heads(encoder_features(self.unet, x_t, t, cond)).float()


class FrozenRole(Role):
    def __init__(self, name: str, module: nn.Module, precision: str, device: torch.device):
        super().__init__(name, module.eval().requires_grad_(False), precision, device)


def warmup_lr(base_lr: float, warmup: int, iteration: int) -> float:
    """Constant LR after a linear warmup counted in iterations (algorithm.md §5, §10.5)."""
    if warmup <= 0:
        return base_lr
    return base_lr * min(1.0, (iteration + 1) / warmup)


class TrainableRole(Role):
    """A trainable role with AdamW, iteration-counted warmup, gradient accumulation and clipping.

    ``precision='bf16'`` keeps bf16 weights in the module and an fp32 master copy that the optimizer
    updates (the same contract as DeepSpeed's bf16 mode)."""

    trainable = True

    def __init__(self, name: str, module: nn.Module, precision: str, device: torch.device,
                 opt: OptimizerConfig, grad_accum: int, world_size: int = 1, ema: float = 0.0):
        super().__init__(name, module.train(), precision, device)
        self.opt_cfg = opt
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.master: Optional[list[torch.Tensor]] = None
        if precision == "bf16":
            # new fp32 leaf tensors owned by the optimizer (the module's own parameters are not touched)
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        opt_params = self.master if self.master is not None else self.params
        self.optimizer = torch.optim.AdamW(opt_params, lr=warmup_lr(opt.lr, opt.warmup, 0), betas=tuple(opt.betas),
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        self.ema_decay = ema
        self.ema: Optional[nn.Module] = None
        if ema > 0:
            self.ema = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.last_lr = warmup_lr(opt.lr, opt.warmup, 0)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def _sync_grads(self) -> None:
        if self.world_size <= 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)  # one collective per role and step, not one per tensor
        torch.distributed.all_reduce(flat)
        flat.div_(self.world_size)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def step(self, iteration: int) -> dict:
        self._sync_grads()
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.detach().float()
        opt_params = self.master if self.master is not None else self.params
        grads = [p for p in opt_params if p.grad is not None]
        clip = self.opt_cfg.clip_grad_norm
        if grads:
            norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
        else:
            norm = torch.zeros(())
        lr = warmup_lr(self.opt_cfg.lr, self.opt_cfg.warmup, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m.to(p.dtype))
        for p in self.params:
            p.grad = None
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.module.parameters()):
                    e.lerp_(p.to(e.dtype), 1 - self.ema_decay)
        self.last_lr = lr
        return {"grad_norm": float(norm), "lr": lr}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def inference_module(self) -> nn.Module:
        """The weights to sample/export with: the EMA when enabled."""
        return self.ema if self.ema is not None else self.module

    # -- checkpointing --------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        sd = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if self.master is not None:
            names = [n for n, p in self.module.named_parameters() if p.requires_grad]
            sd.update({f"master.{n}": m.detach() for n, m in zip(names, self.master)})
        if self.ema is not None:
            sd.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return sd

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("module.")})
        if self.master is not None:
            names = [n for n, p in self.module.named_parameters() if p.requires_grad]
            with torch.no_grad():
                for n, m in zip(names, self.master):
                    m.copy_(sd[f"master.{n}"])
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("ema.")})

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "last_lr": self.last_lr}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_lr = state["last_lr"]
