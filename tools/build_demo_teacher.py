"""Build the demo's built-in teacher (``builtin:demo_teacher``) into the package, where `make demo` and the
tests load it through the same ``builtin:`` path as a user's model folder.

    .venv/bin/python tools/build_demo_teacher.py            # pretrain (tens of minutes on 2 cores), then publish
    .venv/bin/python tools/build_demo_teacher.py --check    # is the shipped teacher intact and current?

It pretrains ``unidad_dist.builtin.TEACHER`` (its domain, network, iterations, seed) with
``builtin.pretrain_teacher`` — the code a machine without the shipped files runs to rebuild it — and writes
``unidad_dist/assets/demo_teacher/``: the diffusers pipeline folder, ``manifest.json`` (configuration, its
key, seed, sha256 of each file, versions, seconds) and ``samples.png`` (25-step DDIM samples). At each
quarter of the run it prints the samples' proxy distance to the domain and their noise level and
sharpness beside the real images', and writes a grid, so one can see when its samples are clean.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import torch

    from unidad_dist import builtin
    from unidad_dist.core.images import save_grid
    from unidad_dist.eval import metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the shipped teacher; exit 1 if it is not usable")
    ap.add_argument("--out", default=str(builtin.ASSETS / "demo_teacher"), help="where to publish it")
    args = ap.parse_args()
    if args.check:
        folder, why = builtin.shipped("demo_teacher")
        print(f"shipped demo teacher: {folder}" if folder else f"shipped demo teacher not usable: {why}")
        return 0 if folder else 1

    kind, cfg = builtin.BUILTINS["demo_teacher"]
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    real = builtin.render_shapes(builtin.DOMAINS[cfg["domain"]], 64, cfg["resolution"], torch.Generator().manual_seed(99))
    noise_real, sharp_real = metrics.noise_and_sharpness(real)

    def snapshot(step: int, unet) -> None:
        x = builtin.teacher_samples(unet, cfg, 64)
        noise, sharp = metrics.noise_and_sharpness(x)
        save_grid(x[:36], tmp / f"samples_{step:06d}.png")
        print(f"\niteration {step}: proxy distance to its domain {metrics.proxy_distance(x, real):.3f}, noise level "
              f"{noise:.3f} (real {noise_real:.3f}), sharpness {sharp:.3f} (real {sharp_real:.3f})", flush=True)

    t0 = time.time()
    builtin.pretrain_teacher(cfg, tmp, progress=True, snapshot=snapshot)
    seconds = time.time() - t0
    from diffusers import UNet2DModel

    snapshot(cfg["steps"], UNet2DModel.from_pretrained(tmp / "unet").eval())
    os.replace(tmp / f"samples_{cfg['steps']:06d}.png", tmp / "samples.png")
    for f in tmp.glob("samples_*.png"):
        f.unlink()
    return publish(tmp, out, seconds)


def publish(tmp: Path, out: Path, seconds: float) -> int:
    """Write the manifest of a pretrained folder and move it to ``out``; 0 when it then verifies."""
    import torch

    from unidad_dist import builtin
    from unidad_dist.core.io import sha256_file

    kind, cfg = builtin.BUILTINS["demo_teacher"]
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != "samples.png")
    manifest = {"name": "demo_teacher", "kind": kind, "config": cfg, "key": builtin._key(kind, cfg),
                "command": "python tools/build_demo_teacher.py", "torch": torch.__version__,
                "seconds": round(seconds), "sha256": {f: sha256_file(tmp / f) for f in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    builtin._SHIPPED_OK.clear()
    folder, why = builtin.shipped("demo_teacher")
    print(f"published {out} ({seconds / 60:.1f} min)" if folder else f"published {out}, but it does not verify: {why}")
    return 0 if folder else 1


if __name__ == "__main__":
    raise SystemExit(main())
