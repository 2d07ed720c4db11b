"""The exchange between placement sides: what a method uses instead of naming ranks or collectives.

* ``run_at(role, fn, shapes)``: run ``fn()`` (a dict of tensors) where ``role`` lives and return its result
  there; in split placement the paired rank of the other side receives the same tensors (detached, fp32),
  packed into one flat buffer whose layout the method declares (``shapes``: name -> shape). Colocated, it is
  a plain call.
* ``holds(role)``: whether this rank runs ``role``'s pieces of the step.
* ``agree(flag)``: a decision taken together by the ranks that step the same roles (the whole world when
  colocated), e.g. that a loss is non-finite on some rank.
* ``dp_rank`` / ``dp_size``: this rank's share of the global batch (its side's ranks in split placement).

The training loop and checkpoints use ``agree_world`` (every rank), ``merge_logs`` and ``side_barriers``.
"""
from __future__ import annotations

import contextlib
from math import prod
from typing import Callable

import torch

from unidad_dist.parallel.placement import Placement


class Exchange:
    def __init__(self, placement: Placement, device: torch.device):
        self.placement = placement
        self.device = device

    # -- what a method uses ---------------------------------------------------------------------------
    @property
    def split(self) -> bool:
        return self.placement.split

    def holds(self, role: str) -> bool:
        return self.placement.holds(role)

    def leader(self, role: str) -> bool:
        return self.placement.holds(role) and self.placement.leader(role)

    @property
    def dp_rank(self) -> int:
        return self.placement.dp_rank

    @property
    def dp_size(self) -> int:
        return self.placement.dp_size

    def run_at(self, role: str, fn: Callable[[], dict], shapes: dict) -> dict:
        if not self.split:
            return self._checked(fn(), shapes, role)  # checked colocated too: a mismatch shows before a split run
        if self.holds(role):
            out = self._checked(fn(), shapes, role)
            torch.distributed.send(self._pack(out, shapes), dst=self.placement.partner)
            return out
        flat = torch.empty((sum(prod(s) for s in shapes.values()),), dtype=torch.float32, device=self.device)
        torch.distributed.recv(flat, src=self.placement.partner)
        return self._unpack(flat, shapes)

    def agree(self, flag: bool) -> bool:
        """True on every rank of this rank's side (the whole world when colocated) if true on any."""
        pl = self.placement
        if pl.world == 1 or not torch.distributed.is_initialized():
            return flag
        return self._any(flag, pl.group_handles.get(pl.side) if pl.split else None)

    # -- what the loop and checkpoints use --------------------------------------------------------------
    def agree_world(self, flag: bool) -> bool:
        """True on every rank if true on any (a world collective)."""
        if self.placement.world == 1 or not torch.distributed.is_initialized():
            return flag
        return self._any(flag, None)

    def merge_logs(self, logs: dict) -> dict:
        """Each side logs its own roles; rank 0 gets both (a world collective, at logging iterations)."""
        pl = self.placement
        if not pl.split:
            return logs
        parts = [None] * pl.world
        torch.distributed.all_gather_object(parts, logs)
        merged: dict = {}
        for ranks in pl.sides.values():
            merged.update(parts[ranks[0]])
        return merged

    @contextlib.contextmanager
    def side_barriers(self):
        """DeepSpeed's save_checkpoint calls world-wide barriers; in split placement the two sides save
        different engines, so its barriers are confined to this rank's side while it saves."""
        pl = self.placement
        if not pl.split:
            yield
            return
        import deepspeed.comm as dscomm

        orig = dscomm.barrier
        side_group = pl.group_handles[pl.side]

        def side_barrier(group=None, **kw):
            return orig(group=group if group is not None else side_group, **kw)

        dscomm.barrier = side_barrier
        try:
            yield
        finally:
            dscomm.barrier = orig

    # -- packing --------------------------------------------------------------------------------------
    @staticmethod
    def _checked(tensors: dict, shapes: dict, role: str) -> dict:
        """What ``fn`` computed must be exactly what the method declared: the other side receives only that."""
        if set(tensors) != set(shapes):
            raise RuntimeError(f"exchange at {role}: computed {sorted(tensors)} but declared {sorted(shapes)}")
        bad = {k: (tuple(v.shape), tuple(shapes[k])) for k, v in tensors.items() if tuple(v.shape) != tuple(shapes[k])}
        if bad:
            raise RuntimeError(f"exchange at {role}: shapes differ from the declared ones (got, declared): {bad}")
        return tensors

    def _pack(self, tensors: dict, shapes: dict) -> torch.Tensor:
        return torch.cat([tensors[k].detach().float().reshape(-1).to(self.device) for k in shapes]).contiguous()

    @staticmethod
    def _unpack(flat: torch.Tensor, shapes: dict) -> dict:
        out, off = {}, 0
        for k, shape in shapes.items():
            n = prod(shape)
            out[k] = flat[off:off + n].view(tuple(shape))
            off += n
        return out

    def _any(self, flag: bool, group) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(t, group=group)
        return bool(t.item())
