"""Built-in models and data for the demo and tests: procedurally generated image domains and a tiny
pixel-space teacher pretrained on one of them.

``builtin:<name>`` in a recipe resolves to a folder under ``$UNIDAD_CACHE`` (default
``~/.cache/unidad_dist``), keyed by a hash of the builder's config. The first run builds it: global rank 0
takes a file lock, builds into a temporary folder and renames it into place, while other ranks wait for it.
The result is an ordinary diffusers pipeline folder (or a folder of PNGs), loaded by the same code path as
a user's checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from unidad_dist.core.images import save_images
from unidad_dist.core.progress import progress_bar
from unidad_dist.errors import UserError
from unidad_dist.models.schedule import NoiseSchedule

BUILD_VERSION = 1
# Seconds spent building built-ins in this process (reported in the demo's summary).
BUILD_SECONDS: dict[str, float] = {}

# name -> (kind, config)
DOMAINS = {
    "red_discs": {"shape": "disc", "color": [0.85, 0.15, 0.12], "color_jitter": 0.12},
    "blue_discs": {"shape": "disc", "color": [0.15, 0.3, 0.9], "color_jitter": 0.12},
    "green_squares": {"shape": "square", "color": [0.15, 0.8, 0.2], "color_jitter": 0.12},
    "yellow_triangles": {"shape": "triangle", "color": [0.9, 0.8, 0.1], "color_jitter": 0.12},
}

TEACHER = {
    "domain": "red_discs",
    "resolution": 32,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "steps": 900,
    "batch": 64,
    "lr": 2e-3,
    "ema": 0.995,
    "seed": 0,
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

BUILTINS = {
    "demo_teacher": ("teacher", TEACHER),
    "demo_target": ("shots", {"domain": "blue_discs", "n": 10, "resolution": 32, "seed": 1234}),
}


def cache_root() -> Path:
    return Path(os.environ.get("UNIDAD_CACHE", Path.home() / ".cache" / "unidad_dist")).expanduser()


# --------------------------------------------------------------------------------------------------
# Procedural domains
# --------------------------------------------------------------------------------------------------
def render_shapes(domain: dict, n: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """n images (n, 3, R, R) in [-1, 1]: one anti-aliased shape of the domain's colour on a soft
    gradient background; position, size, rotation, shade and background vary per image."""
    R = resolution
    u = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(R, dtype=torch.float32) + 0.5, torch.arange(R, dtype=torch.float32) + 0.5,
                            indexing="ij")
    cx = R * (0.3 + 0.4 * u(n))
    cy = R * (0.3 + 0.4 * u(n))
    size = R * (0.16 + 0.14 * u(n))
    angle = math.pi * 2 * u(n)
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    shape = domain["shape"]
    if shape == "disc":
        sd = (dx ** 2 + dy ** 2).sqrt() - size[:, None, None]
    else:
        c, s = angle.cos()[:, None, None], angle.sin()[:, None, None]
        rx, ry = c * dx + s * dy, -s * dx + c * dy
        if shape == "square":
            sd = torch.maximum(rx.abs(), ry.abs()) - 0.85 * size[:, None, None]
        elif shape == "triangle":
            k = math.sqrt(3.0)
            r = size[:, None, None]
            sd = torch.maximum(ry - 0.5 * r, torch.maximum((k * rx - ry) / 2 - 0.5 * r, (-k * rx - ry) / 2 - 0.5 * r))
        else:
            raise ValueError(f"unknown shape {shape!r}")
    mask = torch.sigmoid(-sd * 2.5)[:, None]  # soft edge ~1 px
    base = torch.tensor(domain["color"])[None, :, None, None]
    jit = domain.get("color_jitter", 0.1)
    color = (base + jit * (2 * u(n, 3, 1, 1) - 1)).clamp(0, 1)
    bg_level = 0.25 + 0.2 * u(n, 1, 1, 1)
    bg_tint = 0.05 * (2 * u(n, 3, 1, 1) - 1)
    grad_dir = 2 * u(n, 1, 1, 1) - 1
    background = (bg_level + bg_tint + 0.12 * grad_dir * (ys[None, None] / R - 0.5)).clamp(0, 1)
    img = background * (1 - mask) + color * mask
    return (img * 2 - 1).clamp(-1, 1)


def make_shots(folder: Path, domain: str | dict, n: int, resolution: int, seed: int) -> Path:
    """Write an n-shot folder of PNGs for a named (or given) procedural domain."""
    d = DOMAINS[domain] if isinstance(domain, str) else domain
    g = torch.Generator().manual_seed(seed)
    save_images(render_shapes(d, n, resolution, g), Path(folder), pattern="shot_{:03d}.png")
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# The tiny teacher
# --------------------------------------------------------------------------------------------------
def tiny_pixel_unet_config(resolution: int, block_out_channels, layers_per_block: int, norm_num_groups: int) -> dict:
    n = len(block_out_channels)
    return dict(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=list(block_out_channels),
                layers_per_block=layers_per_block, down_block_types=["DownBlock2D"] * n,
                up_block_types=["UpBlock2D"] * n, norm_num_groups=norm_num_groups, add_attention=False)


def pretrain_teacher(cfg: dict, out: Path, progress: bool = True) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(cfg["seed"])
    unet = UNet2DModel(**tiny_pixel_unet_config(cfg["resolution"], cfg["block_out_channels"],
                                                cfg["layers_per_block"], cfg["norm_num_groups"]))
    sched = DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=cfg["beta_schedule"],
                          prediction_type=cfg["prediction_type"])
    schedule = NoiseSchedule(sched.alphas_cumprod, cfg["prediction_type"])
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    domain = DOMAINS[cfg["domain"]]
    bar = None
    if progress:
        bar = progress_bar(cfg["steps"], "pretraining built-in teacher", leave=False)
    steps = cfg["steps"]
    for step in range(steps):
        x0 = render_shapes(domain, cfg["batch"], cfg["resolution"], g)
        t = torch.randint(0, cfg["num_train_timesteps"], (cfg["batch"],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = unet(schedule.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        lr_scale = min(1.0, (step + 1) / 50) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * lr_scale
        opt.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - cfg["ema"])
                else:
                    ema[k].copy_(v)
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    unet.load_state_dict(ema)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
def _key(kind: str, cfg: dict) -> str:
    blob = json.dumps({"kind": kind, "cfg": cfg, "v": BUILD_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build(kind: str, cfg: dict, out: Path) -> None:
    if kind == "teacher":
        pretrain_teacher(cfg, out, progress=True)
    elif kind == "shots":
        make_shots(out, cfg["domain"], cfg["n"], cfg["resolution"], cfg["seed"])
    else:
        raise ValueError(kind)


def resolve(given: str, wait_timeout_s: float = 3600.0) -> Path:
    """Path of the cached folder for ``builtin:<name>``, building it on first use."""
    name = given.split(":", 1)[1]
    if name not in BUILTINS:
        raise UserError(f"unknown built-in '{given}'; available: {', '.join('builtin:' + n for n in BUILTINS)}")
    kind, cfg = BUILTINS[name]
    root = cache_root() / "builtin"
    final = root / f"{name}-{_key(kind, cfg)}"
    if (final / ".complete").is_file():
        return final
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # other ranks wait for global rank 0 to publish it
        deadline = time.time() + wait_timeout_s
        while not (final / ".complete").is_file():
            if time.time() > deadline:
                raise UserError(f"waited {wait_timeout_s:.0f}s for rank 0 to build '{given}' in {final}; check rank 0's log")
            time.sleep(0.5)
        return final
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (final / ".complete").is_file():
            return final
        t0 = time.time()
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build(kind, cfg, tmp)
        (tmp / ".complete").write_text(json.dumps({"kind": kind, "cfg": cfg}, indent=2))
        if final.exists():  # an incomplete leftover from a killed build
            shutil.rmtree(final)
        os.replace(tmp, final)
        BUILD_SECONDS[name] = time.time() - t0
    return final


def resolve_path(given: str) -> Path:
    return resolve(given) if given.startswith("builtin:") else Path(given).expanduser()


def domain_names() -> list[str]:
    return sorted(DOMAINS)

