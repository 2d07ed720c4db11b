"""Role -> rank-group placement (docs/design.md "Split placement"), for the roles a method declares.

``colocated``: every rank holds every role; each engine shards over all ranks.
``split``: a method's roles sit on two sides (``RoleSpec.side``; Uni-DAD: the student with the frozen
source teacher on one, the fake teacher with its GAN heads and the target teacher on the other), each on
its own rank group of the same size. Rank i of one group is paired with rank i of the other: both derive
the same per-sample draws from (seed, iteration, global sample index, role, purpose), so only what the
method hands to the exchange crosses (``parallel/exchange.py``). Each engine's ZeRO group is its side's
rank group (DeepSpeed's ``mpu`` argument); ZeRO-3 does not work on rank subgroups (docs/design.md), so split
placement allows ZeRO 0-2 only.

The first role declared on a side is its anchor: it takes the first (second) half of the ranks unless
``placement.<role>`` lists them; every other role of the side lives with its anchor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from unidad_dist.errors import UserError


def _human(role: str) -> str:
    return role.replace("_", " ")


def _sides(cfg) -> tuple[list, dict]:
    """(sides in declared order, side -> its roles in declared order)."""
    members: dict = {}
    for spec in cfg.method.roles(cfg):
        members.setdefault(spec.side, []).append(spec.name)
    return list(members), members


def resolve_groups(cfg, world: int) -> dict[str, list[int]]:
    """role -> ranks for every role the recipe runs, validated against the world size (errors name the key
    and the fix)."""
    method = cfg.method
    pc = cfg.placement
    names = [s.name for s in method.roles(cfg)]
    given = {r: getattr(pc, r) for r in method.role_sections()}
    if pc.mode == "colocated":
        named = [f"placement.{r}" for r, v in given.items() if v is not None]
        if named:
            raise UserError(f"{', '.join(named)} only apply with placement.mode=split; remove them or set the mode")
        return {r: list(range(world)) for r in names}
    unused = [f"placement.{r}" for r, v in given.items() if v is not None and r not in names]
    if unused:
        raise UserError(f"{', '.join(unused)} place roles this recipe does not run (switched off or disabled); "
                        "remove them")
    if world < 2:
        raise UserError("placement.mode=split needs at least 2 ranks (one per group); launch more ranks "
                        "(unidad-dist launch local --nproc 2) or use placement.mode=colocated")
    sides, members = _sides(cfg)
    if len(sides) != 2:
        raise UserError(f"placement.mode=split puts a method's roles on two rank groups, but method "
                        f"'{method.name}' declares {len(sides)} side(s) ({', '.join(sides)}); use "
                        "placement.mode=colocated")
    half = world // 2
    anchors = [members[s][0] for s in sides]
    defaults = {anchors[0]: list(range(half)), anchors[1]: list(range(half, 2 * half))}
    groups: dict[str, list[int]] = {}
    for a in anchors:
        groups[a] = given[a] if given[a] is not None else defaults[a]
    for side, anchor in zip(sides, anchors):
        for r in members[side][1:]:
            groups[r] = given[r] if given[r] is not None else groups[anchor]
    groups = {r: groups[r] for r in names}  # declared order
    for role, ranks in groups.items():
        if not ranks:
            raise UserError(f"placement.{role} is empty: the role is placed on no rank; give it ranks or leave it unset")
        bad = [r for r in ranks if not 0 <= r < world]
        if bad:
            raise UserError(f"placement.{role}={ranks} names ranks {bad} outside the world of {world} ranks "
                            f"(0-{world - 1}); launch more ranks or shrink the group")
        if len(set(ranks)) != len(ranks):
            raise UserError(f"placement.{role}={ranks} repeats a rank")
    g, c = groups[anchors[0]], groups[anchors[1]]
    if set(g) & set(c):
        raise UserError(f"placement.{anchors[0]}={g} and placement.{anchors[1]}={c} overlap; split groups must be "
                        "disjoint")
    for side, anchor in zip(sides, anchors):
        for r in members[side][1:]:
            if sorted(groups[r]) != sorted(groups[anchor]):
                raise UserError(f"in split placement the {_human(r)} lives with the {_human(anchor)}; "
                                f"set placement.{r} equal to placement.{anchor} or leave it unset")
    if len(g) != len(c):
        raise UserError(f"placement.{anchors[0]} has {len(g)} ranks and placement.{anchors[1]} {len(c)}; split "
                        "groups must have the same size (rank i of one is paired with rank i of the other)")
    idle = sorted(set(range(world)) - set(g) - set(c))
    if idle:
        raise UserError(f"ranks {idle} hold no role in split placement; place them or launch {len(g) + len(c)} ranks")
    if 0 not in groups[method.sampler]:
        raise UserError(f"placement.{method.sampler} must include rank 0 (it samples and writes the summary)")
    for role in names:
        if getattr(cfg, role).zero_stage == 3:
            raise UserError(
                f"{role}.zero_stage=3 with placement.mode=split: DeepSpeed's ZeRO-3 does not work on rank subgroups "
                "(docs/design.md); use ZeRO 0-2 in split placement, or placement.mode=colocated for ZeRO-3"
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
    groups: dict[str, list[int]]  # role -> ranks, for the roles the recipe runs
    rank: int
    world: int
    sides: dict[str, list[int]] = field(default_factory=dict)  # split: side -> ranks, in declared order
    mpu: Optional[GroupMPU] = None
    group_handles: dict = field(default_factory=dict)  # split: side -> process group

    @property
    def split(self) -> bool:
        return self.mode == "split"

    def holds(self, role: str) -> bool:
        return self.rank in self.groups.get(role, ())

    @property
    def side(self) -> Optional[str]:
        """This rank's side (split placement); None when colocated."""
        for side, ranks in self.sides.items():
            if self.rank in ranks:
                return side
        return None

    @property
    def side_ranks(self) -> list[int]:
        """The ranks that hold the same roles as this one (all of them when colocated)."""
        return self.sides[self.side] if self.split else list(range(self.world))

    @property
    def dp_rank(self) -> int:
        """This rank's index among the ranks that share its data (its side in split placement)."""
        return self.side_ranks.index(self.rank)

    @property
    def dp_size(self) -> int:
        return len(self.side_ranks)

    @property
    def partner(self) -> int:
        """Split placement: the rank of the other side paired with this one."""
        other = next(r for s, r in self.sides.items() if s != self.side)
        return other[self.dp_rank]

    def leader(self, role: str) -> bool:
        """The one rank that writes a role's whole weights."""
        return self.rank == min(self.groups[role])


def colocated(cfg, rank: int, world: int) -> Placement:
    """Every declared role on every rank (sample/export, tests)."""
    return Placement("colocated", {s.name: list(range(world)) for s in cfg.method.roles(cfg)}, rank, world)


def setup_placement(cfg, rt) -> Placement:
    groups = resolve_groups(cfg, rt.world_size)
    pl = Placement(cfg.placement.mode, groups, rt.rank, rt.world_size)
    if not pl.split:
        return pl
    sides, members = _sides(cfg)
    pl.sides = {side: groups[members[side][0]] for side in sides}
    # every rank creates every group, in the same order (torch.distributed requires it)
    pl.group_handles = {side: torch.distributed.new_group(pl.sides[side]) for side in sides}
    singles = [torch.distributed.new_group([r]) for r in range(rt.world_size)]
    pl.mpu = GroupMPU(pl.group_handles[pl.side], pl.side_ranks, singles[rt.rank], rt.rank)
    return pl
