"""Shard streams with a pure-function sample order and exact resume.

A stream with at least as many shards as readers (data-parallel ranks × DataLoader workers) is *split*:
reader q of Q reads, in epoch e, the shards ``π_e[q::Q]`` (π_e a permutation seeded by (seed, stream,
epoch)), each whole and in the order of an in-shard permutation seeded by (seed, stream, epoch, shard) —
no shuffle buffer, so what a reader yields is a pure function of (seed, epoch, its position). Readers
never end (epoch after epoch), so uneven shards never leave ranks with different step counts.

A rank's DataLoader takes micro-batches from its workers in turn; the position of every reader and the
number of micro-batches taken are the stream's state, saved per rank with each checkpoint. On resume each
worker starts exactly where its reader stopped (a shard skipped as corrupt before stays skipped), and the
worker that owes the next micro-batch goes first, so every rank sees exactly the samples it would have
seen without interruption. At another world size the readers restart from the global sample count
(``count_position``), each at its share of it.

Generator rank i and critic rank i (split placement) read the same stream (the reader id uses the
data-parallel rank), so both sides see the same prompts without sending them.

A stream with fewer shards than readers (the few target shots) is not split: ``load_whole`` reads it into
memory once, and samples are chosen by per-sample draws keyed by (seed, iteration, global sample index).
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from unidad_dist.data.shards import ShardSet, decode_sample
from unidad_dist.errors import UserError
from unidad_dist.core.draws import keyed_generator

Position = tuple[int, int, int]  # (epoch, slot among this reader's shards of the epoch, offset in the shard)


def epoch_shards(seed: int, name: str, num_shards: int, epoch: int) -> list[int]:
    return torch.randperm(num_shards, generator=keyed_generator(seed, name, "shards", epoch)).tolist()


def reader_shards(seed: int, name: str, num_shards: int, epoch: int, reader: int, num_readers: int) -> list[int]:
    return epoch_shards(seed, name, num_shards, epoch)[reader::num_readers]


def in_shard_order(seed: int, name: str, epoch: int, shard: int, n: int) -> list[int]:
    return torch.randperm(n, generator=keyed_generator(seed, name, "in_shard", epoch, shard)).tolist()


def count_position(seed: int, name: str, counts: list[int], reader: int, num_readers: int, count: int) -> Position:
    """Where reader ``reader`` is after yielding ``count`` samples, from the manifest's shard sizes."""
    epoch = 0
    while True:
        mine = reader_shards(seed, name, len(counts), epoch, reader, num_readers)
        total = sum(counts[s] for s in mine)
        if total == 0:
            return (epoch, 0, 0)
        if count >= total:
            count -= total
            epoch += 1
            continue
        for slot, s in enumerate(mine):
            if count < counts[s]:
                return (epoch, slot, count)
            count -= counts[s]


class Reader:
    """One reader's never-ending sequence of (decoded sample, position after it)."""

    def __init__(self, shards: ShardSet, seed: int, name: str, reader: int, num_readers: int):
        self.shards, self.seed, self.name = shards, seed, name
        self.reader, self.num_readers = reader, num_readers

    def __call__(self, pos: Position) -> Iterator[tuple[dict, Position]]:
        epoch, slot, offset = pos
        empty_epochs = 0
        while True:
            mine = reader_shards(self.seed, self.name, self.shards.num_shards, epoch, self.reader, self.num_readers)
            yielded = False
            while slot < len(mine):
                s = mine[slot]
                raw = self.shards.read_shard(s, on_error=_warn_skip)
                order = in_shard_order(self.seed, self.name, epoch, s, len(raw))
                for j in range(offset, len(raw)):
                    after = (epoch, slot, j + 1) if j + 1 < len(raw) else (epoch, slot + 1, 0)
                    if after[1] == len(mine):
                        after = (epoch + 1, 0, 0)
                    yielded = True
                    yield decode_sample(raw[order[j]]), after
                slot, offset = slot + 1, 0
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= 2:
                raise UserError(f"data stream '{self.name}': no readable sample in shards "
                                f"{', '.join(self.shards.urls[i] for i in mine)}; check the paths / URLs and rerun "
                                "make-shards")
            epoch, slot = epoch + 1, 0


def _warn_skip(url: str, reason: str) -> None:
    warnings.warn(f"skipping shard {url}: {reason} (counted in data/<stream>/skipped_shards)")


class _Dataset(IterableDataset):
    """Micro-batches of one rank's readers; worker w plays logical reader (w + first) % workers."""

    def __init__(self, shards, seed, name, dp_rank, dp_size, workers, batch, positions, first):
        super().__init__()
        self.args = (shards, seed, name, dp_rank, dp_size, workers, batch, positions, first)

    def __iter__(self):
        shards, seed, name, dp_rank, dp_size, workers, batch, positions, first = self.args
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        nw = max(workers, 1)
        logical = (w + first) % nw
        reader = Reader(shards, seed, name, dp_rank * nw + logical, dp_size * nw)
        it = reader(tuple(positions[logical]))
        while True:
            items, pos = [], None
            for _ in range(batch):
                sample, pos = next(it)
                items.append(sample)
            yield {"logical": logical, "position": pos, "samples": items, "errors": dict(shards.errors)}


def _identity(x):
    return x


class SplitStream:
    """This rank's share of a large stream, ``batch`` samples at a time, with its resumable state."""

    def __init__(self, shards: ShardSet, seed: int, name: str, dp_rank: int, dp_size: int, workers: int, batch: int,
                 state: Optional[dict] = None, global_count: int = 0):
        self.shards, self.seed, self.name = shards, seed, name
        self.dp_rank, self.dp_size, self.workers, self.batch = dp_rank, dp_size, workers, batch
        nw = max(workers, 1)
        if state is not None:
            self.batches = int(state["batches"])
            self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
            self.errors = dict(state.get("errors", {}))
        else:  # a fresh start, or a resume at another world size: each reader at its share of the count
            q = dp_size * nw
            per_reader = global_count // q
            self.batches = per_reader // batch * nw
            self.positions = {l: count_position(seed, name, shards.counts, dp_rank * nw + l, q, per_reader)
                              for l in range(nw)}
            self.errors = {}
        self._it = None

    def _start(self):
        nw = max(self.workers, 1)
        ds = _Dataset(self.shards, self.seed, self.name, self.dp_rank, self.dp_size, self.workers, self.batch,
                      dict(self.positions), self.batches % nw)
        loader = DataLoader(ds, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                            persistent_workers=False)
        self._it = iter(loader)

    def next_batch(self) -> list[dict]:
        if self._it is None:
            self._start()
        item = next(self._it)
        self.positions[item["logical"]] = tuple(item["position"])
        self.errors.update(item["errors"])
        self.batches += 1
        return item["samples"]

    def samples_seen(self) -> int:
        """The global count: micro-batches × batch × data-parallel ranks."""
        return self.batches * self.batch * self.dp_size

    def state(self) -> dict:
        return {"batches": self.batches, "positions": {str(k): list(v) for k, v in self.positions.items()},
                "errors": dict(self.errors), "workers": self.workers, "dp_size": self.dp_size}

    def close(self) -> None:
        self._it = None


def load_whole(shards: ShardSet, name: str) -> list[dict]:
    """Every readable sample of a small stream, in manifest order."""
    out = []
    for i in range(shards.num_shards):
        out.extend(decode_sample(s) for s in shards.read_shard(i, on_error=_warn_skip))
    if not out:
        raise UserError(f"data stream '{name}': no readable sample in {', '.join(shards.urls)}; check the shard "
                        "paths / URLs and rerun make-shards")
    return out
