"""Bit-identity table: train a fixed set of runs through the CLI, export each student, print the sha256 of
the exported UNet weights (and of the logged losses), so a refactor can prove it changed no result.

Every case runs through the user's code path (``unidad-dist train`` / ``launch local`` + ``export``) on
tiny models written by ``unidad_dist.testing`` (deterministic for a seed on one machine) or on the demo's
built-in teacher. Run it before and after a change on the same machine and compare the tables::

    python tools/bit_identity.py --out before.json
    ... change ...
    python tools/bit_identity.py --out after.json --compare before.json

``--cases a,b`` runs a subset. The losses' hash covers metrics.jsonl without its timing, memory and FLOPs fields.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = ("seconds_per_iteration",)
TIMING_GROUPS = ("time/", "throughput/", "memory/", "perf/")  # speed, memory, FLOPs: not a result (train/perf.py)

# name -> (form, ranks, overrides); form "demo" runs recipes/demo.yaml
COMMON = {"train.iterations": 4, "train.fake_updates_per_student": 2, "checkpoint.every": 2,
          "run.dist_timeout": 120.0, "gan_heads.lambda_g": 0.5}
CASES: dict[str, tuple[str, int, dict]] = {
    "demo_1rank_20it": ("demo", 1, {"train.iterations": 20}),
    "pixel_2ranks_zero2": ("pixel", 2, {"student.zero_stage": 2, "fake_teacher.zero_stage": 2,
                                        "target_teacher.zero_stage": 2, "train.batch_size": 1}),
    "pixel_2ranks_zero3": ("pixel", 2, {"student.zero_stage": 3, "fake_teacher.zero_stage": 3,
                                        "target_teacher.zero_stage": 3, "source_teacher.zero_stage": 3,
                                        "student.zero3_persistence_threshold": 0,
                                        "fake_teacher.zero3_persistence_threshold": 0,
                                        "target_teacher.zero3_persistence_threshold": 0,
                                        "source_teacher.zero3_persistence_threshold": 0, "train.batch_size": 1}),
    "pixel_2ranks_split": ("pixel", 2, {"placement.mode": "split", "student.zero_stage": 1,
                                        "fake_teacher.zero_stage": 2, "target_teacher.zero_stage": 2,
                                        "student.ema": 0.9}),
    "pixel_backward_simulation": ("pixel", 1, {"student.steps": 3, "student.unroll": "backward_simulation"}),
    "pixel_full_ema_accum": ("pixel", 1, {"student.steps": 2, "student.unroll": "full", "student.ema": 0.5,
                                          "fake_teacher.grad_accum": 2, "student.prediction": "x0"}),
    "pixel_a0_no_target": ("pixel", 1, {"algorithm.a": 0.0, "target_teacher.mode": "off"}),
    "pixel_frozen_target_zero1": ("pixel", 1, {"target_teacher.mode": "frozen", "target_teacher.init": "{pixel}",
                                               "student.zero_stage": 1, "fake_teacher.zero_stage": 1}),
    "sd15_lora_student": ("sd15", 1, {"student.lora.rank": 4, "source_teacher.cfg": 2.0}),
    "sd15_cfg": ("sd15", 1, {"source_teacher.cfg": 2.0, "target_teacher.cfg": 1.5, "student.steps": 2,
                             "target_teacher.student_feedback": 0.5, "target_teacher.feedback_start": 1}),
    "sdxl_a1": ("sdxl", 1, {"source_teacher.cfg": 2.0, "student.steps": 2, "algorithm.a": 1.0,
                            "target_teacher.cfg": 1.5}),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _losses_sha(metrics: Path) -> str:
    h = hashlib.sha256()
    for line in metrics.read_text().splitlines():
        rec = {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS and not k.startswith(TIMING_GROUPS)}
        h.update(json.dumps(rec, sort_keys=True).encode())
    return h.hexdigest()


class Failed(Exception):
    pass


def _run(args: list[str], env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "unidad_dist", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise Failed(f"unidad-dist {' '.join(args)}\n{r.stderr[-3000:]}")


def run_case(name: str, work: Path, pipes: dict) -> dict:
    import yaml

    from unidad_dist import testing

    form, ranks, over = CASES[name]
    rdir = work / name / "run"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    t0 = time.time()
    if form == "demo":
        _run(["demo", f"run.dir={rdir}", "logging.progress=false", *[f"{k}={v}" for k, v in over.items()]], env)
    else:
        over = {k: (v.format(**pipes) if isinstance(v, str) else v) for k, v in over.items()}
        rec = testing.tiny_recipe(pipes[form], pipes["shots"], rdir, **{**COMMON, **over})
        recipe = work / name / "recipe.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(rec))
        if ranks == 1:
            _run(["train", "--config", str(recipe)], env)
        else:
            _run(["launch", "local", "--nproc", str(ranks), "--config", str(recipe)], env)
    out = work / name / "export"
    _run(["export", "--run", str(rdir), "--out", str(out)], env)
    return {"student_sha256": _sha(out / "unet" / "diffusion_pytorch_model.safetensors"),
            "losses_sha256": _losses_sha(rdir / "metrics.jsonl"), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the table as JSON here (rows of other cases in it are kept)")
    ap.add_argument("--compare", default=None, help="a table written before: print same / DIFFERENT per case")
    ap.add_argument("--cases", default=None, help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from unidad_dist import builtin, testing

    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; pick from {', '.join(CASES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="unidad_bitid_"))
    pipes = {"pixel": testing.write_pixel_pipeline(work / "pipes" / "pixel"),
             "sd15": testing.write_text_pipeline(work / "pipes" / "sd15", "sd15"),
             "sdxl": testing.write_text_pipeline(work / "pipes" / "sdxl", "sdxl"),
             "shots": builtin.make_shots(work / "pipes" / "shots", "blue_discs", 6, 16, seed=3)}
    table = {}
    if args.out and Path(args.out).is_file():  # keep the rows of cases not rerun
        table = {k: v for k, v in json.loads(Path(args.out).read_text()).items() if k not in names}
    for name in names:
        try:
            table[name] = run_case(name, work, pipes)
        except Failed as e:
            table[name] = {"student_sha256": "failed", "losses_sha256": "failed", "seconds": 0, "error": str(e)}
            print(f"{name}: FAILED {e}", flush=True)
            continue
        finally:
            if args.out:
                Path(args.out).write_text(json.dumps(table, indent=2))
        print(f"{name:32} student {table[name]['student_sha256']}  losses {table[name]['losses_sha256'][:16]}"
              f"  ({table[name]['seconds']} s)", flush=True)
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        bad = 0
        print(f"\n{'case':32} {'student sha256 (before)':24} {'after':18} result")
        for name, row in ((n, table[n]) for n in names):
            old = before.get(name)
            same = old is not None and all(old[k] == row[k] for k in ("student_sha256", "losses_sha256"))
            bad += not same
            print(f"{name:32} {(old or {}).get('student_sha256', '-')[:16]:24} {row['student_sha256'][:16]:18} "
                  f"{'same' if same else 'DIFFERENT'}")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
