"""``unidad-dist launch ray --config FILE [overrides] --num-workers N ...``: the train loop on a Ray cluster,
through Ray Train.

* A ``TorchTrainer`` whose N workers each run ``unidad-dist train``'s loop (``_worker``: the same ``train(cfg)``
  every launcher ends in). Ray Train starts the process group (gloo on CPU workers, NCCL on GPU workers) and
  sets RANK / WORLD_SIZE / LOCAL_RANK; each worker's device is the one Ray Train assigned it
  (``ray.train.torch.get_device()``), not an index the launcher guesses.
* ``RunConfig(storage_path=<run folder's parent>, name=<run folder's name>)``: Ray's own files land in the run
  folder. Each published checkpoint is reported from every worker (``ray.train.report``, the same number of
  times on each, through the loop's ``on_checkpoint`` hook) with the checkpoint folder, which holds every rank's
  part (its ZeRO partitions, RNG, data positions); Ray records it where it is, without a copy.
* ``FailureConfig(max_failures)``: when a worker dies (a SIGKILL, a lost node), Ray Train stops the group and
  starts a new one, whose loop resumes from the run folder's latest complete checkpoint exactly as any other
  launcher's does (the lock of the dead group is taken over: it carries this launch's id).
* SIGINT (Ctrl-C) or SIGTERM to the command: every worker stops at the next iteration boundary with a checkpoint
  (through ``<run>/stop.request``), and the command exits 128 + the signal; a second one aborts at once (the
  latest checkpoint stays). The same command resumes.
* An error in the input that the workers find (a damaged run folder, changed frozen weights, …: a ``UserError``)
  is not retried — it would recur: the worker records it beside the run folder and returns; a group restarted
  because another rank then lost its peer returns at once; the command prints it and exits 2.
* The command waits; rank 0's progress comes through Ray's log forwarding and goes to ``<run>/train.log``;
  metrics, grids and summary.json are the loop's, as with any launcher. Exit status 0 when the run finished,
  1 when it failed after ``--max-failures`` restarts (the same command resumes it).

``--address``: ``auto`` joins the cluster this node belongs to (``ray start`` ran here, or RAY_ADDRESS),
``local`` starts a private one-node cluster for this command, ``HOST:PORT`` a head node's GCS address.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from unidad_dist.config import batch_for_world, run_dir
from unidad_dist.device import backend_for_gpus
from unidad_dist.errors import UserError
from unidad_dist.launch.chain import launch_config, run_folders, run_recipe
from unidad_dist.train.hooks import Hook
from unidad_dist.train.runlock import LAUNCH_ID_ENV, live_writer
from unidad_dist.train.signals import SIGNALS as STOP_SIGNALS

RAY_EXTRA = "pip install 'unidad_dist[ray]' (or pip install 'ray[default,train]')"
STOP_REQUEST = "stop.request"  # in the run folder: the launcher asks the workers to stop with a checkpoint


def _error_record(rdir: Path, launch_id: str) -> Path:
    """Where a worker records a UserError for the launcher (beside the run folder: a refused start writes
    nothing into it)."""
    return rdir.parent / f".{rdir.name}.{launch_id.replace(':', '-')}.error.json"


@dataclasses.dataclass
class RayOptions:
    num_workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    address: Optional[str] = None  # auto | local | HOST:PORT; None: $RAY_ADDRESS, else auto
    max_failures: int = 3


class RayReport(Hook):
    """Reports each published checkpoint to Ray Train from every worker (a barrier: every rank reaches it the
    same number of times, as every rank takes part in every save), with rank 0's latest step logs."""

    def __init__(self):
        self.logs: dict[int, dict] = {}  # iterations done -> that iteration's logs (since the last report)

    def on_step_end(self, run, iteration: int, logs: dict) -> None:
        self.logs[iteration + 1] = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}

    def on_checkpoint(self, run, path: Path, iteration: int) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        # checkpoint.async reports a checkpoint later, once published: with the logs of its own iteration
        logs = self.logs.get(iteration, {})
        self.logs = {k: v for k, v in self.logs.items() if k > iteration}
        ray.train.report({"iteration": iteration, **logs},
                         checkpoint=ray.train.Checkpoint(str(Path(path).resolve())),  # pyarrow: absolute paths
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


class StopRequest(Hook):
    """Stops the loop at the next iteration boundary, with a checkpoint, once ``<run>/stop.request`` exists (the
    launcher writes it on SIGINT / SIGTERM). Ray Train runs the loop outside the worker's main thread, where
    signal handlers cannot be installed, so the request travels through the run folder (shared by all nodes);
    rank 0 looks, the loop agrees over all ranks. ``path``: the file the launcher writes (a chain's stages run in
    folders below the one the launcher watches); default ``<run>/stop.request``."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path

    def should_stop(self, run, done: int) -> bool:
        return run.rt.is_main and (self.path or run.dir / STOP_REQUEST).exists()


def _worker(spec: dict) -> None:
    """What each Ray Train worker runs: the train loop on the recipe, resuming from the run folder."""
    import ray.train.torch
    import torch

    os.environ[LAUNCH_ID_ENV] = spec["launch_id"]  # a restarted group takes over the dead group's run lock
    threads = max(1, int(spec["cpus_per_worker"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)  # the worker's CPUs, not every core of its node
    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])  # relative paths in overrides and run.dir are the launching shell's
    record = Path(spec["error_record"])
    if record.exists():  # a restart after this launch's input error: it would recur
        return
    try:
        run_recipe(spec["config"], spec["overrides"], hooks=[RayReport(), StopRequest(Path(spec["stop_file"]))],
                   device=ray.train.torch.get_device())  # a plain recipe, or a chain's stages
    except UserError as e:  # deterministic: returned, not raised, so FailureConfig does not retry it
        rank = int(os.environ.get("RANK", "0"))
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f"{record.name}.{rank}-{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"rank": rank, "error": str(e)}))
            os.replace(tmp, record)
        except OSError:  # a full or read-only disk: raised instead (Ray retries, and ends with the same error)
            raise e from None
        if torch.distributed.is_initialized():  # a gloo peer still in a collective with this rank fails now; an
            torch.distributed.destroy_process_group()  # NCCL one at its timeout; the restarted group returns


def _reachable(address: str) -> Optional[str]:
    """Why the cluster at ``address`` (auto or HOST:PORT) cannot be reached, or None. Checked with a short TCP
    connect first: ``ray.init`` itself retries an unreachable GCS for many minutes."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    try:
        where = canonicalize_bootstrap_address(address)
    except Exception as e:  # an unparsable address, a stale cluster file
        return str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    if where is None:
        return "no running cluster found on this node"
    host, _, port = where.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return None
    except (OSError, ValueError) as e:
        return f"{where}: {e.strerror or e}" if isinstance(e, OSError) else f"{where}: {e}"


def _connect(address: Optional[str]):
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    # Ray Train's print patch would send every line rank 0 prints (already in train.log and on stdout) once more
    # through its logger: off, on every worker of this job
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": "warning",
                    "runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}}
    try:
        why = None if address == "local" else _reachable(address)
        if why:
            raise ConnectionError(why)
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ("no running Ray cluster was found on this node: start one (`ray start --head`), give its "
                "address (--address HOST:PORT), or run on this machine alone with --address local"
                if address == "auto" else "check the head node's address and port (`ray status` on the head node "
                "prints it) and that this machine can reach it")
        raise UserError(f"cannot connect to the Ray cluster at {address!r} ({str(e).splitlines()[0][:300]}); "
                        f"{hint}; nothing started") from None
    return ray


def _check_resources(ray, o: RayOptions) -> None:
    total = ray.cluster_resources()
    need = {"CPU": o.num_workers * o.cpus_per_worker, "GPU": o.num_workers * o.gpus_per_worker}
    short = [f"{need[k]:g} {k} ({o.num_workers} worker(s) x {v:g}) but it has {total.get(k, 0):g}"
             for k, v in (("CPU", o.cpus_per_worker), ("GPU", o.gpus_per_worker)) if need[k] > total.get(k, 0)]
    if short:
        fix = ("give fewer --num-workers, a smaller --cpus-per-worker / --gpus-per-worker, or add nodes"
               if total.get("GPU", 0) or not o.gpus_per_worker else
               "this cluster has no GPUs: run with --gpus-per-worker 0 (CPU workers) or join a GPU cluster")
        raise UserError(f"the Ray cluster cannot place the workers: they need {'; '.join(short)}; {fix}; nothing "
                        "started")


def _fit_in_thread(trainer):
    """``trainer.fit()`` in a thread, so that this (main) thread keeps the signal handlers: in the main thread
    Ray Train installs its own SIGINT handler, which aborts the workers without a checkpoint."""
    import threading

    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    t = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)  # signal handlers run between the waits
    if "error" in box:
        raise box["error"]
    return box["result"]


def _check_options(o: RayOptions) -> None:
    if o.num_workers < 1 or o.cpus_per_worker <= 0 or o.gpus_per_worker < 0 or o.max_failures < -1:
        raise UserError(f"--num-workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0 and "
                        f"--max-failures >= -1 (-1: unlimited) (got {o.num_workers}, {o.cpus_per_worker:g}, "
                        f"{o.gpus_per_worker:g}, {o.max_failures})")
    if o.gpus_per_worker and o.gpus_per_worker != int(o.gpus_per_worker):
        raise UserError(f"--gpus-per-worker {o.gpus_per_worker:g}: each rank needs whole GPUs (one rank per GPU: 1)")


def _trainer(config: str, overrides: list[str], o: RayOptions, cfg, rdir: Path, launch_id: str):
    """The TorchTrainer whose workers run ``_worker`` on the recipe, with Ray's storage in the run folder."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # the run folder as an absolute path: a worker whose node lacks this directory still finds it
    spec = {"config": str(Path(config).resolve()) if Path(config).is_file() else config,
            "overrides": [*overrides, f"run.dir={rdir}"], "cwd": os.getcwd(), "cpus_per_worker": o.cpus_per_worker,
            "launch_id": launch_id, "error_record": str(_error_record(rdir, launch_id)),
            "stop_file": str((rdir / STOP_REQUEST).resolve())}
    resources = {"CPU": o.cpus_per_worker, **({"GPU": o.gpus_per_worker} if o.gpus_per_worker else {})}
    return TorchTrainer(
        _worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=o.num_workers, use_gpu=bool(o.gpus_per_worker),
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend_for_gpus(bool(o.gpus_per_worker)),
                                 timeout_s=int(cfg.run.dist_timeout)),
        run_config=RunConfig(name=rdir.name, storage_path=str(rdir.parent),
                             failure_config=FailureConfig(max_failures=o.max_failures)))


def _fit_stoppable(trainer, rdir: Path, o: RayOptions, launch_id: str) -> int:
    """Fit, turning SIGINT / SIGTERM into a stop request the workers act on (a second one aborts); the exit
    status (2: an input error a worker recorded)."""
    record = _error_record(rdir, launch_id)
    try:
        return _fit_signalled(trainer, rdir, o, record)
    finally:
        record.unlink(missing_ok=True)


def _raise_recorded(record: Path) -> None:
    if record.is_file():
        found = json.loads(record.read_text())
        raise UserError(f"{found['error']} (rank {found['rank']}; not retried: it would recur)")


def _fit_signalled(trainer, rdir: Path, o: RayOptions, record: Path) -> int:
    t0 = time.time()
    stop_file = rdir / STOP_REQUEST
    stop_file.unlink(missing_ok=True)  # a request left by an earlier launch
    # Ray's record of an earlier launch's checkpoints: it refuses to start when one it lists was pruned
    # (checkpoint.keep); the loop resumes from the run folder's own checkpoints, not from this record
    (rdir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    received: list[int] = []

    def ask_to_stop(signum, frame):
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt  # the second one: abort now
        print(f"launch ray: {signal.Signals(signum).name}: asking the workers to stop at the next iteration "
              "boundary with a checkpoint (again to abort at once)", file=sys.stderr, flush=True)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    old = {s: signal.signal(s, ask_to_stop) for s in STOP_SIGNALS}
    try:
        result = _fit_in_thread(trainer)
    except KeyboardInterrupt:
        print(f"launch ray: aborted; the latest checkpoint in {rdir / 'checkpoints'} stays; the same command "
              "resumes", file=sys.stderr, flush=True)
        return 128 + received[0] if received else 130
    except Exception as e:  # Ray Train's TrainingFailedError after max_failures restarts
        _raise_recorded(record)
        print(f"launch ray: the run failed after at most {o.max_failures} restart(s): "
              f"{str(e).strip().splitlines()[-1][:2000] if str(e).strip() else type(e).__name__}; the "
              f"checkpoints in {rdir / 'checkpoints'} stay valid; the same command resumes the run",
              file=sys.stderr, flush=True)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop_file.unlink(missing_ok=True)
    _raise_recorded(record)
    if getattr(result, "error", None) is not None:
        print(f"launch ray: the run failed: {result.error}", file=sys.stderr, flush=True)
        return 1
    if received:
        print(f"launch ray: stopped with a checkpoint ({time.time() - t0:.0f} s); the same command resumes; run "
              f"folder {rdir}", file=sys.stderr, flush=True)
        return 128 + received[0]
    print(f"launch ray: finished in {time.time() - t0:.0f} s; run folder {rdir}", flush=True)
    return 0


def launch_ray(config: str, overrides: list[str], o: RayOptions) -> int:
    cfg = launch_config(config, overrides)  # bad input fails here, before anything starts
    _check_options(o)
    batch_for_world(cfg, o.num_workers)  # a global batch this many ranks cannot split
    rdir = run_dir(cfg).resolve()
    for folder in [rdir] + [f.resolve() for f in run_folders(config, overrides)[1:]]:  # a chain: its stages' too
        busy = live_writer(folder, cfg.run.lock_stale_s)
        if busy:
            raise UserError(busy + "; nothing started")
    try:
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise UserError(f"launch ray needs Ray Train: {RAY_EXTRA}") from None
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _connect(o.address)
    try:
        _check_resources(ray, o)
        launch_id = f"ray:{uuid.uuid4().hex[:12]}"
        trainer = _trainer(config, overrides, o, cfg, rdir, launch_id)
        print(f"launch ray: {o.num_workers} worker(s) x {o.cpus_per_worker:g} CPU"
              + (f" + {o.gpus_per_worker:g} GPU" if o.gpus_per_worker else "")
              + f" on the Ray cluster; run folder {rdir}; at most {o.max_failures} restart(s) after a worker "
              "failure", flush=True)
        return _fit_stoppable(trainer, rdir, o, launch_id)
    finally:
        ray.shutdown()
