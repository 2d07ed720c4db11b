"""Per-rank model-state bytes at world size 2 / world size 1 under ZeRO-3 (stage3_param_persistence_threshold 0).

Model states = bytes of the distinct storages reachable from each engine's parameters (their partitions),
gradients, fp32 partitions and optimizer state, taken right before an optimizer step. Runs itself under
torchrun with 1 and then 2 ranks and prints the ratio per trainable role and in total.

usage: python benchmarks/zero3_memory.py [--channels 64,128]
goal: ratio <= 0.55
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def worker(out: str, channels: str) -> None:
    import common
    from unidad_dist.device import runtime_from_env
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.measure import model_states_before_step
    from unidad_dist.train.build import build

    over = {f"{r}.zero_stage": 3 for r in ("student", "fake_teacher", "target_teacher")}
    over.update({f"{r}.zero3_persistence_threshold": 0 for r in ("student", "fake_teacher", "target_teacher")})
    cfg = common.config(channels=tuple(int(c) for c in channels.split(",")), batch=2, **over)
    rt = runtime_from_env()
    models = build(cfg, rt)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    method.step(0)  # Adam's moments exist from the first step on
    with model_states_before_step(models.trainable_roles()) as states:
        method.step(1)
    if rt.is_main:
        Path(out).write_text(json.dumps(states))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", default="64,128")
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.channels)
        return
    from unidad_dist.device import free_port

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"ws{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", __file__, "--worker", str(out), "--channels", args.channels]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            res[n] = json.loads(out.read_text())
    for role in res[1]:
        print(f"{role:15} ws1 {res[1][role] / 2**20:8.2f} MiB  ws2 {res[2][role] / 2**20:8.2f} MiB  "
              f"ratio {res[2][role] / res[1][role]:.3f}")
    total = sum(res[2].values()) / sum(res[1].values())
    print(f"per-rank model states, world size 2 / world size 1 (ZeRO-3, persistence 0) = {total:.3f}  (goal <= 0.55)")


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
