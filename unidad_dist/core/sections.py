"""The recipe's typed sections that do not belong to one method, and the one base of every role's section.

A recipe is these generic sections (``run``, ``train``, ``data``, ``placement``, ``checkpoint``,
``logging``, ``eval``) plus the sections its method declares (one per role, its ``algorithm`` section and
any options of its own; ``config.py`` assembles them). A method may extend a generic section by
subclassing it (Uni-DAD adds ``train.fake_updates_per_student``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from unidad_dist.core.schema import path_field

PRECISIONS = ("fp32", "bf16_autocast", "bf16", "fp16")  # fp16: CUDA only (DeepSpeed loss scaling)
LR_SCHEDULES = ("constant", "linear", "cosine")  # optimizer.schedule: after the warmup


@dataclass
class RunConfig:
    name: str = "unidad"  # the run's name: its folder is runs/<name> unless run.dir is set
    dir: Optional[str] = None  # the run folder (relative: to the working directory); default runs/<name>
    seed: int = 0  # every random draw of the run derives from it (with the iteration, sample index, role)
    dist_timeout: float = 600.0  # seconds any collective may wait
    lock_stale_s: float = 900.0  # a run.lock from another host without heartbeat this long is taken over
    discard_damaged: bool = False  # a folder whose checkpoints all fail verification: move it aside, start over
    signal_grace_s: float = 300.0  # launch local: after forwarding a stop signal, kill ranks still running then
    # CUDA: deterministic cuDNN/cuBLAS kernels, so a rerun or a resume is bit-identical on GPUs too (slower;
    # an op without a deterministic kernel is an error naming it). CPU kernels are deterministic already.
    deterministic: bool = False

    def folder(self) -> Path:
        """The run folder: ``dir``, else runs/<name> (relative: to the working directory)."""
        return Path(self.dir) if self.dir else Path("runs") / self.name


@dataclass
class TrainConfig:
    iterations: int = 1000  # training iterations (may be raised on resume, unless an optimizer.schedule decays to it)
    batch_size: int = 1  # per rank and micro-batch (with global_batch_size: the largest micro-batch per rank)
    # samples per optimizer step over all ranks (split placement: over each side's), kept whatever the world
    # size: the per-rank micro-batch and every trainable role's gradient accumulation are derived from it (null:
    # train.batch_size x grad_accum x ranks)
    global_batch_size: Optional[int] = None
    nonfinite: str = "skip"  # a NaN/inf loss on any rank: "skip" that role's step on all ranks, or "stop" all
    max_nonfinite_skips: int = 10  # stop when one role's step is skipped this many iterations in a row


@dataclass
class OptimizerConfig:
    lr: float = 2e-6  # AdamW learning rate (after the warmup: constant, or decayed as `schedule` says)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    eps: float = 1e-8  # AdamW epsilon
    warmup: int = 500  # linear warmup, counted in iterations (all roles follow the iteration counter)
    # after the warmup: "constant" (the paper), or "linear" / "cosine" decay to lr x final_lr_ratio at
    # train.iterations (as diffusers' training scripts' --lr_scheduler)
    schedule: str = "constant"
    final_lr_ratio: float = 0.0  # linear / cosine: the learning rate at train.iterations, as a fraction of lr
    clip_grad_norm: float = 10.0  # <= 0 disables clipping


@dataclass
class LoraConfig:
    rank: int = 0  # 0: train every weight; > 0: train a peft LoRA adapter of this rank on the UNet
    alpha: Optional[float] = None  # None: = rank
    dropout: float = 0.0  # LoRA dropout
    # the UNet layers that get a LoRA adapter
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class RoleConfig:
    """What every role has: its network and how it is held."""
    backbone: Optional[str] = path_field()  # diffusers pipeline/model folder or builtin:<name>; None: the method's default
    init: Optional[str] = path_field()  # weights (folder, .safetensors, .bin); None: the backbone's, or a copy (method)
    strict: bool = True  # init: missing or unexpected weight names are an error (false: load what matches)
    precision: str = "bf16_autocast"  # fp32 | bf16_autocast (fp32 weights) | bf16 | fp16 (DeepSpeed, CUDA only)
    zero_stage: int = 0  # trainable: DeepSpeed ZeRO stage 0-3; frozen: 0 replicated, 3 partitioned
    zero3_persistence_threshold: int = 100000  # ZeRO-3: parameters smaller than this stay whole


@dataclass
class TrainableRoleConfig(RoleConfig):
    """A role that can train: its optimizer and engine options."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_accum: int = 1  # micro-batches per optimizer step of this role
    offload_optimizer: bool = False  # ZeRO optimizer states (and the fp32 master) in CPU memory
    activation_checkpointing: bool = False  # recompute the UNet blocks' activations in backward
    deepspeed_config: Optional[str] = path_field()  # JSON file whose fields override the generated config
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AlgorithmConfig:
    """A method's own section: ``name`` selects the method (a registered name, or ``module:Class``)."""
    name: str = "unidad"  # the method: a registered name (unidad) or module:Class


@dataclass
class TargetDataConfig:
    path: Optional[str] = path_field()  # folder of target images, a make-shards folder (manifest.json), or builtin:<name>
    shards: Optional[str] = path_field()  # where the manifest's shards are read from: brace pattern / pipe: URLs
    resolution: Optional[int] = None  # default: the backbone's sample size (x VAE factor)
    prompt: str = "a {rare} {cls}"  # caption of a target image without its own caption file (text models)
    rare_token: str = "sks"  # what {rare} becomes (the new concept's identifier)
    class_name: str = ""  # what {cls} becomes (the class noun)
    hflip: bool = True  # random horizontal flips of the target images
    # random translation of the target images (DiffAugment's few-shot remedy, beyond the paper): each shifted by
    # whole pixels (latent cells for a latent model) up to this fraction of its side, reflected at the border;
    # 0: off. What every method trains on as real (Uni-DAD: the discriminator and the target teacher); the
    # auto-a probe, evaluation and grids read the shots unshifted.
    translate: float = 0.0


@dataclass
class SourceDataConfig:
    prompts: list[str] = field(default_factory=lambda: ["a {rare} {cls}"])  # source prompts (text models)
    prompt_file: Optional[str] = path_field()  # a text file, one source prompt per line; replaces prompts
    path: Optional[str] = path_field()  # a make-shards prompt folder (manifest.json); replaces prompts / prompt_file
    shards: Optional[str] = path_field()  # where the manifest's shards are read from: brace pattern / pipe: URLs


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
    """``mode``; config.py adds one optional rank list per role of the method (split placement only)."""
    mode: str = "colocated"  # colocated: every rank holds every role | split: two rank groups (README)


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only the initial and the final checkpoint
    keep: int = 2  # complete checkpoints kept (older ones are pruned)
    on_signal: bool = True  # a SIGTERM/SIGINT/SIGHUP stop writes a checkpoint at the iteration boundary
    # training goes on while a checkpoint is written: the state is copied to host
    # memory (pinned on CUDA) at the boundary, a background thread writes and publishes it; the next save, the
    # end of the run and a stop wait for it. Holds one host copy of each rank's checkpointed state
    async_: bool = False


@dataclass
class LoggingConfig:
    every: int = 10  # metrics.jsonl line every N iterations (and the last)
    progress: bool = True  # a progress bar on rank 0 (false: none, e.g. in CI logs)
    sample_every: int = 0  # write a sample grid every N iterations (0: only before/after)
    grid_size: int = 16  # images per sample grid
    wandb: bool = False  # also log to wandb (rank 0); only this key turns it on, WANDB_* variables configure it
    # a new run's wandb project (null: $WANDB_PROJECT, else unidad_dist); a resumed run keeps its own
    wandb_project: Optional[str] = None


@dataclass
class EvalWeightsConfig:
    """The paper metrics' networks (eval/networks.py): files and folders the user supplies, checked before use;
    unset: the environment variable, else the metric is reported unavailable with the file it needs."""
    inception: Optional[str] = path_field()  # FID Inception: pt_inception-2015-12-05-6726825d.pth (else $UNIDAD_FID_INCEPTION)
    vgg16: Optional[str] = path_field()  # LPIPS trunk: torchvision's vgg16-397923af.pth (else $UNIDAD_LPIPS_VGG16)
    # LPIPS v0.1 heads: the lpips package's weights/v0.1/vgg.pth (else $UNIDAD_LPIPS_HEADS, else an installed lpips)
    lpips_heads: Optional[str] = path_field()
    clip: Optional[str] = path_field()  # CLIP ViT-B/32 transformers folder, CLIP-I/T (else $UNIDAD_CLIP)
    dino: Optional[str] = path_field()  # DINO ViT-S/16 transformers folder, DINO-I (else $UNIDAD_DINO)


@dataclass
class EvalConfig:
    num_samples: int = 64  # samples of the before/after evaluation (proxies, grids)
    steps: Optional[int] = None  # None: the method's own (Uni-DAD: student.steps)
    weights: EvalWeightsConfig = field(default_factory=EvalWeightsConfig)
    # FID reference: .npz of `unidad-dist fid-stats` over the full target data set (not the few shots)
    fid_stats: Optional[str] = path_field()
    reference: Optional[str] = path_field()  # folder of reference photos for CLIP-I / DINO-I (None: the target shots)
    lpips_per_cluster: int = 100  # Intra-LPIPS: samples kept per few-shot cluster (the paper's 100)
    # text models: a prompt file (one a line, {rare}/{cls} filled in; sample i takes prompt i mod count, so
    # num_samples = 4 x 27 gives the paper's 27 prompts x 4 seeds); None: the run's own sampling prompts
    prompts: Optional[str] = path_field()
    batch: int = 16  # samples each rank draws at a time (evaluate and sample run on every rank they are started on)
    # every N iterations during training: the sampler's ranks draw num_samples, rank 0 measures (proxies and the
    # paper's metrics) into metrics.jsonl as eval/<key>, wandb and eval/during_<N>.json (N iterations done); 0: off
    every: int = 0
    # the metric `evaluate` picks the best checkpoint on (eval/best.json, `export --best`, kept from pruning):
    # proxy_distance | fid (lower is better) | intra_lpips | clip_i | clip_t | dino_i (higher); null: none
    select: Optional[str] = None


GENERIC_SECTIONS = {"run": RunConfig, "train": TrainConfig, "data": DataConfig, "placement": PlacementConfig,
                    "checkpoint": CheckpointConfig, "logging": LoggingConfig, "eval": EvalConfig}
