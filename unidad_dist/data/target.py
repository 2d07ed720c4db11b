"""The target stream (few-shot images) and the source stream (prompts), with deterministic draws.

The target is a folder of images or a ``make-shards`` folder; the source is the recipe's prompt list, a
prompt file, or a ``make-shards`` prompt folder. Folder images are center-cropped and resized (bicubic) to
the training resolution once at start; an optional ``<image>.txt`` beside an image is its caption,
otherwise the prompt template ``a {rare} {cls}`` is used.

A small stream (an image folder, the prompt list, shards fewer than the readers or holding fewer than
``data.split_min_samples`` samples) is held whole in memory: which sample, and whether it is flipped, is a per-sample draw keyed by (seed, iteration, global
sample index), so the batch split over ranks does not change what is seen. A large shard stream is split
over ranks and DataLoader workers (``data/stream.py``) and read in its pure-function order; its position
is part of every checkpoint. Precomputed latents and text embeddings (``make-shards --precompute``) are
used as they are, so training calls neither the VAE nor the text encoders for them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.builtin import resolve_path
from unidad_dist.core.draws import SampleDraws
from unidad_dist.data.shards import decode_sample, is_shard_folder, open_shards
from unidad_dist.data.stream import SplitStream, load_whole
from unidad_dist.errors import UserError
from unidad_dist.models.conditioning import cat_cond, fill_prompt, strip_rare_token

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


MAX_PIXELS_PER_BYTE = 20_000  # a real image compresses far less (flat PNG art ~10-1000 pixels per byte)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """A target image as (3, resolution, resolution) in [-1, 1]: centre crop to a square, bicubic resize.
    16-bit images are scaled to 8 bits (not clipped to white); an image whose declared size is absurd for
    its bytes or far above the training resolution is refused before it is decoded; an extreme aspect ratio
    or a tiny image is warned about (the crop keeps little of it)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            nbytes = max(1, path.stat().st_size)
            limit = max(64 * resolution * resolution, 4096 * 4096)
            if w * h > limit or w * h > MAX_PIXELS_PER_BYTE * nbytes:
                raise UserError(f"target image '{path}' declares {w}x{h} pixels in {nbytes} bytes — absurd for its "
                                f"size or far above the {resolution}px training resolution; resize it (or remove it)")
            if max(w, h) > 4 * min(w, h) or min(w, h) * 4 < resolution:
                warnings.warn(f"target image '{path}' is {w}x{h}: the centre crop keeps a {min(w, h)}x{min(w, h)} "
                              f"square{' (upscaled to ' + str(resolution) + 'px)' if min(w, h) < resolution else ''}; "
                              "crop it yourself if that loses the subject", UserWarning, stacklevel=2)
            im = _to_rgb8(im)
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot read target image '{path}' ({type(e).__name__}); remove or replace it (PNG/JPEG expected)"
        ) from None
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def _to_rgb8(im):
    """8-bit RGB: 16-bit and 32-bit integer images are scaled down (``convert`` would clip them to white),
    float images are read as [0, 1]."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0
        elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / (257.0 if a.max(initial=0) <= 65535 else 16843009.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_target_folder(path: str, resolution: int) -> tuple[torch.Tensor, list[Optional[str]], list[Path]]:
    folder = resolve_path(path)
    if not folder.exists():
        raise UserError(f"data.target.path '{path}' does not exist (looked for {folder.resolve()}); point it at a "
                        "folder of target images")
    if not folder.is_dir():
        raise UserError(f"data.target.path '{path}' is not a folder; give the folder that holds the target images")
    files = list_images(folder)
    if not files:
        raise UserError(
            f"data.target.path '{path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add the target shots"
        )
    images = torch.stack([load_image(f, resolution) for f in files])
    captions = []
    for f in files:
        cap = f.with_suffix(".txt")
        captions.append(cap.read_text().strip() if cap.is_file() else None)
    return images, captions, files


def fingerprint(spec) -> str:
    """Identifies the frozen encoders (VAE, text encoders) of a backbone by their config files."""
    import hashlib

    h = hashlib.sha256()
    for name in ("vae", "text_encoder", "text_encoder_2"):
        d = spec.component(name) if spec.root is not None else None
        if d is not None and (d / "config.json").is_file():
            h.update(name.encode() + (d / "config.json").read_bytes())
            for w in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
                h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:16]


@dataclass
class Batch:
    """One rank's micro-batch of conditions and target shots (model space: pixels or latents)."""

    cond: Optional[dict]  # student / fake / target teacher prompts
    cond_src: Optional[dict]  # the same prompts without the rare token (source teacher)
    uncond: Optional[dict]  # empty prompt (CFG, condition dropout)
    real: torch.Tensor
    real_cond: Optional[dict]
    prompts: list[str]
    prompts_src: list[str]
    real_prompts: list[str] = field(default_factory=list)  # the shots' captions (real_cond's prompts)


def _check_precomputed(shards, spec, key: str, backbone_key: str, token: Optional[str] = None) -> None:
    m = shards.manifest
    if not m.get("precomputed"):
        return
    if token is not None:
        raise UserError(
            f"{key}: these shards hold precomputed prompt embeddings, but this run trains the embedding of the new "
            f"token '{token}', so its prompts must be encoded as it changes; rerun make-shards without --precompute"
        )
    if m.get("encoders") != fingerprint(spec):
        raise UserError(
            f"{key}: these shards were precomputed with other frozen encoders ({m.get('backbone')}) than the "
            f"recipe's {backbone_key} ({spec.given}); rerun make-shards --precompute with this recipe"
        )


def _first_samples(shards, key: str, path: str, n: int = 64) -> list[dict]:
    """The first n readable samples in manifest order: a split stream's in-memory reference (evaluation
    shots; prompts for sampling and warm start)."""
    out: list[dict] = []
    for i in range(shards.num_shards):
        out.extend(decode_sample(s) for s in shards.read_shard(i))
        if len(out) >= n:
            break
    if not out:
        raise UserError(f"{key} '{path}': no readable shard; check the paths and rerun make-shards")
    return out[:n]


def _split(shards, readers: int, cfg) -> bool:
    return shards.num_shards >= readers and shards.manifest["num_samples"] >= cfg.data.split_min_samples


class DataSource:
    """Source prompts + target shots; produces ``Batch``es from per-sample draws or from split streams.

    ``images`` are the target shots in pixels (metrics, grids); for a split target stream they are its first
    64 readable samples in manifest order, the evaluation reference. ``conditioner`` is the run's shared
    text conditioner (a component of the run, not of the data): prompts are encoded with it and cached."""

    def __init__(self, cfg, spec, resolution: int, codec=None, conditioner=None, dp: tuple[int, int] = (0, 1),
                 sampling_prompts: Optional[list[str]] = None):
        t = cfg.data.target
        self.cfg = cfg
        self.rare = t.rare_token
        self.hflip = t.hflip
        self.translate = t.translate
        self.codec = codec
        self.conditioner = conditioner
        self._cache: dict[str, dict] = {}
        self.streams: dict[str, SplitStream] = {}
        self.in_memory: dict[str, object] = {}  # shard sets read whole (their skipped shards are counted too)
        readers = dp[1] * max(cfg.data.workers, 1)
        seed, B = cfg.run.seed, cfg.train.batch_size
        default_prompt = fill_prompt(t.prompt, t.rare_token, t.class_name)

        if sampling_prompts is not None:  # sample/export: no image and no stream is read
            self.images = torch.zeros((0, 3, resolution, resolution))
            self.model_space = self.model_space_flipped = None
            self.real_prompts = [default_prompt]
            self.prompts = list(sampling_prompts)
            self._keep = set(self.prompts) | {""}
            return

        # -- target ----------------------------------------------------------------------------
        tpath = resolve_path(t.path)
        if tpath.exists() and is_shard_folder(tpath):
            shards = open_shards(t.path, t.shards, "images", "data.target.path")
            _check_precomputed(shards, spec, "data.target.path", f"{cfg.method.primary}.backbone",
                               getattr(conditioner, "token", None))
            if shards.manifest.get("resolution") != resolution:
                raise UserError(
                    f"data.target.path '{t.path}' holds {shards.manifest.get('resolution')}px images but the backbone "
                    f"trains at {resolution}px; rerun make-shards with --resolution {resolution} (or --config)"
                )
            if _split(shards, readers, cfg):
                self.streams["target"] = SplitStream(shards, seed, "target", dp[0], dp[1], cfg.data.workers, B)
                samples = _first_samples(shards, "data.target.path", t.path)  # the evaluation reference
            else:
                samples = load_whole(shards, "target")
                self.in_memory["target"] = shards
            missing = [str(s.get("key")) for s in samples if "image" not in s]
            if missing:
                raise UserError(f"data.target.path '{t.path}': samples {', '.join(missing[:5])} hold no image (png); "
                                "rerun make-shards")
            images = torch.stack([s["image"] for s in samples])
            captions = [s.get("prompt") for s in samples]
            if all("latents" in s for s in samples):
                model_space = torch.stack([s["latents"]["latent"] for s in samples])
                model_flipped = torch.stack([s["latents"]["latent_flip"] for s in samples])
            else:
                model_space = model_flipped = None
            for s in samples:
                if "emb" in s and s.get("prompt") is not None:
                    self._cache[s["prompt"]] = s["emb"]["cond"]
        else:
            images, captions, _ = load_target_folder(t.path, resolution)
            model_space = model_flipped = None
        if model_space is None:
            model_space, model_flipped = self._to_model_space(images), self._to_model_space(images.flip(-1))
        self.images = images
        self.model_space = model_space
        self.model_space_flipped = model_flipped
        self.real_prompts = [c or default_prompt for c in captions]

        # -- source ----------------------------------------------------------------------------
        src = cfg.data.source
        if src.path is not None:
            if conditioner is None:
                raise UserError(f"data.source.path is set but '{spec.given}' is unconditional (no text encoder); "
                                "remove data.source.path")
            shards = open_shards(src.path, src.shards, "prompts", "data.source.path")
            _check_precomputed(shards, spec, "data.source.path", f"{cfg.method.primary}.backbone",
                               getattr(conditioner, "token", None))
            if _split(shards, readers, cfg):
                self.streams["source"] = SplitStream(shards, seed, "source", dp[0], dp[1], cfg.data.workers, B)
                samples = _first_samples(shards, "data.source.path", src.path)  # prompts for sampling, warm start
            else:
                samples = load_whole(shards, "source")
                self.in_memory["source"] = shards
            prompts = [s["prompt"] for s in samples]
            for s in samples:
                if "emb" in s:
                    self._cache[s["prompt"]] = s["emb"]["cond"]
                    self._cache[strip_rare_token(s["prompt"], self.rare)] = s["emb"]["cond_src"]
            uncond = shards.extra("uncond")
            if uncond is not None:
                self._cache[""] = uncond["cond"]
        else:
            prompts = list(src.prompts)
            if src.prompt_file:
                pf = Path(src.prompt_file).expanduser()
                if not pf.is_file():
                    raise UserError(f"data.source.prompt_file '{pf}' not found (looked for {pf.resolve()}); give a "
                                    "text file with one prompt per line")
                prompts = [line.strip() for line in pf.read_text().splitlines() if line.strip()]
                if not prompts:
                    raise UserError(f"data.source.prompt_file '{pf}' holds no prompt; write one prompt per line")
            prompts = [fill_prompt(p, t.rare_token, t.class_name) for p in prompts]
        self.prompts = prompts
        # the in-memory prompts' encodings stay cached; a split stream's are dropped after their batch
        self._keep = set(prompts) | {strip_rare_token(p, self.rare) for p in prompts} | set(self.real_prompts) | {""}

    def _to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return images
        dev = self.codec.vae.device
        return torch.cat([self.codec.encode(images[i:i + 8].to(dev)).cpu() for i in range(0, len(images), 8)])

    @property
    def num_shots(self) -> int:
        return self.images.shape[0]

    def forget(self, word: str) -> None:
        """Drop the cached encodings of prompts holding ``word`` (a token whose embedding changed; CLIP's
        tokenizers lower-case the text, so any case)."""
        word = word.lower()
        for k in [k for k in self._cache if word in k.lower()]:
            del self._cache[k]

    def encode(self, prompts: list[str]) -> Optional[dict]:
        if self.conditioner is None:
            return None
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            enc = self.conditioner.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: ({kk: vv[i:i + 1] for kk, vv in v.items()} if isinstance(v, dict) else v[i:i + 1])
                                  for k, v in enc.items()}
        return cat_cond([_to(self._cache[p], self.conditioner.device) for p in prompts])

    # -- streams' state (saved per rank with each checkpoint) ---------------------------------------
    def state(self) -> dict:
        return {name: s.state() for name, s in self.streams.items()}

    def restore(self, state: Optional[dict], global_counts: Optional[dict] = None) -> None:
        """Continue the split streams: from this rank's saved positions (``state``), or — after a resume at
        another world size — from each stream's global sample count, every reader at its share of it."""
        for name, s in list(self.streams.items()):
            if global_counts is not None:
                self.streams[name] = SplitStream(s.shards, s.seed, name, s.dp_rank, s.dp_size, s.workers, s.batch,
                                                 global_count=int(global_counts.get(name, 0)))
                continue
            st = (state or {}).get(name)
            if st is None:
                continue
            self.streams[name] = SplitStream(s.shards, s.seed, name, s.dp_rank, s.dp_size, s.workers, s.batch,
                                             state=st)

    def samples_seen(self) -> dict:
        return {name: s.samples_seen() for name, s in self.streams.items()}

    def logs(self) -> dict:
        out = {f"data/{name}/skipped_shards": float(len(s.errors)) for name, s in self.in_memory.items()}
        out.update({f"data/{name}/skipped_shards": float(len(s.errors)) for name, s in self.streams.items()})
        return out

    def close(self) -> None:
        for s in self.streams.values():
            s.close()

    def batch(self, d: SampleDraws, augment: bool = True) -> Batch:
        """One micro-batch. Split streams are read only by training iterations (``d.iteration >= 0``);
        warm start, sampling and grids (iteration -1) draw from the in-memory prompts and shots.
        ``augment=False``: the shots as they are (flipped, not translated) — for a measurement such as the
        auto-a probe, or a caller that does not read ``real``."""
        B = len(d.indices)
        training = d.iteration >= 0
        src = self.streams.get("source") if training else None
        if src is not None:
            got = src.next_batch()
            prompts = [s["prompt"] for s in got]
            for s in got:
                if "emb" in s:  # precomputed: no text encoder call
                    self._cache[s["prompt"]] = s["emb"]["cond"]
                    self._cache[strip_rare_token(s["prompt"], self.rare)] = s["emb"]["cond_src"]
        else:
            pidx = d.randint(0, len(self.prompts), "source", "prompt").cpu().tolist()
            prompts = [self.prompts[i] for i in pidx]
        prompts_src = [strip_rare_token(p, self.rare) for p in prompts]
        flip = (d.rand("target", "flip") < 0.5).cpu() if self.hflip else torch.zeros(B, dtype=torch.bool)
        tgt = self.streams.get("target") if training else None
        if tgt is not None:
            got = tgt.next_batch()
            real_prompts = [s.get("prompt") or self.real_prompts[0] for s in got]
            if all("latents" in s for s in got):
                real = torch.stack([s["latents"]["latent_flip" if f else "latent"] for s, f in zip(got, flip.tolist())])
            else:
                pix = torch.stack([s["image"].flip(-1) if f else s["image"] for s, f in zip(got, flip.tolist())])
                real = self._to_model_space(pix)
            for s in got:
                if "emb" in s and s.get("prompt") is not None:
                    self._cache[s["prompt"]] = s["emb"]["cond"]
        else:
            shot = d.randint(0, self.num_shots, "target", "shot").cpu()
            real = torch.where(flip[:, None, None, None], self.model_space_flipped[shot], self.model_space[shot])
            real_prompts = [self.real_prompts[i] for i in shot.tolist()]
        if self.translate > 0 and augment:
            real = translate(real, d, self.translate)
        batch = Batch(
            cond=self.encode(prompts), cond_src=self.encode(prompts_src), uncond=self.encode([""] * B),
            real=real.to(d.device), real_cond=self.encode(real_prompts), prompts=prompts, prompts_src=prompts_src,
            real_prompts=real_prompts,
        )
        if tgt is not None or src is not None:  # a stream's samples are used once: keep the cache small
            for k in [k for k in self._cache if k not in self._keep]:
                del self._cache[k]
        return batch


def translate(x: torch.Tensor, d: SampleDraws, frac: float) -> torch.Tensor:
    """Shift each image of ``x`` (B, C, H, W) by whole cells (dx, dy), each uniform in [-m, m] with
    m = floor(frac x side), drawn per sample (role "target", purposes "shift_x" / "shift_y"); the border is
    reflected. A shift of (0, 0) returns the image unchanged."""
    h, w = x.shape[-2:]
    mx, my = int(frac * w), int(frac * h)  # < the side: validation keeps frac below 0.5, as reflect padding needs
    if mx == 0 and my == 0:
        warnings.warn(f"data.target.translate={frac} shifts {w}x{h} model-space images by less than one cell: no "
                      f"shift happens; raise it to at least {1 / min(w, h):.3g} or set 0", stacklevel=2)
        return x
    dx = d.randint(-mx, mx + 1, "target", "shift_x").cpu().tolist()
    dy = d.randint(-my, my + 1, "target", "shift_y").cpu().tolist()
    padded = torch.nn.functional.pad(x, (mx, mx, my, my), mode="reflect")
    # output pixel (i, j) is input pixel (i - dy, j - dx): the content moves right by dx and down by dy
    return torch.stack([padded[b, :, my - sy: my - sy + h, mx - sx: mx - sx + w] for b, (sx, sy) in enumerate(zip(dx, dy))])


def _to(cond: dict, device) -> dict:
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device)) for k, v in cond.items()}
