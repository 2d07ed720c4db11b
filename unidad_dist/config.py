"""Typed configuration: nested dataclasses, YAML recipes, ``key.sub=value`` overrides, validation.

Everything here runs before any model is built. Unknown keys, wrong types and inconsistent settings are
``UserError``s that name the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from unidad_dist.errors import UserError

PRECISIONS = ("fp32", "bf16_autocast", "bf16", "fp16")  # fp16: CUDA only (DeepSpeed loss scaling)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str = "unidad"
    dir: Optional[str] = None  # default: runs/<name>
    seed: int = 0
    dist_timeout: float = 600.0  # seconds any collective may wait
    lock_stale_s: float = 900.0  # a run.lock from another host without heartbeat this long is taken over


@dataclass
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 1  # per rank and micro-batch
    fake_updates_per_student: int = 5  # `ratio`: the student steps on iterations = 0 mod ratio
    nonfinite: str = "skip"  # a NaN/inf loss on any rank: "skip" that role's step on all ranks, or "stop" all
    max_nonfinite_skips: int = 10  # stop when one role's step is skipped this many iterations in a row


@dataclass
class OptimizerConfig:
    lr: float = 2e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup: int = 500  # linear warmup, counted in iterations (all roles follow the iteration counter)
    clip_grad_norm: float = 10.0  # <= 0 disables clipping


@dataclass
class LoraConfig:
    rank: int = 0  # 0: train every weight; > 0: train a peft LoRA adapter of this rank on the UNet
    alpha: Optional[float] = None  # None: = rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class StudentConfig:
    backbone: Optional[str] = None  # None: the source teacher's architecture
    init: Optional[str] = None  # None: copy of the source teacher's weights
    strict: bool = True
    precision: str = "bf16_autocast"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_accum: int = 1
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 of this role's engine
    offload_optimizer: bool = False  # ZeRO optimizer states (and the fp32 master) in CPU memory
    zero3_persistence_threshold: int = 100000  # ZeRO-3: parameters smaller than this stay whole
    activation_checkpointing: bool = False  # recompute the UNet blocks' activations in backward
    deepspeed_config: Optional[str] = None  # JSON file whose fields override the generated config
    lora: LoraConfig = field(default_factory=LoraConfig)
    steps: int = 1  # K
    timesteps: Optional[list[int]] = None  # explicit list, else t_k = T-1 - k*floor(T/K)
    unroll: str = "backward_simulation"  # or "full"
    prediction: str = "teacher"  # "x0": the network's output is x̂0; "teacher": read as the backbone's type
    warm_start: int = 0  # regression steps on (noise -> teacher's DDIM sample) pairs; 0 = off
    warm_start_pairs: int = 256
    warm_start_teacher_steps: int = 25
    warm_start_lr: float = 1e-3
    warm_start_batch: int = 32
    ema: float = 0.0  # decay of the student EMA; 0 = off


@dataclass
class FakeTeacherConfig:
    backbone: Optional[str] = None
    init: Optional[str] = None
    strict: bool = True
    precision: str = "bf16_autocast"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_accum: int = 1
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 of this role's engine
    offload_optimizer: bool = False  # ZeRO optimizer states (and the fp32 master) in CPU memory
    zero3_persistence_threshold: int = 100000  # ZeRO-3: parameters smaller than this stay whole
    activation_checkpointing: bool = False  # recompute the UNet blocks' activations in backward
    deepspeed_config: Optional[str] = None  # JSON file whose fields override the generated config
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class GanHeadsConfig:
    enabled: bool = True
    lambda_d: float = 0.05  # weight of the discriminator loss in the fake-teacher step
    lambda_g: float = 0.015  # weight of the generator loss in the student step


@dataclass
class SourceTeacherConfig:
    backbone: Optional[str] = None  # diffusers pipeline/model folder, or builtin:<name>
    init: Optional[str] = None
    strict: bool = True
    precision: str = "bf16_autocast"
    enabled: bool = True
    cfg: float = 1.0  # classifier-free guidance scale (text models); 1 = no CFG
    zero_stage: int = 0  # 0: replicated on every rank; 3: partitioned (ZeRO-3 engine, no optimizer)
    zero3_persistence_threshold: int = 100000


@dataclass
class TargetTeacherConfig:
    mode: str = "off"  # off | online | frozen
    backbone: Optional[str] = None
    init: Optional[str] = None  # frozen: the target checkpoint; online: None = copy of the source teacher
    strict: bool = True
    precision: str = "bf16_autocast"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_accum: int = 1
    zero_stage: int = 0  # online: ZeRO stage 0-3 of its engine; frozen: 0 replicated, 3 partitioned
    offload_optimizer: bool = False  # ZeRO optimizer states (and the fp32 master) in CPU memory
    zero3_persistence_threshold: int = 100000  # ZeRO-3: parameters smaller than this stay whole
    activation_checkpointing: bool = False  # recompute the UNet blocks' activations in backward
    deepspeed_config: Optional[str] = None  # JSON file whose fields override the generated config
    update_every: int = 1  # tt_every: step the online target teacher on iterations = 0 mod this
    cfg: float = 1.0
    cond_dropout: float = 0.1
    student_feedback: float = 0.0  # OPAD-style: fraction of its batch that is detached student samples
    feedback_start: int = 0


@dataclass
class AlgorithmConfig:
    name: str = "unidad"
    a: Union[float, str] = 0.0  # weight of the target-teacher DMD term; "auto" is reserved
    t_min: int = 20
    t_max: int = 980
    t_sampling: str = "uniform"  # uniform | karras_index


@dataclass
class TargetDataConfig:
    path: Optional[str] = None  # folder of target images, a make-shards folder (manifest.json), or builtin:<name>
    shards: Optional[str] = None  # where the manifest's shards are read from: brace pattern / pipe: URLs
    resolution: Optional[int] = None  # default: the backbone's sample size (x VAE factor)
    prompt: str = "a {rare} {cls}"
    rare_token: str = "sks"
    class_name: str = ""
    hflip: bool = True


@dataclass
class SourceDataConfig:
    prompts: list[str] = field(default_factory=lambda: ["a {rare} {cls}"])
    prompt_file: Optional[str] = None
    path: Optional[str] = None  # a make-shards prompt folder (manifest.json); replaces prompts / prompt_file
    shards: Optional[str] = None  # where the manifest's shards are read from: brace pattern / pipe: URLs


@dataclass
class DataConfig:
    target: TargetDataConfig = field(default_factory=TargetDataConfig)
    source: SourceDataConfig = field(default_factory=SourceDataConfig)
    workers: int = 0  # DataLoader worker processes per rank for a split (large) shard stream
    # A shard stream with fewer samples than this, or fewer shards than readers (ranks x workers), is held
    # whole in memory and sampled by per-sample draws (independent of the world size); a larger one is split.
    split_min_samples: int = 10000


@dataclass
class PlacementConfig:
    mode: str = "colocated"  # colocated | split
    # split only: the ranks of each role (default: student + source teacher on the first half of the
    # ranks, fake teacher + heads + target teacher on the second half)
    student: Optional[list[int]] = None
    fake_teacher: Optional[list[int]] = None
    source_teacher: Optional[list[int]] = None
    target_teacher: Optional[list[int]] = None


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only the initial and the final checkpoint
    keep: int = 2


@dataclass
class LoggingConfig:
    every: int = 10
    progress: bool = True
    sample_every: int = 0  # write a sample grid every N iterations (0: only before/after)
    grid_size: int = 16
    wandb: bool = False
    wandb_project: str = "unidad_dist"


@dataclass
class EvalConfig:
    num_samples: int = 64
    steps: Optional[int] = None  # None: student.steps


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake_teacher: FakeTeacherConfig = field(default_factory=FakeTeacherConfig)
    gan_heads: GanHeadsConfig = field(default_factory=GanHeadsConfig)
    source_teacher: SourceTeacherConfig = field(default_factory=SourceTeacherConfig)
    target_teacher: TargetTeacherConfig = field(default_factory=TargetTeacherConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# YAML with floats as a person writes them (PyYAML reads "1e-4" as a string)
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 booleans: only true/false. (YAML 1.1 reads `mode: off` as False, and `off` is a valid mode.)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None


# --------------------------------------------------------------------------------------------------
# dict -> dataclass with type checks
# --------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; set a value of that type")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; write a YAML list like [1, 2]")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}; set a value of that type")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, prefix: str = ""):
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise UserError(_unknown_key_message(full, [f"{prefix}.{n}" if prefix else n for n in names]))
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, full))
        else:
            out.append(full)
    return out


def _unknown_key_message(key: str, candidates: list[str]) -> str:
    pool = candidates + all_keys()
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    if not close:  # try matching only the last component, e.g. "studnet.steps" -> "student.steps"
        last = key.split(".")[-1]
        tails = {c.split(".")[-1]: c for c in pool}
        close = [tails[m] for m in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else "; run `unidad-dist config` to list valid keys"
    return f"unknown config key '{key}'{hint}"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------------
# Loading, overrides
# --------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key.sub=value (e.g. train.iterations=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' has an empty key; write key.sub=value")
        value = parse_yaml(raw, f"override '{item}'") if raw.strip() != "" else ""
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}' conflicts with an earlier override of '{p}'")
            node = nxt
        node[parts[-1]] = value
    return tree


def load_recipe_dict(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file '{path}' not found; pass an existing YAML file (see recipes/)")
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


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    data = dict(base or {})
    if path is not None:
        data = _deep_merge(data, load_recipe_dict(path))
        data.setdefault("run", {})
        if isinstance(data["run"], dict) and "name" not in data["run"]:
            data["run"]["name"] = Path(path).stem
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}; pick one of them")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def validate(cfg: Config) -> None:
    a = cfg.algorithm.a
    if isinstance(a, str):
        if a == "auto":
            raise UserError("algorithm.a='auto' is reserved and not implemented yet; set a number in [0, 1]")
        raise UserError(f"algorithm.a must be a number in [0, 1] (or 'auto'), got {a!r}")
    if not 0.0 <= a <= 1.0:
        raise UserError(f"algorithm.a must be in [0, 1], got {a}; 0 = source teacher only, 1 = target only")
    _choice("algorithm.name", cfg.algorithm.name, ("unidad",))
    _choice("target_teacher.mode", cfg.target_teacher.mode, ("off", "online", "frozen"))
    if a > 0 and cfg.target_teacher.mode == "off":
        raise UserError(
            f"algorithm.a={a} needs a target teacher but target_teacher.mode=off; "
            "set target_teacher.mode=online (or frozen with target_teacher.init) or algorithm.a=0"
        )
    if a < 1 and not cfg.source_teacher.enabled:
        raise UserError(
            f"algorithm.a={a} < 1 needs the source teacher but source_teacher.enabled=false; "
            "enable it or set algorithm.a=1"
        )
    if not cfg.source_teacher.backbone:
        raise UserError(
            "source_teacher.backbone is not set; point it at a diffusers model folder "
            "(or builtin:demo_teacher) — every role's architecture and noise schedule come from it"
        )
    if cfg.target_teacher.mode == "frozen" and not cfg.target_teacher.init:
        raise UserError("target_teacher.mode=frozen needs target_teacher.init (the target model's weights)")
    st = cfg.student
    if st.steps < 1:
        raise UserError(f"student.steps must be >= 1, got {st.steps}")
    if st.timesteps is not None:
        if len(st.timesteps) != st.steps:
            raise UserError(
                f"student.timesteps has {len(st.timesteps)} entries but student.steps={st.steps}; make them agree"
            )
        if any(b >= a_ for a_, b in zip(st.timesteps, st.timesteps[1:])):
            raise UserError(f"student.timesteps must be strictly decreasing, got {st.timesteps}")
    _choice("student.unroll", st.unroll, ("backward_simulation", "full"))
    _choice("student.prediction", st.prediction, ("teacher", "x0"))
    if not 0.0 <= st.ema < 1.0:
        raise UserError(f"student.ema must be in [0, 1) (0 = off), got {st.ema}")
    _positive("student.warm_start", st.warm_start, allow_zero=True)
    for role in ("student", "fake_teacher", "source_teacher", "target_teacher"):
        prec = getattr(cfg, role).precision
        _choice(f"{role}.precision", prec, PRECISIONS)
    for role in ("student", "fake_teacher", "target_teacher"):
        rc = getattr(cfg, role)
        _positive(f"{role}.grad_accum", rc.grad_accum)
        opt = rc.optimizer
        if opt.lr <= 0:
            raise UserError(f"{role}.optimizer.lr must be > 0, got {opt.lr}")
        if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
            raise UserError(f"{role}.optimizer.betas must be two numbers in [0, 1), got {opt.betas}")
        _positive(f"{role}.optimizer.warmup", opt.warmup, allow_zero=True)
    for role in ("student", "fake_teacher", "target_teacher"):
        rc = getattr(cfg, role)
        trainable = role != "target_teacher" or cfg.target_teacher.mode == "online"
        stages = (0, 1, 2, 3) if trainable else (0, 3)
        if rc.zero_stage not in stages:
            what = "ZeRO stage 0-3" if trainable else "0 (replicated) or 3 (partitioned, frozen)"
            raise UserError(f"{role}.zero_stage={rc.zero_stage} is not a valid {what}; set one of {list(stages)}")
        if rc.offload_optimizer and not trainable:
            raise UserError(f"{role}.offload_optimizer applies to trainable roles only (a frozen teacher has no "
                            f"optimizer); remove it or set {role}.mode=online")
        if rc.offload_optimizer and rc.zero_stage == 0:
            raise UserError(f"{role}.offload_optimizer needs ZeRO: set {role}.zero_stage to 1, 2 or 3")
        _positive(f"{role}.zero3_persistence_threshold", rc.zero3_persistence_threshold, allow_zero=True)
        lora = getattr(rc, "lora", None)
        if lora is not None:
            _positive(f"{role}.lora.rank", lora.rank, allow_zero=True)
            if lora.rank > 0 and not lora.target_modules:
                raise UserError(f"{role}.lora.target_modules is empty; name the UNet layers to adapt (e.g. to_q)")
    if cfg.source_teacher.zero_stage not in (0, 3):
        raise UserError(
            f"source_teacher.zero_stage={cfg.source_teacher.zero_stage}: a frozen teacher is 0 (replicated) "
            "or 3 (partitioned); set one of [0, 3]"
        )
    _positive("source_teacher.zero3_persistence_threshold", cfg.source_teacher.zero3_persistence_threshold,
              allow_zero=True)
    if cfg.student.ema > 0 and cfg.student.zero_stage == 3:
        raise UserError(
            "student.ema with student.zero_stage=3 is not available (the EMA would need the whole student on "
            "every rank); use student.zero_stage 0-2 or student.ema=0"
        )
    _positive("train.iterations", cfg.train.iterations, allow_zero=True)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.fake_updates_per_student", cfg.train.fake_updates_per_student)
    _positive("target_teacher.update_every", cfg.target_teacher.update_every)
    if not 0 <= cfg.target_teacher.cond_dropout < 1:
        raise UserError(f"target_teacher.cond_dropout must be in [0, 1), got {cfg.target_teacher.cond_dropout}")
    if not 0 <= cfg.target_teacher.student_feedback < 1:
        raise UserError(
            f"target_teacher.student_feedback must be in [0, 1), got {cfg.target_teacher.student_feedback}"
        )
    al = cfg.algorithm
    _choice("algorithm.t_sampling", al.t_sampling, ("uniform", "karras_index"))
    if not 0 <= al.t_min <= al.t_max:
        raise UserError(f"need 0 <= algorithm.t_min <= algorithm.t_max, got {al.t_min}, {al.t_max}")
    _choice("placement.mode", cfg.placement.mode, ("colocated", "split"))
    _choice("train.nonfinite", cfg.train.nonfinite, ("skip", "stop"))
    _positive("train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, allow_zero=True)
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("logging.every", cfg.logging.every)
    _positive("eval.num_samples", cfg.eval.num_samples)
    if cfg.eval.steps is not None:
        _positive("eval.steps", cfg.eval.steps)
    if cfg.run.lock_stale_s <= 0:
        raise UserError(f"run.lock_stale_s must be > 0 seconds, got {cfg.run.lock_stale_s}")
    if cfg.run.dist_timeout <= 0:
        raise UserError(f"run.dist_timeout must be > 0 seconds, got {cfg.run.dist_timeout}")
    if cfg.data.target.path is None:
        raise UserError(
            "data.target.path is not set; point it at a folder of target images "
            "(the GAN heads and an online target teacher train on them; the summary measures against them)"
        )
    if cfg.data.target.resolution is not None:
        _positive("data.target.resolution", cfg.data.target.resolution)
    _positive("data.workers", cfg.data.workers, allow_zero=True)
    _positive("data.split_min_samples", cfg.data.split_min_samples, allow_zero=True)
    if cfg.data.source.path is not None and cfg.data.source.prompt_file is not None:
        raise UserError("data.source.path (prompt shards) and data.source.prompt_file are both set; keep one")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name
