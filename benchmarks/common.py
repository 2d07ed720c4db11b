"""Shared set-up for the benchmark scripts: a pixel UNet recipe of a chosen size, built like a test's."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def recipe(channels=(64, 128), resolution=32, batch=4, **over) -> dict:
    from unidad_dist import builtin, testing

    root = Path(tempfile.mkdtemp(prefix="unidad_bench_"))
    pipe = testing.write_pixel_pipeline(root / "pixel", resolution=resolution, block_out_channels=channels)
    shots = builtin.make_shots(root / "shots", "blue_discs", 6, resolution, seed=3)
    return testing.tiny_recipe(pipe, shots, root / "run", **{"train.batch_size": batch, **over})


def config(**kw):
    from unidad_dist.config import config_from_dict

    return config_from_dict(recipe(**kw))


def image_strip(out: Path, files: list) -> None:
    """The images of ``files`` side by side, 12 white pixels apart, saved to ``out`` (grids of runs)."""
    from PIL import Image

    ims = [Image.open(f) for f in files]
    canvas = Image.new("RGB", (sum(i.width for i in ims) + 12 * len(ims), max(i.height for i in ims)), "white")
    x = 0
    for im in ims:
        canvas.paste(im, (x, 0))
        x += im.width + 12
    canvas.save(out)
