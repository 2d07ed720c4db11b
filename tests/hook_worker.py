"""Run under torchrun by tests/test_hooks.py: train a recipe with extra hooks — one that asks to stop on
ONE rank only, one that records every event — and write what each rank saw to <out>/rank<r>.json.

usage: torchrun --nproc_per_node 2 tests/hook_worker.py RECIPE.yaml OUT_DIR STOP_RANK STOP_AT
"""
import json
import sys
from pathlib import Path


def main() -> None:
    from unidad_dist.config import load_config
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.hooks import Hook
    from unidad_dist.train.loop import train

    recipe, out, stop_rank, stop_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rt = runtime_from_env(60.0)
    seen = {"steps": [], "checkpoints": [], "finished": None, "closed": False, "started": None}

    class StopOnOneRank(Hook):  # e.g. the SLURM signal reached this rank first
        def should_stop(self, run, done):
            return run.rt.rank == stop_rank and done >= stop_at

    class Record(Hook):
        def on_train_start(self, run, start):
            seen["started"] = start

        def on_step_end(self, run, iteration, logs):
            seen["steps"].append(iteration)

        def on_checkpoint(self, run, path, iteration):
            seen["checkpoints"].append([str(path), iteration, (Path(path) / "manifest.json").is_file()])

        def on_train_end(self, run, finished):
            seen["finished"] = finished

        def close(self, run):
            seen["closed"] = True

    train(load_config(recipe), rt, hooks=[StopOnOneRank(), Record()])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rt.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
