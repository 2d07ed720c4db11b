"""Feature networks a method trains against (OPAD's alignment terms, docs/algorithm.md §12): an identity
embedding (``identity(images)``: unit vectors) and a perceptual distance (``perceptual(x, y)``: one value
per pair), both differentiable with respect to the images (in [-1, 1]) and frozen themselves.

``paper``: CLIP ViT-B/32's image embedding (transformers ``CLIPModel`` from ``eval.weights.clip``) and
LPIPS-VGG (``eval.weights.vgg16`` + the lpips heads), the evaluation networks, located and checked exactly as
evaluation checks them (eval/networks.py); a missing or wrong file is an error naming it, before any role is
built. ``stand_in``: a fixed random convolutional network (weights a function of the run's seed), named as a
stand-in wherever it is reported — for machines without those weights (the CPU tests and demos); its numbers
are not CLIP or LPIPS numbers.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from unidad_dist.core.draws import keyed_generator
from unidad_dist.errors import UserError
from unidad_dist.eval.networks import load_clip, load_lpips, locate

KINDS = ("paper", "stand_in")
STAND_IN_WIDTHS = (16, 32, 64)


class StandInFeatures(nn.Module):
    """Three 3x3 stride-2 convolutions with ReLU, He-initialised from a keyed generator and frozen. Identity:
    the unit vector of the last map's channel means and standard deviations; perceptual: LPIPS' form with
    unit weights (each map unit-normalised over channels, squared difference, spatial mean, summed)."""

    name = "stand-in: fixed random conv net (not CLIP / LPIPS)"

    def __init__(self, seed: int):
        super().__init__()
        g = keyed_generator(seed, "alignment_stand_in")
        convs, cin = [], 3
        for w in STAND_IN_WIDTHS:
            conv = nn.Conv2d(cin, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            convs.append(conv)
            cin = w
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False).eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], x.float()
        for conv in self.convs:
            h = F.relu(conv(h))
            out.append(h)
        return out

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        h = self.taps(x)[-1]
        return F.normalize(torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1), dim=1)

    def perceptual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def unit(h):
            return h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        return sum((unit(a) - unit(b)).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(self.taps(x), self.taps(y)))


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): PyTorch's antialiased bicubic resize along one axis as a matrix (it is separable)."""
    # the basis images are 4 wide: a 1-wide input takes another code path in PyTorch, with other weights
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 4).contiguous()
    out = F.interpolate(basis, size=(n_out, 4), mode="bicubic", align_corners=False, antialias=True)
    return out[:, 0, :, 0].T.contiguous().float()


def resize_bicubic(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.interpolate(x, (h, w), mode="bicubic", antialias=True)`` as two matrix products: the same values, and a
    backward with a deterministic CUDA kernel (interpolate's antialiased bicubic backward has none, so it would
    stop a ``run.deterministic`` run)."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    a_h = _resize_matrix(x.shape[-2], h).to(x.device, x.dtype)
    a_w = _resize_matrix(x.shape[-1], w).to(x.device, x.dtype)
    return torch.einsum("oh,bchw,pw->bcop", a_h, x, a_w)


def _size(size, keys) -> int:
    """A processor's size setting (an int, a dict, or transformers' SizeDict) as one side length."""
    if isinstance(size, int):
        return size
    for k in keys:
        v = size.get(k) if isinstance(size, dict) else getattr(size, k, None)
        if v:
            return int(v)
    raise UserError(f"the CLIP image processor's size {size!r} has none of {keys}; re-save the model folder's "
                    "preprocessor_config.json")


class PaperFeatures(nn.Module):
    """CLIP ViT-B/32 image embeddings (its processor's resize, centre crop and normalisation, in torch so
    gradients pass) and LPIPS-VGG."""

    def __init__(self, clip_model, processor, lpips_net, sha256: dict):
        super().__init__()
        self.clip = clip_model
        self.lpips = lpips_net
        self.crop = _size(processor.crop_size, ("height", "shortest_edge"))
        self.short = _size(processor.size, ("shortest_edge", "height"))
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1))
        self.sha256 = sha256
        self.name = "CLIP ViT-B/32 image embedding + LPIPS-VGG"
        self.requires_grad_(False).eval()

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2
        h, w = x.shape[-2:]
        s = self.short / min(h, w)
        x = resize_bicubic(x, round(h * s), round(w * s))
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        out = self.clip.get_image_features(pixel_values=(x - self.mean) / self.std)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def perceptual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x.float(), y.float())


def build_features(kind: str, weights, seed: int, device: torch.device, key: str = "algorithm.features"):
    """The feature networks of ``kind`` on ``device`` (``weights``: the recipe's ``eval.weights``)."""
    if kind == "stand_in":
        return StandInFeatures(seed).to(device)
    if kind != "paper":
        raise UserError(f"{key}={kind!r} is not one of {', '.join(KINDS)}")
    located = {name: locate(name, getattr(weights, name, None)) for name in ("clip", "vgg16", "lpips_heads")}
    missing = [loc.reason for loc in located.values() if not loc.available]
    if missing:
        raise UserError(f"{key}=paper trains against CLIP and LPIPS, whose weights are not usable here: "
                        + "; ".join(missing) + f". Supply them, or set {key}=stand_in to train against a fixed "
                        "random feature network instead (reported as a stand-in)")
    model, processor, _ = load_clip(located["clip"])
    lpips_net = load_lpips(located["vgg16"], located["lpips_heads"])
    sha = {name: loc.sha256 for name, loc in located.items()}
    return PaperFeatures(model, processor, lpips_net, sha).to(device)
