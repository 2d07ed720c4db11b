"""The paper's metrics (docs/algorithm.md §7) on the networks of eval/networks.py, with weights the user
supplies: FID against reference statistics of the full target set, Intra-LPIPS, CLIP-I, CLIP-T, DINO-I.

Every result is a dict naming the metric, the network, the sample count and the step count, and the sha256
of each weight file it used; a metric whose weights (or reference data) are missing is
``{"available": False, "reason": ...}`` with the file it needs and where it goes — never a number from
random weights. Images come in as [-1, 1] floats and are quantised to 8 bits first, as saved PNGs are.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from unidad_dist.core.images import from_uint8, to_uint8
from unidad_dist.device import CPU
from unidad_dist.errors import UserError
from unidad_dist.eval import networks
from unidad_dist.eval.networks import Located

FID_DIMS = 2048


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------
def inception_features(net, images_u8: torch.Tensor, batch: int = 50, device=CPU) -> torch.Tensor:
    """pool3 features (N, 2048), float64, of uint8 images (N, 3, H, W)."""
    net = net.to(device)
    out = []
    with torch.no_grad():
        for s in _batches(images_u8.shape[0], batch):
            out.append(net(images_u8[s].to(device).float() / 255.0).double().cpu())
    return torch.cat(out)


@dataclasses.dataclass
class FidStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    weights_sha256: str = ""

    @classmethod
    def of(cls, features: torch.Tensor, weights_sha256: str = "") -> "FidStats":
        f = features.double().numpy()
        if f.shape[0] < 2:
            raise UserError(f"FID statistics need at least 2 images, got {f.shape[0]}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), int(f.shape[0]), weights_sha256)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"--out {path}: FID statistics are written as .npz; name the file stats.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                 weights_sha256=np.array(self.weights_sha256))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FidStats":
        """Reference statistics, checked: mu (2048,), sigma (2048, 2048), finite, count >= 2 (a file of
        pytorch-fid's --save-stats, mu and sigma only, is accepted with count unknown = 0 -> refused)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"eval.fid_stats: {path} is not a file; compute it with "
                            f"`unidad-dist fid-stats --images DIR --out {path.name}`")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive of mu, sigma and count")
            with z:
                data = {k: z[k] for k in z.files}
            count = int(data["count"]) if "count" in data else 0
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"eval.fid_stats: {path} cannot be read as FID statistics (.npz of mu, sigma, count): "
                            f"{e}; recompute it with `unidad-dist fid-stats`") from None
        mu, sigma = data.get("mu"), data.get("sigma")
        problems = []
        if mu is None or mu.shape != (FID_DIMS,):
            problems.append(f"mu has shape {None if mu is None else mu.shape}, not ({FID_DIMS},)")
        if sigma is None or sigma.shape != (FID_DIMS, FID_DIMS):
            problems.append(f"sigma has shape {None if sigma is None else sigma.shape}, not ({FID_DIMS}, {FID_DIMS})")
        if count < 2:
            problems.append(f"count is {count} (it must record how many images made it, >= 2)")
        if not problems and not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            problems.append("mu or sigma holds NaN/inf")
        if problems:
            raise UserError(f"eval.fid_stats: {path} is not usable reference statistics: {'; '.join(problems)}; "
                            "recompute it with `unidad-dist fid-stats`")
        sha = str(data["weights_sha256"]) if "weights_sha256" in data else ""
        return cls(mu.astype(np.float64), sigma.astype(np.float64), count, sha)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the trace of the square root as the sum
    of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so no complex parts to drop)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root @ s2 @ root
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------------------
# Intra-LPIPS
# --------------------------------------------------------------------------------------------------
def intra_lpips(net, samples: torch.Tensor, shots: torch.Tensor, per_cluster: int = 100, batch: int = 16,
                device=CPU) -> tuple[float, dict]:
    """Assign each sample to its nearest shot (LPIPS), keep up to ``per_cluster`` per shot (in sample order),
    average the mean pairwise LPIPS within each cluster of >= 2 members. Images in [-1, 1]. Returns the
    value and {"clusters_used", "cluster_sizes"}; raises UserError when no cluster has 2 members."""
    net = net.to(device)
    samples, shots = samples.float(), shots.float()
    with torch.no_grad():
        shot_taps = net.taps(shots.to(device))
        dist = torch.empty(samples.shape[0], shots.shape[0], dtype=torch.float64)
        for s in _batches(samples.shape[0], batch):
            f = net.taps(samples[s].to(device))
            for j in range(shots.shape[0]):
                dist[s, j] = net.between(f, [t[j:j + 1] for t in shot_taps]).double().cpu()
        assign = dist.argmin(dim=1)
        sizes, values = [], []
        for j in range(shots.shape[0]):
            members = samples[assign == j][:per_cluster]
            sizes.append(int((assign == j).sum()))
            n = members.shape[0]
            if n < 2:
                continue
            total, pairs = 0.0, 0
            for i in range(n - 1):
                fi = net.taps(members[i:i + 1].to(device))
                for s in _batches(n - i - 1, batch):
                    others = members[i + 1:][s].to(device)
                    d = net.between(fi, net.taps(others))
                    total += float(d.double().sum())
                    pairs += others.shape[0]
            values.append(total / pairs)
    if not values:
        raise UserError(f"Intra-LPIPS: no shot is the nearest of 2 or more of the {samples.shape[0]} samples "
                        f"(cluster sizes {sizes}); evaluate more samples")
    return float(np.mean(values)), {"clusters_used": len(values), "cluster_sizes": sizes}


# --------------------------------------------------------------------------------------------------
# CLIP-I, CLIP-T, DINO-I (transformers models)
# --------------------------------------------------------------------------------------------------
def _pil_list(images_u8: torch.Tensor) -> list[np.ndarray]:
    return [im.permute(1, 2, 0).numpy() for im in images_u8]


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _embed(embed, processor, images_u8: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Unit embeddings of uint8 images: the model folder's own image processor, then ``embed(pixel_values)``."""
    out = []
    with torch.no_grad():
        for s in _batches(images_u8.shape[0], batch):
            px = processor(images=_pil_list(images_u8[s]), return_tensors="pt")["pixel_values"].to(device)
            out.append(embed(px).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def clip_image_embeddings(model, processor, images_u8: torch.Tensor, batch: int = 64, device=CPU) -> torch.Tensor:
    model = model.to(device)
    return _embed(lambda px: _pooled(model.get_image_features(pixel_values=px)), processor, images_u8, batch, device)


def clip_text_embeddings(model, tokenizer, texts: Sequence[str], device=CPU) -> torch.Tensor:
    model = model.to(device)
    with torch.no_grad():
        tok = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        emb = _pooled(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                              attention_mask=tok["attention_mask"].to(device)))
    return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)


def dino_embeddings(model, processor, images_u8: torch.Tensor, batch: int = 64, device=CPU) -> torch.Tensor:
    """The CLS token of the last layer (after its layer norm), unit length."""
    model = model.to(device)
    return _embed(lambda px: model(pixel_values=px).last_hidden_state[:, 0], processor, images_u8, batch, device)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every pair of unit vectors (a_i, b_j)."""
    return float((a.double() @ b.double().T).mean())


def without_rare_token(prompt: str, rare: Optional[str]) -> str:
    """The prompt as CLIP-T reads it: the rare token removed (whole word), spaces tidied."""
    if rare:
        prompt = re.sub(rf"(?<!\w){re.escape(rare)}(?!\w)", " ", prompt)
    return re.sub(r"\s+", " ", prompt).strip()


# --------------------------------------------------------------------------------------------------
# All of them, each available or not
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
    samples: torch.Tensor  # generated images in [-1, 1]
    shots: torch.Tensor  # the few-shot target images in [-1, 1] (Intra-LPIPS' clusters)
    steps: int  # the sampler's step count
    references: Optional[torch.Tensor] = None  # reference photos for CLIP-I / DINO-I (default: the shots)
    prompts: Optional[list[str]] = None  # per sample, for text models (CLIP-T)
    rare_token: Optional[str] = None
    fid_stats: Optional[str] = None  # eval.fid_stats


PAPER_METRICS = ("FID", "Intra-LPIPS", "CLIP-I", "CLIP-T", "DINO-I")
# each metric's key (eval.select, the eval/<key> values training logs with eval.every)
METRIC_KEYS = {"fid": "FID", "intra_lpips": "Intra-LPIPS", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_i": "DINO-I"}


def paper_metrics(inp: Inputs, weights, device=CPU, per_cluster: int = 100,
                  locate: Callable[..., Located] = networks.locate) -> list[dict]:
    """Each of PAPER_METRICS on ``inp``: a value with its provenance, or unavailable with the reason.
    ``weights`` holds the recipe's eval.weights.<name> paths (attributes; None: the environment)."""
    n = int(inp.samples.shape[0])
    base = {"num_samples": n, "steps": int(inp.steps)}
    samples_u8 = to_uint8(inp.samples)
    refs = inp.references if inp.references is not None else inp.shots
    found: dict[str, Located] = {}

    def need(*names: str) -> Optional[str]:
        for name in names:
            if name not in found:
                found[name] = locate(name, getattr(weights, name, None))
        missing = [found[name].reason for name in names if not found[name].available]
        return "; ".join(missing) if missing else None

    def result(metric: str, network: str, compute, precondition: Optional[str] = None) -> dict:
        names = {"FID": ("inception",), "Intra-LPIPS": ("vgg16", "lpips_heads"), "CLIP-I": ("clip",),
                 "CLIP-T": ("clip",), "DINO-I": ("dino",)}[metric]
        rec = {"metric": metric, "network": network, **base}
        if precondition and precondition.startswith("not applicable"):
            return {**rec, "available": False, "value": None, "reason": precondition}
        why = "; ".join(w for w in (need(*names), precondition) if w) or None
        if why is None:
            try:
                rec.update(compute())
            except UserError as e:
                why = str(e)
        if why is not None:
            return {**rec, "available": False, "value": None, "reason": why}
        return {**rec, "available": True, "weights_sha256": {k: found[k].sha256 for k in names}}

    cache: dict[str, object] = {}

    def clip():
        """The CLIP model, processor and tokenizer, and the samples' image embeddings: loaded and computed
        once for CLIP-I and CLIP-T."""
        if "clip" not in cache:
            model, proc, tok = networks.load_clip(found["clip"])
            cache["clip"] = model, proc, tok, clip_image_embeddings(model, proc, samples_u8, device=device)
        return cache["clip"]

    def fid():
        ref = FidStats.load(inp.fid_stats)
        sha = found["inception"].sha256
        if ref.weights_sha256 and ref.weights_sha256 != sha:
            raise UserError(f"eval.fid_stats {inp.fid_stats} was computed with Inception weights {ref.weights_sha256[:12]}..., "
                            f"not these ({sha[:12]}...); recompute it with the same file")
        if n < 2:
            raise UserError(f"FID needs at least 2 samples, got {n}")
        gen = FidStats.of(inception_features(networks.load_inception(found["inception"]), samples_u8, device=device))
        return {"value": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "reference": str(inp.fid_stats),
                "reference_count": ref.count}

    def lpips():
        net = networks.load_lpips(found["vgg16"], found["lpips_heads"])
        quantised = [from_uint8(to_uint8(x)) for x in (inp.samples, inp.shots)]  # as saved PNGs, in [-1, 1]
        value, info = intra_lpips(net, *quantised, per_cluster=per_cluster, device=device)
        return {"value": value, **info, "per_cluster": per_cluster}

    def clip_i():
        model, proc, _, img = clip()
        return {"value": mean_cosine(img, clip_image_embeddings(model, proc, to_uint8(refs), device=device)),
                "num_references": int(refs.shape[0])}

    def clip_t():
        if len(inp.prompts) != n:
            raise UserError(f"CLIP-T: {len(inp.prompts)} prompts for {n} samples")
        model, _, tok, img = clip()
        texts = [without_rare_token(p, inp.rare_token) for p in inp.prompts]
        txt = clip_text_embeddings(model, tok, texts, device=device)
        return {"value": float((img.double() * txt.double()).sum(dim=1).mean())}

    def dino_i():
        model, proc = networks.load_dino(found["dino"])
        return {"value": mean_cosine(dino_embeddings(model, proc, samples_u8, device=device),
                                     dino_embeddings(model, proc, to_uint8(refs), device=device)),
                "num_references": int(refs.shape[0])}

    spec = networks.SPECS
    no_stats = None if inp.fid_stats else (
        "needs reference statistics of the full target data set: `unidad-dist fid-stats --images DIR --out "
        "stats.npz`, then eval.fid_stats=stats.npz")
    no_prompts = None if inp.prompts else "not applicable: the samples have no prompts (an unconditional model)"
    return [result("FID", spec["inception"].what, fid, no_stats),
            result("Intra-LPIPS", f"LPIPS-VGG ({spec['lpips_heads'].what})", lpips),
            result("CLIP-I", spec["clip"].what, clip_i),
            result("CLIP-T", spec["clip"].what, clip_t, no_prompts),
            result("DINO-I", spec["dino"].what, dino_i)]


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        head = f"{r['metric']:12} ({r['network']}, {r['num_samples']} samples, {r['steps']} steps)"
        lines.append(f"{head}: {r['value']:.4f}" if r.get("available") else f"{head}: unavailable: {r['reason']}")
    return "\n".join(lines)
