"""`unidad-dist launch slurm` (issue 15 §1): the dry run and bad input everywhere; against a real local SLURM
(`bash tools/slurm_local.sh start`, which .ci/run does) a 2-task job that SLURM signals mid-run stops every
rank with one checkpoint, requeues, resumes and ends with weights bit-identical to an uninterrupted
`launch local` run of the same recipe; with --max-requeues 0 it ends stopped and the same command resumes it. Without a SLURM here the cluster test is skipped with the reason."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_signals import ITERS, _recipe as signals_recipe, assert_same_weights_and_export
from test_wandb import assert_one_wandb_run
from unidad_dist.cli import main



def _slurm_up() -> str | None:
    """None when a SLURM controller answers with a usable node here, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client here (bash tools/slurm_local.sh start installs and starts one)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer (no slurmctld running: bash tools/slurm_local.sh start)"
    if r.returncode != 0 or not {"idle", "mixed", "allocated"} & set(r.stdout.split()):
        return f"no usable SLURM node (sinfo: {r.stdout.strip() or r.stderr.strip()})"
    return None


def _recipe(tmp_path, pipes, name, **extra):
    return signals_recipe(tmp_path, pipes, name, **{"run.dist_timeout": 60.0, **extra})


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNIDAD_", "SLURM_", "SUBMITIT_"))}
    env.update(extra)
    return env


def test_dry_run_prints_the_job_and_submits_nothing(tmp_path, pipes, capsys, monkeypatch):
    recipe = _recipe(tmp_path, pipes, "dry")
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch needed: nothing is submitted
    assert main(["launch", "slurm", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "4", "--time", "30",
                 "--partition", "gpu", "--account", "proj", "--signal-delay", "120", "--mem", "64G",
                 "--dry-run", "train.iterations=3"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=30", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=USR2@120", "#SBATCH --mem=64G", "2 node(s) x 4 task(s) = 8 ranks"):
        assert line in out, (line, out)
    assert f"unidad-dist train --config {recipe} train.iterations=3" in out
    assert not (tmp_path / "dry" / "slurm").exists() or not list((tmp_path / "dry" / "slurm").glob("*.pkl"))
    # another signal: SLURM sends it, and submitit's own handler (before the loop starts) watches the same one
    assert main(["launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2", "--signal", "USR1",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --signal=USR1@90" in out and "export SUBMITIT_PREEMPT_SIGNAL=USR1" in out, out
    assert "UNIDAD_STOP_SIGNALS=USR1" in out


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one rank per GPU"),
    ([], "give --tasks-per-node"),
    (["--tasks-per-node", "2", "--signal", "NOPE"], "unknown signal 'NOPE'"),
    (["--tasks-per-node", "2", "--time", "1", "--signal-delay", "90"], "--signal-delay 90 s is not shorter"),
    (["--tasks-per-node", "2", "--max-requeues", "-1"], "--max-requeues >= 0"),
])
def test_bad_options_are_refused_before_anything_is_submitted(tmp_path, pipes, capsys, args, message):
    recipe = _recipe(tmp_path, pipes, "bad")
    assert main(["launch", "slurm", "--config", str(recipe), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_busy_run_folder_or_no_sbatch_is_refused_before_submitting(tmp_path, pipes, capsys, monkeypatch):
    recipe = _recipe(tmp_path, pipes, "busy")
    (tmp_path / "busy").mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "started": time.time()}
    (tmp_path / "busy" / "run.lock").write_text(json.dumps(lock))  # a live writer: this very process
    assert main(["launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert "is in use by host" in err and "nothing submitted" in err, err
    (tmp_path / "busy" / "run.lock").unlink()
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2"]) == 2
    assert "sbatch, squeue, scontrol not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "busy" / "slurm").exists()


def test_a_signal_before_the_loop_listens_requeues_the_same_task_until_max_requeues(monkeypatch):
    """submitit calls SlurmTask.checkpoint on rank 0 when the signal comes while the task still imports or
    builds: it requeues the same call (recipe, overrides, cap, signal, run folder), and — as the loop's own path
    counts — not after --max-requeues requeues (None: submitit ends the job)."""
    import pickle

    from unidad_dist.launch.slurm import SlurmTask

    task = SlurmTask("/r/recipe.yaml", ["train.iterations=9", "run.dir=/r/run"], 2, "USR2", "/r/run")
    for restarts, requeued in (("", True), ("0", True), ("1", True), ("2", False), ("5", False)):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        again = task.checkpoint()
        if not requeued:
            assert again is None, restarts
            continue
        again = pickle.loads(pickle.dumps(again))  # submitit pickles it for the requeued job
        assert again.args == () and again.kwargs == {}
        t = again.function
        assert (t.config, t.overrides, t.max_requeues, t.signal_name, t.run_dir) == (
            "/r/recipe.yaml", ["train.iterations=9", "run.dir=/r/run"], 2, "USR2", "/r/run")
        assert t.argv() == task.argv()


def _release_requeued(job_ids: set, stop: threading.Event) -> None:
    """SLURM holds a requeued job ~2 minutes (BeginTime); release it sooner, as an operator would, once the old
    allocation has wound down: released while a step of the last start is still ending, slurmd refuses to launch
    it ("Job credential revoked") and the job FAILS (seen in CI)."""
    seen: dict = {}
    while not stop.is_set():
        r = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            jid, state, reason = (line.split() + ["", "", ""])[:3]
            if state == "PENDING" and reason == "BeginTime":
                job_ids.add(jid)
                first = seen.setdefault(jid, time.time())
                steps = subprocess.run(["squeue", "-h", "-s", "-j", jid], capture_output=True, text=True).stdout
                if time.time() - first >= 10 and not steps.strip():
                    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
                    seen.pop(jid)
        stop.wait(1.0)


@pytest.mark.slow
def test_a_signalled_job_checkpoints_requeues_and_resumes_bit_identically(tmp_path, pipes):
    why = _slurm_up()
    if why:
        pytest.skip(why)
    from unidad_dist.train import checkpoint

    straight = _recipe(tmp_path, pipes, "straight")
    slurm = _recipe(tmp_path, pipes, "slurm", **{"logging.wandb": True})  # offline: one wandb run throughout
    # the uninterrupted reference comes from another launcher: the same weights whoever started the ranks (with
    # the task's thread count unset, SLURM's ranks ran with another one and ended 2.5e-7 away)
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                        str(straight)], capture_output=True, text=True, timeout=600, env=_clean_env())
    assert r.returncode == 0, r.stderr[-3000:]

    # rank 1 asks SLURM to signal the whole job before iteration 2, as a preemption or a near time limit does
    requeued: set = set()
    stop = threading.Event()
    releaser = threading.Thread(target=_release_requeued, args=(requeued, stop), daemon=True)
    releaser.start()
    try:
        r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "slurm", "--config", str(slurm),
                            "--tasks-per-node", "2", "--time", "10", "--max-requeues", "1"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path,
                           env=_clean_env(UNIDAD_SCANCEL_AT="1:iter:2:USR2", WANDB_MODE="offline",
                                          WANDB_SILENT="true"))
    finally:
        stop.set()
        releaser.join()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    assert "received SIGUSR2" in out and "requeued job" in out and "resumed from" in out, out[-3000:]
    assert len(requeued) == 1, requeued
    at = int(out.split("stopped at iteration ")[1].split()[0])
    assert 2 <= at < ITERS, at
    ckpt = tmp_path / "slurm" / "checkpoints" / checkpoint.ckpt_name(at)
    assert f"resumed from {ckpt}" in out
    assert not (tmp_path / "slurm" / "run.lock").exists()
    assert json.loads((tmp_path / "slurm" / "outcome.json").read_text())["outcome"] == "finished"
    assert_one_wandb_run(tmp_path / "slurm", starts=2)
    assert_same_weights_and_export(tmp_path, "straight", "slurm")


@pytest.mark.slow
def test_a_job_at_its_time_limit_stops_or_requeues_within_max_requeues_and_finishes(tmp_path, pipes):
    """A real time limit (--time 1): SLURM sends USR2 --signal-delay seconds before it (measured here: 8 s
    earlier still, its timer ticks every ~30 s). With --max-requeues 0 the job ends stopped (exit 128 + USR2) with
    its checkpoint; the same command with room for requeues resumes it, runs into the limit again, requeues and
    finishes. The second command trains 120 s more at the first job's rate (train.iterations may change on
    resume), so it needs more than one window whatever the machine's speed and wherever SLURM's timer tick falls;
    --max-requeues 8 leaves room."""
    why = _slurm_up()
    if why:
        pytest.skip(why)
    from unidad_dist.train import checkpoint

    iters = 5000  # more than one job's window anywhere: the first job is stopped by the limit
    recipe = _recipe(tmp_path, pipes, "timed", **{"train.iterations": iters, "checkpoint.every": 0,
                                                  "logging.every": 50})
    cmd = [sys.executable, "-m", "unidad_dist", "launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2",
           "--time", "1", "--signal-delay", "5"]
    r = subprocess.run(cmd + ["--max-requeues", "0"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=_clean_env())
    assert r.returncode == 128 + signal.SIGUSR2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "received SIGUSR2" in r.stdout and "after 0 requeue(s) (--max-requeues 0)" in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / "timed" / "outcome.json").read_text())["outcome"] == "stopped"
    first = int(r.stdout.split("stopped at iteration ")[1].split()[0])
    assert 0 <= first < iters and checkpoint.latest_complete(tmp_path / "timed").name == checkpoint.ckpt_name(first)

    # the rest: 120 s of training at the rate this job just showed, more than any one window holds, so the second
    # command meets the limit again, requeues and then finishes. A window's training time varies ~3x with where
    # SLURM's 30-s timer tick falls (measured: 20-48 s; a count of 3x the first window + 50 once finished in one
    # window whose training ran 42 s); its 120 s need 2-5 windows, within --max-requeues 8.
    train_s = float(r.stdout.split("stopped at iteration ")[1].split("(")[1].split()[0])
    iters = first + max(50, math.ceil(first / max(train_s, 1.0) * 120))
    cmd = cmd + [f"train.iterations={iters}"]
    requeued: set = set()
    stop = threading.Event()
    releaser = threading.Thread(target=_release_requeued, args=(requeued, stop), daemon=True)
    releaser.start()
    try:
        r = subprocess.run(cmd + ["--max-requeues", "8"], capture_output=True, text=True, timeout=1500,
                           cwd=tmp_path, env=_clean_env())
    finally:
        stop.set()
        releaser.join()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    assert out.count("received SIGUSR2") >= 1 and "requeued job" in out and len(requeued) >= 1, out[-3000:]
    assert f"resumed from {tmp_path / 'timed' / 'checkpoints' / checkpoint.ckpt_name(first)}" in out
    assert json.loads((tmp_path / "timed" / "outcome.json").read_text())["outcome"] == "finished"
    assert checkpoint.latest_complete(tmp_path / "timed").name == checkpoint.ckpt_name(iters)
    assert not (tmp_path / "timed" / "run.lock").exists()


def _edited_template(tmp_path, out, name: str = "torchrun.sbatch") -> str:
    """A template in slurm/ with its #SBATCH lines edited for this machine, as its header asks a user to."""
    text = (Path(__file__).resolve().parent.parent / "slurm" / name).read_text()
    for old, new in (("--nodes=2", "--nodes=1"), ("--cpus-per-task=64", "--cpus-per-task=2"),
                     ("--time=04:00:00", "--time=10"), ("--output=%x-%j.out", f"--output={out}")):
        assert f"#SBATCH {old}" in text, old
        text = text.replace(f"#SBATCH {old}", f"#SBATCH {new}")
    assert "#SBATCH --gpus-per-node=8\n" in text
    text = text.replace("#SBATCH --gpus-per-node=8\n", "")  # a CPU node
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_the_torchrun_sbatch_template_trains_a_recipe_on_2_ranks(tmp_path, pipes):
    why = _slurm_up()
    if why:
        pytest.skip(why)
    recipe = _recipe(tmp_path, pipes, "template")
    out = tmp_path / "job.out"
    env = _clean_env(RECIPE=str(recipe), GPUS_PER_NODE="2", RDZV_PORT=str(_free_port()),
                     ACTIVATE=f"export PATH={Path(sys.executable).parent}:$PATH")
    r = subprocess.run(["sbatch", "--wait", _edited_template(tmp_path, out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env=env)
    log = out.read_text() if out.is_file() else ""
    assert r.returncode == 0, (r.stdout, r.stderr, log[-3000:])
    assert "1 node(s) x 2 rank(s)" in log and "training exited with code 0" in log, log[-3000:]
    assert "2 ranks on cpu, gloo" in log, log[-3000:]
    assert json.loads((tmp_path / "template" / "outcome.json").read_text())["outcome"] == "finished"
    assert (tmp_path / "template" / "checkpoints" / f"iter_{ITERS:07d}").is_dir()


def _free_port() -> int:
    from unidad_dist.device import free_port

    return free_port()


@pytest.mark.slow
def test_the_torchrun_template_requeues_on_its_signal_and_resumes(tmp_path, pipes):
    """USR2 to the batch script (as SLURM sends it before the time limit) once training runs: every rank stops
    with a checkpoint, the job requeues itself, and the restarted job resumes and finishes."""
    why = _slurm_up()
    if why:
        pytest.skip(why)
    recipe = _recipe(tmp_path, pipes, "requeue", **{"train.iterations": 24})
    out = tmp_path / "job.out"
    env = _clean_env(RECIPE=str(recipe), GPUS_PER_NODE="2", RDZV_PORT=str(_free_port()), MAX_REQUEUES="1",
                     ACTIVATE=f"export PATH={Path(sys.executable).parent}:$PATH")
    r = subprocess.run(["sbatch", "--parsable", _edited_template(tmp_path, out)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / "requeue" / "train.log"
    requeued: set = set()
    stop = threading.Event()
    releaser = threading.Thread(target=_release_requeued, args=(requeued, stop), daemon=True)
    releaser.start()
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (log.is_file() and "training: iterations 1-" in log.read_text()):
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
        # the job passes through a moment with no queue entry (or a CANCELLED one) while it requeues: it is over
        # when the script printed its last line, or when it has been out of the queue for 20 s in a row
        deadline, gone = time.time() + 900, 0
        while time.time() < deadline and "training exited with code" not in (out.read_text() if out.is_file() else ""):
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
            gone = gone + 1 if not state.strip() or state.strip() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else 0
            if gone >= 20:
                break
            time.sleep(1)
    finally:
        stop.set()
        releaser.join()
    text = out.read_text()
    assert "asking every rank to stop" in text and "requeueing (requeue 1 of at most 1)" in text, text[-3000:]
    assert "training exited with code 0" in text, text[-3000:]
    assert requeued == {job}
    run_log = log.read_text()
    at = int(run_log.split("stopped at iteration ")[1].split()[0])
    assert 1 <= at < 24 and f"resumed from {tmp_path / 'requeue' / 'checkpoints' / f'iter_{at:07d}'}" in run_log
    assert json.loads((tmp_path / "requeue" / "outcome.json").read_text())["outcome"] == "finished"


def test_a_sweep_dry_run_lists_one_run_per_point_in_one_job_array(tmp_path, pipes, capsys, monkeypatch):
    recipe = _recipe(tmp_path, pipes, "sweep")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2", "--dry-run",
                 "--sweep", "algorithm.a=0,0.5", "--sweep", "train.iterations=2,3"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%4" in out and "a job array of 4 runs" in out, out
    for a in ("0", "0.5"):
        for n in ("2", "3"):
            assert f"algorithm.a={a} train.iterations={n} run.dir={tmp_path / 'sweep' / f'a={a}_iterations={n}'}" in out
    for bad, message in ((["--sweep", "algorithm.nope=0,1"], "unknown config key 'algorithm.nope'"),
                         (["--sweep", "algorithm.a=0,zz"], "--sweep point a=zz: algorithm.a must be a number"),
                         (["--sweep", "algorithm.a"], "give key=value1,value2"),
                         (["--sweep", "algorithm.a=0", "--sweep", "algorithm.a=1"], "names algorithm.a twice")):
        assert main(["launch", "slurm", "--config", str(recipe), "--tasks-per-node", "2", *bad]) == 2
        assert message in capsys.readouterr().err, bad
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_runs_each_point_in_its_own_folder_and_summarises(tmp_path, pipes):
    why = _slurm_up()
    if why:
        pytest.skip(why)
    recipe = _recipe(tmp_path, pipes, "sweep", **{"train.iterations": 2, "checkpoint.every": 0})
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "slurm", "--config", str(recipe),
                        "--tasks-per-node", "2", "--time", "10", "--sweep", "algorithm.a=0,0.5"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["point"] for row in rows] == [{"algorithm.a": "0"}, {"algorithm.a": "0.5"}]
    for row, a in zip(rows, (0.0, 0.5)):
        run = tmp_path / "sweep" / f"a={row['point']['algorithm.a']}"
        assert row["run"] == str(run) and row["exit"] == 0 and row["outcome"] == "finished", row
        assert yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["a"] == a
        assert json.loads((run / "outcome.json").read_text())["outcome"] == "finished"
    assert "sweep of 2 runs ended" in r.stdout


@pytest.mark.parametrize("args, said", [
    (["--tasks-per-node", "2", "--partition", "nope"], "invalid partition specified: nope"),
    (["--tasks-per-node", "64"], "Requested node configuration is not available"),
    (["--gpus-per-node", "2"], "Invalid generic resource (gres) specification"),  # a node without GPUs
])
def test_a_request_the_cluster_cannot_meet_is_refused_with_sbatchs_words(tmp_path, pipes, capsys, args, said):
    why = _slurm_up()
    if why:
        pytest.skip(why)
    recipe = _recipe(tmp_path, pipes, "refused")
    assert main(["launch", "slurm", "--config", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the job" in err and said in err and "nothing submitted" in err, err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_the_ray_sbatch_template_starts_ray_and_trains_a_recipe_on_2_workers(tmp_path, pipes):
    """slurm/ray.sbatch: a Ray head on the (single) node by srun, then `launch ray --address` with 2 workers."""
    why = _slurm_up()
    if why:
        pytest.skip(why)
    pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (pip install 'unidad_dist[ray]')")
    recipe = _recipe(tmp_path, pipes, "ray_template")
    out = tmp_path / "job.out"
    env = _clean_env(RECIPE=str(recipe), GPUS_PER_NODE="2", RAY_PORT=str(_free_port()),
                     ACTIVATE=f"export PATH={Path(sys.executable).parent}:$PATH")
    env = {k: v for k, v in env.items() if not k.startswith("RAY_") or k == "RAY_PORT"}
    r = subprocess.run(["sbatch", "--wait", _edited_template(tmp_path, out, "ray.sbatch")], capture_output=True,
                       text=True, timeout=900, cwd=tmp_path, env=env)
    log = out.read_text() if out.is_file() else ""
    assert r.returncode == 0, (r.stdout, r.stderr, log[-5000:])
    assert "1 node(s) x 2 worker(s), Ray head" in log and "training exited with code 0" in log, log[-5000:]
    assert "launch ray: 2 worker(s) x 1 CPU" in log and "2 ranks on cpu, gloo" in log, log[-5000:]
    assert json.loads((tmp_path / "ray_template" / "outcome.json").read_text())["outcome"] == "finished"
    assert (tmp_path / "ray_template" / "checkpoints" / f"iter_{ITERS:07d}").is_dir()
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split()
    assert not left, f"Ray processes outlived the job: {left}"
