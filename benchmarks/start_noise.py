"""How grainy a K-step student is before any training (issues 11 and 13): a built-in teacher read with the
student's sampler (x̂0 at each timestep, re-noised with fresh noise to the next) at several timestep lists,
beside its own 25-step DDIM samples. Prints the proxy's noise level and edge sharpness
(``eval.metrics.noise_and_sharpness``) of 64 samples each (seed 5), and the ratio of each list's noise to DDIM's.

    .venv/bin/python benchmarks/start_noise.py [--teacher demo_teacher] [--timesteps 999,300 999,500 ...]

The demo's acceptance allows the shots' noise + 0.03; what the untrained start already uses of it is what
adaptation has left.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT = ["999,300", "999,150", "999,500", "999,700", "999,600,300", "999,500,150", "999,750,500,250"]


def main() -> int:
    import torch
    from diffusers import UNet2DModel

    from unidad_dist import builtin
    from unidad_dist.eval.metrics import noise_and_sharpness
    from unidad_dist.methods.generate import generate
    from unidad_dist.models.schedule import NoiseSchedule

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="demo_teacher", choices=sorted(k for k, v in builtin.BUILTINS.items()
                                                                         if v[0] == "teacher" and not v[1].get("text")))
    ap.add_argument("--timesteps", nargs="+", default=DEFAULT, help="comma-separated lists, e.g. 999,300")
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    _, cfg = builtin.BUILTINS[args.teacher]
    unet = UNet2DModel.from_pretrained(builtin.resolve(f"builtin:{args.teacher}") / "unet").eval()
    sched = NoiseSchedule(builtin._scheduler(cfg).alphas_cumprod, cfg["prediction_type"])
    shape = (args.n, 3, cfg["resolution"], cfg["resolution"])
    g = torch.Generator().manual_seed(5)
    z = torch.randn(shape, generator=g)
    fresh = [torch.randn(shape, generator=g) for _ in range(8)]
    ddim_noise, ddim_sharp = noise_and_sharpness(builtin.teacher_samples(unet, cfg, args.n, seed=5))
    print(f"{'sampler':24s} {'noise':>7s} {'sharp':>7s} {'noise / DDIM':>13s}")
    print(f"{'DDIM 25 steps':24s} {ddim_noise:7.3f} {ddim_sharp:7.3f} {1.0:13.2f}")
    for spec in args.timesteps:
        ts = [int(t) for t in spec.split(",")]
        with torch.no_grad():
            x = generate(lambda x_t, t: sched.to_x0(unet(x_t, t).sample.float(), x_t, t), z, ts, sched,
                         lambda k: fresh[k])
        noise, sharp = noise_and_sharpness(x.clamp(-1, 1))
        print(f"{str(ts):24s} {noise:7.3f} {sharp:7.3f} {noise / ddim_noise:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
