"""K-step student generation; training and sampling share this code (docs/algorithm.md §3). Also the
deterministic many-step DDIM sampler of teachers."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from unidad_dist.core.draws import SampleDraws
from unidad_dist.errors import UserError
from unidad_dist.models.schedule import NoiseSchedule


def student_timesteps(steps: int, T: int, explicit: Optional[Sequence[int]] = None) -> list[int]:
    """t_k = T−1 − k·⌊T/K⌋ (K=1: [999]; K=4: [999, 749, 499, 249]) unless an explicit list is given."""
    if explicit is not None:
        bad = [int(t) for t in explicit if not 0 <= int(t) < T]
        if bad:
            raise UserError(f"student.timesteps {bad} lie outside this noise schedule's timesteps 0..{T - 1}; "
                            f"give timesteps in that range")
        return [int(t) for t in explicit]
    if not 1 <= steps <= T:
        raise UserError(f"student.steps={steps} but this noise schedule has {T} timesteps; set 1 <= student.steps <= {T}")
    return [T - 1 - k * (T // steps) for k in range(steps)]


def generate(
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    noise_for_step: Callable[[int], torch.Tensor],
    grad_step: Optional[int] = None,
    stop_at: Optional[int] = None,
) -> torch.Tensor:
    """Run the student from pure noise ``z``.

    ``call(x_t, t)`` returns x̂0 (fp32). ``noise_for_step(k)`` is the fresh noise that re-noises x̂0 into
    step k (k >= 1). With ``grad_step=None`` every call runs under the ambient grad mode (unroll
    ``full`` when grad is on, plain sampling under no_grad). With ``grad_step=k`` (backward simulation),
    steps 0 … k−1 run under no_grad, step k with gradients, and its x̂0 is returned.
    """
    last = len(timesteps) - 1 if stop_at is None else stop_at
    if grad_step is not None:
        last = grad_step
    x_t = z
    x0 = z
    for k in range(last + 1):
        t = torch.full((z.shape[0],), int(timesteps[k]), dtype=torch.long, device=z.device)
        if grad_step is not None and k < grad_step:
            with torch.no_grad():
                x0 = call(x_t, t)
        else:
            x0 = call(x_t, t)
        if k < last:
            t_next = torch.full_like(t, int(timesteps[k + 1]))
            x_t = schedule.add_noise(x0.detach() if grad_step is not None else x0, noise_for_step(k + 1), t_next)
    return x0


def sample_by_index(x0: Callable, models, ts: Sequence[int], seed: int, n: int, batch: int, device,
                    prompts: Optional[list[str]] = None, generator: Optional[torch.Generator] = None,
                    first: int = 0) -> torch.Tensor:
    """A K-step student's samples ``first`` … ``first + n - 1`` (``x0(x_t, t, cond)`` its x̂0), each from noise
    keyed by (seed, "sample", its index) and, for text models, with prompt ``index mod len(prompts)`` (default:
    the data's prompts) — so a rank that draws a share of the indices gets exactly those images of the whole
    set. With a (CPU) ``generator``: in one batch drawn as a diffusers pipeline draws it, the initial noise,
    then the re-noising noise of each step, in that order (an exported pipeline gives the same images)."""
    out = []
    if generator is not None:
        batch = n
    for start in range(first, first + n, batch):
        idx = list(range(start, min(first + n, start + batch)))
        d = SampleDraws(seed, -1, idx, device)
        if generator is not None:
            shape = (len(idx),) + tuple(models.sample_shape)
            z = torch.randn(shape, generator=generator, device=generator.device).to(device)
            renoise = lambda k: torch.randn(shape, generator=generator, device=generator.device).to(device)  # noqa: E731
        else:
            z = d.randn(models.sample_shape, "sample", "z")
            renoise = lambda k: d.randn(models.sample_shape, "sample", f"renoise_{k}")  # noqa: E731
        cond = None
        if models.text is not None:
            ps = prompts or models.data.prompts
            cond = models.data.encode([ps[i % len(ps)] for i in idx])
        x = generate(lambda x_t, t: x0(x_t, t, cond), z, ts, models.schedule, renoise)
        out.append(x.float())
    return torch.cat(out)


def ddim_timesteps(steps: int, T: int, spacing: str = "linspace") -> list[int]:
    """A DDIM sampler's timesteps as diffusers' DDIMScheduler spaces them: "linspace" (``steps`` evenly spaced
    from T-1 down to 0, rounded) or "trailing" (round(T, T - T/steps, ...) - 1: from T-1, the spacing for
    zero-terminal-SNR schedules, and the one whose steps diffusers takes exactly when T % steps == 0)."""
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1).tolist()
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


def ddim(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, timesteps: Sequence[int],
         schedule: NoiseSchedule, prev: Optional[Sequence[int]] = None, eps_from_clipped: bool = True,
         states: Optional[dict] = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise ``z`` over ``timesteps`` (decreasing). ``call(x_t, t)``
    returns x̂0 (fp32), or (x̂0, ε̂); x̂0 is clipped when the schedule clips samples. Step i goes to ``prev[i]``
    (default: the next timestep of the list; a negative one ends there, returning x̂0). ``eps_from_clipped``:
    the noise that carries to the next step is recomputed from the clipped x̂0 (the teachers' grids and
    warm-start pairs); False keeps the model's own (ε̂ when ``call`` gives it), as diffusers'
    DDIMScheduler.step does (with ``prev[i] = t - T // steps``, its rule, the two agree). ``states``: a dict
    whose keys are timesteps of the list; each is set to the trajectory's x_t there (the input of that step)."""
    prev = list(timesteps[1:]) + [-1] if prev is None else list(prev)
    x = z
    for i, t in enumerate(timesteps):
        tt = torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device)
        if states is not None and int(t) in states:
            states[int(t)] = x
        out = call(x, tt)
        x0, eps_model = out if isinstance(out, tuple) else (out, None)
        a, s = schedule.coefficients(tt, x.ndim, x.device)
        eps = None if eps_from_clipped else eps_model if eps_model is not None else (x.float() - a * x0) / s
        if schedule.clip_sample is not None:
            x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
        if prev[i] >= 0:
            tn = torch.full_like(tt, int(prev[i]))
            if eps is None:
                eps = (x.float() - a * x0) / s
            a2, s2 = schedule.coefficients(tn, x.ndim, x.device)
            x = a2 * x0 + s2 * eps
        else:
            return x0
    return x
