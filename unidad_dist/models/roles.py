"""A role's network and precision policy behind one interface (no distribution: engines wrap it from
``parallel/``).

The method only calls ``role.forward`` / ``role.discriminate`` (another role's network, no update),
``role.train_forward`` / ``role.train_discriminate`` (the role's own loss), ``role.backward(loss)``,
``role.step(iteration)`` and ``role.autocast()``. ``build`` makes plain roles (the warm start runs on
them); ``parallel.engines.attach`` then puts every trainable role behind a DeepSpeed engine and, when
asked, a frozen teacher behind a ZeRO-3 partitioning engine. The method does not change.
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch
from torch import nn

from unidad_dist import device as dev
from unidad_dist.models.backbones import encoder_features, unet_forward


class RoleNet(nn.Module):
    """A role's network as one module: the UNet, plus the heads a method gives the role (Uni-DAD: the fake
    teacher's GAN heads).

    ``forward(x_t, t, cond)`` is the raw prediction; ``forward(..., discriminate=True)`` runs only the
    encoder and returns the heads' logits. One module, so one engine serves both passes.

    ``tokens``: the trainable embedding of the run's new token (``conditioning.TokenRows``), when the method gives
    it to this role; a condition of token ids (``TextConditioner.tokenize``) is then encoded here, with
    gradients to it."""

    def __init__(self, unet: nn.Module, heads: Optional[nn.Module] = None, tokens: Optional[nn.Module] = None):
        super().__init__()
        self.unet = unet
        self.heads = heads
        self.tokens = tokens

    def forward(self, x_t, t, cond=None, discriminate: bool = False):
        if cond and "input_ids" in cond:
            cond = self.tokens(cond)
        if discriminate:
            return self.heads(encoder_features(self.unet, x_t, t, cond)).float()
        return unet_forward(self.unet, x_t, t, cond)


class Role:
    """A plain (un-engined) role: a RoleNet on this rank's device with a precision policy."""

    engine = None

    def __init__(self, name: str, net: RoleNet, precision: str, device: torch.device, trainable: bool,
                 grad_accum: int = 1, staged: bool = False):
        self.name = name
        self.precision = precision
        self.device = device
        self.trainable = trainable
        self.grad_accum = grad_accum
        if precision in ("bf16", "fp16") and not trainable:  # a trainable role's engine casts it (fp32 master)
            net = net.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        # ``staged``: kept in host memory until its engine moves it to ``device`` (the compute device)
        net = net.to(dev.CPU if staged else device)
        if not trainable:
            net = net.eval().requires_grad_(False)
        self.module = net

    @property
    def unet(self) -> nn.Module:
        return self.module.unet

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def autocast(self, force_fp32: bool = False):
        if force_fp32:
            return dev.no_autocast(self.device)
        return dev.autocast(self.device, enabled=self.precision == "bf16_autocast")

    # calls into this role's network from another role's graph (or under no_grad): the bare module
    def forward(self, x_t, t, cond, force_fp32: bool = False) -> torch.Tensor:
        with self.autocast(force_fp32):
            return self.module(x_t, t, cond)

    def discriminate(self, x_t, t, cond) -> torch.Tensor:
        with self.autocast():
            return self.module(x_t, t, cond, discriminate=True)

    # this role's own training loss; an engine role routes these through its engine
    def train_forward(self, x_t, t, cond) -> torch.Tensor:
        return self.forward(x_t, t, cond)

    def train_discriminate(self, x_t, t, cond) -> torch.Tensor:
        return self.discriminate(x_t, t, cond)

    def output(self, x_t, t, cond, module: Optional[nn.Module] = None) -> torch.Tensor:
        """Its network's output: for its own loss (through its engine when it has one), or that of ``module`` (a
        sampling copy of it, e.g. its EMA) under its precision."""
        if module is None:
            return self.train_forward(x_t, t, cond)
        with self.autocast():
            return module(x_t, t, cond)

    def inference_module(self) -> nn.Module:
        return self.module

    def read_params(self, prefix: str) -> list[torch.Tensor]:
        """Whole fp32 copies of its parameters whose names start with ``prefix`` (an engine role at ZeRO-3
        gathers them: every rank of the role calls it)."""
        return [p.detach().float().clone() for n, p in self.module.named_parameters() if n.startswith(prefix)]

    @contextlib.contextmanager
    def inference_weights(self, use_ema: bool = True):
        """The module to sample with (an engine role: its EMA when it keeps one)."""
        yield self.module
