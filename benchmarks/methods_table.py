"""The four methods side by side on the CPU toy text domain (issue 17 §4): Uni-DAD, OPAD and the Uni-DAD
paper's two-stage baselines, each from the built-in tiny text-conditioned teacher (``builtin:text_teacher``:
red shapes on mid grey captioned "a <shape>") to the demo's 10 shots of blue discs, the concept "a sks disc".

    .venv/bin/python benchmarks/methods_table.py [--methods unidad,opad,...] [--jobs 2] [--threads 1] [--out DIR]
        [--reuse] [k=v ...]

The runs, each one command a user could type (printed):

* ``unidad``: ``unidad-dist train --config demo`` with the text teacher as source (the demo recipe unchanged);
* ``opad``: ``unidad-dist train --config demo_opad`` (recipes/demo_opad.yaml; stand-in feature networks);
* ``adapt_then_distill`` / ``distill_then_adapt``: the shipped chained recipes with ``builtin:demo_teacher``
  replaced by the text teacher in each stage (written to <out>/<name>.yaml; each stage's recipe otherwise
  unchanged).

Every run gets ``data.target.class_name=disc``. Prints one row per method: proxy distance before (the
first stage's sampler before training) and after (the last stage's, at the end), after / the 2-step
student's start from the untouched teacher (one reference for every row), copy rate,
diversity, noise level (samples / shots) and wall seconds (all stages' ``wall_time_s.total_s``), and writes
table.json and a strip of grids (shots | before | after) per method under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import image_strip  # noqa: E402

TEACHER = "builtin:text_teacher"
CLASS = ["data.target.class_name=disc"]
METHODS = ("unidad", "opad", "adapt_then_distill", "distill_then_adapt")


def text_chain(name: str) -> dict:
    """A shipped chained recipe with the demo teacher replaced by the text teacher in every stage."""
    chain = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())

    def swap(v):
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return TEACHER if v == "builtin:demo_teacher" else v

    for st in chain["stages"]:
        st["recipe"] = swap(st["recipe"])
        if isinstance(st["recipe"], str):  # a shipped recipe by name (demo): its source teacher, by override
            st.setdefault("overrides", {})["source_teacher.backbone"] = TEACHER
    return chain


def command(method: str, out: Path) -> tuple[list[str], list[Path]]:
    """The train command of a method and its run folders (stages in order)."""
    train, common = [sys.executable, "-m", "unidad_dist", "train"], ["logging.progress=false", *CLASS]
    run = out / method
    if method == "unidad":
        return [*train, "--config", "demo", f"run.dir={run}", f"source_teacher.backbone={TEACHER}", *common], [run]
    if method == "opad":
        return [*train, "--config", "demo_opad", f"run.dir={run}", *common], [run]
    chain = text_chain(method)
    f = out / f"{method}.yaml"
    f.write_text(yaml.safe_dump(chain, sort_keys=False))
    return [*train, "--config", str(f), f"run.dir={run}", *common], [run / st["name"] for st in chain["stages"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default cpu_count / jobs)")
    ap.add_argument("--out", default=None, help="folder for the runs and table.json (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs of --out whose last stage finished (summary.json) instead of running them again")
    ap.add_argument("overrides", nargs="*", help="overrides for every run (k=v), e.g. run.seed=1")
    args = ap.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="unidad_methods_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def run(method):
        cmd, folders = command(method, out)
        cmd += list(args.overrides)
        print("$ " + " ".join(cmd[2:]), flush=True)
        t = time.time()
        if not (args.reuse and (folders[-1] / "summary.json").is_file()):
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            (out / f"{method}.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise SystemExit(f"{method} failed (exit {r.returncode}); its output: {out / f'{method}.log'}\n"
                                 f"{r.stderr[-2000:]}")
        first = json.loads((folders[0] / "summary.json").read_text())
        last = json.loads((folders[-1] / "summary.json").read_text())
        # <sampler>_before.png / _after.png: the sampler is the student, or a fine-tuned stage's target_teacher
        image_strip(out / f"{method}_grids.png", [folders[0] / "samples" / "target_shots.png",
                                                  *sorted((folders[0] / "samples").glob("*_before.png"))[:1],
                                                  *sorted((folders[-1] / "samples").glob("*_after.png"))[:1]])
        row = {"method": method, "before": first["proxy_distance_before"], "after": last["proxy_distance_after"],
               "copy_rate": last["copy_rate"], "diversity": last["diversity"], "noise_level": last["noise_level"],
               "noise_level_shots": last["noise_level_shots"],
               "wall_s": sum(json.loads((f / "summary.json").read_text())["wall_time_s"]["total_s"] for f in folders),
               "stages": [str(f) for f in folders]}
        print(f"{method}: done in {time.time() - t:.0f} s", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, methods))
    # one reference for every row: the 2-step student as it starts from the untouched teacher (the first
    # stage's "before" of unidad, opad and distill_then_adapt — the same samples; Adapt-then-Distill's first
    # stage samples the teacher itself in 25 steps, so its own "before" is another quantity)
    starts = [r["before"] for r in rows if r["method"] != "adapt_then_distill"]
    start = starts[0] if starts else None
    for r in rows:
        r["ratio"] = r["after"] / start if start else None
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"\nfrom {TEACHER} to 10 shots of blue discs ('a sks disc'); proxy = colour + structure Frechet distance "
          "to the shots (a proxy, not FID); before = the first stage's sampler before training; ratio = after / "
          f"the 2-step student's start from the untouched teacher ({start:.3f})" if start else "")
    print(f"{'method':20s} {'before':>7s} {'after':>7s} {'ratio':>6s} {'copy':>5s} {'div':>5s} {'noise(s/shots)':>14s} {'wall s':>7s}")
    for r in rows:
        ratio = f"{r['ratio']:6.3f}" if r["ratio"] is not None else f"{'-':>6s}"
        print(f"{r['method']:20s} {r['before']:7.3f} {r['after']:7.3f} {ratio} {r['copy_rate']:5.3f} "
              f"{r['diversity']:5.2f} {r['noise_level']:7.3f}/{r['noise_level_shots']:.3f} {r['wall_s']:7.0f}")
    print(f"\nruns, logs and grids (shots | before | after) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
