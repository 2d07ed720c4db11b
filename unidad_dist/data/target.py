"""The few-shot target set and the source prompts, with deterministic per-sample draws.

Target images are center-cropped and resized (bicubic) to the training resolution once at start (the
set is tiny); an optional ``<image>.txt`` beside an image is its caption, otherwise the prompt template
``a {rare} {cls}`` is used. Which shot, and whether it is flipped, is a per-sample draw keyed by
(seed, iteration, global sample index) — so the batch split over ranks does not change what is seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.errors import UserError
from unidad_dist.methods.draws import SampleDraws
from unidad_dist.models.conditioning import fill_prompt, strip_rare_token

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image(path: Path, resolution: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(
            f"cannot read target image '{path}' ({type(e).__name__}); remove or replace it (PNG/JPEG expected)"
        ) from None
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_target_folder(path: str, resolution: int) -> tuple[torch.Tensor, list[Optional[str]], list[Path]]:
    from unidad_dist.builtin import resolve_path

    folder = resolve_path(path)
    if not folder.exists():
        raise UserError(f"data.target.path '{path}' does not exist; point it at a folder of target images")
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


class DataSource:
    """Source prompts + target shots; produces ``Batch``es from per-sample draws."""

    def __init__(self, cfg, images: torch.Tensor, captions: list[Optional[str]], model_space: torch.Tensor,
                 model_space_flipped: torch.Tensor, conditioner=None):
        t = cfg.data.target
        self.rare = t.rare_token
        self.hflip = t.hflip
        self.images = images
        self.model_space = model_space
        self.model_space_flipped = model_space_flipped
        self.real_prompts = [c or fill_prompt(t.prompt, t.rare_token, t.class_name) for c in captions]
        prompts = list(cfg.data.source.prompts)
        if cfg.data.source.prompt_file:
            pf = Path(cfg.data.source.prompt_file).expanduser()
            if not pf.is_file():
                raise UserError(f"data.source.prompt_file '{pf}' not found; give a text file with one prompt per line")
            prompts = [line.strip() for line in pf.read_text().splitlines() if line.strip()]
            if not prompts:
                raise UserError(f"data.source.prompt_file '{pf}' holds no prompt; write one prompt per line")
        self.prompts = [fill_prompt(p, t.rare_token, t.class_name) for p in prompts]
        self.conditioner = conditioner
        self._cache: dict[str, dict] = {}

    @property
    def num_shots(self) -> int:
        return self.images.shape[0]

    def encode(self, prompts: list[str]) -> Optional[dict]:
        if self.conditioner is None:
            return None
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            enc = self.conditioner.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: ({kk: vv[i:i + 1] for kk, vv in v.items()} if isinstance(v, dict) else v[i:i + 1])
                                  for k, v in enc.items()}
        from unidad_dist.models.conditioning import cat_cond

        return cat_cond([self._cache[p] for p in prompts])

    def batch(self, d: SampleDraws) -> Batch:
        B = len(d.indices)
        pidx = d.randint(0, len(self.prompts), "source", "prompt").cpu().tolist()
        prompts = [self.prompts[i] for i in pidx]
        prompts_src = [strip_rare_token(p, self.rare) for p in prompts]
        shot = d.randint(0, self.num_shots, "target", "shot").cpu()
        flip = (d.rand("target", "flip") < 0.5).cpu() if self.hflip else torch.zeros(B, dtype=torch.bool)
        real = torch.where(flip[:, None, None, None], self.model_space_flipped[shot], self.model_space[shot])
        real_prompts = [self.real_prompts[i] for i in shot.tolist()]
        return Batch(
            cond=self.encode(prompts), cond_src=self.encode(prompts_src), uncond=self.encode([""] * B),
            real=real.to(d.device), real_cond=self.encode(real_prompts), prompts=prompts, prompts_src=prompts_src,
        )
