"""``unidad-dist`` command line: train, demo, config, sample, launch, plan, make-shards, export."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from unidad_dist.errors import StoppedBySignal, UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _demo_recipe() -> Path:
    for candidate in (RECIPES / "demo.yaml", Path(__file__).resolve().parent / "recipes" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError("recipes/demo.yaml not found next to the package; reinstall unidad_dist from its repository")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. train.iterations=100)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unidad-dist", description="Distributed Uni-DAD training")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("--config", required=True, help="recipe YAML file")
    _add_overrides(p)
    p = sub.add_parser("demo", help="train recipes/demo.yaml (a built-in tiny teacher and 10-shot target)")
    _add_overrides(p)
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("--config", default=None, help="recipe YAML file (default: built-in defaults)")
    p.add_argument("--keys", action="store_true", help="list every valid key")
    _add_overrides(p)
    p = sub.add_parser("sample", help="sample the student (the method's sampler role) of a run")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default: as trained)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--out", required=True, help="a .png grid, a folder for single PNGs, or .safetensors (floats)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt", default=None, help="prompt for text models (default: the recipe's source prompts)")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: latest)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA (when the run kept one)")
    p.add_argument("--generator-seed", type=int, default=None,
                   help="draw the noise from torch.Generator().manual_seed(N) in one batch, as a diffusers "
                        "pipeline called with that generator does (an exported pipeline gives the same images)")
    p = sub.add_parser("launch", help="start several ranks of the same train loop")
    p.add_argument("where", choices=["local"], help="local: N processes on this host")
    p.add_argument("--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--config", required=True, help="recipe YAML file")
    _add_overrides(p)
    p = sub.add_parser("plan", help="memory and FLOPs per role and rank, from model configs (meta device)")
    p.add_argument("--config", required=True, help="recipe YAML file")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB: say whether it fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_overrides(p)
    p = sub.add_parser("make-shards", help="write WebDataset shards (+ manifest) from images or a prompt list")
    p.add_argument("--out", required=True, help="new folder for the shards and manifest.json")
    p.add_argument("--images", default=None, help="folder of target images (the target stream)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (the source stream)")
    p.add_argument("--config", default=None, help="recipe: resolution, prompt template and frozen encoders")
    p.add_argument("--precompute", action="store_true",
                   help="store VAE latents (image + flip) and text embeddings (prompt + rare-token-stripped)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the recipe's)")
    p.add_argument("--per-shard", type=int, default=500, help="samples per tar shard")
    p.add_argument("--prompt", default=None, help="prompt template for images without a caption file")
    p.add_argument("--rare", default=None, help="rare token for {rare}")
    p.add_argument("--cls", default=None, help="class noun for {cls}")
    _add_overrides(p)
    p = sub.add_parser("export", help="export the student (the method's sampler role) as a diffusers pipeline "
                                      "folder (safetensors)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="new folder")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: latest)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA (when the run kept one)")
    return ap


def cmd_train(config: Path | str, overrides: list[str]) -> int:
    from unidad_dist.config import load_config
    from unidad_dist.train.loop import train

    cfg = load_config(config, overrides)
    rdir = train(cfg)
    summary = rdir / "summary.json"
    if summary.is_file() and int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {rdir}")
        print(summary.read_text())
    return 0


def cmd_config(args) -> int:
    from unidad_dist.config import all_keys, dump_yaml, load_config, validate

    cfg = load_config(args.config, args.overrides, check=False)  # the recipe's method decides its sections
    if args.keys:
        print("\n".join(all_keys(cfg.method)))
        return 0
    try:
        validate(cfg)
    except UserError as e:
        if args.config is not None:
            raise
        print(f"# note: {e}", file=sys.stderr)  # the defaults alone name no model or data
    print(dump_yaml(cfg), end="")
    return 0


def cmd_sample(args) -> int:
    import torch

    from unidad_dist.core.images import save_grid, save_images
    from unidad_dist.train.loop import load_run

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg, models, method, ckpt = load_run(args.run, use_ema=not args.raw, iteration=args.checkpoint)
    prompts = [args.prompt] if args.prompt else None
    gen = torch.Generator().manual_seed(args.generator_seed) if args.generator_seed is not None else None
    with torch.no_grad():
        x = method.sample(args.num, steps=args.steps, seed=args.seed, prompts=prompts, generator=gen)
        pixels = models.to_pixels(x).cpu()
    out = Path(args.out)
    if out.suffix.lower() == ".safetensors":  # the float images in [0, 1], (N, 3, H, W), as pipelines give them
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": ((pixels.float() + 1) / 2).clamp(0, 1).contiguous()}, str(out))
    elif out.suffix.lower() == ".png":
        save_grid(pixels, out)
    else:
        save_images(pixels, out)
    print(f"wrote {args.num} samples ({args.steps or method.sampling_info()['steps']} steps, {ckpt.name}) to {out}")
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from unidad_dist.config import load_config
    from unidad_dist.parallel.plan import format_plan, make_plan, parse_bytes

    cfg = load_config(args.config, args.overrides)
    mem = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    plan = make_plan(cfg, args.world_size, mem)
    if args.json:
        out = dataclasses.asdict(plan)
        out["fits"] = plan.fits
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
    return 0


def cmd_export(args) -> int:
    from unidad_dist.export import export

    out = export(args.run, args.out, iteration=args.checkpoint, use_ema=not args.raw)
    info = json.loads((out / "unidad_student.json").read_text())
    what = f"a {info['pipeline']} folder" if info["pipeline"] else "the UNet + scheduler"
    print(f"exported {what} ({info['checkpoint']}, K={info['steps']}) to {out}; "
          f"call it with {', '.join(f'{k}={v}' for k, v in info['pipeline_call'].items())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides that argparse did not place (e.g. after options of `launch local`)
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        if args.cmd == "train":
            return cmd_train(args.config, args.overrides)
        if args.cmd == "demo":
            return cmd_train(_demo_recipe(), args.overrides)
        if args.cmd == "config":
            return cmd_config(args)
        if args.cmd == "sample":
            return cmd_sample(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "make-shards":
            from unidad_dist.data.make_shards import make_shards

            m = make_shards(args.out, images=args.images, prompts=args.prompts, config=args.config,
                            overrides=tuple(args.overrides), precompute=args.precompute, resolution=args.resolution,
                            per_shard=args.per_shard, prompt=args.prompt, rare=args.rare, cls=args.cls)
            print(f"wrote {m['num_samples']} {m['kind']} samples in {len(m['shards'])} shards to {args.out}"
                  + (" (precomputed latents/embeddings)" if m["precomputed"] else ""))
            return 0
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "launch":
            from unidad_dist.launch.local import launch_local

            return launch_local(args.nproc, args.config, args.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr)
        return 128 + e.signum
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
