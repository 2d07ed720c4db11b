"""Role -> rank-group placement (design.md "Split placement").

``colocated``: every rank holds every role; each engine shards over all ranks.
``split``: the student (with the frozen source teacher) lives on one rank group, the fake teacher (with
its GAN heads and the target teacher) on another of the same size. Generator rank i is paired with
critic rank i: both derive the same per-sample draws from (seed, iteration, global sample index, role,
purpose), so only three things cross, explicitly: the student samples (generator -> critic), and the
critic's predictions plus the GAN input-gradient (critic -> generator). Each engine's ZeRO group is its
rank group (DeepSpeed's ``mpu`` argument); ZeRO-3 does not work on rank subgroups (design.md), so split
placement allows ZeRO 0-2 only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from unidad_dist.errors import UserError

ROLES = ("student", "fake_teacher", "source_teacher", "target_teacher")
GENERATOR = ("student", "source_teacher")
CRITIC = ("fake_teacher", "target_teacher")


def resolve_groups(cfg, world: int) -> dict[str, list[int]]:
    """role -> ranks, validated against the world size (errors name the key and the fix)."""
    pc = cfg.placement
    given = {r: getattr(pc, r) for r in ROLES}
    if pc.mode == "colocated":
        named = [f"placement.{r}" for r, v in given.items() if v is not None]
        if named:
            raise UserError(f"{', '.join(named)} only apply with placement.mode=split; remove them or set the mode")
        return {r: list(range(world)) for r in ROLES}
    if world < 2:
        raise UserError("placement.mode=split needs at least 2 ranks (one per group); launch more ranks "
                        "(unidad-dist launch local --nproc 2) or use placement.mode=colocated")
    half = world // 2
    groups = {
        "student": given["student"] if given["student"] is not None else list(range(half)),
        "fake_teacher": given["fake_teacher"] if given["fake_teacher"] is not None else list(range(half, 2 * half)),
    }
    groups["source_teacher"] = given["source_teacher"] if given["source_teacher"] is not None else groups["student"]
    groups["target_teacher"] = given["target_teacher"] if given["target_teacher"] is not None else groups["fake_teacher"]
    for role, ranks in groups.items():
        if not ranks:
            raise UserError(f"placement.{role} is empty: the role is placed on no rank; give it ranks or leave it unset")
        bad = [r for r in ranks if not 0 <= r < world]
        if bad:
            raise UserError(f"placement.{role}={ranks} names ranks {bad} outside the world of {world} ranks "
                            f"(0-{world - 1}); launch more ranks or shrink the group")
        if len(set(ranks)) != len(ranks):
            raise UserError(f"placement.{role}={ranks} repeats a rank")
    g, c = groups["student"], groups["fake_teacher"]
    if set(g) & set(c):
        raise UserError(f"placement.student={g} and placement.fake_teacher={c} overlap; split groups must be disjoint")
    if sorted(groups["source_teacher"]) != sorted(g):
        raise UserError("in split placement the source teacher lives with the student; "
                        "set placement.source_teacher equal to placement.student or leave it unset")
    if sorted(groups["target_teacher"]) != sorted(c):
        raise UserError("in split placement the target teacher lives with the fake teacher; "
                        "set placement.target_teacher equal to placement.fake_teacher or leave it unset")
    if len(g) != len(c):
        raise UserError(f"placement.student has {len(g)} ranks and placement.fake_teacher {len(c)}; split groups "
                        "must have the same size (generator rank i is paired with critic rank i)")
    idle = sorted(set(range(world)) - set(g) - set(c))
    if idle:
        raise UserError(f"ranks {idle} hold no role in split placement; place them or launch {len(g) + len(c)} ranks")
    if 0 not in g:
        raise UserError("placement.student must include rank 0 (it samples and writes the summary)")
    for role in ("student", "fake_teacher", "target_teacher", "source_teacher"):
        if getattr(cfg, role).zero_stage == 3:
            raise UserError(
                f"{role}.zero_stage=3 with placement.mode=split: DeepSpeed's ZeRO-3 does not work on rank subgroups "
                "(design.md); use ZeRO 0-2 in split placement, or placement.mode=colocated for ZeRO-3"
            )
    return groups


class GroupMPU:
    """The ``mpu`` DeepSpeed needs to treat a rank group as its data-parallel world (no model parallelism)."""

    def __init__(self, group, ranks: list[int], single, rank: int):
        self.group, self.ranks, self.single, self.rank = group, list(ranks), single, rank

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(self.rank)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks)

    def get_model_parallel_group(self):
        return self.single

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@dataclass
class Placement:
    mode: str
    groups: dict[str, list[int]]
    rank: int
    world: int
    mpu: Optional[GroupMPU] = None
    group_handles: dict = field(default_factory=dict)

    @property
    def split(self) -> bool:
        return self.mode == "split"

    def holds(self, role: str) -> bool:
        return self.rank in self.groups[role]

    @property
    def side(self) -> str:
        return "generator" if self.holds("student") else "critic"

    @property
    def side_ranks(self) -> list[int]:
        return self.groups["student"] if self.side == "generator" else self.groups["fake_teacher"]

    @property
    def dp_rank(self) -> int:
        """This rank's index among the ranks that share its data (its side in split placement)."""
        return self.side_ranks.index(self.rank)

    @property
    def dp_size(self) -> int:
        return len(self.side_ranks)

    @property
    def partner(self) -> int:
        other = self.groups["fake_teacher"] if self.side == "generator" else self.groups["student"]
        return other[self.dp_rank]

    def leader(self, role: str) -> bool:
        """The one rank that writes a role's whole weights."""
        return self.rank == min(self.groups[role])

    # -- the explicit exchange between paired ranks ----------------------------------------------
    def send(self, t: torch.Tensor) -> None:
        torch.distributed.send(t.detach().contiguous(), dst=self.partner)

    def recv(self, shape, dtype, device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.recv(buf, src=self.partner)
        return buf

    def any_rank(self, flag: bool, device) -> bool:
        """True on every rank of this rank's side (the whole world when colocated) if it is true on any:
        the ranks that step the same roles decide together."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        group = self.group_handles.get(self.side) if self.split else None
        torch.distributed.all_reduce(t, group=group)
        return bool(t.item())

    def merge_logs(self, logs: dict) -> dict:
        """Each side logs its own roles; rank 0 gets both (a world collective, at logging iterations)."""
        if not self.split:
            return logs
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, logs)
        merged: dict = {}
        for r in (self.groups["student"][0], self.groups["fake_teacher"][0]):
            merged.update(parts[r])
        return merged

    @contextlib.contextmanager
    def side_barriers(self):
        """DeepSpeed's save_checkpoint calls world-wide barriers; in split placement the two sides save
        different engines, so its barriers are confined to this rank's side while it saves."""
        if not self.split:
            yield
            return
        import deepspeed.comm as dscomm

        orig = dscomm.barrier
        side_group = self.group_handles[self.side]

        def side_barrier(group=None, **kw):
            return orig(group=group if group is not None else side_group, **kw)

        dscomm.barrier = side_barrier
        try:
            yield
        finally:
            dscomm.barrier = orig


def setup_placement(cfg, rt) -> Placement:
    groups = resolve_groups(cfg, rt.world_size)
    pl = Placement(cfg.placement.mode, groups, rt.rank, rt.world_size)
    if not pl.split:
        return pl
    # every rank creates every group, in the same order (torch.distributed requires it)
    handles = {"generator": torch.distributed.new_group(groups["student"]),
               "critic": torch.distributed.new_group(groups["fake_teacher"])}
    singles = [torch.distributed.new_group([r]) for r in range(rt.world_size)]
    pl.group_handles = handles
    pl.mpu = GroupMPU(handles[pl.side], pl.side_ranks, singles[rt.rank], rt.rank)
    return pl
