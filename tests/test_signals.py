"""Stopping a run with a signal (issue 12 §1): SIGTERM to `launch local` reaches every rank, which stop
together at an iteration boundary with a checkpoint, release the lock and exit; no rank outlives the
launcher; the same command resumes and ends bit-identical to an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from unidad_dist import testing

ITERS = 8


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _recipe(tmp_path, pipes, name, **extra):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / name, **{
        "train.iterations": ITERS, "train.batch_size": 1, "train.fake_updates_per_student": 2,
        "checkpoint.every": 4, "checkpoint.keep": 10, "run.dist_timeout": 30.0, "student.zero_stage": 2,
        "fake_teacher.zero_stage": 2, "target_teacher.zero_stage": 2, **extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _launch(recipe, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIDAD_")}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                             str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint_and_resumes_bit_identically(tmp_path, pipes):
    from unidad_dist.train import checkpoint

    straight, stopped = _recipe(tmp_path, pipes, "straight"), _recipe(tmp_path, pipes, "stopped")
    p = _launch(straight)
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]

    # rank 1 sends SIGTERM to the launcher before iteration 3, as `kill <launcher pid>` would
    p = _launch(stopped, {"UNIDAD_SIGTERM_PARENT_AT": "1:iter:3"})
    ranks: set[int] = set()
    deadline = time.time() + 120
    while len(ranks) < 2 and p.poll() is None and time.time() < deadline:
        ranks |= _children(p.pid)
        time.sleep(0.05)
    assert len(ranks) == 2, "did not see both ranks start"
    out, err = p.communicate(timeout=400)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not [pid for pid in ranks if _alive(pid)], "a rank outlived the launcher"
    m = re.search(r"stopped by SIGTERM after iteration (\d+) of 8; checkpoint iter_(\d+) written", err)
    assert m and m.group(1) == str(int(m.group(2))), err[-3000:]
    at = int(m.group(1))
    assert 3 <= at < ITERS, at  # the run stopped mid-way, at a boundary that is no periodic checkpoint
    assert checkpoint.latest_complete(tmp_path / "stopped") == tmp_path / "stopped" / "checkpoints" / checkpoint.ckpt_name(at)
    assert not (tmp_path / "stopped" / "run.lock").exists(), "the lock was not released"
    assert err.count("stopped by SIGTERM") == 1  # one line, from rank 0

    p = _launch(stopped)  # the same command resumes and finishes
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints' / checkpoint.ckpt_name(at)}" in out
    assert_same_weights_and_export(tmp_path, "straight", "stopped")


def assert_same_weights_and_export(tmp_path, a_name: str, b_name: str) -> None:
    """Two runs under tmp_path end with the same trained roles (at ITERS) and the same exported student, bit for bit."""
    from safetensors.torch import load_file

    from test_resume_kill import _same
    from unidad_dist.cli import main
    from unidad_dist.train import checkpoint
    from unidad_dist.train.checkpoint import role_weights

    a = tmp_path / a_name / "checkpoints" / checkpoint.ckpt_name(ITERS)
    b = tmp_path / b_name / "checkpoints" / checkpoint.ckpt_name(ITERS)
    for role in ("student", "fake_teacher", "target_teacher"):
        _same(role_weights(a, role), role_weights(b, role), role)
    for name in (a_name, b_name):
        assert main(["export", "--run", str(tmp_path / name), "--out", str(tmp_path / f"export_{name}")]) == 0
    _same(load_file(str(tmp_path / f"export_{a_name}" / "unet" / "diffusion_pytorch_model.safetensors")),
          load_file(str(tmp_path / f"export_{b_name}" / "unet" / "diffusion_pytorch_model.safetensors")), "export")


def test_one_process_stops_at_the_boundary_with_or_without_a_checkpoint(tmp_path, pipes):
    """`unidad-dist train` itself (no launcher): SIGTERM during iteration 2 -> the iteration finishes, a
    checkpoint of iteration 3 is written (checkpoint.on_signal) or none is (=false), exit 143, lock gone."""
    from unidad_dist.train import checkpoint

    for on_signal in (True, False):
        name = f"run_{on_signal}"
        rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / name, **{
            "train.iterations": 6, "checkpoint.every": 2, "checkpoint.on_signal": on_signal})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(rec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIDAD_")}
        env["UNIDAD_SIGTERM_SELF_AT"] = "0:iter:2"
        r = subprocess.run([sys.executable, "-m", "unidad_dist", "train", "--config", str(path)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
        assert "stopped by SIGTERM after iteration 3 of 6" in r.stderr, r.stderr[-3000:]
        latest = checkpoint.latest_complete(tmp_path / name).name
        assert latest == (checkpoint.ckpt_name(3) if on_signal else checkpoint.ckpt_name(2)), latest
        assert ("no checkpoint written" in r.stderr) is (not on_signal)
        assert not (tmp_path / name / "run.lock").exists()
        assert "Traceback" not in r.stderr
