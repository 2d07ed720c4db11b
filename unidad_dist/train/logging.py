"""Run outputs: metrics.jsonl, a progress bar and optional wandb, and train.log (written by the main rank only)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from unidad_dist.core.io import atomic_write_text
from unidad_dist.core.progress import progress_bar
from unidad_dist.errors import UserError

QUIET = ("lr", "grad_norm", "skipped_nonfinite")  # logged, not shown on the progress bar


class RunLogger:
    """Writes one JSON line per logged iteration; only the main rank writes. The progress bar shows every loss
    the method logs (``<role>/<loss>``), not learning rates, gradient norms or counters."""

    def __init__(self, run_dir: Path, cfg, is_main: bool, total: int, start: int):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.bar = None
        self.wandb = None
        self._t = time.time()
        self._last_it = start
        if not is_main:
            return
        self._drop_lines_from(start)
        if cfg.logging.progress:
            self.bar = progress_bar(total, cfg.method.name, initial=start)
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("logging.wandb=true but wandb is not installed; pip install 'unidad_dist[wandb]'") from None
            import dataclasses

            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, dir=str(self.run_dir),
                                    config=dataclasses.asdict(cfg), resume="allow")

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
        if self.wandb is not None:
            self.wandb.log(rec, step=iteration)
        if self.bar is not None:
            shown = {k: v for k, v in values.items() if "/" in k and k.split("/", 1)[0] != "data"
                     and k.rsplit("/", 1)[1] not in QUIET}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

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
