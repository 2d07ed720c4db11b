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


def _metrics(rdir: Path) -> list[dict]:
    f = rdir / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return out


def run_status(rdir: str | Path, verify: bool = False) -> dict:
    rdir = Path(rdir)
    cfg_file = rdir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"'{rdir}' is not a run folder (no config.yaml); pass the run.dir of a training run")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    total = int(cfg.get("train", {}).get("iterations", 0))
    lines = _metrics(rdir)
    done = max([x.get("iteration", -1) + 1 for x in lines], default=0)
    ok = checkpoint.is_complete if verify else _files_present
    ckpts = [c for c in reversed(checkpoint.all_checkpoints(rdir)) if ok(c)]
    latest = ckpts[0] if ckpts else None
    latest_it = int(latest.name.split("_")[1]) if latest else None
    done = max(done, latest_it or 0)
    recent = [x["seconds_per_iteration"] for x in lines[-10:] if "seconds_per_iteration" in x]
    spi = statistics.median(recent) if recent else None
    out = {"run": str(rdir), "iterations_done": done, "iterations": total,
           "latest_checkpoint": latest.name if latest else None, "checkpoint_verified": verify,
           "seconds_per_iteration": spi,
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
    return "\n".join(lines)
