"""A run's copy rate measured on many samples (issue 13 §1): the evaluation's 64 samples measure a 5 % copy
rate to about +-2.7 % (one binomial standard error), so one seed's pass or fail says little.

    .venv/bin/python benchmarks/copy_rate.py RUN [RUN ...] [--num 512] [--seed 1000] [--checkpoint N] [--raw]
        [--domain blue_discs]

For each run: `unidad-dist sample --run RUN --num N --seed S --out <tmp>.safetensors` (the user's path: the EMA
unless --raw), then the copy rate of eval/metrics.py (a sample closer to a shot, or its mirror image, than half
the shots' median nearest-neighbour distance) against the run's own target shots, as the evaluation reads
them — printed per block of 64 (the spread one evaluation sees) and over all N, with the shots each copy is
nearest to. ``--domain NAME`` (a built-in procedural domain, unidad_dist.builtin.DOMAINS) adds the same
rate for N fresh draws of that domain itself: what a generator of the true domain would score.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unidad_dist import builtin  # noqa: E402
from unidad_dist.config import config_from_dict  # noqa: E402
from unidad_dist.eval.metrics import nearest_shot  # noqa: E402
from unidad_dist.train.evaluate import target_shots  # noqa: E402

BLOCK = 64  # the demo recipe's eval.num_samples


def report(name: str, samples: torch.Tensor, shots: torch.Tensor) -> dict:
    copies, idx = nearest_shot(samples, shots)
    blocks = [float(copies[i:i + BLOCK].double().mean()) for i in range(0, len(samples) - BLOCK + 1, BLOCK)]
    rate = float(copies.double().mean())  # metrics.copy_rate: the evaluation's criterion
    by_shot = torch.bincount(idx[copies], minlength=len(shots)).tolist()
    print(f"{name}: copy rate {rate:.4f} over {len(samples)} samples; per {BLOCK}: "
          f"{' '.join(f'{b:.3f}' for b in blocks)} (min {min(blocks, default=rate):.3f}, "
          f"max {max(blocks, default=rate):.3f}); copies by nearest shot: {by_shot}", flush=True)
    return {"copy_rate": rate, "blocks": blocks, "by_shot": by_shot}


def sample_run(run: Path, num: int, seed: int, checkpoint, raw: bool, tmp: Path) -> torch.Tensor:
    out = tmp / f"{run.name}.safetensors"
    args = [sys.executable, "-m", "unidad_dist", "sample", "--run", str(run), "--num", str(num), "--seed", str(seed),
            "--out", str(out), "--batch", str(BLOCK)]
    args += ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
    args += ["--raw"] if raw else []
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    (x,) = load_file(out).values()
    return x.float() * 2 - 1  # sample writes floats in [0, 1]; the metrics read [-1, 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--num", type=int, default=512, help="samples per run (default 512)")
    p.add_argument("--seed", type=int, default=1000, help="sample seed (default 1000: not the evaluation's)")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration (default: the latest)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA")
    p.add_argument("--domain", default=None, help="also N fresh draws of this built-in domain")
    a = p.parse_args(argv)
    if a.num < 1:
        p.error("--num must be at least 1")
    if a.domain is not None and a.domain not in builtin.DOMAINS:
        p.error(f"--domain {a.domain!r} is not a built-in domain; one of: {', '.join(builtin.DOMAINS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for run in a.runs:
            cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
            samples = sample_run(run, a.num, a.seed, a.checkpoint, a.raw, Path(tmp))
            shots = target_shots(cfg, samples.shape[-1])
            report(str(run), samples, shots)
            if a.domain is not None:
                fresh = builtin.render_shapes(builtin.DOMAINS[a.domain], a.num, samples.shape[-1],
                                              torch.Generator().manual_seed(a.seed))
                report(f"{a.domain} (fresh draws)", fresh, shots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
