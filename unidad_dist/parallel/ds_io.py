"""DeepSpeed checkpoint I/O: the engine state folder layout, safe loading (DeepSpeed's own loader uses
``torch.load(weights_only=False)``), the universal conversion for a resume at another world size, and
reading a role's whole weights from an engine's model-states file without an engine."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from unidad_dist import device as dev
from unidad_dist.core.io import torch_save_hashed

TAG = "state"  # one DeepSpeed tag per checkpoint folder: our own `latest` pointer names the folder
UNIVERSAL_TAG = "universal"  # the same state converted by ds_to_universal, for a resume at another world size


# DeepSpeed's CPU shared-memory comm op: its torch backend JIT-compiles it (g++, 35 s to minutes, per cache
# location) in every init_distributed on a CPU accelerator, even for one rank, but only its inference
# all-reduce (deepspeed.comm.inference_all_reduce) ever calls it; training never does.
_UNUSED_OPS = ("deepspeed_shm_comm",)


def import_deepspeed():
    dev.prepare_deepspeed_env()
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import logger as ds_logger

    for name in _UNUSED_OPS:  # build_shm_op() skips an op marked incompatible
        deepspeed.ops.__compatible_ops__[name] = False

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls a torch collective under its deprecated name on every ZeRO step
    warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated")
    return deepspeed


def _safe_globals() -> list:
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = [ZeroStageEnum, fragment_address]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - layout of other DeepSpeed versions
        pass
    return out


@contextlib.contextmanager
def safe_torch_load():
    """DeepSpeed's universal-checkpoint conversion and loader call ``torch.load(weights_only=False)``: route
    every load inside this block through ``weights_only=True`` (only DeepSpeed's own types allow-listed)."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def to_universal(folder: Path, world_size: int) -> Path:
    """Convert a role's DeepSpeed state (``folder/state``) into ``folder/universal`` with DeepSpeed's
    ds_to_universal (once: a finished conversion is reused; a killed one is redone), for a resume on
    ``world_size`` ranks. Called by one rank while the others wait."""
    import io
    import os
    import shutil
    from contextlib import redirect_stdout
    from types import SimpleNamespace

    out = Path(folder) / UNIVERSAL_TAG
    if not out.is_dir():
        tmp = Path(folder) / f".tmp-{UNIVERSAL_TAG}"
        shutil.rmtree(tmp, ignore_errors=True)
        import_deepspeed()
        from deepspeed.checkpoint import ds_to_universal

        args = SimpleNamespace(input_folder=str(Path(folder) / TAG), output_folder=str(tmp), num_extract_workers=1,
                               num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        with safe_torch_load(), redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds_to_universal.main(args)
        (Path(folder) / "latest_universal").unlink(missing_ok=True)  # ours names the tag explicitly
        os.replace(tmp, out)
    # ZeRO-3: every loading rank reads "its" model-states file, and the conversion copies only those of the
    # saving ranks (deepspeed PR #7599). The ranks' files are identical (counters, shapes, config; the
    # weights come from the converted per-parameter files), so rank 0's serves the new ranks.
    first = out / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if first.is_file():
        for r in range(world_size):
            f = out / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
            if not f.is_file():
                shutil.copyfile(first, out / f".{f.name}.tmp")
                os.replace(out / f".{f.name}.tmp", f)
    return out


_ROUTE = None  # set by routed_saves: where the engines' saves go instead of the file


@contextlib.contextmanager
def routed_saves(save):
    """Inside this block every engine's checkpoint file goes to ``save(state_dict, path, **torch_save_kwargs)``
    instead of being written (an asynchronous checkpoint stages it in host memory; train/checkpoint.py)."""
    global _ROUTE
    _ROUTE = save
    try:
        yield
    finally:
        _ROUTE = None


def make_safe_checkpoint_engine(config):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, loading with ``weights_only=True`` (only DeepSpeed's own enum and
        dataclass types are allow-listed) and saving through a hashing, fsyncing writer."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

        def save(self, state_dict, path: str):
            """Write with the checksum computed on the way out: the manifest reuses it (or, inside
            ``routed_saves``, hand the state to the asynchronous checkpoint's stager)."""
            kw = {"_use_new_zipfile_serialization": self.zipfile_serialization}
            if _ROUTE is not None:
                _ROUTE(state_dict, path, **kw)
            else:
                torch_save_hashed(state_dict, path, **kw)

    return SafeCheckpointEngine(config)


def needs_universal(state_folder: Path) -> bool:
    """Whether a role's DeepSpeed state is partitioned over the saving ranks (ZeRO 1-3, or DeepSpeed's bf16
    optimizer): then another world size loads it through the universal conversion."""
    return any((Path(state_folder) / TAG).glob("*optim_states.pt"))


def engine_module_weights(role_folder: Path) -> dict[str, torch.Tensor]:
    """The whole module weights in a role's engine model-states file (ZeRO 0-2 write the whole module there).
    Memory-mapped: the optimizer state in the same file (ZeRO-0) is never read."""
    ms = Path(role_folder) / TAG / "mp_rank_00_model_states.pt"
    if not ms.is_file():
        raise FileNotFoundError(f"{ms} is missing")
    import_deepspeed()
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            sd = torch.load(str(ms), map_location=dev.CPU, weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) serialization cannot be mapped
            sd = torch.load(str(ms), map_location=dev.CPU, weights_only=True)
    return sd["module"]
