"""Atomic full-state checkpoints of the trainable roles, and resume.

Layout of ``<run>/checkpoints/``::

    iter_0000100/            one complete checkpoint
      <role>/state/…         the role's DeepSpeed engine: weights, optimizer, fp32 partitions, counters
                             (written by every rank under an explicit tag; loaded with weights_only=True)
      <role>/universal/…     added by a resume at another world size: the state converted by DeepSpeed's
                             ds_to_universal (not in the manifest; reused by later resizes)
      <role>.safetensors     ZeRO-3: the role's whole (gathered) weights; the EMA when enabled (below ZeRO-3
                             the whole weights are those in the engine's model-states file: role_weights)
      rng_rank<r>.pt         per-rank RNG states
      data_rank<r>.json      per-rank positions of the split data streams (data/stream.py)
      method_rank<r>.json    per-rank state of the method (Method.state_dict: e.g. non-finite skip counters)
      state.json             iteration, method, world size, global sample counts of the streams
      manifest.json          the XXH3-128 checksum of every file above (written last inside the folder)
    latest                   name of the newest complete checkpoint (written after the rename)

A checkpoint is written into ``.tmp-iter_…`` and renamed into place, so a killed writer never leaves a
folder that looks complete; a checkpoint whose manifest does not match is skipped with a warning and the
previous complete one is used. DeepSpeed's own file I/O is in ``parallel/ds_io.py``. Frozen roles are not copied: ``state.json`` records their weight files by
path + sha256, they are reloaded from the recipe's paths, and a resume whose frozen weights differ stops.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from unidad_dist import device as dev
from unidad_dist.core.io import (CHECKSUM, checksum_file, fsync as _fsync, fsync_dir as _fsync_dir, fsync_written,
                                 sha256_file, take_digests, torch_save_hashed)
from unidad_dist.device import CPU
from unidad_dist.errors import UserError
from unidad_dist.models.backbones import resolve_backbone, weights_file
from unidad_dist.core.staging import Stager
from unidad_dist.parallel.ds_io import engine_module_weights, needs_universal, routed_saves, to_universal
from unidad_dist.train.faults import kill_point

__all__ = ["CHECKSUM", "checksum_file", "sha256_file", "save", "stage", "AsyncWriter", "load", "latest_complete", "is_complete",
           "role_weights", "load_role_weights", "frozen_record", "check_frozen", "saved_state"]


def _barrier(rt, group=None) -> None:
    if rt.distributed:
        torch.distributed.barrier(group=group)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": dev.accelerator_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    dev.set_accelerator_rng_state(state.get("accelerator"))


def frozen_files(cfg) -> dict[str, Path]:
    """The weight files recorded by path + sha256 (never copied into checkpoints): the primary network's (every
    role's default copy) and those of the frozen roles that ask for it."""
    method = cfg.method
    primary = getattr(cfg, method.primary)

    def file_of(given: Optional[str], backbone: Optional[str], role: str) -> Optional[Path]:
        if given:
            p = Path(given).expanduser()
            return weights_file(p) if p.is_dir() else p
        spec = resolve_backbone(backbone, role)
        return weights_file(spec.unet_dir)

    out = {}
    f = file_of(primary.init, primary.backbone, method.primary)
    if f is not None:
        out[method.primary] = f
    for spec in method.roles(cfg):
        if spec.trainable or not spec.record_frozen or spec.name == method.primary:
            continue
        rc = getattr(cfg, spec.name)
        f = file_of(rc.init, rc.backbone or primary.backbone, spec.name)
        if f is not None:
            out[spec.name] = f
    return out


def frozen_record(cfg) -> dict:
    return {role: {"path": str(f.resolve()), "sha256": sha256_file(f)} for role, f in frozen_files(cfg).items()}


def check_frozen(saved: dict, current: dict) -> None:
    """A resumed run must see the same frozen weights it started with."""
    for role, rec in saved.items():
        now = current.get(role)
        if now is None or now["sha256"] != rec["sha256"]:
            raise UserError(
                f"{role} weights changed since this run started ({rec['path']} sha256 {rec['sha256'][:12]}…, now "
                f"{(now or {}).get('path')} {((now or {}).get('sha256') or 'missing')[:12]}…); restore them, or "
                "train in a new run.dir"
            )


def ckpt_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(ckpt: Path) -> int:
    """The iteration of a checkpoint folder (iter_0000100 -> 100)."""
    return int(Path(ckpt).name[len("iter_"):])


class _Files:
    """This rank's files of one checkpoint: written at once, or — given a ``Stager`` (``checkpoint.async``) —
    copied into host memory now and written by ``write()`` later, from the background writer."""

    def __init__(self, stager: Optional[Stager] = None):
        self.stager = stager
        self.pending: list = []
        self.written: list[Path] = []  # written other than through HashingWriter (fsync'd by ``publish``)

    def _later_or_now(self, fn, obj, *args) -> None:
        if self.stager is not None:
            self.pending.append((fn, self.stager.copy(obj), args))
        else:
            fn(obj, *args)

    def torch(self, obj, path, **kw) -> None:
        self._later_or_now(lambda o, p, k: torch_save_hashed(o, p, **k), obj, path, kw)

    def safetensors(self, sd: dict, path: Path) -> None:
        from safetensors.torch import save_file

        def write(tensors, p):
            save_file(tensors, str(p))
            self.written.append(p)

        self._later_or_now(write, sd, path)

    def text(self, path: Path, text: str) -> None:
        def write(t, p):
            p.write_text(t)
            self.written.append(p)

        self._later_or_now(write, text, path)

    def write(self) -> None:
        for fn, obj, args in self.pending:
            fn(obj, *args)
        self.pending = []


def save(run_dir: Path, models, iteration: int, rt, method, keep: int, frozen: Optional[dict] = None) -> Path:
    """All ranks: every trainable role this rank holds, the method's state, this rank's RNG and data-stream
    positions; rank 0 publishes the checkpoint (manifest, rename, ``latest``) and prunes to ``keep``."""
    return stage(run_dir, models, iteration, rt, method, keep, frozen)()


def stage(run_dir: Path, models, iteration: int, rt, method, keep: int, frozen: Optional[dict] = None,
          stager: Optional[Stager] = None, group=None, gate: Optional["PublishGate"] = None):
    """The collective part of a save (all ranks, at the iteration boundary): the engines' states, the gathered
    whole weights, RNG, data and method state — written into the checkpoint's temporary folder, or with
    ``stager`` copied into host memory. Returns ``publish``: writes what was staged, then (every rank, through
    process group ``group``: a separate one when it runs in a background thread) the manifest, the rename
    and the prune; returns the published folder. A cancelled ``gate`` (a run interrupted at once) publishes
    nothing."""
    exchange = models.exchange
    placement = models.placement
    data_state, samples_seen = models.data.state(), models.data.samples_seen()
    root = Path(run_dir) / "checkpoints"
    final = root / ckpt_name(iteration)
    tmp = root / f".tmp-{ckpt_name(iteration)}"
    if rt.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(rt)
    files = _Files(stager)
    for name, role in models.trainable_roles().items():  # the roles this rank holds
        with exchange.side_barriers(), (routed_saves(files.torch) if stager is not None
                                        else contextlib.nullcontext()):
            role.save_state(tmp / name)  # every rank of the role's group writes (or stages) its partitions
        # Below ZeRO-3 the engine's model-states file already holds the whole weights (role_weights reads
        # them there); ZeRO-3 partitions them, so they are gathered (a collective) and written here.
        sd = role.full_weights(copy=False) if getattr(role, "stage", 0) == 3 else {}
        extra = role.extra_weights()
        if (sd or extra) and placement.leader(name):
            sd = {f"module.{k}": v.contiguous() for k, v in sd.items()}
            sd.update({k: v.detach().to(CPU).contiguous() for k, v in extra.items()})
            files.safetensors(sd, tmp / f"{name}.safetensors")
    if rt.is_main:
        files.text(tmp / "state.json", json.dumps(
            {"iteration": iteration, "method": method.name, "world_size": rt.world_size,
             "samples_seen": samples_seen or {}, "frozen": frozen or {}}, indent=2))
    _barrier(rt)
    # Each rank's RNG (python random / numpy state hold no tensors that weights_only rejects).
    st = rng_state()
    st["python"] = [st["python"][0], list(st["python"][1]), st["python"][2]]
    st["numpy"] = [st["numpy"][0], torch.from_numpy(np.asarray(st["numpy"][1]).astype(np.int64)),
                   int(st["numpy"][2]), int(st["numpy"][3]), float(st["numpy"][4])]
    files.torch(st, tmp / f"rng_rank{rt.rank}.pt")
    files.text(tmp / f"data_rank{rt.rank}.json", json.dumps(data_state or {}))
    files.text(tmp / f"method_rank{rt.rank}.json", json.dumps(method.state_dict(), sort_keys=True))

    return functools.partial(_write_and_publish, files, tmp, final, iteration, rt, keep, group, gate)


def _write_and_publish(files: "_Files", tmp: Path, final: Path, iteration: int, rt, keep: int, group,
                       gate: Optional["PublishGate"]) -> Path:
    """Every rank: write (and fsync) what it staged, then gather every rank's digests (or error, or cancel) on
    ``group``; rank 0 publishes or finds why not and tells every rank the same outcome, so an error after the
    gather (a full disk at the manifest) or a cancel is raised everywhere, never left to a rank waiting alone."""
    error = None
    try:
        files.write()
        fsync_written(tmp, extra=tuple(files.written))
    except Exception as e:  # noqa: BLE001 - told to every rank (none waits forever), raised below
        error = e
    kill_point(rt.rank, f"ckpt:{iteration}")  # tests: a rank dies while the checkpoint is being written
    # the digests computed while writing, from every rank (files on a shared filesystem are not re-read)
    mine = take_digests(tmp) if error is None else {_ERROR: _describe(error, rt.rank)}
    if gate is not None and gate.cancelled:
        mine[_CANCELLED] = True
    parts = [None] * rt.world_size
    if rt.distributed:
        torch.distributed.all_gather_object(parts, mine, group=group)
    else:
        parts = [mine]
    outcome = _publish_on_main(tmp, final, parts, keep, gate, rt.rank) if rt.is_main else None
    if rt.distributed:
        box = [outcome]
        torch.distributed.broadcast_object_list(box, src=0, group=group)
        outcome = box[0]
    if error is not None:
        raise error
    if outcome is not None:
        raise OSError(outcome[0] or 0, f"checkpoint {final.name} was not published: {outcome[1]}")
    return final


def _publish_on_main(tmp: Path, final: Path, parts: list, keep: int, gate: Optional["PublishGate"],
                     rank: int) -> Optional[list]:
    """Rank 0, after the gather: publish, or [errno, why not] (a rank's write error, a cancel, a failed publish)."""
    failed = [p[_ERROR] for p in parts if p and _ERROR in p]
    if failed:
        return failed[0]
    if any(p and p.get(_CANCELLED) for p in parts):
        return [None, "abandoned: the run was interrupted"]
    try:
        with gate.publishing() if gate is not None else contextlib.nullcontext(True) as go:
            if not go:
                return [None, "abandoned: the run was interrupted"]
            _publish(tmp, final, final.parent, parts, keep)
    except Exception as e:  # noqa: BLE001 - told to every rank by the caller
        return _describe(e, rank)
    return None


def _describe(e: BaseException, rank: int) -> list:
    return [getattr(e, "errno", None), f"rank {rank}: {type(e).__name__}: {e}"]


class PublishGate:
    """Lets an interrupted run stop a background checkpoint from being published: ``cancel()`` waits for a
    publish in progress (a rename, ``latest``, a prune: short) and forbids the next, so nothing is published
    after the run lets go of its folder."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    @contextlib.contextmanager
    def publishing(self):
        with self._lock:
            yield not self._cancelled


_CANCELLED = "__cancelled__"
_ERROR = "__error__"


BEST = Path("eval") / "best.json"  # in the run folder: the checkpoint `evaluate` picked on eval.select


def best_checkpoint_name(rdir: Path) -> Optional[str]:
    """The checkpoint folder name recorded in <run>/eval/best.json (None: none, or unreadable)."""
    try:
        return json.loads((Path(rdir) / BEST).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def _publish(tmp: Path, final: Path, root: Path, parts: list, keep: int) -> None:
    """Rank 0: the manifest (every rank's digests), the rename into place, ``latest``, the prune to ``keep``."""
    known = {k: v for part in parts for k, v in (part or {}).items()}
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    manifest = {"checksum": CHECKSUM,
                "files": {name: known.get(name) or checksum_file(tmp / name) for name in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    _fsync(tmp / "manifest.json")
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True) + [tmp]:
        _fsync_dir(d)  # the folders' entries too, before the rename publishes them
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    best = best_checkpoint_name(root.parent)  # `evaluate`'s pick (eval.select) is kept beside the newest
    for old in [p for p in complete[:-keep] if p.name != best]:  # renamed first: an interrupted prune never
        trash = root / f".trash-{old.name}"  # leaves a half-deleted iter_*
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
    for trash in root.glob(".trash-iter_*"):  # this prune's, and any an interrupted one left
        shutil.rmtree(trash, ignore_errors=True)


class AsyncWriter:
    """``checkpoint.async``: one checkpoint at a time is written and published by a background thread while
    training goes on. Its collectives (the digests' gather, the last barrier) run on a gloo group of their own,
    made at the first save (the training's own group is busy with the next iterations; gloo also on NCCL
    runs: what it carries is a few small objects). ``wait()`` (every rank, at the same iteration) returns the
    published (folder, iteration) or raises what the write raised."""

    def __init__(self, rt):
        self.rt = rt
        self.stager = Stager()
        self._group = None
        self._thread: Optional[threading.Thread] = None
        self._outcome: tuple = ()
        self.iteration: Optional[int] = None  # of the checkpoint being written
        self.gate = PublishGate()  # cancelled: the checkpoint being written is not published (abandon)
        self.write_s = 0.0  # wall seconds of the latest background write

    def group(self):
        if self.rt.distributed and self._group is None:
            self._group = dev.host_group(self.rt.dist_timeout)
        return self._group

    def start(self, publish, iteration: int) -> None:
        assert self._thread is None, "the previous checkpoint was not waited for"
        self.iteration = iteration

        def run():
            t0 = time.perf_counter()
            try:
                self._outcome = (publish(), iteration, None)
            except BaseException as e:  # noqa: BLE001 - raised by wait() in the training thread
                self._outcome = (None, iteration, e)
            finally:
                self.stager.release()
                self.write_s = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name=f"checkpoint-writer-{iteration}", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """The run is interrupted at once: what is being written stays unpublished (the last one stands); a
        publish already under way is finished first, none starts after this returns."""
        self.gate.cancel()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def wait(self) -> Optional[tuple[Path, int]]:
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, self.iteration = None, None
        path, iteration, error = self._outcome
        self._outcome = ()
        if error is not None:
            raise error
        return path, iteration


def is_complete(ckpt: Path) -> bool:
    mf = ckpt / "manifest.json"
    if not mf.is_file():
        return False
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        return False
    if not isinstance(manifest, dict):
        return False
    if "files" in manifest:
        algorithm, files = manifest.get("checksum", CHECKSUM), manifest["files"]
    else:  # manifests of earlier versions: a flat name -> sha256 map
        algorithm, files = "sha256", manifest
    if not isinstance(files, dict) or "state.json" not in files:  # every checkpoint has one: an empty or
        return False                                               # truncated manifest is no checkpoint
    for name, digest in files.items():
        p = ckpt / name
        if not p.is_file() or checksum_file(p, algorithm) != digest:
            return False
    return True


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of a run (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))


def latest_complete(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; a damaged newer one is skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for i, c in enumerate(candidates):
        if is_complete(c):
            return c
        warnings.warn(f"checkpoint {c} is incomplete or corrupt (checksum mismatch); falling back to an older one")
    return None


def load_data_state(ckpt: Path, rank: int) -> Optional[dict]:
    f = ckpt / f"data_rank{rank}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def saved_state(ckpt: Path) -> dict:
    """A checkpoint's ``state.json``: iteration, method, world size, global sample counts, frozen record."""
    return json.loads((Path(ckpt) / "state.json").read_text())


def read_method_state(ckpt: Path, method_cls, rt) -> Optional[dict]:
    """The method's own state: this rank's file, or — written at another world size — the merge of every
    saving rank's (``Method.merge_state_dicts``); None for checkpoints without one (earlier versions)."""
    state = saved_state(ckpt)
    files = sorted(Path(ckpt).glob("method_rank*.json"))
    if not files:
        if not (Path(ckpt) / "state.json").is_file():  # removed while it was read (a live run's pruning)
            raise FileNotFoundError(f"checkpoint {ckpt} is gone")
        return None
    if int(state["world_size"]) == rt.world_size and (Path(ckpt) / f"method_rank{rt.rank}.json").is_file():
        return json.loads((Path(ckpt) / f"method_rank{rt.rank}.json").read_text())
    return method_cls.merge_state_dicts([json.loads(f.read_text()) for f in files])


def load_method_state(ckpt: Path, method, rt) -> None:
    """Restore the method's state from a checkpoint (``read_method_state``; none: it stays fresh)."""
    state = read_method_state(ckpt, type(method), rt)
    if state is not None:
        method.load_state_dict(state)


def load(ckpt: Path, models, rt, method=None) -> int:
    """Restore every trainable role this rank holds, its EMA, the method's state and this rank's RNG. A
    checkpoint written at another world size goes through DeepSpeed's universal conversion (rank 0 converts
    each partitioned role once, inside the checkpoint folder, while the others wait); RNG then comes from the
    saving rank ``min(rank, saved ranks - 1)`` (per-sample draws are keyed by global indices, not by these
    states)."""
    from safetensors.torch import load_file

    state = saved_state(ckpt)
    saved_world = int(state["world_size"])
    resized = saved_world != rt.world_size
    if resized:
        if rt.is_main:
            for folder in sorted(p for p in ckpt.iterdir() if p.is_dir() and needs_universal(p)):
                to_universal(folder, rt.world_size)
        _barrier(rt)
    for name, role in models.trainable_roles().items():
        role.load_state(ckpt / name, universal=resized and needs_universal(ckpt / name))
        if getattr(role, "keeps_extra", False):
            role.load_extra_weights(load_file(str(ckpt / f"{name}.safetensors"), device=str(CPU)))
    if method is not None:
        load_method_state(ckpt, method, rt)
    rng_file = ckpt / f"rng_rank{min(rt.rank, saved_world - 1)}.pt"
    if rng_file.is_file():
        st = torch.load(rng_file, map_location=CPU, weights_only=True)
        st["python"] = (st["python"][0], tuple(st["python"][1]), st["python"][2])
        st["numpy"] = (st["numpy"][0], st["numpy"][1].numpy().astype(np.uint32), st["numpy"][2], st["numpy"][3],
                       st["numpy"][4])
        set_rng_state(st)
    return int(state["iteration"])


def role_weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """A trainable role's whole weights in a checkpoint, ``module.*`` (and ``ema.*`` when it keeps an EMA),
    whatever its ZeRO stage: from ``<role>.safetensors`` (ZeRO-3: gathered at save; the EMA), else from the
    engine's model-states file (ZeRO 0-2 write the whole module there, so it is not written twice)."""
    from safetensors.torch import load_file

    f = Path(ckpt) / f"{name}.safetensors"
    out = load_file(str(f), device=str(CPU)) if f.is_file() else {}
    if not any(k.startswith("module.") for k in out):
        try:
            module = engine_module_weights(Path(ckpt) / name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"checkpoint {ckpt} holds no weights of role {name} ({e})") from None
        out.update({f"module.{k}": v for k, v in module.items()})
    return out


def load_role_weights(ckpt: Path, name: str, prefer_ema: bool = True, role_net: bool = False) -> dict[str, torch.Tensor]:
    """A role's UNet weights (``role_net``: its RoleNet's, keys ``unet.*``) from a checkpoint's whole
    weights, the EMA when present and preferred."""
    sd = role_weights(ckpt, name)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in sd) else "module."
    if not role_net:
        prefix += "unet."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
