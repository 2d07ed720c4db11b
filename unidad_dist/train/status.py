"""``unidad-dist status --run DIR``: where a run stands, read from its folder alone (any launcher, live or
not): iterations done, the latest checkpoint, seconds per iteration and ETA, who holds the lock, and how
the last process that held it ended."""
from __future__ import annotations

import json
import socket
import statistics
import time
from pathlib import Path

import yaml

from unidad_dist.errors import UserError
from unidad_dist.train import checkpoint
from unidad_dist.train.logging import TRAIN_LOG
from unidad_dist.train.loop import OUTCOME
from unidad_dist.train.runlock import LOCK, _alive


def _files_present(ckpt: Path) -> bool:
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files", manifest) if isinstance(manifest, dict) else {}
    return all((ckpt / name).is_file() for name in files)


METRICS = "metrics.jsonl"


def read_metrics(rdir: Path) -> tuple[list[dict], int]:
    """The records of a run's metrics.jsonl, in the file's order, and how many lines could not be read: one cut
    by a kill, the line a live run is writing, anything that is not a JSON object of numbers with an integer
    ``iteration``. Never raises on the file's contents."""
    f = Path(rdir) / METRICS
    try:
        text = f.read_bytes().decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return [], 0
    out, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int) \
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in rec.values()):
            skipped += 1
            continue
        out.append(rec)
    return out, skipped


def recent_median(records: list[dict], key: str, last: int = 10) -> float | None:
    """The median of ``key`` over the last ``last`` records (None when none holds it)."""
    recent = [x[key] for x in records[-last:] if key in x]
    return statistics.median(recent) if recent else None


def skipped_note(skipped: int) -> str:
    return (f"skipped {skipped} unreadable line{'' if skipped == 1 else 's'} of {METRICS} (cut by a kill, or being "
            "written)") if skipped else ""


def read_run_config(rdir: Path) -> dict:
    """A run folder's config.yaml as a dict; a folder without a readable one is not a run (one clear error)."""
    cfg_file = Path(rdir) / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"'{rdir}' is not a run folder (no config.yaml); pass the run.dir of a training run")
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"'{cfg_file}' cannot be read ({type(e).__name__}); it is not a run folder written by "
                        "unidad-dist, or the file was damaged: pass the run.dir of a training run") from None
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
        raise UserError(f"'{cfg_file}' is not a resolved recipe; pass the run.dir of a training run")
    return cfg


def run_status(rdir: str | Path, verify: bool = False) -> dict:
    rdir = Path(rdir)
    cfg = read_run_config(rdir)
    total = int(cfg.get("train", {}).get("iterations", 0))
    lines, skipped = read_metrics(rdir)
    done = max([x.get("iteration", -1) + 1 for x in lines], default=0)
    ok = checkpoint.is_complete if verify else _files_present
    ckpts = [c for c in reversed(checkpoint.all_checkpoints(rdir)) if ok(c)]
    latest = ckpts[0] if ckpts else None
    latest_it = int(latest.name.split("_")[1]) if latest else None
    done = max(done, latest_it or 0)
    spi = recent_median(lines, "seconds_per_iteration")
    out = {"run": str(rdir), "iterations_done": done, "iterations": total,
           "latest_checkpoint": latest.name if latest else None, "checkpoint_verified": verify,
           "seconds_per_iteration": spi, "metrics_lines_skipped": skipped,
           "eta_s": spi * (total - done) if spi is not None and done < total else (0.0 if done >= total else None)}
    lock = rdir / LOCK
    holder = None
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        age = time.time() - lock.stat().st_mtime
        holder["heartbeat_age_s"] = age
        stale_s = float(cfg.get("run", {}).get("lock_stale_s", 900.0))
        if holder.get("host") == socket.gethostname():
            holder["alive"] = _alive(int(holder.get("pid", -1)))
        else:
            holder["alive"] = age <= stale_s  # another host: judged by the heartbeat
    out["lock"] = holder
    ended = None
    if (rdir / OUTCOME).is_file():
        try:
            ended = json.loads((rdir / OUTCOME).read_text())
        except (OSError, ValueError):
            ended = None
    if holder is not None and holder.get("alive"):
        state = "live"
    elif holder is not None:
        state = "died (its process is gone without releasing the lock: killed or lost); run the same command to resume"
    elif ended is not None and ended.get("outcome") == "finished" and done >= total:
        state = "finished"
    elif ended is not None and ended.get("outcome") == "stopped":
        state = f"stopped by {ended.get('signal', 'a signal')}; run the same command to resume"
    elif ended is not None and ended.get("outcome") == "failed":
        state = f"failed: {ended.get('error', '?')}"
    else:
        state = "not running" + ("" if done >= total else "; run the same command to resume")
    out["state"] = state
    out["last_outcome"] = ended
    out["train_log"] = str(rdir / TRAIN_LOG) if (rdir / TRAIN_LOG).is_file() else None
    return out


def _duration(s) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_status(st: dict) -> str:
    lines = [f"run        {st['run']}",
             f"state      {st['state']}",
             f"iteration  {st['iterations_done']} of {st['iterations']}",
             f"checkpoint {st['latest_checkpoint'] or 'none yet'}"
             + ("" if st["checkpoint_verified"] or not st["latest_checkpoint"] else " (files present; --verify checks "
                                                                                   "their checksums)"),
             f"speed      " + (f"{st['seconds_per_iteration']:.2f} s/iteration, ETA {_duration(st['eta_s'])}"
                               if st["seconds_per_iteration"] is not None else "- (no metrics logged yet)")]
    h = st["lock"]
    if h is not None:
        lines.append(f"lock       host {h.get('host')} pid {h.get('pid')} job {h.get('job') or '-'}, heartbeat "
                     f"{h['heartbeat_age_s']:.0f} s ago ({'alive' if h.get('alive') else 'not alive'})")
    else:
        lines.append("lock       none (no process is writing this run)")
    if st["train_log"]:
        lines.append(f"log        {st['train_log']}")
    if st.get("metrics_lines_skipped"):
        lines.append(f"metrics    {skipped_note(st['metrics_lines_skipped'])}")
    return "\n".join(lines)
