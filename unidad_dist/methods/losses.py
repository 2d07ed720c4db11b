"""Loss functions of Uni-DAD (docs/algorithm.md §4). Pure functions of tensors; no module, no state."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_gradient(x: torch.Tensor, x_fake: torch.Tensor, x_teacher: torch.Tensor) -> torch.Tensor:
    """g_k = (x̂_fk − x̂_k) / w_k with w_k = mean over non-batch dims of |x − x̂_k| (x the student sample,
    not x_t; clamped at 1e-8). fp32, non-finite entries zeroed."""
    x, x_fake, x_teacher = x.detach().float(), x_fake.float(), x_teacher.float()
    dims = tuple(range(1, x.ndim))
    w = (x - x_teacher).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return torch.nan_to_num((x_fake - x_teacher) / w, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L = ½ mean((x − sg(x − g))²), so ∂L/∂x = g / numel."""
    x = x.float()
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x, target, reduction="mean")


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
            + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def input_gradient_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. x is ``grad``: injects a gradient computed elsewhere (the GAN
    generator term via the fake teacher, docs/design.md) into the student's graph."""
    return (x.float() * grad.detach().float()).sum()
