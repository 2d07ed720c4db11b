"""``unidad-dist launch slurm --config FILE [overrides] --nodes N --gpus-per-node G ...``: the train loop on a
SLURM allocation, through submitit.

* One task per GPU (``--tasks-per-node`` on CPU clusters); each task takes RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT from submitit's ``TorchDistributedEnvironment`` and its device by local rank
  (``device.pick_device``: local rank modulo the GPUs it sees, so it is right whether SLURM shows a task every
  GPU of its node or only its own), then runs ``unidad-dist train`` — the loop every launcher ends in.
* submitit's folder (the sbatch script, each task's stdout/stderr, the pickled call and its result) is
  ``<run>/slurm/``.
* Time limit and preemption: SLURM sends ``--signal`` (USR2) ``--signal-delay`` seconds before it kills the job
  (``#SBATCH --signal=USR2@90``), to every task. Each rank's train loop treats it as a stop request
  (train/signals.py): all ranks agree at the next iteration boundary, write one collective checkpoint and exit;
  then global rank 0 requeues the job (``scontrol requeue``), which restarts it (SLURM holds a requeued job for
  about two minutes first) and the loop resumes from that checkpoint. At most ``--max-requeues`` requeues
  (counted by SLURM_RESTART_COUNT); after that the job ends "stopped", and the same command resumes it. A signal
  that arrives before training started (while building) goes to submitit's own handler, which requeues too.
* By default the command waits, prints rank 0's ``<run>/train.log`` as it grows, and returns the job's exit
  status (0 finished, 1 failed, 128 + the signal when it ended stopped); ``--no-wait`` prints the job id and
  the run folder and returns. ``--dry-run`` prints the sbatch script and each task's command; nothing is
  submitted.

* ``--sweep key=v1,v2`` (repeatable: the product): one job array, one run per point in
  ``<run.dir>/<key=value_...>`` (each point's values checked before anything is submitted); the command waits
  for all, then prints and writes ``<run.dir>/sweep.json``: each point's outcome and proxies.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from unidad_dist.config import batch_for_world, run_dir
from unidad_dist.core.io import atomic_write_text
from unidad_dist.errors import StoppedBySignal, UserError
from unidad_dist.launch.chain import launch_config, run_folders, run_recipe
from unidad_dist.train.logging import TRAIN_LOG
from unidad_dist.train.runlock import live_writer
from unidad_dist.train.signals import STOP_SIGNALS_ENV, signal_by_name

SUBMITIT_FOLDER = "slurm"  # under the run folder
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "SPECIAL_EXIT", "REVOKED"}


@dataclasses.dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: int = 60  # minutes
    account: Optional[str] = None
    qos: Optional[str] = None
    mem: Optional[str] = None  # SLURM's --mem: "64G", "0" (all of the node's)
    constraint: Optional[str] = None
    max_requeues: int = 3
    signal: str = "USR2"
    signal_delay: int = 90  # seconds before the time limit
    job_name: Optional[str] = None
    sweep: list = dataclasses.field(default_factory=list)  # "key=v1,v2,..." each; several make the product
    dry_run: bool = False
    no_wait: bool = False


class SlurmTask:
    """What each task of the job runs (pickled by submitit, called on the compute node)."""

    def __init__(self, config: str, overrides: list[str], max_requeues: int, signal_name: str, run_dir: str):
        self.config, self.overrides = config, list(overrides)
        self.max_requeues, self.signal_name, self.run_dir = max_requeues, signal_name, run_dir

    def _say(self, text: str) -> None:
        """A line in the task's log and in the run's train.log (which the waiting launcher prints)."""
        print(text, flush=True)
        try:
            with open(Path(self.run_dir) / TRAIN_LOG, "a", encoding="utf-8") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        except OSError:
            pass

    def argv(self) -> list[str]:
        return ["train", "--config", self.config, *self.overrides]

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ[STOP_SIGNALS_ENV] = self.signal_name  # the time-limit / preemption signal stops the loop
        if "OMP_NUM_THREADS" not in os.environ:  # the task's CPUs, not every core of the node per rank
            per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(
                max(1, int(os.environ.get("SLURM_CPUS_ON_NODE", str(os.cpu_count() or 1))) // per_node))
            os.environ["OMP_NUM_THREADS"] = cpus
            import torch  # already imported with this module: the variable alone would come too late

            torch.set_num_threads(int(cpus))
        code = self._train()
        if code == 0:
            return {"outcome": "finished", "rank": env.global_rank}
        signum = signal_by_name(self.signal_name)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if code == 128 + signum:
            if restarts < self.max_requeues:
                if env.global_rank == 0:
                    subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
                    self._say(f"launch slurm: stopped by {signum.name} with a checkpoint; requeued job {env.job_id} "
                              f"(requeue {restarts + 1} of at most {self.max_requeues}); it resumes when SLURM "
                              "starts it again")
                raise SystemExit(code)  # no result file: the job is not over, it restarts and resumes
            raise RuntimeError(f"stopped by {signum.name} after {restarts} requeue(s) (--max-requeues "
                               f"{self.max_requeues}); the checkpoint is written, the same command resumes the run")
        if code > 128:
            raise RuntimeError(f"stopped by signal {code - 128} (not the job's {signum.name}); the same command "
                               "resumes the run")
        raise RuntimeError(f"unidad-dist train exited with code {code} (rank {env.global_rank}); its output is in "
                           "the task's log under <run>/slurm/")

    def _train(self) -> int:
        """``unidad-dist train`` in this process: 0, 2 (bad input) or 128 + the signal that stopped it."""
        try:
            rdir = run_recipe(self.config, self.overrides)  # a plain recipe, or a chain's stages
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except StoppedBySignal as e:
            if os.environ.get("RANK", "0") == "0":
                print(str(e), file=sys.stderr, flush=True)
            return 128 + e.signum
        if os.environ.get("RANK", "0") == "0":
            print(f"run folder: {rdir}", flush=True)
        return 0

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on rank 0 when the signal arrives before the loop installed its own handler
        (while importing and building): requeue as is (the loop resumes from the run folder), or — the job was
        requeued ``max_requeues`` times already, as the loop's own path counts — None: submitit ends the job."""
        import submitit

        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(SlurmTask(self.config, self.overrides, self.max_requeues,
                                                            self.signal_name, self.run_dir))


def _tasks_per_node(o: SlurmOptions) -> int:
    if o.gpus_per_node < 0 or o.nodes < 1:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {o.nodes}, {o.gpus_per_node})")
    if o.gpus_per_node > 0:
        if o.tasks_per_node not in (None, o.gpus_per_node):
            raise UserError(f"--tasks-per-node {o.tasks_per_node} with --gpus-per-node {o.gpus_per_node}: the "
                            "framework runs one rank per GPU; leave --tasks-per-node out on GPU nodes")
        return o.gpus_per_node
    if not o.tasks_per_node or o.tasks_per_node < 1:
        raise UserError("on CPU nodes (--gpus-per-node 0) give --tasks-per-node N (ranks per node)")
    return o.tasks_per_node


def _executor_parameters(o: SlurmOptions, tasks: int, name: str) -> dict:
    try:
        sig = signal_by_name(o.signal)
    except ValueError as e:
        raise UserError(f"--signal: {e}") from None
    if o.time < 1 or o.signal_delay < 0 or o.max_requeues < 0:
        raise UserError(f"--time must be >= 1 minute, --signal-delay and --max-requeues >= 0 (got {o.time}, "
                        f"{o.signal_delay}, {o.max_requeues})")
    if o.signal_delay >= o.time * 60:
        raise UserError(f"--signal-delay {o.signal_delay} s is not shorter than --time {o.time} min: the signal "
                        "would come before the job starts; shorten it")
    # submitit.SlurmExecutor's names (sbatch's, with underscores)
    p: dict = {"nodes": o.nodes, "ntasks_per_node": tasks, "time": o.time, "job_name": name,
               "signal_delay_s": o.signal_delay}
    for key, value in (("gpus_per_node", o.gpus_per_node), ("cpus_per_task", o.cpus_per_task),
                       ("partition", o.partition), ("account", o.account), ("qos", o.qos),
                       ("constraint", o.constraint)):
        if value:
            p[key] = value
    extra: dict = {}
    if o.mem:
        extra["mem"] = o.mem
    short = sig.name[3:]
    if short != "USR2":  # submitit's default; its own handler (before the loop starts) must watch the same one
        extra["signal"] = f"{short}@{o.signal_delay}"
        p["setup"] = [f"export SUBMITIT_PREEMPT_SIGNAL={short}"]
    if extra:
        p["additional_parameters"] = extra
    return p


def _test_only(params: dict, array: Optional[int]) -> None:
    """``sbatch --test-only`` on the job's parameters: an unknown partition or account, more tasks, CPUs or GPUs
    than a node has, ... are refused with sbatch's own words before anything is written or submitted (sbatch
    would otherwise queue a job that can never start)."""
    import tempfile

    from submitit.slurm.slurm import _make_sbatch_string

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.sh"
        script.write_text(_make_sbatch_string(command="true", folder=tmp, **params,
                                              **({"map_count": array} if array else {})))
        r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        said = " / ".join(line.strip() for line in (r.stderr + r.stdout).splitlines() if line.strip())
        raise UserError(f"sbatch refused the job: {said or f'exit {r.returncode}'}; nothing submitted")


def _squeue_state(job_id: str) -> Optional[str]:
    """The job's state as squeue shows it, or None once it has left the queue."""
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    state = r.stdout.strip().splitlines()
    return state[0].strip() if r.returncode == 0 and state else None


def _follow(path: Path, pos: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        return pos
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", "replace"))
        sys.stdout.flush()
    return pos + len(chunk)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def launch_slurm(config: str, overrides: list[str], o: SlurmOptions, poll_s: float = 2.0) -> int:
    cfg = launch_config(config, overrides)  # bad input fails here, before anything is submitted
    tasks = _tasks_per_node(o)
    batch_for_world(cfg, o.nodes * tasks)  # a global batch this many ranks cannot split
    rdir = run_dir(cfg).resolve()
    name = o.job_name or f"unidad-{cfg.run.name}"
    params = _executor_parameters(o, tasks, name)
    runs = _runs(config, overrides, rdir, o.sweep)
    folders = [f.resolve() for f in run_folders(config, overrides)] if not o.sweep else []  # a chain: its stages'
    for run in [r for _, _, r in runs] + folders[1:]:
        busy = live_writer(run, cfg.run.lock_stale_s)
        if busy:
            raise UserError(busy + "; nothing submitted")
    config_path = str(Path(config).resolve()) if Path(config).is_file() else config  # a shipped recipe's name
    calls = [SlurmTask(config_path, over, o.max_requeues, o.signal, str(run)) for _, over, run in runs]
    try:
        import submitit
    except ImportError:
        raise UserError("launch slurm needs submitit: pip install 'unidad_dist[slurm]' (or pip install "
                        "submitit)") from None
    if not o.dry_run:
        missing = [c for c in ("sbatch", "squeue", "scontrol") if shutil.which(c) is None]
        if missing:
            raise UserError(f"launch slurm: {', '.join(missing)} not found on PATH; run it on a SLURM login node "
                            "(or use `launch local`)")
    folder = rdir / SUBMITIT_FOLDER
    world = o.nodes * tasks
    if o.dry_run:
        _dry_run(params, calls, folder, rdir, o, tasks, sweep=bool(o.sweep))
        return 0
    _test_only(params, len(runs) if o.sweep else None)  # a request the cluster cannot meet: refused here
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=o.max_requeues)
    executor.update_parameters(**params)
    rdir.mkdir(parents=True, exist_ok=True)
    try:
        if o.sweep:
            with executor.batch():
                jobs = [executor.submit(call) for call in calls]
        else:
            jobs = [executor.submit(calls[0])]
    except subprocess.CalledProcessError as e:  # sbatch refused it: its own words
        out = (e.output or b"") if isinstance(e.output, bytes) else (e.output or "").encode()
        raise UserError(f"sbatch refused the job: {out.decode(errors='replace').strip() or e}") from None
    except Exception as e:  # submitit wraps sbatch's failures in its own errors
        raise UserError(f"sbatch refused the job: {e}") from None
    if o.sweep:
        print(f"launch slurm: submitted job array {str(jobs[0].job_id).split('_')[0]} ({len(jobs)} runs of "
              f"{o.nodes} node(s) x {tasks} task(s)); run folders under {rdir}; task logs {folder}", flush=True)
        for job, (_, _, run) in zip(jobs, runs):
            print(f"  job {job.job_id}: {run}")
        return 0 if o.no_wait else wait_sweep(jobs, [(p, r) for p, _, r in runs], rdir, o, poll_s)
    job = jobs[0]
    print(f"launch slurm: submitted job {job.job_id} ({o.nodes} node(s) x {tasks} task(s) = {world} ranks); run "
          f"folder {rdir}; task logs {folder}", flush=True)
    if o.no_wait:
        print(f"follow it with `unidad-dist status --run {rdir}` or `tail -f {rdir / 'train.log'}`")
        return 0
    return wait(job, rdir, o, poll_s, logs=[f / TRAIN_LOG for f in folders] or None)


def _runs(config: str, overrides: list[str], rdir: Path, sweep: list[str]) -> list[tuple[list, list[str], Path]]:
    """(point, overrides, run folder) of each run: the recipe's own, or one per sweep point (each checked)."""
    if not sweep:
        return [([], overrides, rdir)]
    runs = []
    for point in sweep_points(sweep):
        run = rdir / point_name(point)
        over = [*overrides, *(f"{k}={v}" for k, v in point), f"run.dir={run}"]
        try:
            launch_config(config, over)  # every point's values are checked before anything is submitted
        except UserError as e:
            raise UserError(f"--sweep point {point_name(point)}: {e}; nothing submitted") from None
        runs.append((point, over, run))
    return runs


def _dry_run(params: dict, calls: list, folder: Path, rdir: Path, o: SlurmOptions, tasks: int, sweep: bool) -> None:
    """Print the sbatch script submitit would write and each run's command, without needing SLURM here."""
    from submitit.slurm.slurm import _make_sbatch_string

    submit = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    array = {"map_count": len(calls)} if sweep else {}
    print(f"launch slurm (dry run, nothing submitted): {o.nodes} node(s) x {tasks} task(s) = {o.nodes * tasks} ranks"
          + (f" per run, a job array of {len(calls)} runs" if sweep else f", run folder {rdir}")
          + f", submitit folder {folder}")
    print("sbatch script:\n" + _make_sbatch_string(command=submit, folder=folder, **params, **array))
    print(f"each task: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM (submitit), "
          f"UNIDAD_STOP_SIGNALS={signal_by_name(o.signal).name[3:]}, then")
    for call in calls:
        print(f"  {shlex.join(['unidad-dist', *call.argv()])}")


def _watch(jobs: list, poll_s: float, hide: tuple = (), tick=None) -> dict:
    """Poll squeue until every job has left the queue or ended (a requeued job is PENDING / REQUEUED meanwhile,
    not gone), printing each change of state except those in ``hide``; ``tick()`` runs at every poll. The
    last state seen per job id."""
    last: dict = {}
    pending = {j.job_id for j in jobs}
    while pending:
        if tick is not None:
            tick()
        for j in jobs:
            if j.job_id not in pending:
                continue
            state = _squeue_state(str(j.job_id))
            if state != last.get(j.job_id) and state not in (None, "COMPLETING", *hide):
                print(f"launch slurm: job {j.job_id} {state}", flush=True)
            last[j.job_id] = state
            if state is None or state in TERMINAL:
                pending.discard(j.job_id)
        if pending:
            time.sleep(poll_s)
    return last


def _result(job) -> tuple[Optional[str], object]:
    """(outcome, value) from rank 0's result file — ("success", ...) or ("error", traceback) — or (None, None)."""
    from submitit.core.utils import pickle_load

    result = job.paths.result_pickle if job.num_tasks == 1 else job.task(0).paths.result_pickle
    for _ in range(20):  # a shared filesystem may show the result a moment later
        if result.exists():
            return pickle_load(result)
        time.sleep(0.5)
    return None, None


def _status(job, o: SlurmOptions, last_state: Optional[str]) -> tuple[int, str]:
    """The finished job's exit status and one line saying how it ended."""
    outcome, value = _result(job)
    if outcome is None:
        err = job.task(0).paths.stderr if job.num_tasks > 1 else job.paths.stderr
        return 1, (f"ended ({last_state or 'gone'}) without a result; rank 0's stderr ({err}) ends:\n"
                   f"{_tail(err)}")
    if outcome == "success":
        return 0, "finished"
    text = str(value).strip().splitlines()
    last = text[-1] if text else str(value)
    return (128 + signal_by_name(o.signal) if "stopped by" in last else 1), f"did not finish: {last}"


def wait(job, rdir: Path, o: SlurmOptions, poll_s: float = 2.0, logs: Optional[list] = None) -> int:
    """Stream rank 0's train.log (``logs``: each of these in turn, a chain's stages) until the job leaves the
    queue (through requeues); its exit status."""
    logs = logs or [rdir / TRAIN_LOG]
    pos = {log: log.stat().st_size if log.is_file() else 0 for log in logs}

    def follow() -> None:
        for log in logs:
            pos[log] = _follow(log, pos[log])

    last_state = _watch([job], poll_s, hide=("RUNNING",), tick=follow).get(job.job_id)  # the log shows it runs
    code, how = _status(job, o, last_state)
    follow()
    print(f"launch slurm: job {job.job_id} {how}" + (f"; run folder {rdir}" if code == 0 else ""),
          file=sys.stdout if code == 0 else sys.stderr, flush=True)
    return code


# --------------------------------------------------------------------------------------------------
# Sweeps: one job array, one run folder per point
# --------------------------------------------------------------------------------------------------
SWEEP_FILE = "sweep.json"


def sweep_points(sweeps: list[str]) -> list[list[tuple[str, str]]]:
    """``["algorithm.a=0,0.5", "train.iterations=2,3"]`` -> the product, as lists of (key, value)."""
    import itertools

    axes = []
    for item in sweeps:
        key, eq, values = item.partition("=")
        vals = [v.strip() for v in values.split(",")]
        if not eq or not key.strip() or not all(vals):
            raise UserError(f"--sweep {item!r}: give key=value1,value2,... (e.g. --sweep algorithm.a=0,0.5,0.75)")
        if any(k == key.strip() for k, _ in axes):
            raise UserError(f"--sweep names {key.strip()} twice; give its values once, comma-separated")
        axes.append((key.strip(), vals))
    return [list(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_name(point: list[tuple[str, str]]) -> str:
    """A run folder's name after its values: the keys' last parts (whole keys where two share one)."""
    last = [k.rsplit(".", 1)[-1] for k, _ in point]
    names = [k if last.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1] for k, _ in point]
    safe = lambda v: "".join(c if c.isalnum() or c in ".-+" else "_" for c in v)  # noqa: E731
    return "_".join(f"{n}={safe(v)}" for n, (_, v) in zip(names, point))


def wait_sweep(jobs: list, points: list, base: Path, o: SlurmOptions, poll_s: float = 2.0) -> int:
    """Wait for every job of the array; print and write (<base>/sweep.json) how each point ended."""
    last = _watch(jobs, poll_s)
    rows, worst = [], 0
    for j, (point, rdir) in zip(jobs, points):
        code, how = _status(j, o, last.get(j.job_id))
        worst = worst or code
        summary = {}
        if (rdir / "summary.json").is_file():
            try:
                summary = json.loads((rdir / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
        rows.append({"job": str(j.job_id), "point": dict(point), "run": str(rdir), "exit": code,
                     "outcome": how.splitlines()[0],
                     **{k: summary[k] for k in ("proxy_distance_ratio", "copy_rate", "diversity") if k in summary}})
    atomic_write_text(base / SWEEP_FILE, json.dumps(rows, indent=2) + "\n")
    print(f"launch slurm: sweep of {len(rows)} runs ended ({base / SWEEP_FILE}):")
    for r in rows:
        extra = "".join(f" {k} {r[k]:.3f}" for k in ("proxy_distance_ratio", "copy_rate", "diversity") if k in r)
        print(f"  {point_name(list(r['point'].items())):40} {r['outcome'][:60]}{extra}  {r['run']}")
    return worst
