"""Host staging of a checkpoint's state for an asynchronous write (``checkpoint.async``).

``Stager.copy(obj)`` returns ``obj`` with every tensor copied into host memory (pinned on CUDA, so the copy is
a DMA the GPU can overlap), storage by storage: tensors that share a storage (views of one flat buffer, as
ZeRO's partitions are) share the copy, and each copy keeps the whole storage, so ``torch.save`` of the copy
writes exactly the bytes it would have written from the live state. Containers are rebuilt, other objects
deep-copied (a config dict, a loss scaler: state that may change while the copy waits to be written).

Host buffers are reused from one save to the next (``release`` returns them once written): pinned allocations
are slow, and a fresh CPU buffer costs page faults as large as the copy itself. So an asynchronous run holds
one host copy of the state this rank checkpoints, for as long as it runs.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch

from unidad_dist import device as dev


class Stager:
    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = defaultdict(list)  # (bytes, pinned) -> buffers
        self._held: list[tuple[tuple[int, bool], torch.Tensor]] = []
        self._memo: dict = {}
        self._devices: set = set()  # devices copied from (CUDA copies are waited for once, at the end)
        self.bytes = 0  # staged since the last release
        self.last_bytes = 0  # staged by the save released last

    def _buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        key = (nbytes, pin)
        buf = self._free[key].pop() if self._free[key] else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._held.append((key, buf))
        self.bytes += nbytes
        return buf

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.detach().untyped_storage()
        key = (storage.data_ptr(), storage.device, storage.nbytes())
        host = self._memo.get(key)
        if host is None:
            pin = dev.pins_host_copies(storage.device)
            self._devices.add(storage.device)
            buf = self._buffer(storage.nbytes(), pin)
            if storage.nbytes():
                src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                buf.copy_(src, non_blocking=pin)
            host = self._memo[key] = buf.untyped_storage()
        out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=t.requires_grad)
        if t.requires_grad:  # torch.save records the flag: the copy is written as the live tensor would be (no graph)
            out.requires_grad_(True)
        return out

    def _copy(self, obj):
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # the same mapping type (OrderedDict, …) and attributes
            for k, v in obj.items():
                out[k] = self._copy(v)
            return out
        if isinstance(obj, list):
            return [self._copy(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self._copy(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)

    def copy(self, obj):
        """``obj`` with its tensors staged in host memory (complete when this returns). Storage sharing is kept
        within one object (one file): the memo, keyed by address, lives only while ``obj`` holds its sources."""
        self._memo = {}
        out = self._copy(obj)
        self._memo = {}
        for d in self._devices:
            dev.synchronize(d)  # a no-op where copies are synchronous
        self._devices = set()
        return out

    def release(self) -> None:
        """The staged copies were written: their buffers serve the next save."""
        for key, buf in self._held:
            self._free[key].append(buf)
        self._held, self._memo, self.last_bytes, self.bytes = [], {}, self.bytes, 0
