"""Run outputs: metrics.jsonl, a progress bar and optional wandb (written by the main rank only)."""
from __future__ import annotations

import json
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
