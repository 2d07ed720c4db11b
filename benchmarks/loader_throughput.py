"""Loader throughput / training consumption on precomputed shards of the tiny SD1.5-form recipe.

Writes >= 1000 target samples (image + precomputed latents of image and flip + prompt embedding) and
>= 1000 source prompts (embeddings of prompt and stripped prompt) with `make-shards --precompute`, then in
one run measures
  * loader: samples/s one rank's split streams deliver (2 DataLoader workers, batch as trained), and
  * training: samples/s the train loop consumes from both streams (iterations of the same recipe on
    1 rank, streams split and precomputed, so training calls neither VAE nor text encoder),
and prints their ratio (goal >= 10: the loader is never the bottleneck).

    python benchmarks/loader_throughput.py [--samples 1000] [--iterations 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import yaml

    from unidad_dist import builtin, testing
    from unidad_dist.config import config_from_dict, to_dict
    from unidad_dist.data.make_shards import make_shards
    from unidad_dist.device import runtime_from_env
    from unidad_dist.core.draws import SampleDraws, global_indices
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    root = Path(tempfile.mkdtemp(prefix="unidad_loader_"))
    pipe = testing.write_text_pipeline(root / "sd15", "sd15")
    shots = builtin.make_shots(root / "shots", "blue_discs", args.samples, 16, seed=3)
    base = testing.tiny_recipe(pipe, shots, root / "x")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(config_from_dict(base))))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of a {{rare}} {{cls}}, variation {i}" for i in range(args.samples)))
    t0 = time.time()
    make_shards(str(root / "target"), images=str(shots), config=str(recipe), precompute=True, per_shard=100)
    make_shards(str(root / "source"), prompts=str(prompts), config=str(recipe), precompute=True, per_shard=100)
    print(f"make-shards --precompute: {2 * args.samples} samples in {time.time() - t0:.1f} s")

    rec = testing.tiny_recipe(pipe, root / "target", root / "run", **{
        "data.source.path": str(root / "source"), "data.workers": args.workers, "data.split_min_samples": 0,
        "train.batch_size": 4, "train.fake_updates_per_student": 1})
    cfg = config_from_dict(rec)
    rt = runtime_from_env()
    models = build(cfg, rt)
    data = models.data
    assert set(data.streams) == {"source", "target"}, "both streams must be split for this benchmark"

    # loader alone: what the streams deliver through the same batch() the loop calls (no network)
    def loader_rate(n_batches: int) -> float:
        for s in data.streams.values():
            s.next_batch()  # start the workers before timing
        t = time.perf_counter()
        for it in range(n_batches):
            data.batch(SampleDraws(0, it, global_indices(it, 0, 1, 0, 1, 4), rt.device))
        return n_batches * 4 * 2 / (time.perf_counter() - t)  # source + target samples

    loader = loader_rate(max(50, args.samples // 8))
    data.close()
    models = build(cfg, rt)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    method.step(0)  # warm-up (workers start, first passes)
    t = time.perf_counter()
    for it in range(1, args.iterations + 1):
        method.step(it)
    train_t = time.perf_counter() - t
    per_iter = 4 * 2  # one micro-batch per iteration (ratio 1, no accumulation): batch from each stream
    consume = args.iterations * per_iter / train_t
    models.data.close()
    print(f"loader: {loader:.0f} samples/s   training consumes: {consume:.1f} samples/s "
          f"({train_t / args.iterations * 1000:.0f} ms/iteration)")
    print(f"ratio loader/consumption = {loader / consume:.1f} (goal >= 10)")


if __name__ == "__main__":
    main()
