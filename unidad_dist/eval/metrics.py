"""Demo-scale metrics between student samples and the few target shots.

These are *proxies*, named as such everywhere: the paper's FID / Intra-LPIPS need network weights
that cannot be downloaded here (docs/algorithm.md §7).

* ``proxy_distance``: Fréchet distance between Gaussians fitted to a fixed 21-d feature of samples and of
  shots, colour and structure:
  - colour (13-d): global per-channel mean and standard deviation, the background colour (per-channel
    median), the colour of the salient pixels (mean of the 15 % most saturated pixels) and their
    saturation. The salient part matters: a global average also falls when only the background takes the
    target's tint while the objects keep the source's colour (seen with an a = 0 control);
  - structure (8-d, weighted so that each kind of failure counts; ``STRUCTURE_WEIGHTS``): edge sharpness
    (95th percentile of the colour gradient), noise (median colour Laplacian), object contrast, and the
    shape of the foreground mask (pixels far from the background colour): boundary length / √area,
    mean and maximum radius from its centroid relative to a disc of that area, whether its centroid is
    filled (a ring is not) and √area. Colour alone let noise in the target's colours pass as an
    adapted student (issue 11): here target-coloured noise and blurred blobs lie far from the shots,
    held-out images of the target domain near (tests/test_metrics.py).
* ``noise_level`` / ``sharpness`` (reported beside it for the samples and the shots): the mean per image of
  the median colour-Laplacian magnitude (pixels in [0, 1]; clean renders ~0, grain ~0.1–1) and of the
  95th-percentile colour gradient over the object's contrast (a crisp edge ~0.3, a blur less).
* ``shape_distance``: Fréchet distance between Gaussians fitted to the shape alone of the foreground mask's
  largest 4-connected part, the object (6-d, invariant to colour, background, position, size and rotation;
  the whole mask took in the specks of a textured background, so that real discs on stripes read as another
  shape than discs on a dark ground: 1.67): its radial profile (the farthest mask pixel
  from the centroid in each of 24 angular bins, over its mean) — spread and the magnitudes of its 3rd and 4th
  angular harmonics (a triangle's three corners, a square's or a cross's four) — and boundary length / √area,
  the maximum radius and whether the centroid is filled. The proxy distance let a wrong shape in the right
  colours pass: discs drawn for triangle shots, on their light background, were at 0.19–0.34 of the source
  domain's proxy distance (an acceptance needs <= 0.5). Measured on every single-shape domain of
  unidad_dist/builtin.py (six in tests/test_metrics.py): held-out images of the shots' domain at <= 0.5,
  every other shape at >= 1.7; ``SHAPE_LIMIT`` (1.0) lies between.
* ``copy_rate``: fraction of samples whose pixel L2 distance to the nearest shot (or its mirror image) is
  below 0.5 × the median nearest-neighbour distance among the shots.
* ``diversity``: mean pairwise pixel L2 distance of samples / that of the shots.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from unidad_dist.core.images import nearest_shot, pairwise_l2

PROXY_FEATURE = ("colour + structure Frechet distance (colour statistics 13-d; edge sharpness, noise, contrast and "
                 "foreground-shape descriptors 8-d); a proxy, not FID")
SALIENT_FRACTION = 0.15
MASK_LEVEL = 0.7  # foreground: colour distance from the background above this fraction of the object contrast
SHAPE_LIMIT = 1.0  # samples whose shape distance to the shots exceeds this draw another shape (see above)
PROFILE_BINS = 24
# the shape distance's descriptors (of the mask's largest connected part: SHAPE_KEYS below)
OBJECT_KEYS = ("profile_spread", "profile_h3", "profile_h4", "compactness", "radius_max", "centre_filled")
STRUCTURE_WEIGHTS = {"sharpness": 4.0, "noise": 1.0, "contrast": 1.0, "compactness": 2.0, "radius_mean": 2.0,
                     "radius_max": 3.0, "centre_filled": 1.0, "area": 2.0}
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def colour_features(images: torch.Tensor) -> torch.Tensor:
    x = images.float().clamp(-1, 1).flatten(2)  # (N, 3, HW)
    mean = x.mean(dim=2)
    std = x.std(dim=2)
    median = x.median(dim=2).values
    sat = x.max(dim=1).values - x.min(dim=1).values  # (N, HW)
    k = max(1, int(round(SALIENT_FRACTION * sat.shape[1])))
    top = sat.topk(k, dim=1)
    salient = torch.gather(x, 2, top.indices[:, None, :].expand(-1, 3, -1)).mean(dim=2)
    return torch.cat([mean, std, median, salient, top.values.mean(dim=1, keepdim=True)], dim=1).double()


def _filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.to(x)[None, None].repeat(c, 1, 1, 1), groups=c)


def _geometry(mask: torch.Tensor) -> dict:
    """A foreground mask's (n, h, w) shape descriptors (each (n,)): its radial profile's spread and 3rd / 4th
    harmonics, boundary length / sqrt(area), mean and maximum radius over a disc of that area, whether the
    centroid is filled, and sqrt(area) as a fraction of the image."""
    n, h, w = mask.shape
    area = mask.flatten(1).sum(1).clamp_min(1)
    boundary = (mask[:, 1:] != mask[:, :-1]).flatten(1).sum(1) + (mask[:, :, 1:] != mask[:, :, :-1]).flatten(1).sum(1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cy = (mask * ys).flatten(1).sum(1) / area
    cx = (mask * xs).flatten(1).sum(1) / area
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    rad = (dy ** 2 + dx ** 2).sqrt()
    r = rad / (area / math.pi).sqrt()[:, None, None]
    # the radial profile: the farthest mask pixel (its outer edge, + 0.5) in each angular bin, over its mean
    ang = ((torch.atan2(dy, dx) + math.pi) / (2 * math.pi) * PROFILE_BINS).long().clamp(0, PROFILE_BINS - 1)
    profile = torch.zeros(n, PROFILE_BINS, dtype=mask.dtype).scatter_reduce(
        1, ang.flatten(1), (mask * (rad + 0.5)).flatten(1), "amax")
    profile = profile / profile.mean(1, keepdim=True).clamp_min(1e-3)
    harmonics = torch.fft.rfft(profile, dim=1).abs() / PROFILE_BINS
    return {
        "profile_spread": torch.log(profile.std(1) + 0.03),
        "profile_h3": torch.log(harmonics[:, 3] + 0.02),
        "profile_h4": torch.log(harmonics[:, 4] + 0.02),
        "compactness": torch.log(boundary.float() / area.sqrt() + 0.05),
        "radius_mean": torch.log((mask * r).flatten(1).sum(1) / area + 0.05),
        "radius_max": torch.log((mask * r).flatten(1).max(1).values + 0.05),
        "centre_filled": mask[torch.arange(n), cy.round().long().clamp(0, h - 1), cx.round().long().clamp(0, w - 1)],
        "area": (area / (h * w)).sqrt(),
    }


def largest_component(mask: torch.Tensor, grid: int = 64) -> torch.Tensor:
    """The largest 4-connected component of each (n, h, w) 0/1 mask (ties: the one whose last pixel, in
    row-major order, comes first). Masks larger than ``grid`` pixels a side are labelled on a ``grid``-sized
    max-pooled copy (cells that touch there join), the component's cells then intersected with the full mask:
    the cost stays that of a 64 x 64 mask."""
    n, h, w = mask.shape
    k = max(1, math.ceil(max(h, w) / grid))
    small = F.max_pool2d(mask[:, None], k, ceil_mode=True)[:, 0] if k > 1 else mask
    on = small > 0
    sh, sw = small.shape[1:]
    idx = torch.arange(1, sh * sw + 1, dtype=torch.float32).view(1, sh, sw).expand(n, sh, sw)
    label = torch.where(on, idx, torch.zeros(()))
    while True:  # every pixel takes the largest label among itself and its 4 neighbours, inside the mask
        p = F.pad(label, (1, 1, 1, 1))
        grown = torch.stack([label, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.where(on, grown, torch.zeros(()))
        if torch.equal(grown, label):
            break
        label = grown
    counts = torch.zeros(n, sh * sw + 1).scatter_add_(1, label.flatten(1).long(), on.flatten(1).float())
    counts[:, 0] = 0
    keep = (label == counts.argmax(1).float()[:, None, None]) & on
    if k > 1:
        keep = keep.repeat_interleave(k, 1).repeat_interleave(k, 2)[:, :h, :w]
    return mask * keep.to(mask.dtype)


def _structure(images: torch.Tensor) -> dict:
    """Per-image structure statistics (each (N,)), images in [-1, 1]."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    n, _, h, w = x.shape
    grad = (_filter(x, _SOBEL) ** 2 + _filter(x, _SOBEL.T) ** 2).sum(1).sqrt().flatten(1)
    # noise: the diagonal (HH) Haar band, where smooth shading, stripes and most of an edge leave little
    # (Donoho's estimator; the median ignores the edges that remain)
    hh = (x[:, :, 0::2, 0::2] - x[:, :, 0::2, 1::2] - x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) / 2
    noise = hh.pow(2).sum(1).sqrt().flatten(1).median(dim=1).values / 0.6745
    flat = x.flatten(2)
    dist = (flat - flat.median(dim=2).values[:, :, None]).norm(dim=1)  # colour distance from the background
    contrast = dist.quantile(0.98, dim=1)
    mask = (dist > MASK_LEVEL * contrast.clamp_min(0.05)[:, None]).float().view(n, h, w)
    p99 = grad.quantile(0.99, dim=1)
    # the proxy reads the whole mask's geometry; the shape distance its largest connected part's: the object,
    # without the specks a mottled background leaves in the mask (which made another background read as
    # another shape: real teal discs on stripes at 1.67 against dark-ground shots, 0.11 of the object alone)
    obj = _geometry(largest_component(mask))
    return {
        **_geometry(mask),
        **{f"object_{k}": obj[k] for k in OBJECT_KEYS},
        "sharpness_raw": p99 / contrast.clamp_min(0.05),
        "noise_raw": noise,
        "sharpness": torch.log(p99 + 0.02),
        "noise": torch.log(noise + 0.03),
        "contrast": torch.log(contrast + 0.02),
    }


# each takes the images' _structure when the caller has it already (all_metrics computes it once per set)
def structure_features(images: torch.Tensor, s: Optional[dict] = None) -> torch.Tensor:
    s = _structure(images) if s is None else s
    return torch.stack([wt * s[k] for k, wt in STRUCTURE_WEIGHTS.items()], dim=1).double()


SHAPE_KEYS = tuple(f"object_{k}" for k in OBJECT_KEYS)  # the largest connected part of the mask


def shape_features(images: torch.Tensor, s: Optional[dict] = None) -> torch.Tensor:
    s = _structure(images) if s is None else s
    return torch.stack([s[k] for k in SHAPE_KEYS], dim=1).double()


def shape_distance(samples: torch.Tensor, shots: torch.Tensor) -> float:
    return frechet_distance(shape_features(samples), shape_features(shots))


def proxy_features(images: torch.Tensor, s: Optional[dict] = None) -> torch.Tensor:
    return torch.cat([colour_features(images), structure_features(images, s)], dim=1)


def noise_and_sharpness(images: torch.Tensor, s: Optional[dict] = None) -> tuple[float, float]:
    s = _structure(images) if s is None else s
    return float(s["noise_raw"].mean()), float(s["sharpness_raw"].mean())


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    ca = (torch.cov(a.T) if len(a) > 1 else torch.zeros_like(eye)) + ridge * eye  # one sample: no spread
    cb = (torch.cov(b.T) if len(b) > 1 else torch.zeros_like(eye)) + ridge * eye
    sa = _sqrtm_psd(ca)
    cross = _sqrtm_psd(sa @ cb @ sa)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * torch.trace(cross))


def proxy_distance(samples: torch.Tensor, shots: torch.Tensor) -> float:
    return frechet_distance(proxy_features(samples), proxy_features(shots))


def copy_rate(samples: torch.Tensor, shots: torch.Tensor) -> float:
    return float(nearest_shot(samples, shots)[0].double().mean())


def _mean_pairwise(x: torch.Tensor) -> torch.Tensor:
    d = pairwise_l2(x, x)
    n = x.shape[0]
    return d.sum() / (n * (n - 1))


def diversity(samples: torch.Tensor, shots: torch.Tensor) -> float:
    return float(_mean_pairwise(samples) / _mean_pairwise(shots))


def all_metrics(samples: torch.Tensor, shots: torch.Tensor) -> dict:
    s, t = _structure(samples), _structure(shots)
    noise, sharp = noise_and_sharpness(samples, s)
    noise_shots, sharp_shots = noise_and_sharpness(shots, t)
    return {"proxy_distance": frechet_distance(proxy_features(samples, s), proxy_features(shots, t)),
            "shape_distance": frechet_distance(shape_features(samples, s), shape_features(shots, t)),
            "copy_rate": copy_rate(samples, shots),
            "diversity": diversity(samples, shots), "noise_level": noise, "noise_level_shots": noise_shots,
            "sharpness": sharp, "sharpness_shots": sharp_shots}
