"""Deterministic random draws (docs/algorithm.md §3, "Rule for every random draw").

* A draw that changes which network calls run (whether the student steps, the backward-simulation step k)
  depends on (seed, iteration, purpose) only, so every rank agrees without communication.
* A per-sample draw (noise, timesteps, flips, shifts, which target shot) depends on (seed, iteration, global
  sample index, role, purpose), so results do not depend on how a global batch is split over ranks,
  and a resumed run draws exactly what an uninterrupted one would have.

Draws are made on the CPU with a generator seeded from a hash of the key, then moved to the device, so
CPU and GPU runs draw the same numbers.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from unidad_dist.device import CPU


def key_seed(*parts) -> int:
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def keyed_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from a hash of ``parts`` (the draw's key)."""
    g = torch.Generator(device=CPU)
    g.manual_seed(key_seed(*parts))
    return g


def shared_randint(seed: int, iteration: int, purpose: str, low: int, high: int) -> int:
    """Same value on every rank: depends on (seed, iteration, purpose) only."""
    return int(torch.randint(low, high, (1,), generator=keyed_generator(seed, iteration, "shared", purpose)).item())


class SampleDraws:
    """Per-sample draws for one micro-batch: ``indices`` are the global sample indices it holds."""

    def __init__(self, seed: int, iteration: int, indices: Sequence[int], device: torch.device):
        self.seed = seed
        self.iteration = iteration
        self.indices = list(indices)
        self.device = device

    def _stack(self, fn, role: str, purpose: str) -> torch.Tensor:
        out = [fn(keyed_generator(self.seed, self.iteration, i, role, purpose)) for i in self.indices]
        return torch.stack(out).to(self.device)

    def randn(self, shape: Sequence[int], role: str, purpose: str) -> torch.Tensor:
        return self._stack(lambda g: torch.randn(tuple(shape), generator=g), role, purpose)

    def randint(self, low: int, high: int, role: str, purpose: str) -> torch.Tensor:
        return self._stack(lambda g: torch.randint(low, high, (), generator=g), role, purpose)

    def rand(self, role: str, purpose: str) -> torch.Tensor:
        return self._stack(lambda g: torch.rand((), generator=g), role, purpose)


def global_indices(iteration: int, micro: int, n_micro: int, rank: int, world: int, batch: int) -> list[int]:
    """Global sample indices of one rank's micro-batch: [iteration][micro][rank][j]."""
    per_micro = world * batch
    start = (iteration * n_micro + micro) * per_micro + rank * batch
    return list(range(start, start + batch))
