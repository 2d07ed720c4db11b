"""VP noise schedule, conversion of ε/v/x0 predictions to x̂0, denoising targets and CFG (docs/algorithm.md §2).

All conversions run in fp32: a prediction is cast to fp32 *before* it is turned into x̂0, because the
division by √ᾱ_t amplifies any rounding error (docs/algorithm.md §4, "Precision").
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, clip_sample: float | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        self.clip_sample = clip_sample  # clamp x̂0 to ±this while sampling the teacher (scheduler's clip_sample)
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self.T = int(alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(config)
        clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
        return cls(sched.alphas_cumprod, sched.config.prediction_type, clip)

    def coefficients(self, t: torch.Tensor, ndim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) as fp32 tensors shaped to broadcast against an ndim-dimensional batch."""
        ab = self.alphas_cumprod[t.detach().cpu().long()].to(torch.float32)
        shape = (-1,) + (1,) * (ndim - 1)
        return ab.sqrt().view(shape).to(device), (1 - ab).sqrt().view(shape).to(device)

    def sqrt_alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t].sqrt())

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0.ndim, x0.device)
        return a * x0 + s * noise

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        ptype = prediction_type or self.prediction_type
        pred = pred.float()
        x_t = x_t.float()
        a, s = self.coefficients(t, x_t.ndim, x_t.device)
        if ptype == "epsilon":
            return (x_t - s * pred) / a
        if ptype == "v_prediction":
            return a * x_t - s * pred
        return pred

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise a prediction implies (as diffusers' schedulers compute it: ε itself; v: √ᾱ·v + √(1−ᾱ)·x_t)."""
        pred, x_t = pred.float(), x_t.float()
        a, s = self.coefficients(t, x_t.ndim, x_t.device)
        if self.prediction_type == "epsilon":
            return pred
        if self.prediction_type == "v_prediction":
            return a * pred + s * x_t
        return (x_t - a * pred) / s

    def x0_to_prediction(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        """Inverse of ``to_x0``: what a network of this type would output for the given x̂0."""
        ptype = prediction_type or self.prediction_type
        a, s = self.coefficients(t, x_t.ndim, x_t.device)
        if ptype == "epsilon":
            return (x_t.float() - a * x0.float()) / s
        if ptype == "v_prediction":
            eps = (x_t.float() - a * x0.float()) / s
            return a * eps - s * x0.float()
        return x0.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target of the standard diffusion loss for this backbone's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a, s = self.coefficients(t, x0.ndim, x0.device)
            return a * noise - s * x0
        return x0


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond − uncond)."""
    return uncond + scale * (cond - uncond)


def karras_index_timesteps(schedule: NoiseSchedule, n: int = 1000, sigma_min: float = 0.002,
                           sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Map a 1000-point Karras σ grid (ρ = 7) onto the nearest discrete timesteps of the VP schedule
    (the reference face setting draws noise levels uniformly over this grid's index)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = 1.0 / rho
    sigmas = (sigma_max ** inv + ramp * (sigma_min ** inv - sigma_max ** inv)) ** rho
    ab = schedule.alphas_cumprod
    vp_sigmas = ((1 - ab) / ab).sqrt()
    idx = (vp_sigmas[None, :] - sigmas[:, None]).abs().argmin(dim=1)
    return idx.long()
