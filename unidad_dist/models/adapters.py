"""Model-side options of a trainable role: a peft LoRA adapter and activation checkpointing (applied before
any engine wraps the network)."""
from __future__ import annotations

import torch

from unidad_dist.core.draws import key_seed
from unidad_dist.errors import UserError


def prepare_trainable(unet: torch.nn.Module, rc, role: str, seed: int) -> torch.nn.Module:
    """``rc``: the role's section (``lora``, ``activation_checkpointing``). The adapter's initial weights are
    a function of (seed, role) only."""
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
    if getattr(rc, "activation_checkpointing", False):
        unet.enable_gradient_checkpointing()
    return unet


def apply_train_filter(net: torch.nn.Module, keep, role: str, doc: str = "") -> None:
    """Freeze every parameter of a plain network (before any engine wraps it) that ``keep(name, param)``
    does not select: a method's choice of what trains (e.g. only cross-attention K/V)."""
    for pname, p in net.named_parameters():
        if not keep(pname, p):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in net.parameters()):
        raise UserError(f"{role}: the method trains no parameter of this network (its filter matched none)"
                        + (f"; it trains {doc}" if doc else ""))
