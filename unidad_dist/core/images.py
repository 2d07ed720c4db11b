"""Image conversion and PNG grids (images in [-1, 1], (N, 3, H, W))."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> uint8 on the CPU (uint8 images pass through)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (what to_uint8 gives back unchanged)."""
    return images.float() / 127.5 - 1


def pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 distances (float64) between the flattened rows of ``a`` (N, ...) and ``b`` (M, ...): (N, M)."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double())


def nearest_shot(samples: torch.Tensor, shots: torch.Tensor,
                 mirrors: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: whether it is a copy (closer to a shot, or its mirror image, than half the shots' median
    nearest-neighbour distance) and the index of that nearest shot. ``mirrors``: the shots' mirror images where
    a horizontal flip of the tensor is not one (VAE latents: the latents of the flipped images); default
    ``shots.flip(-1)``."""
    among = pairwise_l2(shots, shots)
    among.fill_diagonal_(float("inf"))
    threshold = 0.5 * among.min(dim=1).values.median()
    mirrors = shots.flip(-1) if mirrors is None else mirrors
    nearest, idx = pairwise_l2(samples, torch.cat([shots, mirrors])).min(dim=1)
    return nearest < threshold, idx % len(shots)


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None, min_cell: int = 96) -> Path:
    """A PNG grid of images in [-1, 1] or uint8 (N, 3, H, W); small images are upscaled (nearest) for viewing."""
    from PIL import Image

    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    arr = to_uint8(images)
    _, c, h, w = arr.shape
    pad = 2
    canvas = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, cidx = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + cidx * (w + pad): pad + cidx * (w + pad) + w] = arr[i]
    im = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    scale = max(1, min_cell // max(h, w))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def save_images(images: torch.Tensor, folder: Path, pattern: str = "{:05d}.png") -> list[Path]:
    """One PNG per image (in [-1, 1], or uint8), named by ``pattern.format(index)``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    out = []
    for i, a in enumerate(arr):
        p = folder / pattern.format(i)
        Image.fromarray(a).save(p)
        out.append(p)
    return out
