"""Reference data for the paper's metrics: FID statistics of a full target data set (``unidad-dist fid-stats``)
and the reference photos of CLIP-I / DINO-I."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import torch

from unidad_dist.builtin import resolve_path
from unidad_dist.core.images import to_uint8
from unidad_dist.data.shards import decode_sample, is_shard_folder, open_shards
from unidad_dist.data.target import list_images, load_image
from unidad_dist.device import CPU
from unidad_dist.errors import UserError
from unidad_dist.eval import networks, paper


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}); remove or replace it") from None


def folder_images(folder: str | Path, resolution: Optional[int], what: str) -> tuple[list[Path], int]:
    """The images of ``folder`` and the side they are read at: ``resolution`` (centre crop + resize, as
    training reads them) or, when None, their own size, which must then be one square size."""
    folder = resolve_path(str(folder))
    if not folder.is_dir():
        raise UserError(f"{what} '{folder}' is not a folder of images")
    files = list_images(folder)
    if not files:
        raise UserError(f"{what} '{folder}' holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
    if resolution is not None:
        return files, resolution
    sizes = Counter(_image_size(f) for f in files)
    if len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(4))
        raise UserError(f"{what} '{folder}' holds images of mixed or non-square sizes ({listed}); pass --resolution R "
                        "(each is centre-cropped and resized to R x R, as training reads images; use the resolution "
                        "the samples are generated at)")
    return files, next(iter(sizes))[0]


def iter_reference(images: Optional[str] = None, shards: Optional[str] = None, resolution: Optional[int] = None,
                   batch: int = 50) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, R, R) of every image of a folder or a make-shards image folder, in order."""
    if (images is None) == (shards is None):
        raise UserError("give exactly one of --images DIR and --shards DIR")
    if images is not None:
        files, side = folder_images(images, resolution, "--images")
        for start in range(0, len(files), batch):
            yield to_uint8(torch.stack([load_image(f, side) for f in files[start:start + batch]]))
        return
    path = resolve_path(shards)
    if not is_shard_folder(path):
        raise UserError(f"--shards '{shards}' is not a make-shards folder (no manifest.json)")
    s = open_shards(shards, None, "images", "--shards")
    if resolution is not None and s.manifest.get("resolution") != resolution:
        raise UserError(f"--shards '{shards}' holds {s.manifest.get('resolution')}px images, not --resolution {resolution}; "
                        "omit --resolution or rerun make-shards")
    pending: list[torch.Tensor] = []
    for i in range(s.num_shards):
        for sample in s.read_shard(i):
            image = decode_sample(sample).get("image")
            if image is not None:
                pending.append(image)
            if len(pending) == batch:
                yield to_uint8(torch.stack(pending))
                pending = []
    if pending:
        yield to_uint8(torch.stack(pending))


def fid_stats(out: str, images: Optional[str] = None, shards: Optional[str] = None, resolution: Optional[int] = None,
              inception: Optional[str] = None, batch: int = 50, device=CPU) -> paper.FidStats:
    """Reference statistics (mu, sigma, count, the Inception file's sha256) of a full data set, written to
    ``out`` (.npz). The Inception weights are checked before any image is read."""
    if not str(out).endswith(".npz"):
        raise UserError(f"--out {out}: FID statistics are written as .npz; name the file e.g. stats.npz")
    loc = networks.locate("inception", inception)
    if not loc.available:
        raise UserError(f"fid-stats {loc.reason}")
    net = networks.load_inception(loc)
    feats = [paper.inception_features(net, b, batch=batch, device=device) for b in
             iter_reference(images, shards, resolution, batch)]
    if not feats:
        raise UserError(f"no readable image in {images or shards}")
    stats = paper.FidStats.of(torch.cat(feats), loc.sha256)
    stats.save(out)
    return stats


def reference_photos(folder: Optional[str], resolution: int) -> Optional[torch.Tensor]:
    """eval.reference: reference photos for CLIP-I / DINO-I in [-1, 1] at the samples' resolution (None: none)."""
    if folder is None:
        return None
    files, side = folder_images(folder, resolution, "eval.reference")
    return torch.stack([load_image(f, side) for f in files])
