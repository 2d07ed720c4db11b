"""Two ranks on 127.0.0.1 (gloo) through `unidad-dist launch local` — every trainable role's DeepSpeed
engine averages its gradients over the ranks, so 2 ranks x batch b equal 1 rank x batch 2b."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from unidad_dist import testing


def _recipe(tmp_path, pipe, shots, name, batch, **over):
    rec = testing.tiny_recipe(pipe, shots, tmp_path / name, **{
        "train.batch_size": batch, "train.iterations": 3, "train.fake_updates_per_student": 1,
        "run.dist_timeout": 60.0, "eval.num_samples": 4,
        # a large Adam eps keeps updates proportional to gradients, so float rounding in the all-reduce
        # cannot be blown up to lr-sized differences on near-zero gradients
        "student.optimizer.eps": 1e-3, "fake_teacher.optimizer.eps": 1e-3, "target_teacher.optimizer.eps": 1e-3,
        **over})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path, tmp_path / name


def _launch(nproc, recipe, *over, timeout=300):
    return subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", str(nproc),
                           "--config", str(recipe), *over], capture_output=True, text=True, timeout=timeout)


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, pipes):
    from unidad_dist.train.checkpoint import role_weights

    pipe = testing.write_pixel_pipeline(tmp_path / "v", prediction_type="v_prediction")
    one, dir1 = _recipe(tmp_path, pipe, pipes["shots"], "one", 4)
    two, dir2 = _recipe(tmp_path, pipe, pipes["shots"], "two", 2)
    r1 = _launch(1, one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(2, two, "logging.every=1")  # overrides after the options reach every rank
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (dir2 / "checkpoints" / "iter_0000003" / "rng_rank1.pt").is_file()
    for role in ("student", "fake_teacher", "target_teacher"):
        a = role_weights(dir1 / "checkpoints" / "iter_0000003", role)
        b = role_weights(dir2 / "checkpoints" / "iter_0000003", role)
        init = role_weights(dir1 / "checkpoints" / "iter_0000000", role) \
            if (dir1 / "checkpoints" / "iter_0000000").exists() else None
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=f"{role}.{k}")
        assert init is None or any(not torch.equal(a[k], init[k]) for k in a), f"{role} did not train"
    summary = json.loads((dir2 / "summary.json").read_text())
    assert summary["iterations"] == 3
    assert len((dir2 / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_dying_rank_fails_the_launch(tmp_path, pipes):
    """SIGKILL rank 1 mid-run: rank 0 must not hang, and the launcher returns non-zero within the timeout."""
    import os
    import signal
    import time

    import psutil

    recipe, rdir = _recipe(tmp_path, pipes["pixel"], pipes["shots"], "die", 1,
                           **{"run.dist_timeout": 20.0, "train.iterations": 100000})
    launcher = subprocess.Popen([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2",
                                 "--config", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.time() + 180
        while not (rdir / "metrics.jsonl").is_file():  # both ranks are in the loop
            assert launcher.poll() is None, launcher.stderr.read()[-2000:]
            assert time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        ranks = {int(c.environ().get("RANK", -1)): c for c in psutil.Process(launcher.pid).children()}
        os.kill(ranks[1].pid, signal.SIGKILL)
        killed = time.time()
        code = launcher.wait(timeout=120)
        assert code != 0
        assert time.time() - killed < 20.0 + 15.0
        assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in ranks.values())
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_split_placement_resumes_bit_identically(tmp_path, pipes):
    """Split placement through the launcher (each side saves its own engines, ZeRO-1/2 inside the groups):
    2 + 2 iterations with a restart equal 4 uninterrupted iterations, bit for bit."""
    from unidad_dist.train.checkpoint import role_weights

    over = {"placement.mode": "split", "student.zero_stage": 1, "fake_teacher.zero_stage": 2,
            "target_teacher.zero_stage": 2, "student.ema": 0.9, "checkpoint.every": 2}
    full, dfull = _recipe(tmp_path, pipes["pixel"], pipes["shots"], "full", 2, **{**over, "train.iterations": 4})
    part, dpart = _recipe(tmp_path, pipes["pixel"], pipes["shots"], "part", 2, **{**over, "train.iterations": 2})
    for recipe, extra in ((full, []), (part, []), (part, ["train.iterations=4"])):
        r = _launch(2, recipe, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    for role in ("student", "fake_teacher", "target_teacher"):
        a = role_weights(dfull / "checkpoints" / "iter_0000004", role)
        b = role_weights(dpart / "checkpoints" / "iter_0000004", role)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role}.{k}"


def _same_roles(dir_a, dir_b, iteration: int) -> None:
    from unidad_dist.train.checkpoint import ckpt_name, role_weights

    for role in ("student", "fake_teacher", "target_teacher"):
        a = role_weights(dir_a / "checkpoints" / ckpt_name(iteration), role)
        b = role_weights(dir_b / "checkpoints" / ckpt_name(iteration), role)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=f"{role}.{k}")


@pytest.mark.slow
def test_a_global_batch_trains_the_same_on_2_ranks_on_1_and_across_a_resize(tmp_path, pipes):
    """train.global_batch_size=4 with micro-batches of at most 2: 2 ranks x 2 x 1 step and 1 rank x 2 x 2 accumulated
    steps give the same weights, and a 2-rank run resumed on 1 rank continues the same trajectory."""
    import shutil

    # (the target teacher's warm start, whose Adam has eps 1e-8, is compared in tests/test_unidad_step.py)
    over = {"train.global_batch_size": 4, "train.iterations": 4, "checkpoint.every": 2}
    pipe = testing.write_pixel_pipeline(tmp_path / "v", prediction_type="v_prediction")
    two, dir2 = _recipe(tmp_path, pipe, pipes["shots"], "two", 2, **over)
    one, dir1 = _recipe(tmp_path, pipe, pipes["shots"], "one", 2, **over)
    resized, dir_r = _recipe(tmp_path, pipe, pipes["shots"], "resized", 2, **over)
    r = _launch(2, two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 = 2 rank(s) x micro-batch 2 x 1 accumulation step(s)" in r.stdout, r.stdout[-3000:]
    r = _launch(1, one)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 = 1 rank(s) x micro-batch 2 x 2 accumulation step(s)" in r.stdout, r.stdout[-3000:]
    _same_roles(dir2, dir1, 4)
    # the resized run: the 2-rank run's folder cut back to its checkpoint 2, continued on 1 rank
    shutil.copytree(dir2, dir_r)
    shutil.rmtree(dir_r / "checkpoints" / "iter_0000004")
    (dir_r / "checkpoints" / "latest").write_text("iter_0000002")
    r = _launch(1, resized, f"run.dir={dir_r}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 ranks, now 1" in r.stdout, r.stdout[-3000:]
    _same_roles(dir2, dir_r, 4)
    # config.yaml keeps the recipe's values; a world size that cannot split the batch is refused before starting
    assert yaml.safe_load((dir2 / "config.yaml").read_text())["train"]["batch_size"] == 2
    r = _launch(3, one, "run.dir=" + str(tmp_path / "three"))
    assert r.returncode == 2 and "cannot be split over 3 ranks; run on 1, 2, 4 ranks" in r.stderr, r.stderr[-2000:]
    # the report says what each rank trained with at the latest checkpoint's world size
    for rdir, per_rank in ((dir2, "micro-batch 2 x 1 accumulation"), (dir_r, "micro-batch 2 x 2 accumulation")):
        r = subprocess.run([sys.executable, "-m", "unidad_dist", "report", "--run", str(rdir), "--no-plot"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and f"global batch 4 (at this world size: {per_rank}" in r.stdout, r.stdout[:2000]


@pytest.mark.slow
def test_the_student_ema_at_zero3_is_sharded_and_equals_zero2s(tmp_path, pipes):
    """student.ema at ZeRO-3 (every parameter partitioned over 2 ranks): the same EMA as at ZeRO-2 (fp32
    tolerance) in the checkpoint's whole-weights file, the same samples from it (the evaluation after training
    samples with the EMA), and a resume on 1 rank re-partitions it and continues the same EMA."""
    import shutil

    from unidad_dist.train.checkpoint import role_weights

    over = {"train.iterations": 4, "checkpoint.every": 2, "checkpoint.keep": 5, "student.ema": 0.5,
            "train.global_batch_size": 4,  # the resumed run on 1 rank keeps the batch
            # a warm start: the "initial" evaluation runs on every rank's plain student before the engines
            "student.warm_start": 2, "student.warm_start_pairs": 4, "student.warm_start_batch": 2,
            "student.warm_start_teacher_steps": 2}
    z3 = {f"{r}.zero_stage": 3 for r in ("student", "fake_teacher", "target_teacher")}
    z3.update({f"{r}.zero3_persistence_threshold": 0 for r in ("student", "fake_teacher", "target_teacher")})
    pipe = testing.write_pixel_pipeline(tmp_path / "v", prediction_type="v_prediction")
    r2, dir2 = _recipe(tmp_path, pipe, pipes["shots"], "z2", 2, **over)
    r3, dir3 = _recipe(tmp_path, pipe, pipes["shots"], "z3", 2, **over, **z3)
    rr, dir_r = _recipe(tmp_path, pipe, pipes["shots"], "z3_resized", 2, **over, **z3)
    for recipe in (r2, r3):
        r = _launch(2, recipe)
        assert r.returncode == 0, r.stderr[-3000:]
    a = role_weights(dir2 / "checkpoints" / "iter_0000004", "student")
    b = role_weights(dir3 / "checkpoints" / "iter_0000004", "student")
    init = role_weights(dir3 / "checkpoints" / "iter_0000000", "student")
    ema = [k for k in a if k.startswith("ema.")]
    assert ema and set(ema) == {k for k in b if k.startswith("ema.")}
    for k in ema:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
    moved = [k for k in ema if not torch.equal(b[k], init[k])]
    assert moved and any(not torch.equal(b[k], b["module." + k[4:]]) for k in moved)  # an EMA, not the weights
    s2, s3 = (json.loads((d / "summary.json").read_text()) for d in (dir2, dir3))
    for key in ("proxy_distance_ratio", "diversity"):
        assert abs(s2[key] - s3[key]) < 1e-3, (key, s2[key], s3[key])
    assert s2["proxy_distance_initial"] == s3["proxy_distance_initial"] != s3["proxy_distance_before"]
    # resumed on 1 rank from the 2-rank ZeRO-3 checkpoint 2
    shutil.copytree(dir3, dir_r)
    shutil.rmtree(dir_r / "checkpoints" / "iter_0000004")
    (dir_r / "checkpoints" / "latest").write_text("iter_0000002")
    r = _launch(1, rr)
    assert r.returncode == 0, r.stderr[-3000:]
    c = role_weights(dir_r / "checkpoints" / "iter_0000004", "student")
    for k in ema:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
