"""Where an iteration's time goes, and how fast the whole job runs: for each case, a short run through the
normal train entry (`unidad-dist train`, or `launch local --nproc 2`): the first iteration (cold), then
``--periods`` plan periods (the student steps once a period) logged once a period, so that each metrics.jsonl
line (train/perf.py) is the mean over one period; printed, the mean of those lines:

* seconds per iteration and by phase (``time/<phase>_s``: the method's phases, checkpoint, eval);
* samples/s of the whole job, achieved TFLOP/s (FLOPs counted from the planner's passes), MFU against the
  device's dense peak (core/hardware.py) or "n/a" on a CPU / an unknown device;
* peak memory of every rank (CUDA: the allocator's max allocated / reserved; CPU: peak RSS).

The ratio it prints: the phases' sum / the iteration time (goal 0.9 - 1.1: the phases account for the
iteration; what is left is the loop between steps: hooks, the logging gathers, in split placement a side's
wait for the other).

On a small shared CPU machine set OMP_NUM_THREADS=1: with 2 threads per process on 2 busy cores, OpenMP's
waiting made a tiny iteration ~80x slower here.

Cases: the tiny pixel, SD1.5-form and SDXL-form recipes (unidad_dist.testing; fp32, 1 rank, CFG on the text
forms, the student every 2nd iteration, the GAN generator term on) and the tiny pixel recipe on 2 ranks in
split placement. With CUDA, also the shipped ``sd15_subject`` / ``sdxl_subject`` recipes at full size on
random weights (the pipeline writer and the overrides of benchmarks/gpu_check.py: bf16, ZeRO-0, LoRA 64) at
the largest batch the plan fits in 90 % of the GPU (at most ``--max-batch``), 1 rank.

usage: python benchmarks/iteration_phases.py [--cases tiny_pixel,...] [--periods N] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_COMMON = {"train.fake_updates_per_student": 2, "gan_heads.lambda_g": 0.5, "logging.every": 2,
               "checkpoint.every": 0, "logging.sample_every": 0, "eval.num_samples": 4, "logging.grid_size": 4}
TINY = {  # name -> (form, ranks, overrides)
    "tiny_pixel": ("pixel", 1, {}),
    "tiny_sd15": ("sd15", 1, {"source_teacher.cfg": 2.0, "target_teacher.cfg": 1.5}),
    "tiny_sdxl": ("sdxl", 1, {"source_teacher.cfg": 2.0, "target_teacher.cfg": 1.5}),
    "tiny_pixel_2ranks_split": ("pixel", 2, {"placement.mode": "split"}),
}
FULL = {"sd15": "recipes/sd15_subject.yaml", "sdxl": "recipes/sdxl_subject.yaml"}  # CUDA only


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "unidad_dist", *args], stdout=f, stderr=subprocess.STDOUT,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"unidad-dist {' '.join(args[:3])} failed; see {log}:\n" + log.read_text()[-3000:])


def tiny_case(name: str, work: Path, periods: int) -> tuple[Path, dict]:
    import yaml

    from unidad_dist import builtin, testing

    form, ranks, over = TINY[name]
    pipes = work / "pipes"
    pipe = pipes / form
    if not pipe.is_dir():
        pipe = testing.write_pixel_pipeline(pipe) if form == "pixel" else testing.write_text_pipeline(pipe, form)
    shots = pipes / "shots"
    if not shots.is_dir():
        builtin.make_shots(shots, "blue_discs", 6, 16, seed=3)
    rdir = work / name / "run"
    iterations = 1 + periods * TINY_COMMON["train.fake_updates_per_student"]
    rec = testing.tiny_recipe(pipe, shots, rdir, **{**TINY_COMMON, "train.iterations": iterations, **over})
    recipe = work / name / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(rec))
    cmd = ["train", "--config", str(recipe)] if ranks == 1 else \
        ["launch", "local", "--nproc", str(ranks), "--config", str(recipe)]
    run(cmd, work / name / "train.log")
    return rdir, {"ranks": ranks, "batch": rec["train"]["batch_size"], "precision": "fp32"}


def full_case(arch: str, work: Path, periods: int, max_batch: int) -> tuple[Path, dict]:
    """A shipped recipe at full size on random weights, bf16, ZeRO-0, LoRA 64, the batch the plan fits."""
    import torch

    import gpu_check
    from unidad_dist import builtin
    from unidad_dist.config import load_config
    from unidad_dist.models.backbones import resolve_backbone
    from unidad_dist.parallel.plan import make_plan

    pipe = gpu_check.write_random_pipeline(ROOT / "configs" / arch, work / arch / "pipeline", "cuda")
    res = resolve_backbone(str(pipe), "backbone").pixel_resolution
    shots = builtin.make_shots(work / arch / "shots", "blue_discs", 10, res, seed=3)
    over, primary = gpu_check.stage_overrides(FULL[arch], str(shots), 64)
    over = [f"{primary}.backbone={pipe}"] + over
    memory = torch.cuda.get_device_properties(0).total_memory

    def plan(batch):
        cfg = load_config(ROOT / FULL[arch], over + [f"train.batch_size={batch}"])
        return cfg, make_plan(cfg, 1, memory)

    cfg, p1 = plan(1)
    states = sum(r.model_state_bytes for r in p1.roles.values()) + p1.frozen_helpers_bytes
    per_sample = max(p1.per_rank_bytes[0] - states, 1.0)
    batch = max(1, min(max_batch, int((0.9 * memory - states) // per_sample)))
    period = cfg.method.plan_period(cfg)
    rdir = work / arch / "run"
    run(["train", "--config", str(ROOT / FULL[arch]), *over, f"train.batch_size={batch}", f"run.dir={rdir}",
         f"train.iterations={1 + periods * period}", f"logging.every={period}", "logging.progress=false",
         "logging.sample_every=0",
         "checkpoint.every=0", "checkpoint.keep=1", "eval.num_samples=2", "logging.grid_size=2"],
        work / arch / "train.log")
    return rdir, {"ranks": 1, "batch": batch, "precision": "bf16"}


def summarise(rdir: Path) -> dict:
    """Means over the logged lines after the first (each the mean of one plan period)."""
    lines = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    warm = lines[1:] or lines

    def mean(key):
        have = [x[key] for x in warm if key in x]
        return sum(have) / len(have) if have else None

    keys = sorted({k for x in warm for k in x})
    phases = {k[5:-2]: mean(k) for k in keys if k.startswith("time/") and k != "time/iteration_s"}
    memory: dict = {}
    for k in keys:
        if k.startswith("memory/rank"):
            rank, what = k[len("memory/rank"):].split("/", 1)
            memory.setdefault(int(rank), {})[what[:-4]] = max(x[k] for x in warm if k in x)
    return {"periods": len(warm), "iteration_s": mean("time/iteration_s"), "phases": phases,
            "samples_per_s": mean("throughput/samples_per_s"), "tflops": mean("perf/achieved_tflops"),
            "flops_per_iteration": mean("perf/flops_per_iteration"), "mfu": mean("perf/mfu"), "memory": memory}


def show(name: str, info: dict, s: dict, device: str) -> float:
    it = s["iteration_s"]
    total = sum(s["phases"].values())
    print(f"\n{name}: {info['ranks']} rank{'s' if info['ranks'] > 1 else ''}, batch {info['batch']} per rank, "
          f"{info['precision']}, {device}; mean of {s['periods']} plan periods after the first iteration")
    print(f"  iteration {it:.4f} s = " + ", ".join(f"{p} {v:.4f} ({v / it:.0%})" for p, v in s["phases"].items())
          + f"; phases / iteration = {total / it:.3f}")
    mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else \
        f"n/a ({'CPU' if device == 'cpu' else 'device not in core/hardware.py'})"
    tflops = f"{s['tflops']:.4g}" if s["tflops"] is not None else "n/a (no FLOPs count)"
    print(f"  samples/s {s['samples_per_s']:.3f}   achieved {tflops} TFLOP/s   MFU {mfu}")
    for rank, m in sorted(s["memory"].items()):
        parts = [f"{k.replace('_', ' ')} {v:.2f} GiB" for k, v in m.items()]
        print(f"  rank {rank}: peak " + ", ".join(parts))
    return total / it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join([*TINY, *FULL])} "
                                                  "(default: the tiny ones, and with CUDA the full-size ones)")
    ap.add_argument("--periods", type=int, default=4, help="plan periods measured after the first iteration")
    ap.add_argument("--max-batch", type=int, default=16, help="cap on the full-size runs' batch per GPU")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args()
    import torch

    from unidad_dist.device import device_name, pick_device

    cuda = torch.cuda.is_available()
    names = args.cases.split(",") if args.cases else [*TINY, *(FULL if cuda else ())]
    unknown = [n for n in names if n not in TINY and n not in FULL]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; pick from {', '.join([*TINY, *FULL])}")
    if not cuda and any(n in FULL for n in names):
        raise SystemExit("the full-size cases need a CUDA GPU")
    device = device_name(pick_device())
    work = Path(tempfile.mkdtemp(prefix="unidad_phases_"))
    ratios = {}
    try:
        for name in names:
            rdir, info = tiny_case(name, work, args.periods) if name in TINY else \
                full_case(name, work, args.periods, args.max_batch)
            ratios[name] = show(name, info, summarise(rdir), device)
    finally:
        if args.keep:
            print(f"\nrun folders under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\nphases / iteration (goal 0.9 - 1.1): " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check, for the full-size cases
    main()
