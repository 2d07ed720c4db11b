"""Full-state checkpoint save time / raw ``torch.save`` of the same tensors (goal <= 1.5), and the training
stall of an asynchronous save (``checkpoint.async``) / the synchronous save (goal <= 0.25).

A pixel UNet recipe sized so the trainable state (student + fake teacher with heads: fp32 weights and
both Adam moments) is >= 1 GiB, built through the framework (DeepSpeed engines, 1 rank), one training
step so the optimizer state exists. Then, in one run, alternating which goes first, best of --repeats:
  * ours: ``checkpoint.save`` — every trainable role's engine state (weights, optimizer; ZeRO-3 would add
    the gathered weights), RNG, data positions, sha256 manifest (computed while writing), atomic rename,
    fsync;
  * async: ``checkpoint.stage`` with a host stager + the background writer's start — what training waits for
    (the state copied into host memory); the write itself (timed too, not counted) runs in the background,
    and is waited for before the next measurement;
  * raw: ``torch.save`` of the same tensors (weights + exp_avg + exp_avg_sq of every trainable role) into
    one file, fsync'd, no checksum.
Both write to the same filesystem (a folder under --dir, default the system temp folder); ``os.sync()``
before each timed save, so neither pays for the other's queued write-back.

    python -m benchmarks.checkpoint_save [--channels 192,384,768] [--repeats 4] [--dir PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", default="192,384,768")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    import torch

    from benchmarks.common import recipe
    from unidad_dist.config import config_from_dict
    from unidad_dist.device import runtime_from_env
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train import checkpoint
    from unidad_dist.train.build import build

    chans = tuple(int(c) for c in args.channels.split(","))
    rec = recipe(channels=chans, resolution=16, batch=1, **{"target_teacher.mode": "off", "algorithm.a": 0.0,
                                                             "train.fake_updates_per_student": 1})
    cfg = config_from_dict(rec)
    rt = runtime_from_env()
    models = build(cfg, rt)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    method.step(0)
    roles = models.trainable_roles()
    tensors = {}
    for name, role in roles.items():
        opt = role.engine.optimizer
        for i, p in enumerate(role.module.parameters()):
            tensors[f"{name}.{i}.w"] = p.detach()
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"{name}.{i}.{k}"] = st[k]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    n_params = sum(p.numel() for r in roles.values() for p in r.module.parameters())
    print(f"trainable roles: {', '.join(roles)}; {n_params / 1e6:.1f} M parameters; "
          f"weights + Adam moments = {nbytes / 2**30:.2f} GiB")
    if nbytes < 2**30:
        print("warning: less than 1 GiB of trainable state; pass larger --channels")
    base = Path(args.dir or tempfile.gettempdir()) / "unidad_ckpt_bench"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)

    def raw() -> float:
        path = base / "raw.pt"
        os.sync()  # each side starts with no dirty pages of the other queued for write-back
        t = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t
        path.unlink()
        os.sync()
        return dt

    def ours() -> float:
        run = base / "run"
        os.sync()
        t = time.perf_counter()
        checkpoint.save(run, models, 1, rt, method, keep=1)
        dt = time.perf_counter() - t
        shutil.rmtree(run)
        os.sync()
        return dt

    writer = checkpoint.AsyncWriter(rt)
    write_t = []

    def stall() -> float:
        run = base / "async"
        os.sync()
        t = time.perf_counter()
        publish = checkpoint.stage(run, models, 1, rt, method, keep=1, stager=writer.stager, group=writer.group())
        writer.start(publish, 1)
        dt = time.perf_counter() - t
        writer.wait()
        write_t.append(writer.write_s)
        shutil.rmtree(run)
        os.sync()
        return dt

    ours_t, raw_t, async_t = [], [], []
    for i in range(args.repeats):  # rotate which goes first: the disk's write-back state drifts
        order = [(ours, ours_t), (raw, raw_t), (stall, async_t)]
        for fn, out in order[i % 3:] + order[:i % 3]:
            out.append(fn())
    r, o, a = min(raw_t), min(ours_t), min(async_t)
    print(f"raw torch.save: {' '.join(f'{x:.2f}' for x in raw_t)} s   ours: {' '.join(f'{x:.2f}' for x in ours_t)} s")
    print(f"best: raw {r:.2f} s ({nbytes / r / 2**20:.0f} MiB/s), ours {o:.2f} s; median ratio "
          f"{statistics.median(ours_t) / statistics.median(raw_t):.2f}")
    print(f"ratio ours/raw = {o / r:.2f} (best of {args.repeats} each; goal <= 1.5)")
    print(f"async stall: {' '.join(f'{x:.2f}' for x in async_t)} s (first: host buffers allocated; then reused), "
          f"background write: {' '.join(f'{x:.2f}' for x in write_t)} s, staged {writer.stager.last_bytes / 2**30:.2f} GiB")
    print(f"ratio async stall/sync save = {a / o:.2f} (best of {args.repeats} each; goal <= 0.25); median "
          f"{statistics.median(async_t) / statistics.median(ours_t):.2f}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
