"""The Method interface: what a training method declares and does, and the registry that the recipe's
``algorithm.name`` selects from.

A method is a plug-in. It declares, from the recipe alone (class methods, no model built):

* ``sections()``: its recipe sections — one per role (a ``RoleConfig`` subclass, named as the role), its
  ``algorithm`` section (an ``AlgorithmConfig`` subclass) and any options of its own; it may extend a
  generic section by subclassing it (``train``);
* ``roles(cfg)``: the roles this recipe runs (``RoleSpec``: trainable or frozen, side in split
  placement, where its weights come from, extra modules it owns, which parameters train, whether frozen
  weights are recorded for resume checks, its EMA);
* ``components``: the shared components it needs (noise schedule, VAE codec, text conditioner), built
  once for the run from the ``primary`` role's backbone;
* ``iteration_plan(cfg, iteration)``: which roles step, over how many micro-batches, and the draws that
  change which network calls run — a function of (config, seed, iteration) only, so every rank agrees;
* ``passes(cfg, iteration, conditional)``: every network pass of one iteration (``Pass``), read by
  ``unidad-dist plan`` for FLOPs and activation memory;
* ``validate(cfg)``: its own checks (unknown keys and wrong types are already errors).

A run then constructs it with the built roles (``Method(cfg, models, rt)``) and calls ``prepare()`` (on
a fresh start, before the engines exist: e.g. a warm start), ``step(iteration)`` (returns logs),
``sample(n, steps)``, ``grids()`` (extra "before" images), ``summary()`` (its fields of summary.json) and
``state_dict()`` / ``load_state_dict()`` (its own state, kept in every checkpoint).

Its step marks its phases with ``self.timer.phase(name)`` (``core.timing``; names of its choosing, e.g. the
data wait and each role's step), which metrics.jsonl reports as ``time/<name>_s``; ``step_roles`` times each
role's optimizer step as that role's phase. Timing never synchronises the device nor draws a random number.

The method never names a rank or calls a collective: ``models.exchange`` (from ``parallel/``) runs a
piece of the step where a role lives and hands its tensors to the other side (``at``), and agrees on a
flag over the ranks that step the same roles (``agree``). Colocated, ``at`` is a plain call.
"""
from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from unidad_dist.core.sections import AlgorithmConfig, RoleConfig, TrainableRoleConfig
from unidad_dist.core.timing import PhaseTimer
from unidad_dist.errors import UserError

GRADS = ("none", "params", "input", "both")


@dataclass(frozen=True)
class RoleSpec:
    """One role of a method, as declared (its recipe section has the role's name)."""
    name: str
    trainable: bool
    side: str  # split placement: the rank group it lives on (roles of one side are always together)
    copy_of: Optional[str] = None  # default weights: a copy of this role section's network; None: its own
    heads: Optional[Callable[[dict], nn.Module]] = None  # extra modules it owns, built from its UNet config
    heads_key: str = ""  # the heads' initial weights are a function of (run.seed, heads_key)
    train_filter: Optional[Callable[[str, nn.Parameter], bool]] = None  # parameters that train (None: all)
    train_filter_doc: str = ""  # what the filter selects, for the error when a network has none of it
    record_frozen: bool = True  # frozen: its weight file recorded by path + sha256, checked on resume
    ema: float = 0.0  # decay of an EMA of its weights (0: none); sampled and exported when kept
    tokens: bool = False  # it trains the embedding of the run's new token (Method.new_token)


@dataclass(frozen=True)
class IterationPlan:
    """Which roles step in an iteration and over how many micro-batches (``micro[role]``: micro-batches with
    gradient; 0 or absent: it does not step), plus draws that change which network calls run (``extra``)."""
    micro: dict
    extra: dict = field(default_factory=dict)

    @property
    def n_micro(self) -> int:
        return max([1, *self.micro.values()])

    def steps(self, role: str) -> bool:
        return self.micro.get(role, 0) > 0


@dataclass(frozen=True)
class Pass:
    """One network pass of an iteration, for ``unidad-dist plan``: FLOPs = count × (forward + backward of
    this kind of pass); activations: the bytes it saves for backward count while ``phase``'s step runs."""
    role: str
    grad: str = "none"  # none | params (a role's own loss) | input (an input-gradient) | both
    discriminate: bool = False  # the encoder-only pass into the role's heads
    batch: int = 1  # multiple of train.batch_size (2 for a pass that evaluates cond + uncond for CFG)
    phase: Optional[str] = None  # the role whose step holds its saved tensors (default: ``role``)
    count: int = 1

    def __post_init__(self):
        if self.grad not in GRADS:
            raise ValueError(f"Pass.grad={self.grad!r} is not one of {GRADS}")


class NonFiniteLoss(UserError):
    """A role's loss was NaN/inf on some rank and the run is configured (or forced) to stop."""


class Method:
    name: ClassVar[str] = ""
    primary: ClassVar[str] = ""  # the role section whose backbone defines the schedule, space and components
    sampler: ClassVar[str] = ""  # the role that is sampled, evaluated and exported
    components: ClassVar[tuple] = ("schedule", "codec", "text")

    # -- declaration --------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type]:
        raise NotImplementedError

    @classmethod
    def roles(cls, cfg) -> list[RoleSpec]:
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg) -> None:
        pass

    @classmethod
    def iteration_plan(cls, cfg, iteration: int) -> IterationPlan:
        raise NotImplementedError

    @classmethod
    def passes(cls, cfg, iteration: int, conditional: bool) -> list[list[Pass]]:
        """The passes of one iteration, one list per micro-batch."""
        raise NotImplementedError

    @classmethod
    def feature_networks(cls, cfg) -> Optional[str]:
        """The feature networks its losses use (``eval.alignment``: "paper" or "stand_in"), built for a training
        run as ``models.features``; None: none."""
        return None

    @classmethod
    def new_token(cls, cfg) -> Optional[tuple[str, str]]:
        """(token, initial word(s)): a token appended to the shared text encoder whose embedding the role with
        ``RoleSpec.tokens`` trains; None: none."""
        return None

    @classmethod
    def plan_period(cls, cfg) -> int:
        """Iterations after which the schedule repeats (``plan`` averages FLOPs over them)."""
        return 1

    @classmethod
    def role_sections(cls) -> list[str]:
        """The names of all its role sections (a role may be absent from a run, e.g. switched off)."""
        return [n for n, t in cls.sections().items() if isinstance(t, type) and issubclass(t, RoleConfig)]

    # -- a run --------------------------------------------------------------------------------------
    def __init__(self, cfg, models, rt):
        self.cfg = cfg
        self.m = models
        self.rt = rt
        self.seed = cfg.run.seed
        self.nonfinite_run: dict = defaultdict(int)  # consecutive iterations a role's step was skipped
        self.nonfinite_total: dict = defaultdict(int)
        self.timer = PhaseTimer(rt.device)  # seconds by phase of its steps (``time/<phase>_s``)

    @property
    def ex(self):
        """The exchange between placement sides (``parallel.exchange``)."""
        return self.m.exchange

    def prepare(self, initial: Optional[Callable[[], None]] = None) -> dict:
        """Fresh start only, before the engines are attached. Returns what it measured (kept in
        eval_before.json). A method whose prepare changes the sampler's weights (a warm start) calls ``initial()``
        once, on the ranks that hold the sampler, right before the first change, with the sampler on the compute
        device (the loop evaluates the sampler as the run found it there)."""
        return {}

    def step(self, iteration: int) -> dict:
        raise NotImplementedError

    def sample(self, n: int, steps: Optional[int] = None, **kw) -> torch.Tensor:
        """Samples ``first`` … ``first + n - 1`` (``first`` a keyword, default 0) of the sampler role in model
        space. Sample i depends only on (seed, i) — its noise and, for text models, prompt i mod len(prompts)
        — so the ranks of train/sampling.py can each draw a share. Keywords: seed, batch, prompts, use_ema,
        generator (see UniDAD.sample)."""
        raise NotImplementedError

    def grids(self, n: int) -> dict[str, torch.Tensor]:
        """Extra images (model space) written as "before" grids, name -> batch. Every rank that holds the
        sampler role calls it (a ZeRO-3 forward is a collective)."""
        return {}

    def summary(self) -> dict:
        return {}

    def sampling_info(self) -> dict:
        """How the sampler samples, for export: ``steps``, ``timesteps``, ``explicit_timesteps`` (the recipe
        gave the list), ``output`` (its output as a scheduler's prediction type: "sample" for x̂0, else
        "epsilon" / "v_prediction")."""
        raise NotImplementedError

    # -- its state, kept in every checkpoint (per rank) ----------------------------------------------
    def state_dict(self) -> dict:
        return {"nonfinite_run": dict(self.nonfinite_run), "nonfinite_total": dict(self.nonfinite_total)}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_run = defaultdict(int, {k: int(v) for k, v in state.get("nonfinite_run", {}).items()})
        self.nonfinite_total = defaultdict(int, {k: int(v) for k, v in state.get("nonfinite_total", {}).items()})

    @classmethod
    def merge_state_dicts(cls, states: list[dict]) -> dict:
        """One state from the states of every saving rank (a resume at another world size). The counters of
        a role are equal on the ranks that step it and zero elsewhere: the maximum keeps them."""
        out: dict = {"nonfinite_run": {}, "nonfinite_total": {}}
        for st in states:
            for key in out:
                for role, v in st.get(key, {}).items():
                    out[key][role] = max(out[key].get(role, 0), int(v))
        return out

    # -- shared pieces of a step ---------------------------------------------------------------------
    def backward(self, name: str, loss: torch.Tensor, iteration: int, micro: int, skipped: set) -> None:
        """Back-propagate a role's loss unless it is non-finite on any rank that steps the role (a flag
        agreed on before any backward, so all those ranks skip together or all stop)."""
        if name in skipped:
            return
        bad = self.ex.agree(not bool(torch.isfinite(loss.detach()).all()))
        if not bad:
            self.m.roles[name].backward(loss)
            return
        where = f"{name}: non-finite loss at iteration {iteration} (micro-batch {micro}, on at least one rank)"
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLoss(f"{where}; stopping as train.nonfinite=stop (the last checkpoint is intact; "
                                "set train.nonfinite=skip to skip such steps)")
        if micro > 0:
            raise NonFiniteLoss(f"{where}; its earlier micro-batches' gradients are already accumulated in the "
                                "engine and cannot be dropped, so the step cannot be skipped; stopping (the last "
                                "checkpoint is intact)")
        skipped.add(name)
        if self.rt.is_main or self.ex.leader(name):
            print(f"warning: {where}; skipping its step (train.nonfinite=skip)")

    def step_roles(self, iteration: int, roles, skipped: set, logs: dict) -> None:
        """The optimizer step of each role in ``roles`` held here (in order; timed as the role's phase), or its
        skip."""
        for name in roles:
            if not self.ex.holds(name):
                continue
            if name in skipped:
                self.nonfinite_run[name] += 1
                self.nonfinite_total[name] += 1
                for k in [k for k in logs if k.startswith(f"{name}/")]:  # its non-finite losses
                    del logs[k]
                logs[f"{name}/skipped_nonfinite"] = 1.0
                limit = self.cfg.train.max_nonfinite_skips
                if self.nonfinite_run[name] > limit:
                    raise NonFiniteLoss(f"{name}: a non-finite loss made its step skip {self.nonfinite_run[name]} "
                                        f"iterations in a row (> train.max_nonfinite_skips = {limit}), last at "
                                        f"iteration {iteration}; stopping. Lower the learning rate, check the data, "
                                        "or resume from an earlier checkpoint")
                continue
            self.nonfinite_run[name] = 0
            with self.timer.phase(name):
                stepped = self.m.roles[name].step(iteration)
            for k, v in stepped.items():
                logs[f"{name}/{k}"] = v


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
BUILTIN = {"unidad": "unidad_dist.methods.unidad:UniDAD", "finetune": "unidad_dist.methods.finetune:Finetune",
           "opad": "unidad_dist.methods.opad:OPAD"}  # imported when first asked for
_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Register a Method subclass under its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    _REGISTRY[cls.name] = cls
    return cls


def _import(target: str, key: str) -> type:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{key}='{target}': cannot import it ({type(e).__name__}: {e}); give module:Class of a "
                        "Method subclass importable here (check PYTHONPATH)") from None
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise UserError(f"{key}='{target}' is not a Method subclass (unidad_dist.methods.base.Method)")
    return obj


def method_class(name: str, key: str = "algorithm.name") -> type:
    """The method a recipe names: a registered name, a built-in one, or ``module:Class``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN:
        cls = _import(BUILTIN[name], key)
        _REGISTRY.setdefault(name, cls)
        return cls
    if ":" in name:
        cls = _import(name, key)
        return _REGISTRY.setdefault(cls.name, cls) if cls.name else cls
    raise UserError(f"{key}={name!r} is not a known method; pick one of {', '.join(method_names())}, or give "
                    "module:Class of your own Method subclass")


def method_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


__all__ = ["AlgorithmConfig", "GRADS", "IterationPlan", "Method", "NonFiniteLoss", "Pass", "RoleConfig",
           "RoleSpec", "TrainableRoleConfig", "method_class", "method_names", "register_method"]
