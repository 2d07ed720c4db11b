"""Resume at another world size (issue 5 §6): a checkpoint written by 2 ranks resumes on 1 rank and one
written by 1 rank on 2, at ZeRO 1, 2 and 3, through DeepSpeed's universal checkpoint conversion (automatic
when the world size differs). Checked: every trainable role's weights and gathered Adam moments after the
resize equal those at save (the saved whole weights, and the state a same-size resume restores), and the
resumed runs train on to the end. A stage change is a clear error."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unidad_dist import testing

HERE = Path(__file__).resolve().parent
STAGES = (1, 2, 3)
ROLES = ("student", "fake_teacher", "target_teacher")


def _recipe(pipes, tmp: Path, name: str, stage: int, iterations: int = 2) -> Path:
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp / name, **{
        "train.iterations": iterations, "train.batch_size": 1, "checkpoint.every": 2, "run.dist_timeout": 60.0,
        "student.ema": 0.9 if stage < 3 else 0.0, **{f"{r}.zero_stage": stage for r in ROLES},
        **{f"{r}.zero3_persistence_threshold": 0 for r in ROLES}})  # every ZeRO-3 parameter partitioned
    path = tmp / f"{name}-{iterations}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _launch(tmp: Path, nproc: int, jobs: list, tag: str) -> None:
    from unidad_dist.device import free_port

    spec = tmp / f"jobs-{tag}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(HERE / "resize_worker.py"),
                        str(spec)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (tmp / f"log-{tag}.txt").write_text(r.stdout)


@pytest.fixture(scope="module")
def resized(tmp_path_factory, pipes):
    tmp = tmp_path_factory.mktemp("resize")
    # 2 ranks write R2_s, 1 rank writes R1_s (checkpoint at iteration 2)
    _launch(tmp, 2, [{"train": str(_recipe(pipes, tmp, f"R2_{s}", s))} for s in STAGES], "train2")
    _launch(tmp, 1, [{"train": str(_recipe(pipes, tmp, f"R1_{s}", s))} for s in STAGES], "train1")
    for s in STAGES:  # the continued runs start from copies, so the probes read untouched checkpoints
        for w in (1, 2):
            shutil.copytree(tmp / f"R{w}_{s}", tmp / f"C{w}_{s}")
    for w, other in ((1, 2), (2, 1)):
        jobs = []
        for s in STAGES:
            jobs += [{"probe": str(tmp / f"R{w}_{s}"), "iteration": 2, "out": str(tmp / f"same{w}_{s}.safetensors")},
                     {"probe": str(tmp / f"R{other}_{s}"), "iteration": 2,
                      "out": str(tmp / f"from{other}to{w}_{s}.safetensors")},
                     {"train": str(_recipe(pipes, tmp, f"C{other}_{s}", s, iterations=4))}]
        _launch(tmp, w, jobs, f"resume{w}")
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("saved,now", [(2, 1), (1, 2)])
def test_weights_and_adam_moments_survive_a_world_size_change(resized, stage, saved, now):
    from safetensors.torch import load_file

    from unidad_dist.train.checkpoint import role_weights

    got = load_file(str(resized / f"from{saved}to{now}_{stage}.safetensors"))
    ref = load_file(str(resized / f"same{saved}_{stage}.safetensors"))  # restored at the saving world size
    assert set(got) == set(ref) and any("/exp_avg_sq/" in k for k in got)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # the weights are those saved (whole, gathered at save time) ...
    ckpt = resized / f"R{saved}_{stage}" / "checkpoints" / "iter_0000002"
    for role in ROLES:
        saved_w = role_weights(ckpt, role)
        for k, v in got.items():
            if k.startswith(f"{role}/w/"):
                assert torch.equal(v, saved_w["module." + k[len(role) + 3:]]), k
    # ... and the moments are not trivially zero: the run had taken optimizer steps
    assert all(float(v.abs().sum()) > 0 for k, v in got.items() if "/exp_avg_sq/" in k and k.startswith("student"))
    # converted once, inside the checkpoint folder, next to the untouched saved state
    assert (ckpt / "student" / "universal").is_dir() and (ckpt / "student" / "state").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("saved,now", [(2, 1), (1, 2)])
def test_a_resized_run_trains_on_to_the_end(resized, stage, saved, now):
    from unidad_dist.train import checkpoint

    run = resized / f"C{saved}_{stage}"
    assert f"written by {saved} ranks, now {now}" in (resized / f"log-resume{now}.txt").read_text()
    last = checkpoint.latest_complete(run)
    assert last is not None and last.name == "iter_0000004"
    state = json.loads((last / "state.json").read_text())
    assert state["world_size"] == now and state["iteration"] == 4
    assert json.loads((run / "summary.json").read_text())["iterations"] == 4


def test_a_stage_change_on_resume_is_a_clear_error(tmp_path, pipes):
    from unidad_dist.config import config_from_dict
    from unidad_dist.errors import UserError
    from unidad_dist.train.loop import check_resume_compatible

    saved = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "r", **{"student.zero_stage": 2})
    new = config_from_dict(testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "r",
                                               **{"student.zero_stage": 3}))
    from unidad_dist.config import to_dict

    with pytest.raises(UserError, match=r"ZeRO stage cannot change on resume: student.zero_stage=2"):
        check_resume_compatible(to_dict(config_from_dict(saved)), new)


def test_more_iterations_on_resume_is_refused_only_when_a_schedule_decays_to_them(tmp_path, pipes):
    from unidad_dist.config import config_from_dict, to_dict
    from unidad_dist.errors import UserError
    from unidad_dist.train.loop import check_resume_compatible

    def cfg(**over):
        return config_from_dict(testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "r", **over))

    assert "train.iterations" in check_resume_compatible(to_dict(cfg(**{"train.iterations": 4})),
                                                         cfg(**{"train.iterations": 8}))
    cos = {"fake_teacher.optimizer.schedule": "cosine", "fake_teacher.optimizer.warmup": 0}
    with pytest.raises(UserError, match=r"fake_teacher.optimizer.schedule decays the learning rate to train.iterations"):
        check_resume_compatible(to_dict(cfg(**cos, **{"train.iterations": 4})), cfg(**cos, **{"train.iterations": 8}))
    with pytest.raises(UserError, match=r"warmup=4 is not below train.iterations=4"):
        cfg(**{"student.optimizer.schedule": "linear", "student.optimizer.warmup": 4, "train.iterations": 4})
