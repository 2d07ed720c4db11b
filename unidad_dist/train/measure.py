"""Measure what the planner estimates, on real engines and real iterations (used by the plan check and
the benchmarks): model-state bytes reachable from an engine, bytes saved for backward per role, FLOPs."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from unidad_dist.parallel import engines
from unidad_dist.parallel.plan import make_plan
from unidad_dist.train.build import build


def _tensors_in(obj, out: list, seen: set, depth: int = 0) -> None:
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if isinstance(obj, nn.Module):
        return  # modules are reached through their parameters, not through an optimizer's references
    if isinstance(obj, dict):
        for k, v in obj.items():
            _tensors_in(k, out, seen, depth + 1)
            _tensors_in(v, out, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors_in(v, out, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        _tensors_in(obj.state, out, seen, depth + 1)
        _tensors_in(obj.param_groups, out, seen, depth + 1)
        _tensors_in(vars(obj), out, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        _tensors_in(vars(obj), out, seen, depth + 1)


def numel(p) -> int:
    """A parameter's full element count (ZeRO-3 keeps only a partition in ``p``)."""
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def model_states_before_step(roles: dict):
    """Record each role's model-state bytes right before its optimizer step (gradients still held)."""
    found: dict = {}
    originals = {}
    for name, role in roles.items():
        originals[name] = role.engine.step

        def step(*a, name=name, role=role, orig=originals[name], **k):
            if role.engine.is_gradient_accumulation_boundary():
                found[name] = max(found.get(name, 0), model_state_bytes(role))
            return orig(*a, **k)
        role.engine.step = step
    try:
        yield found
    finally:
        for name, role in roles.items():
            role.engine.step = originals[name]


def model_state_bytes(role) -> int:
    """Bytes of the distinct storages reachable from a role's parameters (their ZeRO-3 partitions), their
    gradients, and its optimizer (fp32 partitions, moments, flat buffers)."""
    tensors: list = []
    seen: set = set()
    for p in role.module.parameters():
        tensors.append(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data)
        if p.grad is not None:
            tensors.append(p.grad)
    if getattr(role, "engine", None) is not None and getattr(role.engine, "optimizer", None) is not None:
        _tensors_in(role.engine.optimizer, tensors, seen)
    storages = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return int(sum(storages.values()))


@contextlib.contextmanager
def saved_bytes_by_phase(models):
    """Bytes of the tensors autograd saves for backward per micro-batch, attributed to the role whose step
    they belong to: everything saved since the last role backward goes to the next role whose loss is
    back-propagated (the student's step: its generation, the critic feedback's input-gradient graph and its
    loss). Parameters themselves are not counted. The dict is filled when the context exits."""
    totals: dict = defaultdict(int)
    calls: dict = defaultdict(int)
    pending = [0]
    params = set()
    for role in models.roles.values():
        params.update(id(p) for p in role.module.parameters())
    originals = {}
    for name, role in models.trainable_roles().items():
        originals[name] = role.backward

        def backward(loss, name=name, orig=originals[name]):
            totals[name] += pending[0]
            pending[0] = 0
            calls[name] += 1
            return orig(loss)
        role.backward = backward

    def pack(t):
        if id(t) not in params:
            pending[0] += t.numel() * t.element_size()
        return t

    per_micro: dict = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield per_micro
    finally:
        per_micro.update({k: v / max(1, calls[k]) for k, v in totals.items()})
        for name, role in models.trainable_roles().items():
            if name in originals:
                role.backward = originals[name]


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def built_and_warmed(cfg, rt):
    """The recipe built on this rank behind its engines, after one plan period of iterations (Adam's moments
    and caches exist): (models, method, period)."""
    models = build(cfg, rt)
    method = cfg.method(cfg, models, rt)
    engines.attach(models, cfg, rt)
    period = cfg.method.plan_period(cfg)
    for it in range(period):
        method.step(it)
    return models, method, period


def measure_run(cfg, rt) -> dict:
    """Build the recipe on this process (1 rank), run one plan period of iterations to warm the caches, then
    measure one more: FLOPs of everything (flop counter), bytes saved for backward per role in its first
    iteration, and each engine's model-state bytes right before its optimizer steps."""
    models, method, period = built_and_warmed(cfg, rt)
    saved: dict = {}
    with model_states_before_step(models.trainable_roles()) as states, flop_counter() as fc:
        for it in range(period):
            if it == 0:
                with saved_bytes_by_phase(models) as totals:
                    method.step(it)
                saved = dict(totals)
            else:
                method.step(it)
    return {"flops": float(fc.get_total_flops()), "saved": saved, "states": dict(states), "models": models}


def compare_with_plan(cfg, rt) -> dict:
    """estimate / measured for the three quantities of the plan, per trainable role and in total."""
    plan = make_plan(cfg, rt.world_size)
    got = measure_run(cfg, rt)
    period = cfg.method.plan_period(cfg)
    out = {"flops": sum(r.flops_per_iteration for r in plan.roles.values()) * period / got["flops"]}
    for name in got["states"]:
        out[f"states/{name}"] = plan.roles[name].model_state_bytes / got["states"][name]
    for name, measured in got["saved"].items():
        if measured > 0:
            out[f"activations/{name}"] = plan.roles[name].activation_bytes / measured
    return out
