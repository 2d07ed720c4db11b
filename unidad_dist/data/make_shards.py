"""``unidad-dist make-shards``: image folders and prompt lists -> WebDataset shards (+ precomputed encodings).

    unidad-dist make-shards --images DIR --out DIR [--config RECIPE [--precompute] [key=value ...]]
                            [--resolution R] [--prompt "a {rare} {cls}"] [--rare sks] [--cls dog] [--per-shard 500]
    unidad-dist make-shards --prompts FILE --out DIR [--config RECIPE [--precompute] [key=value ...]]

With ``--config`` the resolution, prompt template, rare token and class come from the recipe's
``data.target`` (a flag wins), and ``--precompute`` stores what the recipe's frozen models compute:
per image the VAE latents of the image and of its horizontal flip; per prompt the text embeddings of the
prompt and of its rare-token-stripped form (SDXL: both encoders + pooled); the unconditional embedding
beside the manifest. Training then skips the VAE and text encoders for these samples. ``key=value``
overrides change that recipe (the keys read here: ``data.target.resolution``, ``.prompt``, ``.rare_token``,
``.class_name`` and the primary role's ``backbone``, e.g. ``source_teacher.backbone``); without ``--config``
they are an error. The manifest's ``fields`` describe every member (shards.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unidad_dist.config import load_config
from unidad_dist.data.shards import image_to_png, write_shards
from unidad_dist.data.target import fingerprint, list_images, load_image
from unidad_dist.device import CPU, pick_device
from unidad_dist.errors import UserError
from unidad_dist.models.backbones import resolve_backbone
from unidad_dist.models.conditioning import LatentCodec, TextConditioner, fill_prompt, strip_rare_token


def make_shards(out: str, images: Optional[str] = None, prompts: Optional[str] = None, config: Optional[str] = None,
                overrides: tuple = (), precompute: bool = False, resolution: Optional[int] = None,
                per_shard: int = 500, prompt: Optional[str] = None, rare: Optional[str] = None,
                cls: Optional[str] = None) -> dict:
    if (images is None) == (prompts is None):
        raise UserError("give exactly one of --images DIR (the target stream) and --prompts FILE (the source stream)")
    if per_shard < 1:
        raise UserError(f"--per-shard must be >= 1, got {per_shard}")
    out_p = Path(out)
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())):
        raise UserError(f"--out '{out}' exists and is not empty; choose a new folder (nothing was written)")
    cfg = spec = codec = conditioner = None
    if config is not None:
        cfg = load_config(config, list(overrides))
        primary = cfg.method.primary  # the role whose backbone holds the run's VAE and text encoders
        spec = resolve_backbone(getattr(cfg, primary).backbone, primary)
    elif overrides:
        raise UserError(f"the overrides {' '.join(overrides)} apply to the recipe given with --config; give "
                        "--config RECIPE, or drop them (nothing was written)")
    elif precompute:
        raise UserError("--precompute needs --config RECIPE (the VAE and text encoders of its primary backbone, "
                        "e.g. source_teacher.backbone)")
    t = cfg.data.target if cfg is not None else None
    template = prompt or (t.prompt if t else "a {rare} {cls}")
    rare = rare if rare is not None else (t.rare_token if t else "sks")
    cls = cls if cls is not None else (t.class_name if t else "")
    device = CPU
    if precompute:
        device = pick_device()
        if spec.kind == "pixel":
            raise UserError(f"--precompute: '{spec.given}' is a pixel-space backbone with no VAE or text encoder; "
                            "drop --precompute")
        codec = LatentCodec(spec, device) if spec.latent else None  # a pixel-space text model: embeddings only
        conditioner = TextConditioner(spec, device) if spec.text_conditioned else None
    meta = {"kind": "images" if images is not None else "prompts", "precomputed": bool(precompute),
            "rare_token": rare, "class_name": cls,
            "backbone": spec.given if spec is not None else None,
            "encoders": fingerprint(spec) if precompute else None}

    def emb(p: str) -> dict:
        return conditioner.encode([p])

    if images is not None:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise UserError(f"--images '{images}' is not a folder; give the folder that holds the images")
        files = list_images(folder)
        if not files:
            raise UserError(f"--images '{images}' holds no image (PNG/JPEG/WebP/BMP); add images")
        if resolution is None and spec is not None:
            resolution = t.resolution or spec.pixel_resolution
        if resolution is None:
            raise UserError("give --resolution N (or --config RECIPE, whose backbone sets it)")
        meta["resolution"] = int(resolution)

        def samples():
            for f in files:
                img = load_image(f, resolution)
                cap = f.with_suffix(".txt")
                text = cap.read_text().strip() if cap.is_file() else fill_prompt(template, rare, cls)
                rec = {"png": image_to_png(img), "txt": text}
                if codec is not None:
                    pair = codec.encode(torch.stack([img, img.flip(-1)]).to(device)).cpu()
                    rec["latents.safetensors"] = {"latent": pair[0], "latent_flip": pair[1]}
                if conditioner is not None:
                    rec["emb.safetensors"] = {"cond": emb(text)}
                yield rec
    else:
        pf = Path(prompts).expanduser()
        if not pf.is_file():
            raise UserError(f"--prompts '{prompts}' not found; give a text file with one prompt per line")
        lines = [ln.strip() for ln in pf.read_text().splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"--prompts '{prompts}' holds no prompt; write one prompt per line")
        if spec is not None and not spec.text_conditioned:
            raise UserError(f"'{spec.given}' is unconditional: a prompt stream has no use; drop --prompts")
        meta["resolution"] = None

        def samples():
            for line in lines:
                text = fill_prompt(line, rare, cls)
                rec = {"txt": text}
                if conditioner is not None:
                    rec["emb.safetensors"] = {"cond": emb(text), "cond_src": emb(strip_rare_token(text, rare))}
                yield rec

    if conditioner is not None:
        meta["_files"] = {"uncond.safetensors": {"cond": emb("")}}
    with torch.no_grad():
        return write_shards(out_p, samples(), per_shard, meta)
