"""Run outputs: metrics.jsonl, a progress bar, PNG grids and optional wandb."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> uint8 on the CPU."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None, min_cell: int = 96) -> Path:
    """A PNG grid of images in [-1, 1] (N, 3, H, W); small images are upscaled (nearest) for viewing."""
    from PIL import Image

    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    arr = to_uint8(images)
    _, c, h, w = arr.shape
    pad = 2
    canvas = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, cidx = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + cidx * (w + pad): pad + cidx * (w + pad) + w] = arr[i]
    im = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    scale = max(1, min_cell // max(h, w))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def save_images(images: torch.Tensor, folder: Path, pattern: str = "{:05d}.png") -> list[Path]:
    """One PNG per image (in [-1, 1]), named by ``pattern.format(index)``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    out = []
    for i, a in enumerate(arr):
        p = folder / pattern.format(i)
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def progress_bar(total: int, desc: str, initial: int = 0, leave: bool = True):
    """A live bar on a terminal; in a log file (SLURM, CI) one line every 30 s."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


class RunLogger:
    """Writes one JSON line per logged iteration; only the main rank writes."""

    def __init__(self, run_dir: Path, cfg, is_main: bool, total: int, start: int):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.bar = None
        self.wandb = None
        self._t = time.time()
        self._last_it = start
        if not is_main:
            return
        if cfg.logging.progress:
            self.bar = progress_bar(total, "uni-dad", initial=start)
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                from unidad_dist.errors import UserError

                raise UserError("logging.wandb=true but wandb is not installed; pip install 'unidad_dist[wandb]'") from None
            from unidad_dist.config import to_dict

            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, dir=str(self.run_dir),
                                    config=to_dict(cfg), resume="allow")

    def log(self, iteration: int, values: dict) -> None:
        if not self.is_main:
            return
        now = time.time()
        its = max(1, iteration + 1 - self._last_it)
        rec = {"iteration": iteration, **{k: float(v) for k, v in values.items()},
               "seconds_per_iteration": (now - self._t) / its}
        self._t, self._last_it = now, iteration + 1
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(rec, step=iteration)
        if self.bar is not None:
            short = {k.split("/")[-1] if k.startswith("student") else k: v for k, v in values.items()
                     if k.endswith(("dmd_src", "dmd_trg", "fake_denoise", "gan_d"))}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
