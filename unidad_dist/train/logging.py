"""Run outputs: metrics.jsonl, a progress bar and optional wandb, and train.log (written by the main rank only)."""
from __future__ import annotations

import json
import os
import secrets
import socket
import string
import sys
import time
from pathlib import Path

from unidad_dist.config import to_dict
from unidad_dist.core.io import atomic_write_text
from unidad_dist.core.progress import progress_bar
from unidad_dist.errors import UserError

QUIET = ("lr", "grad_norm", "skipped_nonfinite")  # logged, not shown on the progress bar
QUIET_GROUPS = ("data", "time", "throughput", "memory", "perf")  # <group>/...: logged, not on the progress bar


WANDB_STATE = "wandb_run.json"  # the run folder's wandb run (id, project, entity): every later process continues it
WANDB_DEFAULT_PROJECT = "unidad_dist"


def wandb_state(run_dir: Path) -> dict | None:
    """The wandb run a run folder logs to (``wandb_run.json``), or None before its first wandb start."""
    f = Path(run_dir) / WANDB_STATE
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except ValueError:
        state = None
    if not isinstance(state, dict) or not state.get("id"):
        raise UserError(f"{f} is damaged (it should hold this run's wandb run id); restore it, or delete it to log "
                        "the rest of this run to a new wandb run")
    return state


def _new_wandb_id() -> str:
    """An id of wandb's own form (8 base-36 characters)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _flat(values: dict, prefix: str) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


class RunLogger:
    """Writes one JSON line per logged iteration; only the main rank writes. The progress bar shows every loss
    the method logs (``<role>/<loss>``), not learning rates, gradient norms or counters.

    With ``logging.wandb`` the same records go to wandb (wandb step = iteration), with the resolved config and
    the run folder as its config. The run folder stores its wandb run (``wandb_run.json``, written before the
    first ``wandb.init``), so every later process on it — a resume after a kill, a requeue, another launcher,
    a moved folder — continues that wandb run. A resumed run re-runs the iterations after its checkpoint:
    wandb only takes steps from its current one on (``run.step``: online, one past the last step it holds;
    offline, 0), so records below it are not sent, and iterations of metrics.jsonl that wandb lost (a killed
    process's unsent tail) are sent again from the file."""

    def __init__(self, run_dir: Path, cfg, is_main: bool, total: int, start: int):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.bar = None
        self.wandb = None
        self._wandb_floor = 0  # the first step wandb takes from this process
        self._t = time.time()
        self._last_it = start
        if not is_main:
            return
        self._drop_lines_from(start)
        if cfg.logging.progress:
            self.bar = progress_bar(total, cfg.method.name, initial=start)
        if cfg.logging.wandb:
            self._start_wandb(start)

    def _start_wandb(self, start: int) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb=true but wandb is not installed; pip install 'unidad_dist[wandb]'") from None
        state, env_id = wandb_state(self.run_dir), os.environ.get("WANDB_RUN_ID")
        if state is None:
            project = self.cfg.logging.wandb_project or os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT
            state = {"id": env_id or _new_wandb_id(), "project": project,
                     "entity": os.environ.get("WANDB_ENTITY") or None}
            atomic_write_text(self.run_dir / WANDB_STATE, json.dumps(state, indent=2) + "\n")
        elif env_id and env_id != state["id"]:
            raise UserError(f"WANDB_RUN_ID={env_id} but run folder {self.run_dir} logs to wandb run {state['id']} "
                            f"({WANDB_STATE}); unset WANDB_RUN_ID to continue that run, or delete {WANDB_STATE} to "
                            "log the rest of this run to a new one")
        elif self.cfg.logging.wandb_project and self.cfg.logging.wandb_project != state["project"]:
            print(f"logging.wandb_project={self.cfg.logging.wandb_project} ignored: this run folder continues wandb "
                  f"run {state['id']} in project {state['project']} ({WANDB_STATE})")
        try:
            run = wandb.init(id=state["id"], project=state["project"], entity=state.get("entity") or None,
                             name=self.cfg.run.name, dir=str(self.run_dir), resume="allow")
        except wandb.errors.Error as e:
            raise UserError(f"wandb could not start ({type(e).__name__}: {str(e).strip()}); log in (`wandb login` or "
                            "WANDB_API_KEY), run it offline (WANDB_MODE=offline; upload later with `wandb sync "
                            f"{self.run_dir}/wandb/offline-run-*`), or set logging.wandb=false") from None
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled
            return
        if run.entity and not state.get("entity"):  # where an online run really went (the login's default entity)
            atomic_write_text(self.run_dir / WANDB_STATE, json.dumps({**state, "entity": run.entity}, indent=2) + "\n")
        run.config.update({**to_dict(self.cfg), "run_folder": str(self.run_dir.resolve())}, allow_val_change=True)
        self.wandb, self._wandb_floor = run, int(run.step)
        if getattr(run, "resumed", False):
            self._backfill(start)

    def _backfill(self, start: int) -> None:
        """Send the metrics.jsonl records of iterations a resumed wandb run lacks (from its step up to this
        process's first iteration): what a killed process logged but never got to the server."""
        f = self.run_dir / "metrics.jsonl"
        if not f.is_file():
            return
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            it = rec.get("iteration", -1)
            if self._wandb_floor <= it < start:
                self.wandb.log(rec, step=it)

    def _drop_lines_from(self, start: int) -> None:
        """A resumed run re-runs the iterations after its checkpoint: drop the lines the interrupted run wrote
        for them (iteration >= start), so metrics.jsonl holds each iteration once."""
        f = self.run_dir / "metrics.jsonl"
        if not f.is_file():
            return
        lines = f.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                it = json.loads(line).get("iteration", -1)
            except ValueError:
                continue  # a line cut by the interruption
            if it < start:
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write_text(f, "".join(keep))

    def log(self, iteration: int, values: dict) -> None:
        if not self.is_main:
            return
        now = time.time()
        its = max(1, iteration + 1 - self._last_it)
        rec = {"iteration": iteration, **{k: float(v) for k, v in values.items()},
               "seconds_per_iteration": (now - self._t) / its}
        self._t, self._last_it = now, iteration + 1
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None and iteration >= self._wandb_floor:
            self.wandb.log(rec, step=iteration)
        if self.bar is not None:
            shown = {k: v for k, v in values.items() if "/" in k and k.split("/", 1)[0] not in QUIET_GROUPS
                     and k.rsplit("/", 1)[1] not in QUIET}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_values(self, iteration: int, values: dict) -> None:
        """A record of ``values`` alone (no speed: evaluation results between the logged windows)."""
        if not self.is_main:
            return
        rec = {"iteration": iteration, **{k: float(v) for k, v in values.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None and iteration >= self._wandb_floor:
            self.wandb.log(rec, step=iteration)

    def image(self, key: str, path: Path, step: int) -> None:
        """An image (a grid file) to wandb at ``step`` (an iteration; the same row as that iteration's record)."""
        if self.wandb is not None and step >= self._wandb_floor:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict, prefix: str) -> None:
        """Results (evaluation) into the wandb run's summary as ``<prefix><key>`` (nested dicts joined by ``/``)."""
        if self.wandb is not None:
            self.wandb.summary.update(_flat(values, prefix))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


TRAIN_LOG = "train.log"


class _Tee:
    """A text stream that also hands each complete line to ``sink`` (a callable), dropping progress-bar frames
    (a line that carries a carriage return or a terminal escape)."""

    def __init__(self, stream, sink):
        self._stream, self._sink, self._buf = stream, sink, ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._buf += text
        if "\n" in self._buf:
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                if "\r" not in line and "\x1b[" not in line:
                    self._sink(line)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class TrainLog:
    """While active, what this process prints (stdout and stderr) is also kept as plain text — the run's
    train.log — without progress-bar frames. Lines are held in memory until ``commit()`` (the run was
    accepted), then appended to ``path`` with a header line; a start refused before that writes nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._held: list[str] = []
        self._saved = None
        self.committed = False

    def _line(self, line: str) -> None:
        if self._file is None:
            self._held.append(line)
        else:
            self._file.write(line + "\n")
            self._file.flush()

    def commit(self) -> None:
        if self.committed:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)} "
                         f"(host {socket.gethostname()}, pid {os.getpid()}) ===\n")
        for line in self._held:
            self._file.write(line + "\n")
        self._file.flush()
        self._held = []
        self.committed = True

    def __enter__(self):
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._line), _Tee(sys.stderr, self._line)
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        if self._file is not None:
            if exc[1] is not None and not isinstance(exc[1], (KeyboardInterrupt, SystemExit)):
                self._file.write(f"error: {type(exc[1]).__name__}: {exc[1]}\n")
            self._file.close()
            self._file = None
        return False
