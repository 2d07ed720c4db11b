"""Sampling on every rank: each rank draws its share of the sample indices; rank 0 receives them all, in order.

Sample i depends only on (seed, i) (``Method.sample``), so the images do not depend on the number of ranks.
The n indices go in rounds of world x batch consecutive indices: in a round, rank r draws the r-th block of
``batch``. The blocks are gathered to rank 0 — as uint8 (``to_uint8``, the PNG quantisation), or float32
where the caller keeps floats — on the runtime's device (gloo: the host; NCCL: the rank's GPU), padded to one
block size, and moved to the host there. So a rank holds one block at a time and every round is one
collective of every rank: no rank waits long at a barrier, whatever n is.

``unidad-dist sample`` and ``unidad-dist evaluate`` use it: started by torchrun, srun or any launcher that sets
RANK / WORLD_SIZE / MASTER_ADDR, every process loads the sampler and draws its share.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unidad_dist.core.images import to_uint8
from unidad_dist.device import Runtime
from unidad_dist.errors import CheckpointGone
from unidad_dist.train.checkpoint import ckpt_name, iteration_of
from unidad_dist.train.loop import load_run, pick_checkpoint


def blocks(n: int, world: int, batch: int) -> list[list[tuple[int, int]]]:
    """Per round, per rank: the (first, count) of the indices it draws (count 0 past the end)."""
    rounds = []
    for base in range(0, n, world * batch):
        rounds.append([(min(n, base + r * batch), max(0, min(n, base + (r + 1) * batch) - (base + r * batch)))
                       for r in range(world)])
    return rounds


def sample_all(method, models, rt: Runtime, n: int, steps: Optional[int] = None, seed: Optional[int] = None,
               prompts: Optional[list[str]] = None, batch: int = 16, use_ema: bool = True,
               as_uint8: bool = True) -> Optional[torch.Tensor]:
    """The n samples in pixel space, on rank 0's host: uint8 (N, 3, H, W) with ``as_uint8``, else float32 in
    [-1, 1]. Every rank must call it (it is a collective when there are several); the others get None."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1 (got {n}, {batch})")
    out: list[torch.Tensor] = []
    for round_ in blocks(n, rt.world_size, batch):
        first, count = round_[rt.rank]
        mine = None
        if count:
            with torch.no_grad():
                x = models.to_pixels(method.sample(count, steps=steps, seed=seed, prompts=prompts, batch=batch,
                                                   use_ema=use_ema, first=first))
            mine = to_uint8(x) if as_uint8 else x.detach().float().cpu()
        if rt.world_size == 1:
            out.append(mine)
            continue
        out.extend(_gather(mine, round_, rt))
    return torch.cat(out) if rt.rank == 0 else None


def _gather(mine: Optional[torch.Tensor], round_: list[tuple[int, int]], rt: Runtime) -> list[torch.Tensor]:
    """One round's blocks to rank 0 (a list there, in rank order; empty elsewhere). A rank past the end of the
    indices sends padding of the shape and dtype of rank 0's block, which rank 0 always has."""
    dist = torch.distributed
    meta = [(tuple(mine.shape[1:]), mine.dtype) if rt.rank == 0 else None]
    dist.broadcast_object_list(meta, src=0)  # the shape and dtype of a block (a rank without one learns it here)
    shape, dtype = meta[0]
    size = max(c for _, c in round_)
    buf = torch.zeros((size,) + shape, dtype=dtype, device=rt.device)
    if mine is not None:
        buf[:mine.shape[0]] = mine.to(rt.device)
    if rt.rank != 0:
        dist.gather(buf, None, dst=0)
        return []
    bufs = [torch.empty_like(buf) for _ in range(rt.world_size)]
    dist.gather(buf, bufs, dst=0)
    return [b[:c].cpu() for b, (_, c) in zip(bufs, round_) if c]


def any_rank(rt: Runtime, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective when there are several)."""
    if rt.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_rank0(rt: Runtime, value):
    """Rank 0's ``value`` on every rank (a picklable object; a collective when there are several)."""
    if rt.world_size == 1:
        return value
    box = [value if rt.rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def load_sampler(rdir: Path, rt: Runtime, use_ema: bool = True, iteration: Optional[int] = None):
    """``load_run`` on every rank, of one checkpoint: rank 0's choice (the latest complete one when
    ``iteration`` is None), and a checkpoint pruned under any rank is CheckpointGone on all of them."""
    if rt.world_size == 1:
        return load_run(rdir, rt=rt, use_ema=use_ema, iteration=iteration)
    ckpt = pick_checkpoint(rdir, iteration)  # nothing to load: the same error on every rank
    iteration = from_rank0(rt, iteration if iteration is not None else iteration_of(ckpt))
    gone = None
    try:
        loaded = load_run(rdir, rt=rt, use_ema=use_ema, iteration=iteration)
    except CheckpointGone as e:
        gone = e
    if any_rank(rt, gone is not None):
        raise gone or CheckpointGone(f"checkpoint {ckpt_name(iteration)} of {rdir} was removed while "
                                     "another rank read it (checkpoint.keep pruned it)")
    return loaded
