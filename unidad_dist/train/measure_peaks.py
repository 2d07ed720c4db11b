"""Measure what ``unidad-dist plan`` estimates, at the step's peaks, on real engines and real iterations
(tests/test_plan.py, benchmarks/plan_check.py; 1 rank in-process or N ranks under torchrun):

* Model states per trainable role: bytes of the distinct storages reachable from its engine (parameters or
  their ZeRO-3 partitions, gradients, the optimizer's fp32 partitions, moments and flat buffers), taken at
  the end of each backward, before DeepSpeed reduces the gradients (``allreduce_gradients``: ZeRO-1 holds them
  whole there, ZeRO-1/2 their contiguous bucket), and right before each optimizer step; the larger.
* Activations per role: the bytes autograd holds for backward during that role's step, tracked live — each
  saved tensor (per save; parameters and views of them, which own no memory, excluded, as the plan counts
  them) from when it is saved until autograd
  releases it, and with activation checkpointing the tensors each block's recomputation saves during the
  backward (a recomputed block's tensors are released before the next block is recomputed: the backward is
  sequential) — the peak over the step's micro-batches. The window of a role's step ends with its backward.
* FLOPs: ``torch.utils.flop_counter`` over one plan period, with the CPU flash-attention kernels counted by
  the formulas of the GPU ones (the flop counter does not know them).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from unidad_dist.parallel.plan import PlanCache, make_plan
from unidad_dist.train.measure import built_and_warmed, model_state_bytes


class _Held:
    """What the pack hook hands autograd: the saved tensor, counted until autograd drops it."""
    __slots__ = ("t", "n", "live")

    def __init__(self, t, n, live):
        self.t, self.n, self.live = t, n, live

    def __del__(self):
        self.live.release(self.n)


class LiveSaved:
    """Bytes held for backward now, and the peak since ``window()`` was last called."""

    def __init__(self, params: set):
        self.params = params
        self.cur = 0  # saved tensors alive
        self.recomputed = 0  # the block being recomputed, during a checkpointed backward
        self.peak = 0

    def _bump(self):
        self.peak = max(self.peak, self.cur + self.recomputed)

    def release(self, n: int) -> None:
        self.cur -= n

    def _weight(self, t) -> bool:
        return id(t) in self.params or (t._base is not None and id(t._base) in self.params)

    def pack(self, t):
        if self._weight(t):  # a parameter, or a view of one (W.t()): no memory of its own
            return t
        n = t.numel() * t.element_size()
        self.cur += n
        self._bump()
        return _Held(t, n, self)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    def recompute_started(self) -> None:
        self.recomputed = 0

    def recompute_saved(self, t) -> None:
        if self._weight(t):
            return
        self.recomputed += t.numel() * t.element_size()
        self._bump()

    def window(self) -> int:
        """The peak since the last call; the next window starts from what is held now."""
        peak, self.recomputed = self.peak, 0
        self.peak = self.cur
        return peak


@contextlib.contextmanager
def _count_recomputation(live: LiveSaved):
    """Route the tensors torch's non-reentrant checkpoint saves while recomputing a block into ``live``."""
    import torch.utils.checkpoint as ckpt

    original = ckpt._recomputation_hook

    class Counting(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner = self.pack_hook
            live.recompute_started()

            def pack_hook(x):
                live.recompute_saved(x)
                return inner(x)

            self.pack_hook = pack_hook

    ckpt._recomputation_hook = Counting
    try:
        yield
    finally:
        ckpt._recomputation_hook = original


@contextlib.contextmanager
def activation_peaks(models):
    """role -> peak bytes held for backward during its step (per micro-batch); filled when the context exits."""
    params = set()
    for role in models.roles.values():
        params.update(id(p) for p in role.module.parameters())
    live = LiveSaved(params)
    peaks: dict = defaultdict(int)
    originals = {}
    for name, role in models.trainable_roles().items():
        originals[name] = role.backward

        def backward(loss, name=name, orig=originals[name]):
            out = orig(loss)
            peaks[name] = max(peaks[name], live.window())
            return out
        role.backward = backward
    found: dict = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack), _count_recomputation(live):
            yield found
    finally:
        found.update(peaks)
        for name, role in models.trainable_roles().items():
            role.backward = originals[name]


@contextlib.contextmanager
def model_state_peaks(roles: dict):
    """role -> the larger of its model-state bytes before each gradient reduction and before each step."""
    found: dict = {}
    restore = []

    def note(name, role):
        found[name] = max(found.get(name, 0), model_state_bytes(role))

    for name, role in roles.items():
        eng = role.engine
        for attr, boundary_only in (("allreduce_gradients", False), ("step", True)):
            orig = getattr(eng, attr)

            def wrapped(*a, name=name, role=role, orig=orig, boundary_only=boundary_only, **k):
                if not boundary_only or role.engine.is_gradient_accumulation_boundary():
                    note(name, role)
                return orig(*a, **k)
            restore.append((eng, attr, eng.__dict__.get(attr)))
            setattr(eng, attr, wrapped)
    try:
        yield found
    finally:
        for eng, attr, own in reversed(restore):
            if own is None:
                delattr(eng, attr)  # back to the class's method
            else:
                setattr(eng, attr, own)


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

    def raw(formula):  # already takes tensors (shape-wrapped): FlopCounterMode must not wrap it again
        def f(*args, **kwargs):
            return formula(*args, **kwargs)
        f._get_raw = True
        return f

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: raw(sdpa_flop),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: raw(sdpa_backward_flop)})


def measure_peaks(cfg, rt) -> dict:
    """Build the recipe on this rank, run one plan period to warm up (Adam's moments, caches), then measure
    the activation peaks per role and the model-state peaks per trainable role over one more, and the FLOPs
    over a third."""
    models, method, period = built_and_warmed(cfg, rt)
    with model_state_peaks(models.trainable_roles()) as states, activation_peaks(models) as acts:
        for it in range(period):
            method.step(it)
    with flop_counter() as fc:  # apart: its module hooks change what a checkpointed backward holds
        for it in range(period):
            method.step(it)
    return {"flops": float(fc.get_total_flops()), "activations": dict(acts), "states": dict(states)}


def compare_peaks_with_plan(cfg, rt, cache: PlanCache | None = None) -> dict:
    """estimate / measured: FLOPs of the period on this rank, and per trainable role its model states and
    the activations its step holds."""
    plan = make_plan(cfg, rt.world_size, cache=cache)
    got = measure_peaks(cfg, rt)
    period = cfg.method.plan_period(cfg)
    out = {"flops": sum(r.flops_per_iteration for r in plan.roles.values() if rt.rank in r.ranks) * period
           / got["flops"]}
    for name, measured in got["states"].items():
        out[f"states/{name}"] = plan.roles[name].model_state_bytes / measured
    for name, measured in got["activations"].items():
        if measured > 0:
            out[f"activations/{name}"] = plan.roles[name].activation_bytes / measured
    return out
