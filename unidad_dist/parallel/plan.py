"""``unidad-dist plan``: memory and FLOPs per role and per rank, from model configs alone (meta device).

* Parameters: every role's network is built from its config on the meta device.
* Model states per rank: the bytes per trainable parameter of each DeepSpeed 0.19 engine layout, measured
  on real engines at the step's peak — the end of a backward, before DeepSpeed reduces the gradients, or
  the optimizer step, whichever holds more (train/measure_peaks.py; tests/test_plan.py and
  benchmarks/plan_check.py re-measure: fp32, bf16 and bf16 autocast, ZeRO 0-3 on 1 rank, ZeRO-1/2 on 2):

      stage 0        w + w + m + 8                 (weights, grads, fp32 master when w = 2, Adam)
      stage 1        w + w + 12 / N, + w * B once  (whole gradients until the boundary reduction; fp32
                                                    partition and Adam moments partitioned)
      stage 2        w + (12 + w) / N, + w * B once (gradients partitioned as they are reduced; with
                                                    gradient accumulation 2 w / N: the accumulated partition
                                                    and the one being reduced)
      stage 3        (w + 12 + w) / N, + w * B once (everything partitioned)

  per trainable parameter, with w = 2 for bf16/fp16 weights and 4 otherwise, N the engine's
  data-parallel size, B the reduce bucket (elements, parallel.engines.bucket_elements: ZeRO's contiguous
  gradient buffer at stages 1-2, the reduce bucket at stage 3, whole on every rank). Under ZeRO-3 a parameter
  smaller than ``zero3_persistence_threshold`` stays whole on every rank (DeepSpeed's persistence rule).
  Frozen weights count w (replicated) or w / N (ZeRO-3). ``offload_optimizer`` moves the fp32 partition and
  Adam moments to host memory. (ZeRO-3 on 2 ranks, where a rank was seen holding more before its
  reduction, is not modelled beyond this.)
* Activations: bytes autograd saves for backward, counted with saved-tensor hooks while each kind of
  network pass runs on meta tensors at the recipe's micro-batch and resolution. A saved parameter, or a
  view of one (a linear saves W.t()), owns no memory and is not counted; under bf16 autocast it is a bf16
  copy (autocast's cast) and is. bf16 autocast is otherwise modelled as bf16 activations. Attention is
  counted as the fused kernels save it (flash / memory-efficient attention on GPUs, the flash kernel on
  CPUs: q, k, v, the output and the log-sum-exp; not the attention matrix, which only the math fallback
  keeps). With activation checkpointing (diffusers checkpoints each ResNet and transformer block) a graph
  holds what the blocks do not cover plus each block's inputs, and while the backward recomputes a block it
  holds that block's saved tensors too: its peak is the largest of (everything held up to block j + block
  j's saved tensors) over the blocks j, and the backward FLOPs include the recomputed forwards. All three
  come from the same meta pass as the numbers without checkpointing (the pass marks where each block starts
  and ends), so switching checkpointing on or off costs no new pass. A step's graphs (the method's passes,
  in the order it lists them) add up as ``make_plan`` describes.
* FLOPs: ``torch.utils.flop_counter``'s formulas over the same meta passes, times the number of passes the
  method declares (``Method.passes``: Uni-DAD's student generation and its backward-simulation draws, DMD
  teachers with CFG, GAN passes, fake/target updates, the update ratio and gradient accumulation) — the
  passes the step makes, read from the same iteration plan. A pass without gradient is the forward of a
  pass with one (FLOPs are linear in the batch), so it costs no meta pass of its own when the plan has one.
  A training run reports the same count in metrics.jsonl (``perf/flops_per_iteration``, MFU): ``make_plan``
  and ``IterationFlops`` share ``PassCosts`` and ``pass_flops``.

Cost cache. A meta pass of an SDXL UNet takes seconds, so every pass cost (and each network's parameter
sizes) is kept under ``<cache root>/plan/<sha256>.json`` ($UNIDAD_CACHE, ``builtin.cache_root``) and in
memory, keyed by a hash of everything that changes the number: the UNet config (architecture fields), the
role's heads and train filter (their code), LoRA settings, which parameters train, dtype and autocast, text
conditioning shapes, pass kind (gradient, encoder-only), micro-batch, the torch / diffusers / peft / transformers
versions, ``CACHE_VERSION`` (bump it with a change elsewhere that changes a cached number) and a hash of the
code the meta passes run (this module, models/roles.py, backbones.py, adapters.py: an edit there starts a
fresh cache). Roles and rungs of the ladder that share a network share its passes.

Recommendation ladder (``recommend``): when the recipe does not fit, the first of these layouts that does,
cheapest first. Each rung only raises what the recipe sets (a ZeRO stage is never lowered, checkpointing
never switched off), and is printed as ``key=value`` overrides for ``unidad-dist train``:

  1. ZeRO-1            optimizer states partitioned: the same communication volume as data parallelism
  2. ZeRO-2            + gradients partitioned: still the data-parallel volume (reduce-scatter + gather)
  3. ZeRO-2 + activation checkpointing            + the blocks' forward again in every backward (about a
                                                  third more compute for the trained passes)
  4. ... + frozen teachers partitioned (ZeRO-3)   + an all-gather of a teacher's weights in every pass
  5. ... + optimizer offload                      Adam on the host: host-device copies, a CPU optimizer step
  6. ZeRO-3 + activation checkpointing            weights gathered in every forward and backward (a
                                                  student EMA is sharded like the student)
  7. ZeRO-3 + activation checkpointing + offload
  8. split placement, ZeRO-2 + checkpointing + offload   half the ranks per role side (half the throughput
                                                  per role), the exchange between the sides

ZeRO-1/2 come before checkpointing because they cost no compute and no more communication than the
all-reduce data parallelism already does, while checkpointing recomputes. A rung is skipped when it changes
nothing or repeats an earlier one, and noted as not possible when it cannot apply (split placement on one
rank or with ``train.global_batch_size``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from unidad_dist.errors import UserError

GIB = 1024 ** 3
CACHE_VERSION = 2  # bump when a change here changes any cached pass cost or parameter count
_MEMO: dict = {}  # key digest -> value, for this process (the ladder re-plans the same networks)


def parse_bytes(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1024 ** 4), ("GB", GIB), ("MB", 1024 ** 2), ("KB", 1024), ("B", 1)):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    raise UserError(f"--gpu-memory '{text}' is not a size like 80GB or 40960MB")


# ------------------------------------------------------------------------------------------------
# Costs of one network pass, on the meta device
# ------------------------------------------------------------------------------------------------
@dataclass
class PassCost:
    fwd: float
    bwd: float  # without activation checkpointing
    saved: int  # bytes saved for backward without checkpointing (0 without grad)
    ac_saved: int = 0  # with checkpointing: bytes held outside the checkpointed blocks + the blocks' inputs
    ac_peak: int = 0  # with checkpointing: the largest (held up to a block + that block recomputed)
    ac_recompute: float = 0.0  # with checkpointing: FLOPs of the recomputed block forwards

    def scaled(self, factor: float) -> "PassCost":
        """A pass without gradient at ``factor`` times this pass's batch (FLOPs are linear in the batch)."""
        return PassCost(self.fwd * factor, 0.0, 0)

    def held(self, checkpointing: bool) -> tuple[float, int, int]:
        """(backward FLOPs, bytes held from forward to backward, peak bytes during the backward)."""
        if checkpointing and self.saved:
            return self.bwd + self.ac_recompute, self.ac_saved, max(self.ac_saved, self.ac_peak)
        return self.bwd, self.saved, self.saved


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _FusedAttention(TorchFunctionMode):
    """On meta tensors ``scaled_dot_product_attention`` takes the math path, which saves the attention matrix
    (in fp32 for bf16 inputs); GPUs and CPUs run fused kernels that save q, k, v, the output and the
    log-sum-exp. Route it to the flash kernel's meta function (its FLOPs counted by the flop counter)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            a = dict(zip(_SDPA_ARGS, args), **kwargs)
            q, k, v = a["query"], a["key"], a["value"]
            if (a.get("attn_mask") is None and not a.get("enable_gqa", False) and q.dim() == 4
                    and q.device.type == "meta" and k.shape[-3] == q.shape[-3]):
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, a.get("dropout_p", 0.0), a.get("is_causal", False), False, scale=a.get("scale"))[0]
        return func(*args, **kwargs)


class _FlopCount(TorchDispatchMode):
    """The FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts (its formula registry), without its
    per-module tracking, which costs as much as the meta pass itself."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def get_total_flops(self) -> int:
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _SavedCounter:
    """Saved-tensor bytes of one pass, split at the blocks diffusers would checkpoint (installed as the UNet's
    gradient-checkpointing function, it runs each block plainly and notes its inputs, saved bytes, FLOPs)."""

    def __init__(self, params: set, flops, cast_weights: bool = False):
        self.params = params
        self.cast_weights = cast_weights  # bf16 autocast: a saved weight is a bf16 copy of the parameter
        self.flops = flops
        self.outer = 0  # saved outside any block
        self.inputs = 0  # the blocks' tensor inputs (what a checkpointed block keeps)
        self.internal = 0  # saved inside the blocks
        self.peak = 0
        self.recompute = 0.0
        self.region: Optional[int] = None

    def pack(self, t):
        # a parameter, or a view of one (a linear's W.t()), costs no memory; under autocast it is a bf16 copy
        weight = id(t) in self.params or (t._base is not None and id(t._base) in self.params)
        if not weight or self.cast_weights:
            n = t.numel() * (2 if weight else t.element_size())
            if self.region is None:
                self.outer += n
            else:
                self.region += n
        return t

    def block(self, module, *args):
        if self.region is not None or not torch.is_grad_enabled():
            return module(*args)
        self.inputs += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        f0 = self.flops.get_total_flops()
        self.region = 0
        try:
            out = module(*args)
        finally:
            r, self.region = self.region, None
        self.internal += r
        self.peak = max(self.peak, self.outer + self.inputs + r)
        self.recompute += self.flops.get_total_flops() - f0
        return out


@contextlib.contextmanager
def _torch_linear():
    """The meta pass runs torch's own linear: from its first ZeRO-3 engine on, DeepSpeed replaces
    ``torch.nn.functional.linear`` process-wide (tests, or a plan made inside a training process) with a
    function that saves the weight itself instead of a view of it: the same bytes (neither owns memory),
    but the plan should not depend on what ran before it in the process."""
    import torch.nn.functional as F

    current = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = current


def _meta_inputs(spec, batch: int, text_dims: Optional[dict]):
    hw = spec.sample_size
    x = torch.zeros(batch, spec.in_channels, hw, hw, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond = None
    if text_dims is not None:
        cond = {"encoder_hidden_states": torch.zeros(batch, text_dims["seq"], text_dims["dim"], device="meta")}
        if text_dims.get("pooled"):
            cond["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text_dims["pooled"], device="meta"),
                                         "time_ids": torch.zeros(batch, 6, device="meta")}
    return x, t, cond


def pass_cost(net, spec, batch: int, text_dims, grad: str, discriminate: bool = False,
              dtype: torch.dtype = torch.float32, autocast: bool = False) -> PassCost:
    """One pass of ``net`` (a RoleNet on the meta device) at ``batch``. grad: none | params | input | both.
    The parameters that take part are those with ``requires_grad`` (the role's trainable set; none for a
    frozen role): ``params`` / ``both`` back-propagate into them (``both`` also into the input), ``input``
    only into the input (``torch.autograd.grad``), though a trainable network still saves what its weight
    gradients would need, as in the step. ``autocast``: bf16 autocast over fp32 weights, modelled as bf16
    activations with every saved weight a bf16 copy (autocast's cast). Not modelled: a process with a ZeRO-3
    engine, where DeepSpeed's linear replaces torch's (it saves its input as it comes and the weight itself:
    autocast estimates ran x1.2 high on the tiny SD1.5 form there)."""
    if grad not in ("none", "params", "input", "both"):
        raise ValueError(f"grad={grad!r}")
    if grad in ("params", "both") and not any(p.requires_grad for p in net.parameters()):
        raise ValueError("a params pass of a network with no trainable parameter")
    x, t, cond = _meta_inputs(spec, batch, text_dims)
    x = x.to(dtype)
    if cond is not None:
        cond = {k: (v.to(dtype) if torch.is_tensor(v) else {kk: vv.to(dtype) for kk, vv in v.items()})
                for k, v in cond.items()}
    if grad in ("input", "both"):
        x = x.requires_grad_(True).clone()  # not a leaf, as in the step (the flop counter's hooks need one)
    unet = net.unet
    with _FlopCount() as fc, _FusedAttention(), _torch_linear():
        counter = _SavedCounter({id(p) for p in net.parameters()}, fc, autocast)
        if getattr(unet, "_supports_gradient_checkpointing", False):
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=counter.block)
        ctx = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda q: q) if grad != "none" else torch.no_grad()
        with ctx:
            out = net(x, t, cond, discriminate=discriminate)
        fwd = fc.get_total_flops()
        if grad == "input":
            torch.autograd.grad(out.float().sum(), x)
        elif grad != "none":
            out.float().sum().backward()
        bwd = fc.get_total_flops() - fwd
    for p in net.parameters():
        p.grad = None
    if grad == "none":
        return PassCost(float(fwd), 0.0, 0)
    saved = counter.outer + counter.internal
    ac_saved = counter.outer + counter.inputs
    return PassCost(float(fwd), float(bwd), int(saved), int(ac_saved), int(max(ac_saved, counter.peak)),
                    float(counter.recompute))


# ------------------------------------------------------------------------------------------------
# The cost cache
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _versions() -> tuple:
    """The code the cached numbers come from (package metadata: importing diffusers or peft takes seconds)."""
    from importlib import metadata

    here = Path(__file__).resolve()
    code = hashlib.sha256()
    for f in (here, here.parents[1] / "models" / "roles.py", here.parents[1] / "models" / "backbones.py",
              here.parents[1] / "models" / "adapters.py"):  # the code the meta passes run
        code.update(f.read_bytes())
    out = [("plan", CACHE_VERSION), ("code", code.hexdigest()[:16]), ("torch", torch.__version__)]
    for dist in ("diffusers", "peft", "transformers"):
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, None))
    return tuple(out)


def cache_key(key: dict) -> str:
    """sha256 of the canonical JSON of ``key`` plus the code versions."""
    blob = json.dumps({"versions": dict(_versions()), **key}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class PlanCache:
    """Pass costs and parameter sizes: in memory (``memory``) and as JSON files under ``folder`` (None: the
    cache root's ``plan/``; ``disk=False``: no files)."""

    def __init__(self, disk: bool = True, memory: bool = True, folder: Optional[Path] = None):
        from unidad_dist import builtin

        self.folder = (Path(folder) if folder is not None else builtin.cache_root() / "plan") if disk else None
        self.memory = memory
        self.hits = 0
        self.computed = 0
        self._warned = False

    def get(self, key: dict):
        digest = cache_key(key)
        if self.memory and digest in _MEMO:
            self.hits += 1
            return _MEMO[digest]
        if self.folder is not None:
            path = self.folder / f"{digest}.json"
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = None
            if isinstance(stored, dict) and stored.get("key") == json.loads(json.dumps(key, default=str)):
                if self.memory:
                    _MEMO[digest] = stored["value"]
                self.hits += 1
                return stored["value"]
        return None

    def put(self, key: dict, value) -> None:
        digest = cache_key(key)
        self.computed += 1
        if self.memory:
            _MEMO[digest] = value
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{digest}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"key": key, "value": value}, default=str))
            os.replace(tmp, self.folder / f"{digest}.json")
        except OSError as e:
            if not self._warned:
                print(f"plan: cannot write the cost cache in {self.folder} ({e.strerror}); continuing without it "
                      "(set UNIDAD_CACHE to a writable folder)", file=sys.stderr)
                self._warned = True
            self.folder = None


def _code_id(fn) -> Optional[list]:
    """What identifies a callable's behaviour for the cache: where it lives, its source file's hash, its
    closure's values."""
    if fn is None:
        return None
    f = getattr(fn, "__func__", fn)
    parts = [getattr(f, "__module__", ""), getattr(f, "__qualname__", repr(f))]
    try:
        parts.append(hashlib.sha256(Path(inspect.getsourcefile(f)).read_bytes()).hexdigest()[:16])
    except (TypeError, OSError):
        code = getattr(f, "__code__", None)
        parts.append(hashlib.sha256(code.co_code).hexdigest()[:16] if code is not None else repr(f))
    parts += [repr(c.cell_contents) for c in (getattr(f, "__closure__", None) or ())]
    return parts


# ------------------------------------------------------------------------------------------------
# Backbones: the recipe's folders, or the shipped configs of its model family
# ------------------------------------------------------------------------------------------------
def shipped_configs_dir() -> Path:
    for candidate in (Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    raise UserError("configs/ (the shipped model configs) not found next to the package; reinstall unidad_dist "
                    "from its repository, or point the recipe's backbone at a diffusers folder")


def shipped_archs() -> list[str]:
    return sorted(p.name for p in shipped_configs_dir().iterdir() if (p / "unet" / "config.json").is_file())


def infer_arch(*names: str) -> Optional[str]:
    """The model family a path or recipe name points at: 'sdxl' (…xl…), 'sd15' (…1-5, 1.5, v1, sd15…)."""
    for name in names:
        s = Path(str(name)).name.lower() if name else ""
        if not s:
            continue
        if "xl" in s:
            return "sdxl"
        if re.search(r"(^|[^0-9.])1[-._]?5([^0-9]|$)|sd-?15|(^|[^a-z0-9])v1([^0-9]|$)", s):
            return "sd15"
    return None


def _resolve(given: str, role: str, arch: Optional[str], run_name: str, notes: list):
    """A role's BackboneSpec: its folder, or — when that folder does not exist — the shipped config of the
    recipe's model family (``arch``, else inferred from the folder and run names), noted in ``notes``."""
    from unidad_dist.models.backbones import resolve_backbone

    if given.startswith("builtin:") or Path(given).expanduser().exists():
        if arch is not None:
            notes.append(f"--arch {arch} not used for {role}.backbone: '{given}' exists and its own config is used")
        return resolve_backbone(given, role)
    archs = shipped_archs()
    family = arch or infer_arch(given, run_name)
    if family is None:
        raise UserError(f"{role}.backbone: folder '{given}' does not exist and its model family cannot be told from "
                        f"its name; plan with a shipped architecture: --arch {'|'.join(archs)} (or set "
                        f"{role}.backbone=configs/<{'|'.join(archs)}>)")
    if family not in archs:
        raise UserError(f"--arch {family}: no shipped config configs/{family}; choose one of {', '.join(archs)}")
    how = "--arch" if arch else "inferred from the names"
    notes.append(f"{role}.backbone '{given}' does not exist here: sized with the shipped configs/{family} "
                 f"({how}); pass the model folder or --arch to change it")
    return resolve_backbone(str(shipped_configs_dir() / family), role)


def _arch_config(unet_config: dict) -> dict:
    return {k: v for k, v in unet_config.items() if not k.startswith("_")}


def _text_dims(spec) -> Optional[dict]:
    if not spec.text_conditioned:
        return None
    root = spec.root
    if root is None:
        raise UserError(f"plan needs the pipeline folder of '{spec.given}' (text encoder configs)")
    cfg1 = _read(root / "text_encoder" / "config.json")
    seq = cfg1.get("max_position_embeddings", 77)
    tok = root / "tokenizer" / "tokenizer_config.json"
    if tok.is_file():
        seq = _read(tok).get("model_max_length", seq)
        seq = seq if seq < 10 ** 6 else cfg1.get("max_position_embeddings", 77)
    dim = cfg1["hidden_size"]
    pooled = None
    if spec.kind == "sdxl":
        cfg2 = _read(root / "text_encoder_2" / "config.json")
        dim += cfg2["hidden_size"]
        pooled = cfg2.get("projection_dim", cfg2["hidden_size"])
    return {"seq": int(seq), "dim": int(dim), "pooled": pooled}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"plan: '{path}' is missing; point the recipe at a complete diffusers pipeline "
                        "folder") from None
    except ValueError as e:
        raise UserError(f"plan: '{path}' is not valid JSON ({e}); re-save the model with save_pretrained") from None


# parameters of the feature networks a method trains against (eval.alignment): transformers' CLIPModel for
# ViT-B/32 (151 277 313) + torchvision's VGG16 features (14 714 688) + the five LPIPS heads (1 472)
FEATURE_PARAMS = {"paper": 151_277_313 + 14_714_688 + 1_472}


def _helpers_bytes(spec, cache: PlanCache) -> float:
    """Frozen text encoders + VAE, replicated (their own dtype: we keep them in fp32)."""
    if spec.kind == "pixel" or spec.root is None:
        return 0.0
    subs = {sub: _read(spec.root / sub / "config.json") for sub in ("text_encoder", "text_encoder_2", "vae")
            if (spec.root / sub / "config.json").is_file()}
    key = {"what": "helpers", "configs": {s: _arch_config(c) for s, c in subs.items()}}
    hit = cache.get(key)
    if hit is not None:
        return float(hit)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    with torch.device("meta"):
        for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if sub in subs:
                total += sum(p.numel() for p in cls(CLIPTextConfig.from_pretrained(spec.root / sub)).parameters())
        if "vae" in subs:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(spec.root / "vae"))
            total += sum(p.numel() for p in vae.parameters())
    cache.put(key, 4.0 * total)
    return 4.0 * total


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class RolePlan:
    name: str
    ranks: list[int]
    params: int  # all parameters of the role's network
    trainable: int
    precision: str
    zero_stage: Optional[int]  # None: replicated frozen
    model_state_bytes: float  # per rank holding the role
    host_bytes: float  # offloaded to host memory per rank
    activation_bytes: float  # held for backward during its step (peak, with checkpointing: its recompute)
    flops_per_iteration: float  # per rank holding the role, averaged over `ratio` iterations
    activation_checkpointing: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Rung:
    """One layout of the recommendation ladder as tried."""
    name: str
    overrides: list[str]  # key=value for unidad-dist train / plan
    largest_rank_bytes: Optional[float]  # None: not possible (see note)
    fits: bool
    note: str = ""


@dataclass
class Recommendation:
    text: str  # the layout, or why nothing fits
    overrides: list[str]
    largest_rank_bytes: Optional[float]
    tried: list[Rung] = field(default_factory=list)


@dataclass
class Plan:
    world_size: int
    placement: str
    roles: dict[str, RolePlan]
    frozen_helpers_bytes: float  # text encoders + VAE, replicated
    per_rank_bytes: dict[int, float]
    gpu_memory: Optional[int]
    recommendation: Optional[Recommendation] = None
    notes: list[str] = field(default_factory=list)
    passes_computed: int = 0  # meta passes run for this plan (the others came from the cache)
    passes_cached: int = 0

    @property
    def largest_rank_bytes(self) -> float:
        return max(self.per_rank_bytes.values())

    @property
    def fits(self) -> Optional[bool]:
        if self.gpu_memory is None:
            return None
        return self.largest_rank_bytes <= 0.9 * self.gpu_memory


def _weight_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(trainable: int, frozen: int, small: int, precision: str, stage: int, n: int,
                      bucket: int, offload: bool = False, ema: bool = False, accum: int = 1) -> tuple[float, float]:
    """(device bytes, host bytes) per rank for one engine at its peak; ``small``: parameters below the
    ZeRO-3 persistence threshold (kept whole); ``accum``: micro-batches accumulated per step (ZeRO-2 then
    holds the accumulated gradient partition next to the one being reduced)."""
    w = _weight_bytes(precision)
    master = 4 if w == 2 else 0
    opt = 4 + 8  # fp32 partition + Adam moments (ZeRO); stage 0 keeps a master copy only for 16-bit weights
    host = 0.0
    if stage == 0:
        dev = trainable * (w + w + master + 8) + frozen * w
        if offload:
            dev -= trainable * (master + 8)
            host = trainable * (master + 8)
    elif stage == 1:  # gradients whole on every rank until the boundary reduction
        dev = trainable * (w + w + opt / n) + frozen * w + w * bucket
    elif stage == 2:
        dev = trainable * (w + (opt + (2 if accum > 1 else 1) * w) / n) + frozen * w + w * bucket
    else:
        part = trainable - min(small, trainable)
        dev = part * w / n + min(small, trainable) * w + trainable * (opt + w) / n + w * bucket
        dev += frozen * w / n
    if offload and stage > 0:
        dev -= trainable * opt / n
        host = trainable * opt / n
    if ema:  # fp32; at ZeRO-3 sharded like the weights, over the trainable parameters only
        dev += 4 * trainable / n if stage == 3 else 4 * (trainable + frozen)
    return float(dev), float(host)


class _RoleNets:
    """A role's network key (for the cache) and, only when the cache misses, its meta network."""

    def __init__(self, cfg, rs, rspec, trainable: bool, dtype: torch.dtype, autocast: bool):
        rc = getattr(cfg, rs.name)
        lora = getattr(rc, "lora", None)
        self.cfg, self.rs, self.rspec, self.dtype, self.trainable = cfg, rs, rspec, dtype, trainable
        self.autocast = autocast
        self.arch = {"unet": rspec.unet_class, "config": _arch_config(rspec.unet_config),
                     "lora": dataclasses.asdict(lora) if (trainable and lora is not None and lora.rank > 0) else None}
        self.heads = _code_id(rs.heads)
        self.mask = {"trainable": trainable, "filter": _code_id(rs.train_filter) if trainable else None}
        self._net = None

    def net(self):
        if self._net is None:
            self._net = _build_meta(self.cfg, self.rs, self.rspec, self.trainable).to(self.dtype)
        return self._net

    def param_key(self) -> dict:
        return {"what": "params", **self.arch, "heads": self.heads, **self.mask}

    def pass_key(self, grad: str, disc: bool, batch: int, text) -> dict:
        key = {"what": "pass", **self.arch, "dtype": str(self.dtype), "autocast": self.autocast, "text": text,
               "grad": grad, "discriminate": disc, "batch": batch}
        if disc:
            key["heads"] = self.heads
        if grad != "none":
            key.update(self.mask)
        return key


def _build_meta(cfg, role_spec, rspec, trainable: bool):
    """A role's network on the meta device, with its heads and its trainable-side options (LoRA, ...)."""
    from unidad_dist.models.adapters import apply_train_filter, prepare_trainable
    from unidad_dist.models.backbones import build_unet
    from unidad_dist.models.roles import RoleNet

    rc = getattr(cfg, role_spec.name)
    with torch.device("meta"):
        unet = build_unet(rspec)
        heads = role_spec.heads(rspec.unet_config) if role_spec.heads is not None else None
    if trainable:
        unet = prepare_trainable(unet, rc, role_spec.name, cfg.run.seed)
    net = RoleNet(unet, heads)
    if trainable and role_spec.train_filter is not None:
        apply_train_filter(net, role_spec.train_filter, role_spec.name)
    if not trainable:
        net.requires_grad_(False)
    return net


def _param_sizes(nets: _RoleNets, cache: PlanCache) -> list:
    """[[numel, how many trainable tensors, how many frozen], ...] of a role's network."""
    key = nets.param_key()
    hit = cache.get(key)
    if hit is not None:
        return hit
    counts: dict = {}
    for p in nets.net().parameters():
        c = counts.setdefault(p.numel(), [0, 0])
        c[0 if p.requires_grad else 1] += 1
    sizes = [[n, a, b] for n, (a, b) in sorted(counts.items())]
    cache.put(key, sizes)
    return sizes


def _role_nets(cfg, rs, spec, arch: Optional[str], notes: list) -> _RoleNets:
    """A declared role's network: its own backbone when it names one, else the primary's (``spec``)."""
    rc = getattr(cfg, rs.name)
    given = getattr(rc, "backbone", None)
    rspec = _resolve(given, rs.name, arch, cfg.run.name, notes) if given and rs.name != cfg.method.primary else spec
    dtype = torch.bfloat16 if rc.precision in ("bf16", "fp16", "bf16_autocast") else torch.float32
    return _RoleNets(cfg, rs, rspec, rs.trainable, dtype, rc.precision == "bf16_autocast")


def _counts(sizes: list, trainable: bool) -> tuple[int, int]:
    """(all parameters, trainable parameters) from ``_param_sizes``."""
    return sum(n * (a + f) for n, a, f in sizes), (sum(n * a for n, a, f in sizes) if trainable else 0)


def role_parameters(cfg, arch: Optional[str] = None, cache: Optional[PlanCache] = None,
                    notes: Optional[list] = None) -> dict[str, tuple[int, int]]:
    """(all, trainable) parameters of every role the recipe's method declares, as ``make_plan`` sizes them:
    from the model configs on the meta device, kept in the cost cache (no weights are read). ``notes``
    receives how a missing backbone folder was sized (see ``make_plan``'s ``arch``)."""
    cache = cache if cache is not None else PlanCache()
    notes = notes if notes is not None else []
    primary = cfg.method.primary
    spec = _resolve(getattr(cfg, primary).backbone, primary, arch, cfg.run.name, notes)
    return {rs.name: _counts(_param_sizes(_role_nets(cfg, rs, spec, arch, notes), cache), rs.trainable)
            for rs in cfg.method.roles(cfg)}


def make_plan(cfg, world_size: int, gpu_memory: Optional[int] = None, arch: Optional[str] = None,
              cache: Optional[PlanCache] = None) -> Plan:
    """Every role the recipe's method declares, sized from configs: parameters and model states (its ZeRO
    stage, precision, placement), and — from the method's ``passes`` over ``plan_period`` iterations — FLOPs
    per iteration and the activations each role's step holds. ``arch``: a shipped config (configs/<arch>)
    for the backbones whose folder does not exist (default: inferred from the names). When it does not fit
    ``gpu_memory``, ``recommendation`` is the cheapest layout of the ladder that does."""
    from unidad_dist.parallel.engines import bucket_elements
    from unidad_dist.parallel.placement import resolve_groups

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    cache = cache if cache is not None else PlanCache()
    h0, c0 = cache.hits, cache.computed
    method = cfg.method
    groups = resolve_groups(cfg, world_size)
    notes: list[str] = []
    spec = _resolve(getattr(cfg, method.primary).backbone, method.primary, arch, cfg.run.name, notes)
    text = _text_dims(spec)
    b = cfg.train.batch_size
    period = method.plan_period(cfg)
    schedules = [method.passes(cfg, it, text is not None) for it in range(period)]

    roles: dict[str, RolePlan] = {}
    nets: dict[str, _RoleNets] = {}
    for rs in method.roles(cfg):
        role, rc = rs.name, getattr(cfg, rs.name)
        trainable = rs.trainable
        nets[role] = _role_nets(cfg, rs, spec, arch, notes)
        sizes = _param_sizes(nets[role], cache)
        n_all, n_train = _counts(sizes, trainable)
        thr = rc.zero3_persistence_threshold
        ranks = groups[role]
        n = len(ranks)
        stage = rc.zero_stage if (trainable or rc.zero_stage == 3) else None
        if trainable:
            small = sum(n_ * a for n_, a, f in sizes if n_ < thr)
            ms, host = model_state_bytes(n_train, n_all - n_train, small, rc.precision, rc.zero_stage, n,
                                         bucket_elements(n_all), getattr(rc, "offload_optimizer", False),
                                         ema=rs.ema > 0, accum=getattr(rc, "grad_accum", 1))
        else:
            w = _weight_bytes(rc.precision)
            small_frozen = sum(n_ * (a + f) for n_, a, f in sizes if n_ < thr)
            ms = ((n_all - small_frozen) * w / n + small_frozen * w) if stage == 3 else n_all * w
            host = 0.0
        ac = bool(trainable and getattr(rc, "activation_checkpointing", False))
        notes_r = ["activation checkpointing on (held: blocks' inputs + the largest recomputed block)"] if ac else []
        roles[role] = RolePlan(role, ranks, n_all, n_train, rc.precision, stage, ms, host, 0.0, 0.0, ac, notes_r)

    # the passes' costs (PassCosts); FLOPs: every pass (pass_flops, what IterationFlops counts at run time),
    # averaged over the period
    costs = PassCosts(nets, text, b, cache)
    costs.need(schedules)
    checkpointing = {role: r.activation_checkpointing for role, r in roles.items()}
    for passes in schedules:
        for role, f in pass_flops(costs, passes, checkpointing).items():
            roles[role].flops_per_iteration += f / period

    # Activations, per phase (the role whose step holds them) and micro-batch, from the graphs its passes
    # build, in the order the method lists them (the order the step runs them). A graph holds its bytes from
    # its forward until it is back-propagated, and with checkpointing one recomputed block more at a time
    # while it is. The phase's own graphs go back in one backward, last built first, so when graph g
    # recomputes, the graphs built after it are released: max over g of (held by the graphs up to g + g's
    # largest recompute). An input-gradient graph (grad "input") is back-propagated by its
    # torch.autograd.grad while the own graphs are all held. On a rank, only the graphs of the roles it
    # holds; the largest micro-batch of any iteration.
    graphs: dict = {}  # phase -> per micro-batch: [(role running the pass, input-gradient?, held, extra), ...]
    for passes in schedules:
        for micro in passes:
            here: dict = {}
            for p in micro:
                _, held, peak = costs.of(p).held(roles[p.role].activation_checkpointing)
                if p.grad != "none":
                    graph = (p.role, p.grad == "input", held, peak - held)
                    here.setdefault(p.phase or p.role, []).extend([graph] * p.count)
            for ph, gs in here.items():
                graphs.setdefault(ph, []).append(gs)

    def activations(ph: str, on) -> float:
        best = 0
        for gs in graphs.get(ph, []):
            own = [g for g in gs if on(g[0]) and not g[1]]
            inp = [g for g in gs if on(g[0]) and g[1]]
            held = sum(g[2] for g in own)
            peak, upto = held, 0
            for g in own:
                upto += g[2]
                peak = max(peak, upto + g[3])
            if inp:
                peak = max(peak, held + sum(g[2] for g in inp) + max(g[3] for g in inp))
            best = max(best, peak)
        return best

    for ph, micros in graphs.items():
        for runner in sorted({g[0] for gs in micros for g in gs} - {ph}):
            v = activations(ph, lambda r, runner=runner: r == runner)
            roles[runner].notes.append(f"its passes in the {ph} step hold {v / 2 ** 20:.1f} MiB for backward "
                                       "(an input-gradient graph), on its ranks")
    for ph in graphs:
        if ph in roles:
            roles[ph].activation_bytes = activations(
                ph, lambda r, ph=ph: bool(set(roles[r].ranks) & set(roles[ph].ranks)))
    helpers = _helpers_bytes(spec, cache)
    features = FEATURE_PARAMS.get(cfg.method.feature_networks(cfg), 0) * 4.0
    if features:
        helpers += features
        notes.append(f"algorithm.features={cfg.method.feature_networks(cfg)}: CLIP ViT-B/32 + LPIPS-VGG in fp32 on "
                     f"every rank ({features / GIB:.2f} GiB, counted with the helpers); the activations they and the "
                     "VAE decode keep for the student's backward are not in this estimate: leave room")
    per_rank = {}
    for r in range(world_size):
        held = [p for p in roles.values() if r in p.ranks]
        act = [activations(ph, lambda run, r=r: r in roles[run].ranks) for ph in graphs]
        per_rank[r] = sum(p.model_state_bytes for p in held) + max(act, default=0) + helpers
    if cfg.checkpoint.async_:
        staged = max(sum(p.model_state_bytes + p.host_bytes for p in roles.values() if r in p.ranks
                         and p.trainable) for r in range(world_size))
        notes.append(f"checkpoint.async: each rank also holds a host-memory copy of the state it checkpoints, about "
                     f"{staged / GIB:.2f} GiB (its trainable roles' model states; pinned memory on CUDA is allocated "
                     "in larger blocks), for the whole run")
    plan = Plan(world_size, cfg.placement.mode, roles, helpers, per_rank, gpu_memory, notes=notes)
    if plan.fits is False:
        plan.recommendation = recommend(cfg, world_size, gpu_memory, arch=arch, cache=cache)
    plan.passes_computed, plan.passes_cached = cache.computed - c0, cache.hits - h0
    return plan


# ------------------------------------------------------------------------------------------------
# FLOPs of an iteration (make_plan, and the run's perf/ metrics)
# ------------------------------------------------------------------------------------------------
class PassCosts:
    """The cost of each kind of network pass (role, gradient kind, encoder-only, batch) a method's passes make,
    from the roles' networks (``nets``: role -> _RoleNets) through the cost cache. Passes with gradient are
    measured first: a pass without is the forward of one of them on the same network, batch-scaled (FLOPs are
    linear in the batch), so it costs no meta pass of its own when there is one."""

    def __init__(self, nets: dict, text: Optional[dict], batch: int, cache: PlanCache):
        self.nets, self.text, self.batch, self.cache = nets, text, batch, cache
        self.costs: dict = {}

    def _key(self, p) -> tuple:
        return p.role, p.grad, p.discriminate, self.batch * p.batch

    def _direct(self, role, grad, disc, batch) -> PassCost:
        net = self.nets[role]
        key = net.pass_key(grad, disc, batch, self.text)
        hit = self.cache.get(key)
        if hit is not None:
            return PassCost(**hit)
        c = pass_cost(net.net(), net.rspec, batch, self.text, grad, disc, net.dtype, net.autocast)
        self.cache.put(key, dataclasses.asdict(c))
        return c

    def need(self, schedules) -> None:
        """Cost every kind of pass in ``schedules`` (iterations, each a list of micro-batches of ``Pass``)."""
        wanted = sorted({self._key(p) for s in schedules for micro in s for p in micro} - set(self.costs),
                        key=lambda k: (k[1] == "none", k))
        nets, text = self.nets, self.text
        for role, grad, disc, batch in wanted:
            if grad != "none":
                self.costs[(role, grad, disc, batch)] = self._direct(role, grad, disc, batch)
                continue
            same = nets[role].pass_key("none", disc, 0, text)
            donors = [(c, k[3]) for k, c in self.costs.items()
                      if k[1] != "none" and k[2] == disc and nets[k[0]].pass_key("none", disc, 0, text) == same]
            self.costs[(role, grad, disc, batch)] = (donors[0][0].scaled(batch / donors[0][1]) if donors
                                                     else self._direct(role, grad, disc, batch))

    def has(self, passes) -> bool:
        """Every kind of pass in ``passes`` (one iteration's micro-batches) is costed already."""
        return all(self._key(p) in self.costs for micro in passes for p in micro)

    def of(self, p) -> PassCost:
        return self.costs[self._key(p)]


def pass_flops(costs: PassCosts, passes: list, checkpointing: dict) -> dict[str, float]:
    """FLOPs of one iteration's passes (a list of micro-batches of ``Pass``), per role, on each rank holding the
    role: count x (forward + backward), the backward with the recomputed forwards of a role with activation
    checkpointing (``checkpointing``: role -> bool)."""
    out: dict[str, float] = {}
    for micro in passes:
        for p in micro:
            c = costs.of(p)
            bwd = c.held(checkpointing[p.role])[0]
            out[p.role] = out.get(p.role, 0.0) + p.count * (c.fwd + bwd)
    return out


class IterationFlops:
    """The FLOPs of a recipe's iterations exactly as ``make_plan`` counts them (the same ``PassCosts`` and
    ``pass_flops`` over the method's ``passes``), for any iteration: per role, per rank, for the whole job.
    Built from configs on the meta device through the cost cache; it changes no random state of the process."""

    def __init__(self, cfg, world_size: int, arch: Optional[str] = None, cache: Optional[PlanCache] = None):
        from unidad_dist.parallel.placement import resolve_groups

        self.cfg, self.method = cfg, cfg.method
        self.groups = resolve_groups(cfg, world_size)
        self.notes: list[str] = []
        primary = self.method.primary
        spec = _resolve(getattr(cfg, primary).backbone, primary, arch, cfg.run.name, self.notes)
        self.text = _text_dims(spec)
        roles = self.method.roles(cfg)
        nets = {rs.name: _role_nets(cfg, rs, spec, arch, self.notes) for rs in roles}
        self.checkpointing = {rs.name: bool(rs.trainable and getattr(getattr(cfg, rs.name), "activation_checkpointing",
                                                                        False)) for rs in roles}
        self.precision = {rs.name: getattr(cfg, rs.name).precision for rs in roles}
        self.costs = PassCosts(nets, self.text, cfg.train.batch_size,
                               cache if cache is not None else PlanCache())
        self.period = self.method.plan_period(cfg)
        with _rng_kept():
            self.costs.need([self._passes(it) for it in range(self.period)])

    def _passes(self, iteration: int) -> list:
        return self.method.passes(self.cfg, iteration, self.text is not None)

    def roles(self, iteration: int) -> dict[str, float]:
        """FLOPs of ``iteration`` per role, on each rank holding the role."""
        passes = self._passes(iteration)
        if not self.costs.has(passes):
            with _rng_kept():
                self.costs.need([passes])
        return pass_flops(self.costs, passes, self.checkpointing)

    def ranks(self, iteration: int) -> dict[int, dict[str, float]]:
        """FLOPs of ``iteration`` per rank, by role (the roles the rank holds)."""
        per_role = self.roles(iteration)
        out: dict[int, dict[str, float]] = {}
        for role, f in per_role.items():
            for r in self.groups[role]:
                out.setdefault(r, {})[role] = f
        return out

    def total(self, iteration: int) -> float:
        """FLOPs of ``iteration`` over every rank of the job."""
        return sum(f * len(self.groups[role]) for role, f in self.roles(iteration).items())


@contextlib.contextmanager
def _rng_kept():
    """Nothing random should be drawn building meta networks; this makes sure the process's generators (torch's
    CPU and CUDA ones, Python's, NumPy's) are as they were afterwards, whatever a library's constructor does."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# ------------------------------------------------------------------------------------------------
# The ladder of cheaper layouts
# ------------------------------------------------------------------------------------------------
LADDER = [  # cheapest first (module docstring): each rung raises the recipe's settings to at least these
    ("ZeRO-1", dict(stage=1)),
    ("ZeRO-2", dict(stage=2)),
    ("ZeRO-2 + activation checkpointing", dict(stage=2, ac=True)),
    ("ZeRO-2 + activation checkpointing, frozen teachers partitioned (ZeRO-3)", dict(stage=2, ac=True, frozen=3)),
    ("ZeRO-2 + activation checkpointing + optimizer offload, frozen teachers partitioned",
     dict(stage=2, ac=True, frozen=3, offload=True)),
    ("ZeRO-3 + activation checkpointing", dict(stage=3, ac=True, frozen=3)),
    ("ZeRO-3 + activation checkpointing + optimizer offload", dict(stage=3, ac=True, frozen=3, offload=True)),
    ("split placement, ZeRO-2 + activation checkpointing + optimizer offload",
     dict(stage=2, ac=True, offload=True, split=True)),
]


def _fmt(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def rung_config(cfg, stage: int = 0, ac: bool = False, offload: bool = False, frozen: int = 0,
                split: bool = False):
    """(config, overrides) of a rung applied to ``cfg``: every trainable role at least at ``stage`` (exactly 2
    in split placement, which has no ZeRO-3), with checkpointing / offload switched on where asked, the frozen
    roles at least at ``frozen``."""
    from dataclasses import replace

    changes, overrides = {}, []
    for rs in cfg.method.roles(cfg):
        rc = getattr(cfg, rs.name)
        if rs.trainable:
            new = dict(zero_stage=min(max(rc.zero_stage, stage), 2) if split else max(rc.zero_stage, stage),
                       activation_checkpointing=rc.activation_checkpointing or ac,
                       offload_optimizer=rc.offload_optimizer or offload)
        else:
            new = dict(zero_stage=0 if split else max(rc.zero_stage, frozen))
        for k, v in new.items():
            if getattr(rc, k) != v:
                overrides.append(f"{rs.name}.{k}={_fmt(v)}")
        changes[rs.name] = replace(rc, **new)
    if split and cfg.placement.mode != "split":
        changes["placement"] = replace(cfg.placement, mode="split")
        overrides.append("placement.mode=split")
    return replace(cfg, **changes), overrides


def recommend(cfg, world_size: int, gpu_memory: int, arch: Optional[str] = None,
              cache: Optional[PlanCache] = None) -> Recommendation:
    """The first rung of ``LADDER`` that fits ``gpu_memory`` (90 % usable) and that the recipe's method accepts,
    with every rung tried before it."""
    usable = 0.9 * gpu_memory
    tried: list[Rung] = []
    seen: set = set()
    for name, kw in LADDER:
        c, overrides = rung_config(cfg, **kw)
        if not overrides or tuple(overrides) in seen:
            continue  # the recipe already has this layout, or an earlier rung gave the same
        seen.add(tuple(overrides))
        if kw.get("split") and world_size < 2:
            tried.append(Rung(name, overrides, None, False, "needs at least 2 ranks"))
            continue
        try:
            c.method.validate(c)  # a layout the recipe's method refuses (e.g. one it needs colocated) is no advice
        except UserError as e:
            tried.append(Rung(name, overrides, None, False, f"the recipe refuses it: {e}"))
            continue
        try:
            p = make_plan(c, world_size, None, arch=arch, cache=cache)
        except UserError as e:
            tried.append(Rung(name, overrides, None, False, str(e)))
            continue
        fits = p.largest_rank_bytes <= usable
        tried.append(Rung(name, overrides, p.largest_rank_bytes, fits))
        if fits:
            return Recommendation(name, overrides, p.largest_rank_bytes, tried)
    lora = ", ".join(f"{rs.name}.lora.rank" for rs in cfg.method.roles(cfg) if rs.trainable)
    return Recommendation(f"nothing fits {gpu_memory / GIB:.0f} GiB per rank at {world_size} ranks; add ranks "
                          f"or train LoRA adapters ({lora})", [], None, tried)


def format_plan(plan: Plan) -> str:
    lines = [f"plan: {plan.world_size} ranks, placement {plan.placement}"]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"{'role':15} {'ranks':>9} {'params':>9} {'train':>9} {'prec':>13} {'ZeRO':>5} "
                 f"{'states/rank':>12} {'host/rank':>10} {'activ.':>10} {'TFLOP/it':>9}")
    for r in plan.roles.values():
        ranks = f"{min(r.ranks)}-{max(r.ranks)}" if len(r.ranks) > 1 else str(r.ranks[0])
        stage = "-" if r.zero_stage is None else str(r.zero_stage)
        lines.append(f"{r.name:15} {ranks:>9} {r.params / 1e6:8.1f}M {r.trainable / 1e6:8.1f}M {r.precision:>13} "
                     f"{stage:>5} {r.model_state_bytes / GIB:10.2f}Gi {r.host_bytes / GIB:8.2f}Gi "
                     f"{r.activation_bytes / GIB:8.2f}Gi {r.flops_per_iteration / 1e12:9.3f}")
        for n in r.notes:
            lines.append(f"{'':15}   {n}")
    lines.append(f"text encoders + VAE (replicated, fp32): {plan.frozen_helpers_bytes / GIB:.2f} GiB per rank")
    worst = max(plan.per_rank_bytes, key=plan.per_rank_bytes.get)
    lines.append(f"largest rank: {worst} with {plan.per_rank_bytes[worst] / GIB:.2f} GiB "
                 "(model states + the largest step's activations + helpers)")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.gpu_memory / GIB:.0f} GiB per rank ({0.9 * plan.gpu_memory / GIB:.1f} GiB "
                     "usable, 90 %)")
        rec = plan.recommendation
        if rec is not None:
            if rec.tried:
                lines.append("cheaper layouts tried, in order of cost (largest rank):")
                width = max(len(t.name) for t in rec.tried)
                for t in rec.tried:
                    got = f"{t.largest_rank_bytes / GIB:8.2f} GiB  {'fits' if t.fits else 'no'}" \
                        if t.largest_rank_bytes is not None else f"{'-':>8}      ({t.note})"
                    lines.append(f"  {t.name:{width}} {got}")
            if rec.overrides:
                lines.append(f"recommended: {rec.text} -> largest rank {rec.largest_rank_bytes / GIB:.2f} GiB; "
                             "add to the command line:")
                lines.append("  " + " ".join(rec.overrides))
            else:
                lines.append(f"recommended: {rec.text}")
    if plan.passes_computed or plan.passes_cached:
        lines.append(f"({plan.passes_computed} network costs computed on the meta device, {plan.passes_cached} "
                     "from the cache)")
    return "\n".join(lines)
