"""``unidad-dist report --run DIR``: a run's summary table and ``report.png``, read from its folder alone (any
launcher, live or finished; no weights are read and no checkpoint is loaded).

The table: recipe, roles (parameters, precision, ZeRO stage, ranks), placement and world size, iterations
done, wall time by phase, speed, the last losses per role, per-phase step times, throughput, memory and any
other logged metric, the proxies before/after, the checkpoints. The figure: losses per role, learning rates,
gradient norms, the timing / throughput / memory / other metrics that the run logged, the proxies, and the
sample grids over time beside the target shots.

Where each number comes from:

* role sizes: ``parallel.plan.role_parameters`` — the model configs on the meta device, as ``unidad-dist plan``
  sizes them, answered from its cost cache when plan (or an earlier report) sized the same networks (else
  they are built on the meta device once, seconds for an SDXL UNet); no weights are read;
* world size: ``state.json`` of the latest checkpoint (a run writes checkpoint 0 before its first iteration);
  placement: the recipe's ``placement`` resolved for that world size;
* wall time by phase: summary.json (written when a run finishes); before that, the training time summed from
  metrics.jsonl's ``seconds_per_iteration``;
* metrics: metrics.jsonl, grouped by the prefix of each key: ``<role>/…`` (losses, ``lr``, ``grad_norm``,
  ``skipped_nonfinite``), ``data/``, ``time/``, ``throughput/``, ``memory/``, ``perf/``, anything else (e.g.
  evaluation metrics) as other metrics. A line that cannot be read (a kill, the line a live run is writing)
  is skipped and counted.

There is no evaluation over checkpoints, so there is no best checkpoint: the report says so and names the
latest complete one.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

from unidad_dist.config import batch_for_world, config_from_dict, data_parallel_size
from unidad_dist.errors import UserError
from unidad_dist.parallel.placement import resolve_groups
from unidad_dist.parallel.plan import role_parameters
from unidad_dist.train import checkpoint
from unidad_dist.train.logging import QUIET, QUIET_GROUPS
from unidad_dist.train.status import format_status, read_metrics, read_run_config, recent_median, run_status

REPORT = "report.png"
GROUPS = QUIET_GROUPS  # the generic key prefixes (data, time, throughput, memory, perf); anything else: "other"
RANKED = re.compile(r"memory/rank\d+/(.+)")  # per-rank keys: shown as the largest over the ranks
FIG_WIDTH_IN, TITLE_IN, PANEL_HEIGHT_IN, DPI, PANEL_COLS, MAX_GRIDS = 15.0, 0.4, 3.2, 100, 3, 8
PROXY_SKIP = ("iterations", "num_samples", "num_shots", "wall_time_s", "proxy_feature")


def _json(path: Path) -> Optional[dict]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _value(rec: dict, key: str):
    """``rec``'s value of ``key``; of a ``memory/rank*/<name>`` key, the largest over the ranks (None: absent)."""
    if "*" not in key:
        return rec.get(key)
    name = key[len("memory/rank*/"):]
    values = [v for k, v in rec.items() if (m := RANKED.fullmatch(k)) and m.group(1) == name]
    return max(values) if values else None


def group_keys(records: list[dict], roles: list[str]) -> dict:
    """The logged keys by what they are: ``roles`` {role: {"losses", "lr", "grad_norm", "skipped_nonfinite"}},
    one list per generic prefix (GROUPS; the per-rank memory keys folded into ``memory/rank*/<name>``), and
    ``other``. Keys in first-seen order."""
    keys: dict = {}
    for rec in records:
        for k in rec:
            m = RANKED.fullmatch(k)
            keys.setdefault(f"memory/rank*/{m.group(1)}" if m else k, None)
    out = {"roles": {r: {"losses": [], "lr": [], "grad_norm": [], "skipped_nonfinite": []} for r in roles},
           **{g: [] for g in GROUPS}, "other": []}
    for k in keys:
        if k in ("iteration", "seconds_per_iteration"):
            continue
        head, _, tail = k.partition("/")
        if tail and head in out["roles"]:
            out["roles"][head][tail if tail in QUIET else "losses"].append(k)
        elif tail and head in GROUPS:
            out[head].append(k)
        else:
            out["other"].append(k)
    return out


def _roles_from_keys(records: list[dict]) -> list[str]:
    """Without a loadable recipe: the prefixes that log a learning rate or gradient norm (trainable roles)."""
    seen: dict = {}
    for rec in records:
        for k in rec:
            head, _, tail = k.partition("/")
            if tail in ("lr", "grad_norm") and head not in GROUPS:
                seen.setdefault(head, None)
    return list(seen)


def last_values(records: list[dict], keys: list[str]) -> dict:
    """key -> (iteration, value) of the last record that holds it."""
    out = {}
    for rec in reversed(records):
        for k in keys:
            if k not in out and _value(rec, k) is not None:
                out[k] = (rec["iteration"], _value(rec, k))
        if len(out) == len(keys):
            break
    return out


def _proxies(before: Optional[dict], summary: Optional[dict]) -> tuple[list, dict]:
    """Rows (metric, before, after, shots) from eval_before.json and summary.json, and summary.json's other
    numbers."""
    before, summary = before or {}, summary or {}
    rows, used = [], set()
    for k, v in before.items():  # the "initial" evaluation's (before a warm start) are summary.json's *_initial
        if not _number(v) or k.endswith("_shots") or k.startswith("initial_"):
            continue
        after_key = f"{k}_after" if f"{k}_after" in summary else k
        after = summary.get(after_key)
        shots = before.get(f"{k}_shots", summary.get(f"{k}_shots"))
        rows.append((k, v, after if _number(after) else None, shots if _number(shots) else None))
        used |= {k, after_key, f"{k}_before", f"{k}_shots"}
    for k, v in summary.items():  # a finished run without eval_before.json: its after values, with its before
        if k in used or not _number(v) or k in PROXY_SKIP or k.endswith(("_before", "_shots", "_ratio")):
            continue
        base = k[:-len("_after")] if k.endswith("_after") else k
        if f"{base}_before" in summary or f"{base}_shots" in summary:
            b, s = summary.get(f"{base}_before"), summary.get(f"{base}_shots")
            rows.append((base, b if _number(b) else None, v, s if _number(s) else None))
            used |= {k, f"{base}_before", f"{base}_shots"}
    other = {k: v for k, v in summary.items() if k not in used and k not in PROXY_SKIP and _number(v)}
    return rows, other


def _grids(rdir: Path, sampler: Optional[str]) -> list[tuple[str, Path]]:
    """(title, png) of the target shots, the sampler before, its grids over time (at most MAX_GRIDS in all,
    evenly spaced, the last kept) and after."""
    samples = rdir / "samples"
    if not samples.is_dir():
        return []
    if sampler is None:  # without a loadable recipe: the one *_before.png
        found = sorted(p.name[:-len("_before.png")] for p in samples.glob("*_before.png"))
        sampler = found[0] if len(found) == 1 else None
    over_time = []
    for p in sorted(samples.glob("iter_*.png")):
        m = re.fullmatch(r"iter_(\d+)\.png", p.name)
        if m:
            over_time.append((f"iteration {int(m.group(1))}", p))
    head = [("target shots", samples / "target_shots.png")]
    if sampler:  # initial: before its warm start, when it had one
        head += [(f"{sampler} initial", samples / f"{sampler}_initial.png"),
                 (f"{sampler} before", samples / f"{sampler}_before.png")]
    tail = [(f"{sampler} after", samples / f"{sampler}_after.png")] if sampler else []
    head, tail = [g for g in head if g[1].is_file()], [g for g in tail if g[1].is_file()]
    room, n = max(1, MAX_GRIDS - len(head) - len(tail)), len(over_time)
    if n > room:
        over_time = [over_time[round(i * (n - 1) / (room - 1))] for i in range(room)] if room > 1 else over_time[-1:]
    return head + over_time + tail


def _roles(cfg, raw: dict, world: Optional[int], records: list[dict], rep: dict, notes: list[str]) -> dict:
    """Each role's size, precision, ZeRO stage and ranks (from the recipe), or only its name (from the
    metrics' keys) when the recipe does not load; sets rep["placement"]."""
    if cfg is None:
        rep["placement"] = (raw.get("placement") or {}).get("mode")
        return {r: {} for r in _roles_from_keys(records)}
    groups = None
    if world is not None:
        try:
            groups = resolve_groups(cfg, world)
        except UserError as e:
            notes.append(f"placement for {world} ranks: {e}")
    sizes = {}
    try:
        sizes = role_parameters(cfg, notes=notes)
    except Exception as e:  # noqa: BLE001 - sizing is optional: the rest of the report stands without it
        notes.append(f"role sizes unavailable ({_first_line(e)})")
    rep["placement"] = cfg.placement.mode
    roles = {}
    for spec in cfg.method.roles(cfg):
        rc = getattr(cfg, spec.name)
        stage = rc.zero_stage if (spec.trainable or rc.zero_stage == 3) else None
        total, trainable = sizes.get(spec.name, (None, None))
        roles[spec.name] = {"trainable": spec.trainable, "params": total, "trainable_params": trainable,
                            "precision": rc.precision, "zero_stage": stage, "ema": spec.ema or None,
                            "ranks": groups.get(spec.name) if groups else None}
    return roles


def _last_values(rep: dict, records: list[dict], roles: list[str]) -> None:
    """The last logged value of each key: per role (losses, lr, grad norm) and per group."""
    keys = group_keys(records, roles)
    last = {}
    for role, ks in keys["roles"].items():
        last[role] = {k.split("/", 1)[1]: v for k, (_, v) in last_values(
            records, ks["losses"] + ks["lr"] + ks["grad_norm"] + ks["skipped_nonfinite"]).items()}
    rep["last_iteration_logged"] = records[-1]["iteration"] if records else None
    rep["last_per_role"] = last
    for g in GROUPS + ("other",):
        rep[f"last_{g}"] = {k: v for k, (_, v) in last_values(records, keys[g]).items()}
    rep["samples_per_s"] = recent_median(records, "throughput/samples_per_s")


def _timings(rep: dict, summary: Optional[dict], records: list[dict]) -> None:
    """Wall time by phase (summary.json) and the training seconds the metrics account for."""
    phases = (summary or {}).get("wall_time_s")
    rep["wall_time_s"] = {k: v for k, v in phases.items() if _number(v)} if isinstance(phases, dict) else None
    trained, prev = 0.0, -1
    for rec in records:
        if _number(rec.get("seconds_per_iteration")):  # an evaluation's record (eval.every) carries no speed
            trained += rec["seconds_per_iteration"] * max(1, rec["iteration"] - prev)
            prev = rec["iteration"]
    rep["train_s_from_metrics"] = trained if records else None


def collect(rdir: str | Path) -> tuple[dict, list[dict]]:
    """What the report says about a run folder (JSON-able), and its metrics records (for the figure)."""
    rdir = Path(rdir)
    raw = read_run_config(rdir)  # not a run folder: one clear error
    st = run_status(rdir)
    records, skipped = read_metrics(rdir)
    notes: list[str] = []
    rep: dict = {"status": st, "run": str(rdir), "metrics_lines": len(records), "metrics_lines_skipped": skipped,
                 "notes": notes}
    run_cfg, algo = raw.get("run") or {}, raw.get("algorithm") or {}
    rep["recipe"] = {"name": run_cfg.get("name"), "method": algo.get("name", "unidad"),
                     "iterations": (raw.get("train") or {}).get("iterations"),
                     "batch_size": (raw.get("train") or {}).get("batch_size"), "seed": run_cfg.get("seed")}
    try:
        cfg = config_from_dict(raw)
    except Exception as e:  # noqa: BLE001 - an older or foreign recipe: report what the files say
        cfg = None
        notes.append(f"config.yaml does not load with this version ({_first_line(e)}): roles are read from the "
                     "metrics' keys, without sizes or placement")
    sampler = cfg.method.sampler if cfg is not None else None
    rep["sampler"] = sampler

    latest = st["latest_checkpoint"]
    world = None
    if latest is not None:
        try:
            world = int(checkpoint.saved_state(rdir / "checkpoints" / latest)["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"checkpoint {latest} has no readable state.json: world size unknown")
    rep["world_size"] = world
    rep["world_size_from"] = latest if world is not None else None
    G = (raw.get("train") or {}).get("global_batch_size")
    rep["recipe"]["global_batch_size"] = G
    if G is not None and cfg is not None and world is not None:  # what each rank trained with at that size
        try:
            eff = batch_for_world(cfg, world)
            rep["recipe"]["micro_batch"] = eff.train.batch_size
            rep["recipe"]["grad_accum"] = G // (data_parallel_size(cfg, world) * eff.train.batch_size)
        except UserError:
            pass

    roles = _roles(cfg, raw, world, records, rep, notes)
    rep["roles"] = roles

    _last_values(rep, records, list(roles))

    summary = _json(rdir / "summary.json")
    before = _json(rdir / "eval_before.json")
    _timings(rep, summary, records)
    rep["proxies"], rep["summary_values"] = _proxies(before, summary)
    if summary is not None and summary.get("iterations") != st["iterations"]:
        notes.append(f"summary.json (wall time, proxies after) is from the end of an earlier train.iterations="
                     f"{summary.get('iterations')}; this run now trains to {st['iterations']}")
    rep["checkpoints"] = [p.name for p in checkpoint.all_checkpoints(rdir)]
    best = _json(rdir / checkpoint.BEST)  # `evaluate` with eval.select
    rep["best_checkpoint"] = ({k: best.get(k) for k in ("checkpoint", "metric", "value", "chosen_on")}
                              if isinstance(best, dict) and best.get("checkpoint") else None)
    rep["evaluations"] = _evaluations(rdir)
    rep["grids"] = [[title, str(p)] for title, p in _grids(rdir, sampler)]
    rep["other_pngs"] = sorted(p.name for p in (rdir / "samples").glob("*.png")
                               if str(p) not in {g[1] for g in rep["grids"]}) if (rdir / "samples").is_dir() else []
    return rep, records


def _evaluations(rdir: Path) -> dict:
    """What `evaluate` (eval/<iteration>.json) and eval.every (eval/during_<iteration>.json) recorded: how many,
    and the latest of each, as {checkpoint or iteration, proxy distance, the paper metrics that were available}."""
    out: dict = {}
    for kind, pattern, key in (("checkpoints", "[0-9]*.json", "checkpoint"), ("during", "during_*.json", "iteration")):
        found = []
        for f in (rdir / "eval").glob(pattern) if (rdir / "eval").is_dir() else []:
            stem = f.stem.removeprefix("during_")
            if stem.isdigit():
                found.append((int(stem), f))
        latest = _json(max(found)[1]) if found else None
        values = {}
        if isinstance(latest, dict):
            values["proxy_distance"] = (latest.get("proxies") or {}).get("proxy_distance")
            for r in latest.get("paper") or []:
                if isinstance(r, dict) and r.get("available"):
                    values[r.get("metric")] = r.get("value")
        out[kind] = {"count": len(found), "latest": max(found)[0] if found else None, "values": values}
    return out


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def _count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _v(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _ranks(ranks: Optional[list]) -> str:
    if not ranks:
        return "-"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _pairs(values: dict, strip: str = "") -> str:
    return "  ".join(f"{k[len(strip):] if k.startswith(strip) else k} {_v(v)}" for k, v in values.items())


def format_report(rep: dict) -> str:
    st = rep["status"]
    r = rep["recipe"]
    out = [format_status(st).splitlines()[0],
           f"recipe     {r['name'] or '-'} (method {r['method']}): {r['iterations']} iterations, "
           + (f"batch {r['batch_size']} per rank" if r.get("global_batch_size") is None else
              f"global batch {r['global_batch_size']}" + (
                  f" (at this world size: micro-batch {r['micro_batch']} x {r['grad_accum']} accumulation step(s) "
                  "per rank)" if r.get("micro_batch") else f" (micro-batch at most {r['batch_size']})"))
           + f", seed {r['seed']} (config.yaml)"]
    out += format_status(st).splitlines()[1:]
    world = rep["world_size"]
    out.append(f"world      {_v(world) if world is not None else 'unknown (no checkpoint yet)'} rank"
               f"{'' if world == 1 else 's'}" + (f" (from {rep['world_size_from']})" if world is not None else "")
               + f", placement {rep['placement'] or '-'}")
    if rep["roles"]:
        out.append("roles      " + f"{'role':16} {'params':>9} {'trainable':>9}  {'precision':14} {'ZeRO':>10}  ranks")
        for name, x in rep["roles"].items():
            if not x:
                out.append(f"           {name:16} (sizes need a config.yaml this version loads)")
                continue
            zero = str(x["zero_stage"]) if x["zero_stage"] is not None else "replicated"
            trainable = _count(x["trainable_params"]) if x["trainable"] else "frozen"
            out.append(f"           {name:16} {_count(x['params']):>9} {trainable:>9}"
                       f"  {x['precision']:14} {zero:>10}  {_ranks(x['ranks'])}"
                       + (f"  (EMA {x['ema']})" if x.get("ema") else ""))
        if any(x.get("params") is not None for x in rep["roles"].values()):
            out.append("           (parameters: `unidad-dist plan`'s sizes from the model configs)")
    w = rep["wall_time_s"]
    if w:
        out.append("wall time  " + ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:.1f} s" for k, v in w.items())
                   + " (summary.json)")
    elif rep["train_s_from_metrics"] is not None:
        out.append(f"wall time  training so far ≈ {rep['train_s_from_metrics']:.1f} s (from metrics.jsonl); phases "
                   "are in summary.json when the run ends")
    else:
        out.append("wall time  - (summary.json is written when the run ends)")
    sps = rep["samples_per_s"]
    out.append("samples/s  " + (f"{sps:.4g} (median of the last logged)" if sps is not None
                                else "- (this run logs no throughput/samples_per_s)"))
    if rep["metrics_lines"] == 0:
        out.append("metrics    none logged yet (metrics.jsonl is written from the first iteration on)")
    else:
        out.append(f"losses     the last value of each (metrics.jsonl up to iteration {rep['last_iteration_logged']}):")
        for role, vals in rep["last_per_role"].items():
            if not vals:
                continue  # a role that logs nothing (a frozen teacher)
            losses = {k: v for k, v in vals.items() if k not in QUIET}
            quiet = {k: vals[k] for k in QUIET if k in vals}
            out.append(f"           {role:16} " + (_pairs(losses) or "-") + ("  | " + _pairs(quiet) if quiet else ""))
        for g, label in (("time", "step time  "), ("throughput", "throughput "), ("perf", "perf       "),
                         ("memory", "memory     "), ("data", "data       "), ("other", "other      ")):
            vals = rep[f"last_{g}"]
            if vals:
                out.append(label + _pairs(vals, {"other": "", "memory": "memory/rank*/"}.get(g, f"{g}/"))
                           + (" (the largest over the ranks)" if g == "memory" else ""))
    if rep["proxies"]:
        out.append(f"proxies    {'metric':22} {'before':>10} {'after':>10} {'shots':>10}")
        for name, b, a, s in rep["proxies"]:
            out.append(f"           {name:22} {_v(b):>10} {_v(a):>10} {_v(s):>10}")
    else:
        out.append("proxies    - (eval_before.json is written before the first iteration, summary.json at the end)")
    if rep["summary_values"]:
        out.append("summary    " + _pairs(rep["summary_values"]))
    ck, ev = rep["checkpoints"], rep.get("evaluations") or {}
    for kind, label, what in (("checkpoints", "evaluated  ", "checkpoint"), ("during", "eval.every ", "iteration")):
        e = ev.get(kind) or {}
        if e.get("count"):
            out.append(f"{label}{e['count']} {what}(s) recorded in eval/, the latest ({what} {e['latest']}): "
                       + (_pairs(e["values"]) or "-"))
    b = rep["best_checkpoint"]
    if b:
        out.append(f"best       {b['checkpoint']}: {b['metric']} {_v(b['value'])} ({b.get('chosen_on') or 'eval/best.json'})"
                   + (f"; present: {', '.join(ck)}" if ck else ""))
    else:
        out.append("best       none recorded (`unidad-dist evaluate --run DIR --all eval.select=<metric>` picks one); "
                   "latest complete: " + (st["latest_checkpoint"] or "none yet") + (f" (present: {', '.join(ck)})" if ck else ""))
    grids = rep["grids"]
    out.append("samples    " + (", ".join(Path(p).name for _, p in grids) if grids else "no sample grids yet")
               + (f"; also {', '.join(rep['other_pngs'])}" if rep["other_pngs"] else ""))
    for n in rep["notes"]:
        out.append(f"note       {n}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------------------
def _series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(rec["iteration"], _value(rec, key)) for rec in records if _value(rec, key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panels(rep: dict, records: list[dict]) -> list[tuple[str, list[str], bool]]:
    """(title, keys, log y) of each metrics panel, only for what the run logged."""
    keys = group_keys(records, list(rep["roles"]))
    panels = []
    for role, ks in keys["roles"].items():
        if ks["losses"]:
            panels.append((f"losses: {role}", ks["losses"], False))
    for what, title, log in (("lr", "learning rate", False), ("grad_norm", "gradient norm", True)):
        ks = [k for r in keys["roles"].values() for k in r[what]]
        if ks:
            panels.append((title, ks, log))
    spi = ["seconds_per_iteration"] if any("seconds_per_iteration" in rec for rec in records) else []
    if spi or keys["time"]:
        panels.append(("seconds per iteration" + (" (time/: by phase)" if keys["time"] else ""), spi + keys["time"],
                       False))
    if keys["memory"]:
        panels.append(("memory (GiB, the largest over the ranks)", keys["memory"], False))
    for k in keys["throughput"] + keys["perf"] + keys["other"]:  # own scales: one panel each
        panels.append((k, [k], False))
    return panels


def _plot_lines(ax, records: list[dict], title: str, keys: list[str], log: bool) -> None:
    strip = title.split(": ", 1)[1] + "/" if title.startswith("losses: ") else ""
    for k in keys:
        xs, ys = _series(records, k)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k[len(strip):] if strip else k)
    if log and all(v > 0 for k in keys for v in _series(records, k)[1] if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(keys) > 1 or strip:
        ax.legend(fontsize=7)


def _plot_proxies(ax, rows: list) -> None:
    ax.axis("off")
    ax.set_title("proxies (eval_before.json, summary.json)", fontsize=10)
    cells = [[name, _v(b), _v(a), _v(s)] for name, b, a, s in rows]
    table = ax.table(cellText=cells, colLabels=["metric", "before", "after", "shots"], loc="upper center",
                     cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)


def figure_size(n_panels: int, n_grids: int) -> tuple[int, int]:
    """report.png's size in pixels for that many metrics panels and sample grids."""
    rows = math.ceil(n_panels / PANEL_COLS)
    return int(round(FIG_WIDTH_IN * DPI)), int(round((TITLE_IN + rows * PANEL_HEIGHT_IN + _grid_height(n_grids)) * DPI))


def _grid_height(n_grids: int) -> float:
    return min(FIG_WIDTH_IN / max(n_grids, 1), PANEL_HEIGHT_IN) + 0.4 if n_grids else 0.0


def write_figure(rep: dict, records: list[dict], out: Path) -> Optional[Path]:
    """report.png (Agg, no pyplot); None when there is nothing to draw (no metrics, proxies or grids)."""
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    panels: list = _panels(rep, records)
    if rep["proxies"]:
        panels.append(("proxies", None, False))
    grids = []
    for title, path in rep["grids"]:
        try:
            with Image.open(path) as im:
                grids.append((title, np.asarray(im.convert("RGB"))))
        except (OSError, ValueError) as e:  # a grid being written by a live run
            rep["notes"].append(f"{Path(path).name} not shown ({_first_line(e)})")
    if not panels and not grids:
        return None
    w_px, h_px = figure_size(len(panels), len(grids))
    w_in, h_in = w_px / DPI, h_px / DPI
    fig = Figure(figsize=(w_in, h_in), dpi=DPI)  # placed by hand, in inches: no layout engine (it draws twice)

    def axes(left: float, top: float, width: float, height: float):
        return fig.add_axes((left / w_in, 1 - (top + height) / h_in, width / w_in, height / h_in))

    cell_w = w_in / PANEL_COLS
    for i, (title, keys, log) in enumerate(panels):
        r, c = divmod(i, PANEL_COLS)
        ax = axes(c * cell_w + 0.75, TITLE_IN + r * PANEL_HEIGHT_IN + 0.35, cell_w - 1.0, PANEL_HEIGHT_IN - 0.95)
        if keys is None:
            _plot_proxies(ax, rep["proxies"])
        else:
            _plot_lines(ax, records, title, keys, log)
    if grids:
        top, gw = TITLE_IN + math.ceil(len(panels) / PANEL_COLS) * PANEL_HEIGHT_IN, w_in / len(grids)
        for i, (title, arr) in enumerate(grids):
            ax = axes(i * gw + 0.1, top + 0.3, gw - 0.2, _grid_height(len(grids)) - 0.4)
            ax.imshow(arr, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{rep['recipe']['name'] or rep['run']}: {rep['status']['state'].split(';')[0]}, iteration "
                 f"{rep['status']['iterations_done']} of {rep['status']['iterations']}", fontsize=11,
                 y=1 - 0.1 / h_in, va="top")
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass --out FILE in a writable folder") from None
    return out


def report(rdir: str | Path, out: Optional[str | Path] = None, plot: bool = True) -> tuple[dict, Optional[Path]]:
    """The report of a run folder and, with ``plot``, report.png (``out``, default ``<run>/report.png``); the
    path is None when there was nothing to draw yet."""
    rep, records = collect(rdir)
    path = write_figure(rep, records, Path(out) if out else Path(rdir) / REPORT) if plot else None
    rep["report_png"] = str(path) if path else None
    return rep, path
