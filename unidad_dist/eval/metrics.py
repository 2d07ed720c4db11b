"""Demo-scale metrics between student samples and the few target shots.

These are *proxies*, named as such everywhere: the paper's FID / Intra-LPIPS need network weights
that cannot be downloaded here (algorithm.md §7).

* ``proxy_distance``: Fréchet distance between Gaussians fitted to a fixed 13-d colour feature of samples and
  of shots: global per-channel mean and standard deviation, the background colour (per-channel median),
  the colour of the salient pixels (mean of the 15 % most saturated pixels) and their saturation. The
  salient-colour part matters: a global-average feature also falls when only the background takes the
  target's tint while the objects keep the source's colour (seen with an a = 0 control).
* ``copy_rate``: fraction of samples whose pixel L2 distance to the nearest shot (or its mirror image) is
  below 0.5 × the median nearest-neighbour distance among the shots.
* ``diversity``: mean pairwise pixel L2 distance of samples / that of the shots.
"""
from __future__ import annotations

import torch

PROXY_FEATURE = ("colour-statistics Frechet distance (global mean+std, background median, salient-pixel colour "
                 "and saturation; 13-d); a proxy, not FID")
SALIENT_FRACTION = 0.15


def proxy_features(images: torch.Tensor) -> torch.Tensor:
    x = images.float().clamp(-1, 1).flatten(2)  # (N, 3, HW)
    mean = x.mean(dim=2)
    std = x.std(dim=2)
    median = x.median(dim=2).values
    sat = x.max(dim=1).values - x.min(dim=1).values  # (N, HW)
    k = max(1, int(round(SALIENT_FRACTION * sat.shape[1])))
    top = sat.topk(k, dim=1)
    salient = torch.gather(x, 2, top.indices[:, None, :].expand(-1, 3, -1)).mean(dim=2)
    return torch.cat([mean, std, median, salient, top.values.mean(dim=1, keepdim=True)], dim=1).double()


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


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double())


def copy_rate(samples: torch.Tensor, shots: torch.Tensor) -> float:
    among = _pairwise(shots, shots)
    among.fill_diagonal_(float("inf"))
    threshold = 0.5 * among.min(dim=1).values.median()
    refs = torch.cat([shots, shots.flip(-1)])
    nearest = _pairwise(samples, refs).min(dim=1).values
    return float((nearest < threshold).double().mean())


def _mean_pairwise(x: torch.Tensor) -> torch.Tensor:
    d = _pairwise(x, x)
    n = x.shape[0]
    return d.sum() / (n * (n - 1))


def diversity(samples: torch.Tensor, shots: torch.Tensor) -> float:
    return float(_mean_pairwise(samples) / _mean_pairwise(shots))


def all_metrics(samples: torch.Tensor, shots: torch.Tensor) -> dict:
    return {"proxy_distance": proxy_distance(samples, shots), "copy_rate": copy_rate(samples, shots),
            "diversity": diversity(samples, shots)}
