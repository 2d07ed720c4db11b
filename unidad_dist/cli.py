"""``unidad-dist`` command line: train, demo, config, recipes, status, report, sample, launch, plan, make-shards,
export.

Only argparse is imported at start: each command imports what it uses, so `--help` and bad-input errors answer
at once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from unidad_dist.errors import CheckpointGone, StoppedBySignal, UserError

def _demo_recipe() -> Path:
    from unidad_dist.config import recipe_path

    return recipe_path("demo")


RECIPE_HELP = "recipe: a YAML file, or a shipped recipe's name (`unidad-dist recipes` lists them)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (when it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == "*":
            return action.help
        return super()._get_help_string(action)


def _add_overrides(p: argparse.ArgumentParser, example: str = "train.iterations=100") -> None:
    p.add_argument("overrides", nargs="*", help=f"key.sub=value recipe overrides (e.g. {example}); "
                                                 "`unidad-dist config --keys` lists the keys")


def _sub(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unidad-dist", description="Distributed Uni-DAD training",
                                 formatter_class=_Formatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = _sub(sub, "train", "train a recipe (or resume its run: run the same command again)")
    p.add_argument("--config", required=True, help=RECIPE_HELP)
    _add_overrides(p)
    p = _sub(sub, "demo", "train recipes/demo.yaml (a built-in tiny teacher and 10-shot target)")
    _add_overrides(p)
    p = _sub(sub, "config", "print the resolved config, or every key with its type, default and meaning")
    p.add_argument("--config", default=None, help=RECIPE_HELP + " (default: the built-in defaults)")
    p.add_argument("--keys", action="store_true", help="list every valid key: type, default, meaning")
    p.add_argument("--markdown", action="store_true", help="with --keys: as a markdown table (the README's)")
    _add_overrides(p)
    _sub(sub, "recipes", "list the shipped recipes with their one-line purpose")
    p = _sub(sub, "status", "where a run stands: iteration, latest checkpoint, speed and ETA, lock holder, "
                            "whether it is live, ended or failed")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--verify", action="store_true", help="check the checkpoints' checksums (reads every file)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p = _sub(sub, "report", "a run's summary table (recipe, roles and sizes, placement, progress, wall time, speed, "
                            "last losses, proxies, checkpoints) and report.png (curves and sample grids over time); "
                            "live or finished")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", default=None, help="the figure's path (default: <run>/report.png)")
    p.add_argument("--no-plot", action="store_true", help="print the table only; write no figure")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = _sub(sub, "sample", "sample the student (the method's sampler role) of a run; started on several ranks "
                           "(torchrun, srun), each draws its share and rank 0 writes the same images as one rank")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default: as trained)")
    p.add_argument("--num", type=int, default=None, help="number of images (default 16; 4 per prompt with --prompts)")
    p.add_argument("--out", required=True,
                   help="a .png grid, a folder for single PNGs, or .safetensors (tensor 'images': floats in [0, 1], "
                        "(N, 3, H, W), as diffusers pipelines give them; the package's own model space is [-1, 1])")
    p.add_argument("--batch", type=int, default=16, help="images each rank draws at a time")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the run's own per-sample noise (default: the run's run.seed); image i depends "
                        "only on (seed, i), as the run's grids do")
    p.add_argument("--prompt", default=None, help="prompt for text models (default: the recipe's source prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text models: a prompt file, one a line ({rare}/{cls} filled in from the recipe); image i "
                        "takes prompt i mod count, and --num defaults to 4 per prompt (the paper's 27 x 4)")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: latest)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA (when the run kept one)")
    p.add_argument("--generator-seed", type=int, default=None,
                   help="draw the noise from torch.Generator().manual_seed(N) in one batch, as a diffusers "
                        "pipeline called with that generator does (an exported pipeline gives the same images)")
    p = _sub(sub, "launch", "start the ranks of the same train loop: on this host, as a SLURM job, or on a Ray cluster")
    where = p.add_subparsers(dest="where", required=True)
    p = _sub(where, "local", "N processes on this host")
    p.add_argument("--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--config", required=True, help=RECIPE_HELP)
    _add_overrides(p)
    p = _sub(where, "slurm", "a SLURM job through submitit: one rank per GPU; on the time limit or a preemption "
                             "every rank checkpoints, the job requeues and resumes")
    p.add_argument("--config", required=True, help=RECIPE_HELP)
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (one rank each); 0 on CPU nodes")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node on CPU nodes")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", type=int, default=60, help="time limit per job start, minutes")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--mem", default=None, help="memory per node, as sbatch --mem takes it (e.g. 64G; 0 = all)")
    p.add_argument("--constraint", default=None, help="node features (sbatch --constraint)")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="requeues after a time limit or preemption; then the job ends stopped (the same command "
                        "resumes)")
    p.add_argument("--signal", default="USR2", help="the signal SLURM sends before the time limit")
    p.add_argument("--signal-delay", type=int, default=90, help="seconds before the time limit it is sent")
    p.add_argument("--job-name", default=None, help="job name (default: unidad-<run.name>)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one run per value (several --sweep: per combination), as one job array; each run's folder "
                        "is <run.dir>/<key=value_...>; waits for all and prints (and writes sweep.json) how each ended")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and each task's command; "
                                                          "submit nothing")
    p.add_argument("--no-wait", action="store_true", help="print the job id and run folder and return")
    _add_overrides(p)
    p = _sub(where, "ray", "Ray Train workers on a Ray cluster: one rank per worker; a failed worker restarts the "
                           "group, which resumes from the latest checkpoint")
    p.add_argument("--config", required=True, help=RECIPE_HELP)
    p.add_argument("--num-workers", type=int, required=True, help="number of workers (ranks)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker: 1 on GPU clusters, 0 on CPUs")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (its torch threads)")
    p.add_argument("--address", default=None,
                   help="auto (the cluster this node belongs to), local (a private cluster on this machine for this "
                        "command) or HOST:PORT of the head node (default: $RAY_ADDRESS, else auto)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker-group restarts after a worker dies (-1: unlimited); each resumes from the latest "
                        "checkpoint")
    _add_overrides(p)
    p = _sub(sub, "plan", "memory and FLOPs per role and rank, from model configs (meta device)")
    p.add_argument("--config", required=True, help=RECIPE_HELP)
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory per GPU, e.g. 80GB: say whether it fits and, if not, the cheapest layout that does")
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="shipped model config (configs/NAME: sd15, sdxl) for backbones whose folder does not exist "
                        "here (default: inferred from the recipe's paths and name)")
    p.add_argument("--no-cache", action="store_true",
                   help="compute every network cost afresh, neither reading nor writing the cost cache (default: "
                        "reuse and keep them in <cache root>/plan; $UNIDAD_CACHE, default ~/.cache/unidad_dist)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_overrides(p)
    p = _sub(sub, "make-shards", "write WebDataset shards (+ manifest) from images or a prompt list")
    p.add_argument("--out", required=True, help="new folder for the shards and manifest.json")
    p.add_argument("--images", default=None, help="folder of target images (the target stream)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (the source stream)")
    p.add_argument("--config", default=None, help=RECIPE_HELP + ": resolution, prompt template and frozen encoders")
    p.add_argument("--precompute", action="store_true",
                   help="store VAE latents (image + flip) and text embeddings (prompt + rare-token-stripped)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the recipe's)")
    p.add_argument("--per-shard", type=int, default=500, help="samples per tar shard")
    p.add_argument("--prompt", default=None, help="prompt template for images without a caption file")
    p.add_argument("--rare", default=None, help="rare token for {rare}")
    p.add_argument("--cls", default=None, help="class noun for {cls}")
    _add_overrides(p, example="data.target.resolution=512")
    p = _sub(sub, "export", "export the student (the method's sampler role) as a diffusers pipeline folder "
                            "(safetensors)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="new folder")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: latest)")
    p.add_argument("--best", action="store_true",
                   help="the checkpoint `evaluate` recorded as best on eval.select (<run>/eval/best.json)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA (when the run kept one)")
    p = _sub(sub, "evaluate", "measure a run's checkpoints: the demo proxies and the paper's metrics (FID, "
                              "Intra-LPIPS, CLIP-I/T, DINO-I; each unavailable until its weights are named in "
                              "eval.weights.* or the environment); writes <run>/eval/<iteration>.json")
    p.add_argument("--run", required=True, help="run folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: latest)")
    which.add_argument("--all", action="store_true", help="every complete checkpoint")
    which.add_argument("--watch", action="store_true",
                       help="evaluate each new checkpoint as it appears (not yet evaluated ones first) until the "
                            "run has ended; beside training, on another GPU or node")
    p.add_argument("--interval", type=float, default=60.0, help="with --watch: seconds between looks")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default: eval.steps, else as trained)")
    p.add_argument("--num", type=int, default=None, help="samples per checkpoint (default: eval.num_samples)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA (when the run kept one)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    _add_overrides(p, example="eval.fid_stats=stats.npz eval.weights.inception=PATH; only eval.* keys")
    p = _sub(sub, "fid-stats", "FID reference statistics (mu, sigma, count) of a full target data set, for "
                               "eval.fid_stats")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default=None, help="folder of the data set's images")
    src.add_argument("--shards", default=None, help="a make-shards image folder (manifest.json)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--resolution", type=int, default=None,
                   help="centre-crop and resize each image to this side (the samples' resolution); default: the "
                        "images' own size, which must then be one square size")
    p.add_argument("--inception", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $UNIDAD_FID_INCEPTION)")
    p.add_argument("--batch", type=int, default=50, help="images per Inception batch")
    return ap


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cmd_recipes() -> int:
    from unidad_dist.config import shipped_recipes

    recipes = shipped_recipes()
    if not recipes:
        raise UserError("no shipped recipes found next to the package; reinstall unidad_dist")
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:{width}}  {recipe_purpose(path)}")
    print(f"\n(in {next(iter(recipes.values())).parent}; use one as --config NAME, or copy it and edit)")
    return 0


def recipe_purpose(path: Path) -> str:
    """A recipe's one-line purpose: the first sentence of its leading comment."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return (text[:117] + "...") if len(text) > 120 else text or "(no description)"


def cmd_status(args) -> int:
    from unidad_dist.train.status import format_status, run_status

    st = run_status(args.run, verify=args.verify)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def cmd_report(args) -> int:
    """Exit 0 whenever the folder is a run, also one with no metrics yet (the table says so); 2 when it is not."""
    from unidad_dist.train.report import format_report, report

    rep, path = report(args.run, out=args.out, plot=not args.no_plot)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(format_report(rep))
    if not args.no_plot:
        print(f"figure     {path}" if path else "figure     none written: no metrics, proxies or sample grids yet")
    return 0


def cmd_train(config: Path | str, overrides: list[str], shown: str | None = None) -> int:
    from unidad_dist.launch.chain import run_recipe

    rdir = run_recipe(config, overrides)  # a plain recipe, or a chain's stages
    summary = rdir / "summary.json"
    if summary.is_file() and int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {rdir}")
        print(summary.read_text())
        print(next_steps(rdir, shown or config, overrides))
    return 0


def next_steps(rdir: Path, config, overrides: list[str]) -> str:
    """What to look at and what to run next, in a few lines (printed at the end of train and demo)."""
    samples = rdir / "samples"
    grids = [f for f in ("target_shots.png", "student_initial.png", "student_before.png", "student_after.png")
             if (samples / f).is_file()]
    again = "unidad-dist demo" if config == "demo" else f"unidad-dist train --config {config}"
    again += "".join(f" {o}" for o in overrides if not o.startswith("train.iterations="))
    return "\n".join([
        "next:",
        f"  look at   {samples}/" + (f" ({', '.join(grids)})" if grids else ""),
        f"  sample    unidad-dist sample --run {rdir} --num 16 --out {rdir}/samples/more.png",
        f"  export    unidad-dist export --run {rdir} --out {rdir}/export   (a diffusers pipeline folder)",
        f"  status    unidad-dist status --run {rdir}",
        f"  resume    {again} train.iterations=<more>   (the same command continues from the last checkpoint)",
    ])


def cmd_config(args) -> int:
    from unidad_dist.config import dump_yaml, keys_markdown, keys_text, load_config, validate

    cfg = load_config(args.config, args.overrides, check=False)  # the recipe's method decides its sections
    if args.keys:
        print(keys_markdown(cfg.method) if args.markdown else keys_text(cfg.method))
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
    """On every rank it is started on (torchrun, srun, ...): each draws its share, rank 0 writes them all."""
    from unidad_dist.core.images import save_grid, save_images
    from unidad_dist.device import runtime_from_env
    from unidad_dist.models.conditioning import read_prompt_file
    from unidad_dist.train.evaluate import load_sampler
    from unidad_dist.train.sampling import sample_all

    for name in ("num", "steps", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.prompt and args.prompts:
        raise UserError("give --prompt (one prompt) or --prompts (a file), not both")
    rt = runtime_from_env()
    if args.generator_seed is not None and rt.world_size > 1:
        raise UserError("--generator-seed draws all the noise in one batch, as a diffusers pipeline does: run it "
                        "as one process (without it, image i depends only on (seed, i), on any number of ranks)")
    cfg, models, method, ckpt = load_sampler(Path(args.run), rt, use_ema=not args.raw, iteration=args.checkpoint)
    prompts = [args.prompt] if args.prompt else None
    if args.prompts:
        if models.text is None:
            raise UserError("--prompts: the run's model is not text-conditioned; drop --prompts")
        prompts = read_prompt_file(args.prompts, cfg.data.target.rare_token, cfg.data.target.class_name)
    num = args.num or (4 * len(prompts) if args.prompts else 16)
    out = Path(args.out)
    as_float = out.suffix.lower() == ".safetensors"
    if args.generator_seed is not None:
        import torch

        with torch.no_grad():
            x = models.to_pixels(method.sample(num, steps=args.steps, seed=args.seed, prompts=prompts,
                                               generator=torch.Generator().manual_seed(args.generator_seed)))
        x = x.detach().float().cpu()
    else:
        x = sample_all(method, models, rt, num, steps=args.steps, seed=args.seed, prompts=prompts,
                       batch=args.batch, use_ema=not args.raw, as_uint8=not as_float)
    if rt.rank != 0:
        return 0
    if as_float:  # the float images in [0, 1], (N, 3, H, W), as pipelines give them
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": ((x + 1) / 2).clamp(0, 1).contiguous()}, str(out),
                  metadata={"range": "[0, 1]", "layout": "N, 3, H, W"})
    elif out.suffix.lower() == ".png":
        save_grid(x, out)
    else:
        save_images(x, out)
        if models.text is not None:  # which prompt each image was drawn with (CLIP-T and the like need it)
            used = prompts or models.data.prompts
            (out / "prompts.json").write_text(json.dumps([used[i % len(used)] for i in range(num)], indent=1))
    steps = args.steps or method.sampling_info()["steps"]
    ranks = f" on {rt.world_size} ranks" if rt.world_size > 1 else ""
    print(f"wrote {_n(num, 'sample')} ({_n(steps, 'step')}, {ckpt.name}){ranks} to {out}")
    return 0


def cmd_evaluate(args) -> int:
    """On every rank it is started on: each draws its share of the samples, rank 0 measures and prints."""
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.evaluate import (EVAL_DIST_TIMEOUT, checkpoints_to_evaluate, evaluate_checkpoint,
                                            format_record, watch)

    for name in ("steps", "num"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.watch and args.interval <= 0:
        raise UserError(f"--interval must be > 0 seconds, got {args.interval}")
    if args.watch and (args.num or args.steps or args.raw):
        raise UserError("--watch evaluates with the recipe's eval settings (the records best.json is chosen from); "
                        "instead of --num/--steps/--raw pass eval.num_samples=N or eval.steps=K")
    if not (Path(args.run) / "config.yaml").is_file():
        raise UserError(f"'{args.run}' is not a run folder (no config.yaml); pass the run.dir of a training run"
                        + (" (or start the run first)" if args.watch else ""))
    rt = runtime_from_env(EVAL_DIST_TIMEOUT)

    def one(it):
        rec = evaluate_checkpoint(Path(args.run), it, steps=args.steps, num=args.num, use_ema=not args.raw,
                                  overrides=args.overrides, rt=rt)
        if rec is not None and not args.json:
            print(format_record(rec), flush=True)
        return rec

    records = []
    if args.watch:
        records = watch(Path(args.run), args.interval, one, log=lambda m: print(m, file=sys.stderr, flush=True), rt=rt)
    else:
        for it in checkpoints_to_evaluate(Path(args.run), args.checkpoint, args.all, rt):
            try:
                rec = one(it)
            except CheckpointGone as e:
                if not args.all:
                    raise
                if rt.rank == 0:
                    print(f"skipped iteration {it}: {e}", file=sys.stderr)  # pruned by checkpoint.keep meanwhile
                continue
            if rec is not None:
                records.append(rec)
    if args.json and rt.rank == 0:
        print(json.dumps(records, indent=2))
    return 0


def cmd_fid_stats(args) -> int:
    from unidad_dist.device import pick_device
    from unidad_dist.eval.reference import fid_stats

    if args.batch < 1 or (args.resolution is not None and args.resolution < 8):
        raise UserError("--batch must be >= 1 and --resolution >= 8")
    stats = fid_stats(args.out, images=args.images, shards=args.shards, resolution=args.resolution,
                      inception=args.inception, batch=args.batch, device=pick_device())
    print(f"wrote FID reference statistics of {_n(stats.count, 'image')} (Inception sha256 {stats.weights_sha256[:12]}...) "
          f"to {args.out}; set eval.fid_stats={args.out}")
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    from unidad_dist.config import batch_for_world, load_config
    from unidad_dist.parallel.plan import PlanCache, format_plan, make_plan, parse_bytes

    cfg = load_config(args.config, args.overrides)
    cfg = batch_for_world(cfg, args.world_size)  # train.global_batch_size: the micro-batch at this size
    mem = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else None
    cache = PlanCache(disk=not args.no_cache)  # --no-cache: this process computes every cost afresh
    plan = make_plan(cfg, args.world_size, mem, arch=args.arch, cache=cache)
    if args.json:
        out = dataclasses.asdict(plan)
        out["fits"] = plan.fits
        out["largest_rank_bytes"] = plan.largest_rank_bytes
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
    return 0


def cmd_export(args) -> int:
    from unidad_dist.export import export

    iteration, use_ema = args.checkpoint, not args.raw
    if args.best:
        from unidad_dist.train.evaluate import best_checkpoint

        if args.checkpoint is not None or args.raw:
            raise UserError("--best exports the checkpoint and the weights (EMA or raw) it was judged on; "
                            "give it without --checkpoint and --raw")
        iteration, use_ema = best_checkpoint(Path(args.run))
    out = export(args.run, args.out, iteration=iteration, use_ema=use_ema)
    info = json.loads((out / "unidad_student.json").read_text())
    what = f"a {info['pipeline']} folder" if info["pipeline"] else "the UNet + scheduler"
    print(f"exported {what} ({info['checkpoint']}, K={info['steps']}) to {out}; "
          f"call it with {', '.join(f'{k}={v}' for k, v in info['pipeline_call'].items())}"
          + ("; run its UNet under bf16 autocast to reproduce `sample` (call_precision in unidad_student.json)"
             if (info.get("call_precision") or {}).get("unet_autocast") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    if rc == 0:
        _close_process_group()
    return rc


def entry() -> None:
    """The process entry point (the ``unidad-dist`` script and ``python -m unidad_dist``): main(), then the exit
    device.exit_process gives a process that had a process group (it skips the interpreter's finalisation,
    where gloo's threads could abort a rank after a successful command)."""
    rc = main()
    if "torch.distributed" in sys.modules:
        from unidad_dist.device import exit_process

        exit_process(rc)
    raise SystemExit(rc)


def _main(argv: list[str] | None = None) -> int:
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
            return cmd_train(_demo_recipe(), args.overrides, shown="demo")
        if args.cmd == "recipes":
            return cmd_recipes()
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "config":
            return cmd_config(args)
        if args.cmd == "sample":
            return cmd_sample(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "evaluate":
            return cmd_evaluate(args)
        if args.cmd == "fid-stats":
            return cmd_fid_stats(args)
        if args.cmd == "make-shards":
            from unidad_dist.data.make_shards import make_shards

            m = make_shards(args.out, images=args.images, prompts=args.prompts, config=args.config,
                            overrides=tuple(args.overrides), precompute=args.precompute, resolution=args.resolution,
                            per_shard=args.per_shard, prompt=args.prompt, rare=args.rare, cls=args.cls)
            what = "image" if m["kind"] == "images" else "prompt"
            print(f"wrote {_n(m['num_samples'], what)} in {_n(len(m['shards']), 'shard')} to {args.out}"
                  + (" (precomputed latents/embeddings)" if m["precomputed"] else ""))
            return 0
        if args.cmd == "plan":
            return cmd_plan(args)
        if args.cmd == "launch" and args.where == "local":
            from unidad_dist.launch.local import launch_local

            return launch_local(args.nproc, args.config, args.overrides)
        if args.cmd == "launch" and args.where == "slurm":
            from unidad_dist.launch.slurm import SlurmOptions, launch_slurm

            opts = SlurmOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmOptions)})
            return launch_slurm(args.config, args.overrides, opts)
        if args.cmd == "launch" and args.where == "ray":
            from unidad_dist.launch.ray_train import RayOptions, launch_ray

            opts = RayOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RayOptions)})
            return launch_ray(args.config, args.overrides, opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr)
        return 128 + e.signum
    return 1


def _close_process_group() -> None:
    """A rank started by a launcher that finished its command closes its process group (torch asks for it before
    exit: NCCL's queued work, its warning). That alone does not stop gloo's worker threads, which could still
    abort the process at exit: device.exit_process (entry()) handles that. Not after a failure: with NCCL,
    destroying waits for this rank's queued work, which a failed peer never completes — there the launcher
    tears the job down."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 — closing is best effort; the command's result stands
            pass


if __name__ == "__main__":
    entry()
