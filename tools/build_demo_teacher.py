"""Build the demo's built-in teacher (``builtin:demo_teacher``) into the package, where `make demo` and the
tests load it through the same ``builtin:`` path as a user's model folder.

    .venv/bin/python tools/build_demo_teacher.py            # build it if missing or out of date, then publish
    .venv/bin/python tools/build_demo_teacher.py --force    # rebuild it (about 25 minutes on 2 cores)
    .venv/bin/python tools/build_demo_teacher.py --check    # is the shipped one intact and current?
    .venv/bin/python tools/build_demo_teacher.py --name broad_teacher --state build/teachers   # a long build
        # that writes its training state to build/teachers every 250 steps; the same command continues it

Every shipped teacher of ``builtin.BUILTINS`` is handled (``--name`` picks one).

It runs ``builtin.pretrain_teacher(TEACHER)`` — the code a machine without the shipped files runs to rebuild
it into its cache — and writes ``unidad_dist/assets/demo_teacher/``: the diffusers pipeline folder,
``manifest.json`` (configuration, its key, sha256 of each file, versions, seconds) and ``samples.png``
(25-step DDIM samples). At each quarter of the run it prints the samples' proxy distance to its domain,
their noise level and sharpness beside the real images', so one can see when its samples are clean; a
teacher whose final samples fall short of QUALITY is not published.
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

from unidad_dist.eval.metrics import SHAPE_LIMIT  # noqa: E402  (after the path insert)


def main() -> int:
    from unidad_dist import builtin

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the shipped files; exit 1 if one is not usable")
    ap.add_argument("--force", action="store_true", help="rebuild even what is shipped intact")
    names = [n for n, (kind, _) in builtin.BUILTINS.items() if kind in builtin.SHIPPED_KINDS]
    ap.add_argument("--name", choices=names, action="append", help="only this teacher (repeatable; default: all)")
    ap.add_argument("--state", type=Path, metavar="DIR",
                    help="build in DIR/<name>.build with its training state in DIR/<name>.state.pt every 250 steps; "
                         "the same command run again continues a stopped build from there")
    args = ap.parse_args()
    bad = 0
    for name in args.name or names:
        folder, why = builtin.shipped(name)
        if args.check:
            print(f"{name}: shipped, intact: {folder}" if folder else f"{name}: not usable: {why}")
            bad += folder is None
        elif folder is None or args.force:
            bad += build(name, args.state)
        else:
            print(f"{name}: shipped and intact ({folder}); --force rebuilds it")
    return 1 if bad else 0


# What a teacher must reach before it is published (its 25-step DDIM samples against fresh images of its
# domain; measured on the shipped one, 128 samples: distance 0.29, noise 0.005, sharpness 0.42 of 0.43,
# diversity 0.85 — while a 3x3 blur of real images is at distance 1.7 and real images + 0.1 noise at 2.7).
# max_shape: the acceptance's limit (eval/metrics.py SHAPE_LIMIT). The shipped demo teacher: 0.48 at the gate's 128
# samples, 0.84 at the slow test's 64 (the Frechet distance's small-sample bias); the text teacher: 0.76 at 128.
QUALITY = {"max_distance": 0.6, "max_noise": 0.02, "min_sharpness_ratio": 0.8, "min_diversity": 0.7,
           "max_shape": SHAPE_LIMIT}


def quality(unet, cfg: dict, n: int = 128, folder: Path | None = None) -> tuple[dict, list[str]]:
    """The teacher's sample quality (proxy and shape distance to its domain, noise, sharpness, diversity) and what
    falls short of QUALITY (empty when it is clean enough to publish). A text teacher (its text encoder in
    ``folder``) samples its caption of each shape in turn."""
    import torch

    from unidad_dist import builtin
    from unidad_dist.eval import metrics

    x = builtin.teacher_samples(unet, cfg, n, folder=folder)
    real = builtin.render_shapes(builtin.DOMAINS[cfg["domain"]], n, cfg["resolution"], torch.Generator().manual_seed(99))
    m = metrics.all_metrics(x, real)  # each set's structure measured once
    noise, sharp, sharp_real = m["noise_level"], m["sharpness"], m["sharpness_shots"]
    q = {"distance": m["proxy_distance"], "noise": noise, "sharpness": sharp, "sharpness_real": sharp_real,
         "diversity": m["diversity"], "shape": m["shape_distance"]}
    bad = []
    if q["distance"] > QUALITY["max_distance"]:
        bad.append(f"proxy distance to its domain {q['distance']:.2f} > {QUALITY['max_distance']}")
    if q["shape"] > QUALITY["max_shape"]:
        bad.append(f"shape distance to its domain {q['shape']:.2f} > {QUALITY['max_shape']} (not its shapes)")
    if noise > QUALITY["max_noise"]:
        bad.append(f"noise level {noise:.3f} > {QUALITY['max_noise']}")
    if sharp < QUALITY["min_sharpness_ratio"] * sharp_real:
        bad.append(f"sharpness {sharp:.3f} < {QUALITY['min_sharpness_ratio']} x the real images' {sharp_real:.3f}")
    if q["diversity"] < QUALITY["min_diversity"]:
        bad.append(f"diversity {q['diversity']:.2f} < {QUALITY['min_diversity']}")
    return q, bad


def build(name: str, state: Path | None = None) -> int:
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel

    from unidad_dist import builtin
    from unidad_dist.core.images import save_grid
    from unidad_dist.eval import metrics

    _, cfg = builtin.BUILTINS[name]
    out = builtin.ASSETS / name
    if state is None:
        tmp, state_file = out.with_name(f".{name}.tmp-{os.getpid()}"), None
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # a fixed folder, kept with its quarter grids until the build completes
        tmp, state_file = state.resolve() / f"{name}.build", state.resolve() / f"{name}.state.pt"
        if state_file.exists():
            print(f"{name}: continuing the build from {state_file}", flush=True)
    tmp.mkdir(parents=True, exist_ok=True)
    real = builtin.render_shapes(builtin.DOMAINS[cfg["domain"]], 128, cfg["resolution"],
                                 torch.Generator().manual_seed(99))
    noise_real, sharp_real = metrics.noise_and_sharpness(real)

    def samples(unet) -> torch.Tensor:
        return builtin.teacher_samples(unet, cfg, 128, folder=tmp)

    def snapshot(step: int, unet) -> None:
        x = samples(unet)
        noise, sharp = metrics.noise_and_sharpness(x)
        save_grid(x[:36], tmp / f"samples_{step:06d}.png")
        print(f"\n{name} iteration {step}: proxy distance to the teacher's domain {metrics.proxy_distance(x, real):.3f}, "
              f"diversity {metrics.diversity(x, real):.2f}, noise level {noise:.3f} (real {noise_real:.3f}), "
              f"sharpness {sharp:.3f} (real {sharp_real:.3f})", flush=True)

    t0 = time.time()
    builtin.pretrain_teacher(cfg, tmp, progress=True, snapshot=snapshot, state_file=state_file)
    seconds = time.time() - t0  # of this process only, when it continued a stopped build
    total = cfg["steps"]
    final = (UNet2DConditionModel if cfg.get("text") else UNet2DModel).from_pretrained(tmp / "unet").eval()
    snapshot(total, final)
    os.replace(tmp / f"samples_{total:06d}.png", tmp / "samples.png")
    for f in tmp.glob("samples_*.png"):
        f.unlink()
    _, bad = quality(final, cfg, folder=tmp)
    if bad:  # never publish a teacher whose own samples are not clean: students inherit its flaws
        print(f"{name}: not published, its samples fall short ({'; '.join(bad)}); kept in {tmp}")
        return 1
    done = publish(name, tmp, seconds)
    if state_file is not None and done == 0:
        state_file.unlink(missing_ok=True)
    return done


def publish(name: str, tmp: Path, seconds: float) -> int:
    """Write the manifest of a built folder and move it into the package; 0 when it then verifies."""
    import torch

    from unidad_dist import builtin
    from unidad_dist.core.io import sha256_file

    kind, cfg = builtin.BUILTINS[name]
    out = builtin.ASSETS / name
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != "samples.png")
    manifest = {"name": name, "kind": kind, "config": cfg, "key": builtin._key(kind, cfg),
                "command": f"python tools/build_demo_teacher.py --name {name}", "torch": torch.__version__,
                "seconds": round(seconds), "sha256": {f: sha256_file(tmp / f) for f in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    builtin._SHIPPED_OK.clear()
    folder, why = builtin.shipped(name)
    print(f"published {out} ({seconds / 60:.1f} min)" if folder else f"published {out}, but it does not verify: {why}")
    return 0 if folder else 1


if __name__ == "__main__":
    raise SystemExit(main())
