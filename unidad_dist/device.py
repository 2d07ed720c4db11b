"""The one place that knows about devices and communication backends.

Everything else asks this module which device to use, which backend to start, how to autocast and how to
save/restore the RNG of the accelerator. No other module may name a device type or backend literally
(a test greps for that), so the same code runs on CUDA + NCCL clusters and on a CPU + gloo laptop.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from unidad_dist.core.io import cache_root

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    dist_timeout: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def pick_device(local_rank: int = 0) -> torch.device:
    if accelerator_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return CPU


def backend_for(device: torch.device) -> str:
    return backend_for_gpus(device.type == "cuda")


def backend_for_gpus(use_gpus: bool) -> str:
    """The process group's backend for ranks on GPUs or on CPUs (a launcher that starts the group itself)."""
    return "nccl" if use_gpus else "gloo"


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """``run.deterministic``: deterministic cuDNN / cuBLAS kernels while it lasts (bit-identical reruns and
    resumes on CUDA, at some speed); an op without a deterministic kernel raises PyTorch's error naming it.
    Entered before the first CUDA op (cuBLAS reads its workspace setting when its handle is made); the previous
    settings come back at the end (a process that trains twice, e.g. the tests, is not left in this mode)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def runtime_from_env(dist_timeout_s: float = 600.0, device: torch.device | None = None) -> Runtime:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun, DeepSpeed launcher, submitit, Ray all set them) and,
    when more than one rank is present, initialise the default process group with the backend that
    fits the device (unless the launcher already did). ``device``: the one the launcher assigned (Ray Train's),
    else the local rank's."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device if device is not None else pick_device(local_rank)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=dist_timeout_s)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # DeepSpeed engines need a process group even for one rank: a private one on a free port
            for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(var, value)  # DeepSpeed reads them
            torch.distributed.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                                 rank=0, world_size=1, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return Runtime(device=device, backend=backend, rank=rank, world_size=world, local_rank=local_rank,
                   dist_timeout=dist_timeout_s)


def exit_process(rc: int) -> None:
    """End this process with exit code ``rc``. One that had a process group (WORLD_SIZE > 1: a rank started by
    a launcher; or one rank's private group, which DeepSpeed's engines need) skips the interpreter's
    finalisation; any other raises SystemExit(rc) as usual.

    Why: gloo's worker threads drop a finished collective's work objects a moment after the caller's wait
    returns, and dropping one releases the Python tensors it held, which takes the GIL. A rank that returns
    right after its last collective (rank 1 of `evaluate`, whose share ends with its gather while rank 0 still
    measures; a test worker's last all_gather_object) can reach finalisation first; the worker's GIL acquire
    then ends its thread, and the forced unwind through the work's destructor aborts the process ("terminate
    called without an active exception", SIGABRT, the launcher reporting a failed job after a successful
    command). Seen in 6 of 40 two-rank runs on 2 loaded cores; destroy_process_group does not stop those
    threads. So such a process runs what finalisation would have run that matters — waits for the non-daemon
    threads, runs the atexit handlers (wandb, logging), flushes stdout and stderr — while the interpreter is
    whole, then os._exit(rc)."""
    import atexit
    import sys
    import threading

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not torch.distributed.is_initialized():
        raise SystemExit(rc)
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(rc)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_env() -> None:
    """Before DeepSpeed is imported: tell it which accelerator to use (it otherwise guesses and warns), and
    give any op it JIT-builds one cache whatever the entry point (make, the CLI, a launcher):
    $TORCH_EXTENSIONS_DIR when set, else <cache root>/torch_extensions."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if accelerator_available() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))


# transformers imports DeepSpeed by itself on some paths (save_pretrained checks for ZeRO-3): every module that
# runs networks imports this one first
prepare_deepspeed_env()


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on whatever device we run on; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype == torch.float16 and device.type != "cuda":
        return False
    return True


def accelerator_rng_state():
    if accelerator_available():
        return torch.cuda.get_rng_state_all()
    return None


def set_accelerator_rng_state(state) -> None:
    if state is not None and accelerator_available():
        torch.cuda.set_rng_state_all(state)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def queues_work(device: torch.device) -> bool:
    """Whether the host only queues work for the device (CUDA): timing it then needs device events."""
    return device.type == "cuda"


def host_group(timeout_s: float):
    """A new process group over every rank for small host-side objects, usable from another thread while the
    training's own group is busy (gloo, whatever the training's backend)."""
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def pins_host_copies(device: torch.device) -> bool:
    """Whether host copies of this device's tensors go to pinned memory (CUDA: an asynchronous DMA)."""
    return device.type == "cuda"


def device_name(device: torch.device) -> str:
    """The accelerator's name as its driver reports it (CUDA), else the device type ("cpu")."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def memory_peaks(device: torch.device) -> dict:
    """The device allocator's peaks since the process started, in bytes ({} on a CPU)."""
    if device.type != "cuda":
        return {}
    return {"max_allocated": torch.cuda.max_memory_allocated(device),
            "max_reserved": torch.cuda.max_memory_reserved(device)}
