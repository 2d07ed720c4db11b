"""run.lock: one live writer per run folder; a dead writer's lock is taken over (issue 5 §5)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.train.runlock import LOCK, RunLock


class _Rt:
    is_main, distributed = True, False


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder, **info):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": None,
                                           "started": time.time(), **info}))


def test_live_writer_refuses_a_second_one(tmp_path, pipes, capsys):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run", **{"train.iterations": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    _write_lock(tmp_path / "run")  # this very process: alive
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "is in use by host" in err and f"pid {os.getpid()}" in err and "remove" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]  # nothing else was written
    # the dead writer's lock is taken over; the run finishes and removes its lock
    _write_lock(tmp_path / "run", pid=_dead_pid())
    assert main(["train", "--config", str(recipe)]) == 0
    assert "taking over" in capsys.readouterr().out
    assert not (tmp_path / "run" / LOCK).exists() and (tmp_path / "run" / "summary.json").is_file()


def test_lock_rules(tmp_path, monkeypatch):
    lock = RunLock(tmp_path / "a", stale_s=60)
    lock.acquire(_Rt())
    assert json.loads((tmp_path / "a" / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(Exception, match="in use"):
        RunLock(tmp_path / "a", stale_s=60).acquire(_Rt())
    lock.release()
    assert not (tmp_path / "a" / LOCK).exists()
    # another host, fresh heartbeat: refused; stale heartbeat: taken over
    _write_lock(tmp_path / "b", host="elsewhere", pid=1)
    with pytest.raises(Exception, match="elsewhere"):
        RunLock(tmp_path / "b", stale_s=60).acquire(_Rt())
    old = time.time() - 120
    os.utime(tmp_path / "b" / LOCK, (old, old))
    RunLock(tmp_path / "b", stale_s=60).acquire(_Rt())
    assert json.loads((tmp_path / "b" / LOCK).read_text())["host"] == socket.gethostname()
    # a requeued scheduler job (same job id) takes over its own lock, even from another host
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path / "c", host="node7", pid=1, job="SLURM_JOB_ID=4242")
    RunLock(tmp_path / "c", stale_s=60).acquire(_Rt())
    # an unreadable lock (a writer killed while creating it) is stale
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / LOCK).write_text("{")
    RunLock(tmp_path / "d", stale_s=60).acquire(_Rt())


def test_frozen_teacher_recorded_by_path_and_sha256_and_checked_on_resume(tmp_path, pipes):
    import shutil

    from safetensors.torch import load_file, save_file

    pipe = tmp_path / "pipe"
    shutil.copytree(pipes["pixel"], pipe)
    rec = testing.tiny_recipe(pipe, pipes["shots"], tmp_path / "run", **{"train.iterations": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    assert main(["train", "--config", str(recipe)]) == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000001" / "state.json").read_text())
    src = state["frozen"]["source_teacher"]
    assert src["path"].startswith(str(pipe)) and len(src["sha256"]) == 64
    assert not any("source_teacher" in p.name for p in (tmp_path / "run" / "checkpoints" / "iter_0000001").iterdir())
    # the teacher's weights change under the run: resuming stops with a clear error, nothing is written
    sd = load_file(src["path"])
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, src["path"])
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert main(["train", "--config", str(recipe), "train.iterations=2"]) == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_engine_checkpoints_carry_universal_checkpoint_info(tmp_path, pipes):
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

    from unidad_dist.parallel.ds_io import _safe_globals

    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run", **{
        "train.iterations": 1, "student.zero_stage": 2, "fake_teacher.zero_stage": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    assert main(["train", "--config", str(recipe)]) == 0
    for role in ("student", "fake_teacher", "target_teacher"):
        f = tmp_path / "run" / "checkpoints" / "iter_0000001" / role / "state" / "mp_rank_00_model_states.pt"
        with torch.serialization.safe_globals(_safe_globals()):  # as our checkpoint engine loads it
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        assert UNIVERSAL_CHECKPOINT_VERSION_KEY in sd[UNIVERSAL_CHECKPOINT_INFO], role


def test_two_writers_that_both_judged_a_lock_stale_do_not_both_hold_it(tmp_path):
    """Issue 12 §9: B judged the dead writer's lock stale, then A took it over first; B must not remove A's
    new lock (the old takeover unlinked whatever file was there)."""
    _write_lock(tmp_path, pid=_dead_pid())
    seen_by_b = (tmp_path / LOCK).stat()
    a = RunLock(tmp_path, stale_s=60)
    a.acquire(_Rt())
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    a_file = (tmp_path / LOCK).read_text()
    b = RunLock(tmp_path, stale_s=60)
    assert b._remove_stale(seen_by_b) is False
    assert (tmp_path / LOCK).read_text() == a_file  # A's lock is where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing left beside it
    with pytest.raises(Exception, match="in use"):
        b.acquire(_Rt())
    # the file B judged is the one there: B removes it
    a.release()
    _write_lock(tmp_path, pid=_dead_pid())
    assert b._remove_stale((tmp_path / LOCK).stat()) is True and not (tmp_path / LOCK).exists()


def test_prune_renames_before_deleting_and_resume_drops_the_rerun_iterations_from_metrics(tmp_path, pipes):
    """Issue 12 §9: an interrupted prune leaves no half-deleted iter_* (only a .trash-* that the next prune
    removes), and metrics.jsonl holds each iteration once after a resume."""
    import shutil

    from unidad_dist.train import checkpoint

    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run", **{
        "train.iterations": 4, "checkpoint.every": 1, "checkpoint.keep": 2, "logging.every": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    calls = []
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):  # the prune dies half-way through deleting its first folder
        calls.append(os.path.basename(str(path)))
        if os.path.basename(str(path)).startswith((".trash-iter_", "iter_")) and os.path.isdir(path):
            victim = sorted(p.path for p in os.scandir(path) if p.is_dir())[0]
            real_rmtree(victim)
            raise KeyboardInterrupt("killed while pruning")
        return real_rmtree(path, *a, **k)

    assert main(["train", "--config", str(recipe), "train.iterations=2"]) == 0
    checkpoint.shutil.rmtree = interrupted_rmtree
    try:
        with pytest.raises(KeyboardInterrupt):
            main(["train", "--config", str(recipe), "train.iterations=3"])
    finally:
        checkpoint.shutil.rmtree = real_rmtree
    ck = tmp_path / "run" / "checkpoints"
    for p in checkpoint.all_checkpoints(tmp_path / "run"):
        assert checkpoint.is_complete(p), f"{p.name} is half deleted"
    assert list(ck.glob(".trash-iter_*"))  # what the interrupted prune was deleting, out of the way
    # as if killed after logging iteration 2 but before checkpoint 3 was published: the resume runs 2 again
    real_rmtree(ck / checkpoint.ckpt_name(3))
    assert main(["train", "--config", str(recipe)]) == 0
    assert not list(ck.glob(".trash-iter_*"))
    its = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert its == [0, 1, 2, 3], its
