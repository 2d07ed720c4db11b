"""Sampling on every rank: each rank draws its share of the sample indices; rank 0 receives them all, in order.

Sample i depends only on (seed, i) (``Method.sample``), so the images do not depend on the number of ranks.
The n indices go in rounds of world x batch consecutive indices: in a round, rank r draws the r-th block of
``batch``. The blocks are gathered to rank 0 — as uint8 (``to_uint8``, the PNG quantisation), or float32
where the caller keeps floats — on the runtime's device (gloo: the host; NCCL: the rank's GPU), padded to one
block size, and moved to the host there. So a rank holds one block at a time and every round is one
collective of every rank: no rank waits long at a barrier, whatever n is.

``unidad-dist sample`` and ``unidad-dist evaluate`` use it (started by torchrun, srun or any launcher that
sets RANK / WORLD_SIZE / MASTER_ADDR, every process loads the sampler and draws its share), and so does
training's ``eval.every`` (hooks.PeriodicEvaluation: the ranks of the sampler's group, in lockstep, since a
ZeRO-3 forward is a collective). ``measure`` is what both record: the proxies and the paper's metrics.
"""
from __future__ import annotations

from typing import Optional

import torch

from unidad_dist.core.images import from_uint8, to_uint8
from unidad_dist.device import Runtime
from unidad_dist.errors import UserError
from unidad_dist.eval import paper
from unidad_dist.eval.metrics import PROXY_FEATURE, all_metrics
from unidad_dist.eval.reference import reference_photos
from unidad_dist.models.conditioning import read_prompt_file

# seconds a rank may wait for rank 0's metrics (FID of thousands of samples): `evaluate`'s process group, and
# the host group the ranks of a training run wait on while rank 0 measures (eval.every)
EVAL_DIST_TIMEOUT = 4 * 3600.0


def blocks(n: int, world: int, batch: int) -> list[list[tuple[int, int]]]:
    """Per round, per rank: the (first, count) of the indices it draws (count 0 past the end)."""
    rounds = []
    for base in range(0, n, world * batch):
        rounds.append([(min(n, base + r * batch), max(0, min(n, base + (r + 1) * batch) - (base + r * batch)))
                       for r in range(world)])
    return rounds


def sample_all(method, models, rt: Runtime, n: int, steps: Optional[int] = None, seed: Optional[int] = None,
               prompts: Optional[list[str]] = None, batch: int = 16, use_ema: bool = True,
               as_uint8: bool = True, ranks: Optional[list[int]] = None, group=None,
               lockstep: bool = False) -> Optional[torch.Tensor]:
    """The n samples in pixel space, on global rank 0's host: uint8 (N, 3, H, W) with ``as_uint8``, else
    float32 in [-1, 1]. ``ranks`` (default: all) draw them and must all call it — a collective of ``group``
    (their process group; None: the world) when there are several, which holds rank 0; the others get None.
    ``lockstep``: a rank with nothing left in a round still runs the sampler once on a block of one (discarded),
    so every rank makes the same forward calls (ZeRO-3)."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1 (got {n}, {batch})")
    # sorted: the gather returns the blocks in rank order, and rank 0 (which always has a block) comes first
    ranks = list(range(rt.world_size)) if ranks is None else sorted(ranks)
    me = ranks.index(rt.rank)
    out: list[torch.Tensor] = []
    for round_ in blocks(n, len(ranks), batch):
        first, count = round_[me]
        mine = None
        if count or lockstep:
            with torch.no_grad():
                x = models.to_pixels(method.sample(max(count, 1), steps=steps, seed=seed, prompts=prompts,
                                                   batch=batch, use_ema=use_ema, first=first if count else 0))
            mine = (to_uint8(x) if as_uint8 else x.detach().float().cpu()) if count else None
        if len(ranks) == 1:
            out.append(mine)
            continue
        out.extend(_gather(mine, round_, rt, ranks, group))
    return torch.cat(out) if rt.rank == 0 else None


def _gather(mine: Optional[torch.Tensor], round_: list[tuple[int, int]], rt: Runtime, ranks: list[int],
            group) -> list[torch.Tensor]:
    """One round's blocks to rank 0 (a list there, in the order of ``ranks``; empty elsewhere). A rank past the
    end of the indices sends padding of the shape and dtype of rank 0's block, which rank 0 always has."""
    dist = torch.distributed
    meta = [(tuple(mine.shape[1:]), mine.dtype) if rt.rank == 0 else None]
    dist.broadcast_object_list(meta, src=0, group=group)  # a block's shape and dtype (for a rank without one)
    shape, dtype = meta[0]
    size = max(c for _, c in round_)
    buf = torch.zeros((size,) + shape, dtype=dtype, device=rt.device)
    if mine is not None:
        buf[:mine.shape[0]] = mine.to(rt.device)
    if rt.rank != 0:
        dist.gather(buf, None, dst=0, group=group)
        return []
    bufs = [torch.empty_like(buf) for _ in ranks]
    dist.gather(buf, bufs, dst=0, group=group)
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



def eval_prompts(cfg, models) -> Optional[list[str]]:
    """eval.prompts read and filled in (text models), else None (the run's sampling prompts are used)."""
    if not cfg.eval.prompts:
        return None
    if models.text is None:
        raise UserError("eval.prompts: the run's model is not text-conditioned; unset eval.prompts")
    return read_prompt_file(cfg.eval.prompts, cfg.data.target.rare_token, cfg.data.target.class_name, "eval.prompts")


def measure(cfg, models, u8: torch.Tensor, shots: torch.Tensor, steps: int, prompts: Optional[list[str]],
            device: torch.device) -> dict:
    """The proxies and the paper's metrics of uint8 samples (rank 0): {"proxies", "paper"}. Sample i was drawn
    with prompt i mod len(prompts) (text models; default: the run's sampling prompts)."""
    pixels, n = from_uint8(u8), u8.shape[0]
    prompts = prompts or (models.data.prompts if models.text is not None else None)
    prompts = [prompts[i % len(prompts)] for i in range(n)] if prompts else None
    ev = cfg.eval
    inp = paper.Inputs(samples=pixels, shots=shots, steps=steps, prompts=prompts, rare_token=cfg.data.target.rare_token,
                       references=reference_photos(ev.reference, models.resolution), fid_stats=ev.fid_stats)
    return {"proxies": {"label": PROXY_FEATURE, **all_metrics(pixels, shots)},
            "paper": paper.paper_metrics(inp, ev.weights, device=device, per_cluster=ev.lpips_per_cluster)}
