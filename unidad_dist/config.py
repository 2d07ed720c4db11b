"""Typed configuration: a recipe's sections, YAML recipes, ``key.sub=value`` overrides, validation.

A recipe is the generic sections (``core/sections.py``: run, train, data, placement, checkpoint, logging,
eval) plus those of its method (``algorithm.name``, default ``unidad``): one per role, its ``algorithm``
section, its own options. ``config_class(method)`` assembles them into one dataclass (``placement`` gets
an optional rank list per role); the method class is ``cfg.method``.

Everything here runs before any model is built. Unknown keys, wrong types and inconsistent settings are
``UserError``s that name the key and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar, Optional

import yaml

from unidad_dist.core.schema import (all_keys as _keys_of, as_dict, choice, deep_merge, describe_keys, flatten, from_dict as _from_dict,
                                     parse_overrides, parse_yaml, positive, resolve_recipe_paths)
from unidad_dist.core.sections import GENERIC_SECTIONS, LR_SCHEDULES, PRECISIONS, PlacementConfig, RoleConfig, TrainableRoleConfig
from unidad_dist.errors import UserError
from unidad_dist.methods.base import Method, method_class

DEFAULT_METHOD = "unidad"
# eval.select: the metric (a key of eval/<iteration>.json) and whether lower is better
SELECTABLE = {"proxy_distance": True, "fid": True, "intra_lpips": False, "clip_i": False, "clip_t": False, "dino_i": False}

__all__ = ["Config", "all_keys", "batch_for_world", "config_class", "data_parallel_size", "config_from_dict", "dump_yaml", "flatten", "from_dict",
           "load_config", "parse_overrides", "run_dir", "to_dict", "validate"]


class Config:
    """Base of every method's assembled config class (``isinstance(cfg, Config)``); ``cfg.method`` is the
    method class."""
    method: ClassVar[type] = Method


@functools.lru_cache(maxsize=None)
def config_class(method: type) -> type:
    """The recipe dataclass of ``method``: generic sections (or the method's subclass of one) and the
    method's own, in the order run, train, <method sections>, data, placement, checkpoint, logging, eval."""
    own = dict(method.sections())
    roles = method.role_sections()
    placement = dataclasses.make_dataclass(
        "PlacementConfig", [(r, Optional[list[int]], dataclasses.field(default=None, metadata={
            "doc": f"split placement: the ranks holding {r} (default: the method's half of the ranks)"}))
            for r in roles],
        bases=(own.pop("placement", PlacementConfig),))
    sections = {"run": GENERIC_SECTIONS["run"], "train": own.pop("train", GENERIC_SECTIONS["train"])}
    sections.update(own)
    sections.update({"data": GENERIC_SECTIONS["data"], "placement": placement})
    for name in ("checkpoint", "logging", "eval"):
        sections[name] = GENERIC_SECTIONS[name]
    for name, cls in sections.items():
        generic = GENERIC_SECTIONS.get(name)
        if generic is not None and not issubclass(cls, generic):
            raise TypeError(f"{method.__name__}: section '{name}' must be (a subclass of) {generic.__name__}")
    fields = [(n, cls, dataclasses.field(default_factory=cls)) for n, cls in sections.items()]
    return dataclasses.make_dataclass("Config", fields, bases=(Config,), namespace={"method": method})


def _method_of(data: dict) -> type:
    algo = data.get("algorithm", {})
    name = algo.get("name", DEFAULT_METHOD) if isinstance(algo, dict) else DEFAULT_METHOD
    if not isinstance(name, str):
        raise UserError(f"algorithm.name: expected str, got {name!r}; name a method (e.g. unidad)")
    return method_class(name)


def from_dict(cls, data: dict, prefix: str = ""):
    return _from_dict(cls, data, prefix)


def all_keys(method: str | type = DEFAULT_METHOD) -> list[str]:
    """Every valid key of a recipe of ``method`` (a name or a Method class)."""
    return _keys_of(config_class(method_class(method) if isinstance(method, str) else method))


def key_reference(method: str | type = DEFAULT_METHOD) -> list[dict]:
    """Every key of a recipe of ``method``: {key, type, default, doc, path} (``config --keys``, the README)."""
    return describe_keys(config_class(method_class(method) if isinstance(method, str) else method))


def _fmt_default(value) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def keys_text(method: str | type = DEFAULT_METHOD) -> str:
    """``config --keys``: one line per key (key, type, default) and its meaning below it."""
    lines = []
    for k in key_reference(method):
        lines.append(f"{k['key']}  ({k['type']}, default {_fmt_default(k['default'])}{', a path' if k['path'] else ''})")
        lines.append(f"    {k['doc']}")
    return "\n".join(lines)


def keys_markdown(method: str | type = DEFAULT_METHOD) -> str:
    """The README's reference of the keys (a test keeps it in sync): a markdown table."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in key_reference(method):
        doc = k["doc"].replace("|", "\\|") + (" (a path: relative to the recipe file)" if k["path"] else "")
        rows.append(f"| `{k['key']}` | {k['type']} | `{_fmt_default(k['default'])}` | {doc} |")
    return "\n".join(rows)


def to_dict(cfg) -> dict:
    return as_dict(cfg)


def shipped_recipes_dir() -> Path:
    """The shipped recipes: recipes/ of the repository (an editable install) or the copy packaged with
    unidad_dist (a wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_recipes_dir().glob("*.yaml"))}


def recipe_path(given: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``sd15_subject`` or ``sd15_subject.yaml``)
    when no such file exists."""
    p = Path(given).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    raise UserError(f"recipe file '{given}' not found (looked for {p.resolve()}); pass an existing YAML file or the "
                    f"name of a shipped recipe: {', '.join(shipped) or 'none found'} (`unidad-dist recipes`)")


def load_recipe_dict(path: str | Path) -> dict:
    p = recipe_path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"cannot read recipe '{path}' ({e.strerror}); check its permissions") from None
    data = parse_yaml(text, f"recipe '{path}'")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a YAML mapping of sections (run:, train:, ...)")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None,
                check: bool = True):
    """The config of recipe ``path`` (a file or a shipped recipe's name) with ``overrides`` (``key.sub=value``)
    on top. Relative paths written in the recipe file (models, data, JSON files: the keys ``config --keys``
    marks as paths) are relative to the recipe file's folder; those given as overrides, to the working
    directory."""
    data = dict(base or {})
    if path is not None:
        file = recipe_path(path)
        recipe = load_recipe_dict(file)
        if "stages" in recipe:
            raise UserError(f"'{path}' is a chained recipe (stages:): `unidad-dist train` and `unidad-dist launch` run "
                            "it; for this command give one of its stages' recipes")
        recipe = resolve_recipe_paths(config_class(_method_of(recipe)), recipe, file.resolve().parent)
        data = deep_merge(data, recipe)
        data.setdefault("run", {})
        if isinstance(data["run"], dict) and "name" not in data["run"]:
            data["run"]["name"] = file.stem
    data = deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(config_class(_method_of(data)), data)
    if check:
        validate(cfg)
    return cfg


def config_from_dict(data: dict):
    cfg = from_dict(config_class(_method_of(data)), data)
    validate(cfg)
    return cfg


def validate_eval(ev) -> None:
    """The eval section's checks (also for `evaluate`'s eval.* overrides of a finished run's recipe)."""
    positive("eval.num_samples", ev.num_samples)
    positive("eval.lpips_per_cluster", ev.lpips_per_cluster)
    positive("eval.batch", ev.batch)
    positive("eval.every", ev.every, allow_zero=True)
    if ev.select is not None:
        choice("eval.select", ev.select, SELECTABLE)
    if ev.steps is not None:
        positive("eval.steps", ev.steps)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Validation: the generic sections and every role section, then the method's own checks
# --------------------------------------------------------------------------------------------------
def _validate_role(cfg, name: str, rc: RoleConfig, trainable: bool, spec=None) -> None:
    choice(f"{name}.precision", rc.precision, PRECISIONS)
    if isinstance(rc, TrainableRoleConfig):
        positive(f"{name}.grad_accum", rc.grad_accum)
        opt = rc.optimizer
        if opt.lr <= 0:
            raise UserError(f"{name}.optimizer.lr must be > 0, got {opt.lr}")
        if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
            raise UserError(f"{name}.optimizer.betas must be two numbers in [0, 1), got {opt.betas}")
        positive(f"{name}.optimizer.warmup", opt.warmup, allow_zero=True)
        choice(f"{name}.optimizer.schedule", opt.schedule, LR_SCHEDULES)
        if opt.schedule != "constant" and opt.warmup >= cfg.train.iterations:
            raise UserError(f"{name}.optimizer.schedule={opt.schedule} decays the rate after the warmup, but "
                            f"{name}.optimizer.warmup={opt.warmup} is not below train.iterations="
                            f"{cfg.train.iterations}: shorten the warmup or use schedule=constant")
        if not 0.0 <= opt.final_lr_ratio <= 1.0:
            raise UserError(f"{name}.optimizer.final_lr_ratio must be in [0, 1] (a fraction of "
                            f"{name}.optimizer.lr), got {opt.final_lr_ratio}")
        positive(f"{name}.optimizer.clip_grad_norm", opt.clip_grad_norm, allow_zero=True)  # 0 = no clipping
    stages = (0, 1, 2, 3) if trainable else (0, 3)
    if rc.zero_stage not in stages:
        what = "ZeRO stage 0-3" if trainable else "0 (replicated) or 3 (partitioned, frozen)"
        if isinstance(rc, TrainableRoleConfig) or trainable:
            raise UserError(f"{name}.zero_stage={rc.zero_stage} is not a valid {what}; set one of {list(stages)}")
        raise UserError(f"{name}.zero_stage={rc.zero_stage}: a frozen teacher is 0 (replicated) or 3 "
                        "(partitioned); set one of [0, 3]")
    positive(f"{name}.zero3_persistence_threshold", rc.zero3_persistence_threshold, allow_zero=True)
    if isinstance(rc, TrainableRoleConfig):
        if rc.offload_optimizer and not trainable:
            raise UserError(f"{name}.offload_optimizer applies to a role that trains, and this recipe does not "
                            f"train {name} (it has no optimizer); remove it or make the role train")
        if spec is not None and not trainable:
            for key, value, default in (("lora.rank", rc.lora.rank, 0),
                                        ("activation_checkpointing", rc.activation_checkpointing, False),
                                        ("deepspeed_config", rc.deepspeed_config, None)):
                if value != default:
                    raise UserError(f"{name}.{key}={value!r} applies to a role that trains, and this recipe keeps "
                                    f"{name} frozen; remove it or make the role train")
        if rc.offload_optimizer and rc.zero_stage == 0:
            raise UserError(f"{name}.offload_optimizer needs ZeRO: set {name}.zero_stage to 1, 2 or 3")
        if rc.lora.rank < 0:
            raise UserError(f"{name}.lora.rank must be >= 0, got {rc.lora.rank}")
        if rc.lora.rank > 0 and not rc.lora.target_modules:
            raise UserError(f"{name}.lora.target_modules is empty; name the UNet layers to adapt (e.g. to_q)")


def validate(cfg) -> None:
    method = cfg.method
    primary = getattr(cfg, method.primary)
    if not primary.backbone:
        raise UserError(
            f"{method.primary}.backbone is not set; point it at a diffusers model folder "
            "(or builtin:demo_teacher) — every role's architecture and noise schedule come from it"
        )
    method.validate(cfg)  # its own sections first: which roles run, and how, depends on them
    specs = {s.name: s for s in method.roles(cfg)}
    for name in method.role_sections():
        spec = specs.get(name)
        _validate_role(cfg, name, getattr(cfg, name), trainable=spec is not None and spec.trainable, spec=spec)
    positive("train.iterations", cfg.train.iterations, allow_zero=True)
    positive("train.batch_size", cfg.train.batch_size)
    if cfg.train.global_batch_size is not None:
        positive("train.global_batch_size", cfg.train.global_batch_size)
        fixed = [f"{n}.grad_accum={getattr(cfg, n).grad_accum}" for n in specs if specs[n].trainable
                 and getattr(getattr(cfg, n), "grad_accum", 1) != 1]
        if fixed:
            raise UserError(f"train.global_batch_size derives every role's gradient accumulation from the world size; "
                            f"remove {', '.join(fixed)} (or train.global_batch_size)")
    choice("placement.mode", cfg.placement.mode, ("colocated", "split"))
    choice("train.nonfinite", cfg.train.nonfinite, ("skip", "stop"))
    positive("train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, allow_zero=True)
    positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    positive("logging.every", cfg.logging.every)
    validate_eval(cfg.eval)
    if cfg.run.dir is not None and not cfg.run.dir.strip():
        raise UserError(f"run.dir is empty; give the run's folder (run.dir=runs/my_run) or leave it unset for "
                        f"runs/<run.name> (runs/{cfg.run.name})")
    name = cfg.run.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"run.name={name!r} must be a plain folder name (it becomes runs/<run.name>); no '/', "
                        "'..' or empty name — use run.dir to put the run elsewhere")
    if cfg.run.signal_grace_s <= 0:
        raise UserError(f"run.signal_grace_s must be > 0 seconds, got {cfg.run.signal_grace_s}")
    if cfg.run.lock_stale_s <= 0:
        raise UserError(f"run.lock_stale_s must be > 0 seconds, got {cfg.run.lock_stale_s}")
    if cfg.run.dist_timeout <= 0:
        raise UserError(f"run.dist_timeout must be > 0 seconds, got {cfg.run.dist_timeout}")
    if cfg.data.target.path is None:
        raise UserError(
            "data.target.path is not set; point it at a folder of target images "
            "(the method adapts to them; the summary measures against them)"
        )
    if cfg.data.target.resolution is not None:
        positive("data.target.resolution", cfg.data.target.resolution)
    if not 0.0 <= cfg.data.target.translate < 0.5:
        raise UserError(f"data.target.translate must be in [0, 0.5) (the largest shift, as a fraction of the "
                        f"image side; 0 turns it off), got {cfg.data.target.translate}")
    positive("data.workers", cfg.data.workers, allow_zero=True)
    positive("data.split_min_samples", cfg.data.split_min_samples, allow_zero=True)
    if cfg.data.source.path is not None and cfg.data.source.prompt_file is not None:
        raise UserError("data.source.path (prompt shards) and data.source.prompt_file are both set; keep one")


def data_parallel_size(cfg, world: int) -> int:
    """The ranks a global batch is spread over: all of them, or in split placement each side's half (both sides
    hold the whole batch)."""
    return world // 2 if cfg.placement.mode == "split" and world >= 2 else world


def batch_for_world(cfg, world: int):
    """The config a run at ``world`` ranks trains with: with ``train.global_batch_size`` G, each rank takes G / world
    samples per optimizer step (G / (world / 2) in split placement, where each side holds the whole batch), as the fewest micro-batches of at most ``train.batch_size`` that divide it evenly;
    ``train.batch_size`` becomes that micro-batch and every trainable role's ``grad_accum`` that count. The
    recipe's own values stay in config.yaml (a resume at another world size derives them again). Without G:
    ``cfg`` itself. A world size that does not divide G is an error naming those that do."""
    G = cfg.train.global_batch_size
    if G is None:
        return cfg
    split = cfg.placement.mode == "split"
    dp = data_parallel_size(cfg, world)
    if G % dp:
        fits = [str(w * (2 if split else 1)) for w in range(1, G + 1) if G % w == 0]
        raise UserError(f"train.global_batch_size={G} cannot be split over {world} ranks"
                        + (f" ({dp} per side of split placement)" if split else "")
                        + f"; run on {', '.join(fits)} ranks, or give a global batch that {dp} divides "
                          f"(e.g. {G + dp - G % dp})")
    per_rank = G // dp
    accum = next(a for a in range(-(-per_rank // cfg.train.batch_size), per_rank + 1) if per_rank % a == 0)
    roles = {s.name: dataclasses.replace(getattr(cfg, s.name), grad_accum=accum) for s in cfg.method.roles(cfg)
             if s.trainable and hasattr(getattr(cfg, s.name), "grad_accum")}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=per_rank // accum), **roles)


def run_dir(cfg) -> Path:
    return cfg.run.folder()
