"""Deterministic stand-in weights for the evaluation networks' checks (tests and tools/check_eval_networks.py):
each tensor drawn from a generator seeded by its key's CRC-32, so two processes with different torch builds
write the same state dict. Never used for a metric."""
from __future__ import annotations

import math
import zlib

import torch


def seeded_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(0, dtype=torch.long)
        elif leaf == "running_var":
            out[key] = 1 + 0.2 * torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:  # conv / linear weights (He), LPIPS heads (positive, as trained ones are)
            w = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
            out[key] = w.abs() * 0.1 if key.startswith("lin") else w
        elif ".bn." in key and leaf == "weight":
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def seeded_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n smooth-ish images in [-1, 1] (a low-resolution draw upsampled, plus fine noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 4, 4), generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn((n, 3, size, size), generator=g)).clamp(-1, 1)
