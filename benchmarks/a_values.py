"""Which a (issue 17 §3): the demo recipe with algorithm.a = auto (the controller of docs/algorithm.md §9)
and with the fixed values 0, 0.5, 0.75, 1, on the demo's own target domain (blue discs) and a generated second
domain (green squares), everything else unchanged — so every row, a = 0 included, starts from the recipe's
student warm start on the target teacher's samples (add student.warm_start=0 to compare without it).

    .venv/bin/python benchmarks/a_values.py [--domains blue_discs,green_squares] [--values auto,0,0.5,0.75,1]
        [--seeds 0] [--jobs 2 --threads 1] [--out DIR] [--reuse] [k=v ...]

For each domain: 10 shots at 32 px (seed 77, as benchmarks/heldout_domains.py draws them), then
`unidad-dist demo data.target.path=SHOTS run.seed=S algorithm.a=V [k=v ...]` per value. Prints one row per
(domain, seed, a): the proxy ratio (after / before), copy rate, diversity, noise level (samples / shots), the a
the run ended with (auto: the controller's), wall seconds, and whether the demo acceptance holds
(tools/check_demo.py). Writes table.json under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.heldout_domains import _run  # noqa: E402
from tools.check_demo import check_summary  # noqa: E402


def main() -> int:
    import os

    from unidad_dist import builtin

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", default="blue_discs,green_squares", help="comma-separated domain names")
    ap.add_argument("--values", default="auto,0,0.5,0.75,1", help="comma-separated values of algorithm.a")
    ap.add_argument("--seeds", default="0", help="comma-separated run.seed values")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default cpu_count / jobs)")
    ap.add_argument("--reuse", action="store_true", help="keep the runs of --out that finished (summary.json)")
    ap.add_argument("--out", default=None, help="folder for the runs and table.json (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every run (k=v)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="unidad_a_values_"))
    out.mkdir(parents=True, exist_ok=True)
    values = args.values.split(",")
    tasks = []
    for name in args.domains.split(","):
        if name not in builtin.DOMAINS:
            raise SystemExit(f"unknown domain {name!r}; known: {', '.join(builtin.domain_names())}")
        builtin.make_shots(out / name / "shots", name, 10, 32, seed=77)
        tasks += [(name, int(seed), v) for seed in args.seeds.split(",") for v in values]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def run(task):
        name, seed, value = task
        run_dir = out / name / f"seed{seed}" / f"a_{value}"
        if args.reuse and (run_dir / "summary.json").is_file():
            return task, (json.loads((run_dir / "summary.json").read_text()), None)
        t = time.time()
        summary = _run(run_dir, out / name / "shots", seed, list(args.overrides) + [f"algorithm.a={value}"], threads,
                       "demo")
        seconds = time.time() - t
        print(f"{name} seed {seed} a={value}: ratio {summary['proxy_distance_ratio']:.3f} ({seconds:.0f} s)", flush=True)
        return task, (summary, seconds)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(run, tasks))
    rows = []
    for (name, seed, value), (s, seconds) in results.items():
        rows.append({"domain": name, "seed": seed, "a": value, "a_final": s.get("a_final", s.get("a")),
                     "ratio": s["proxy_distance_ratio"], "copy_rate": s["copy_rate"], "diversity": s["diversity"],
                     "noise_level": s["noise_level"], "noise_level_shots": s["noise_level_shots"],
                     "seconds": seconds, "problems": check_summary(s)})
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'domain':16} seed  a      a_end  ratio  copy   div  noise(s/shots)  secs  acceptance")
    for r in rows:
        a_end = f"{float(r['a_final']):.3f}"
        secs = f"{r['seconds']:5.0f}" if r["seconds"] is not None else "    -"
        print(f"{r['domain']:16} {r['seed']:4}  {r['a']:5}  {a_end}  {r['ratio']:5.3f}  {r['copy_rate']:5.3f} "
              f"{r['diversity']:5.2f}  {r['noise_level']:6.3f}/{r['noise_level_shots']:5.3f}  {secs}  "
              f"{'ok' if not r['problems'] else '; '.join(r['problems'])}")
    print(f"\nruns in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
