"""Auto-resume after SIGKILL (issue 5 §5): 2 ranks, a rank killed at seeded points (one while a
checkpoint is being written), the same command rerun each time -> the final checkpoint (whole weights and
every DeepSpeed state file: weights, optimizer partitions, counters) and the exported student are bit-
identical to an uninterrupted run. At ZeRO-2 and ZeRO-3; at ZeRO-2 the killed run writes its checkpoints
asynchronously (checkpoint.async: the kill inside a checkpoint hits the background writer while training goes on)
and is still bit-identical to the synchronous uninterrupted run."""
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.cli import main

ITERS = 6


def _launch(recipe, kill=None):
    env = {k: v for k, v in os.environ.items() if k != "UNIDAD_KILL_AT"}
    if kill:
        env["UNIDAD_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                           str(recipe)], capture_output=True, text=True, timeout=400, env=env)


def _kill_points(seed: int) -> list[str]:
    """One iteration point and one inside a checkpoint write, on a seeded rank, in the order a run meets them."""
    rng = random.Random(seed)
    pts = [(rng.randrange(1, ITERS), "iter:{}"), (rng.choice([2, 4]) - 0.5, "ckpt:{}")]
    pts = sorted((k, tpl.format(int(k + 0.5) if "ckpt" in tpl else k)) for k, tpl in pts)
    return [f"{rng.randrange(2)}:{p}" for _, p in pts]


def _load_ds(path):
    from unidad_dist.parallel.ds_io import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _zero3_unpadded(state_dir, name: str, rank: int, world: int = 2):
    """A ZeRO-3 optimizer file with each fp32 partition cut to its parameters' elements: DeepSpeed pads each
    parameter's partition to ceil(numel / world) with never-used (uninitialised) memory."""
    import math

    sd = _load_ds(state_dir / name)
    shapes = _load_ds(state_dir / name.replace("optim_states", "model_states"))["param_shapes"]
    flat = sd["optimizer_state_dict"]["fp32_flat_groups"]
    for g, group_shapes in enumerate(shapes):
        keep, off = [], 0
        for shape in group_shapes.values():
            n = math.prod(shape)
            ps = math.ceil(n / world)
            keep.append(flat[g][off:off + max(0, min(ps, n - rank * ps))])
            off += ps
        assert off == flat[g].numel()
        flat[g] = torch.cat(keep)
    return sd


def _same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # DeepSpeed objects (loss scaler): by fields
        assert type(a) is type(b), where
        _same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkilled_ranks_resume_bit_identically(tmp_path, pipes, stage):
    from safetensors.torch import load_file

    from unidad_dist.train.checkpoint import role_weights

    recipes = {}
    for name in ("straight", "killed"):
        rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / name, **{
            "train.iterations": ITERS, "train.batch_size": 1, "train.fake_updates_per_student": 2,
            "checkpoint.every": 2, "run.dist_timeout": 30.0, "student.zero_stage": stage,
            "fake_teacher.zero_stage": stage, "target_teacher.zero_stage": stage,
            "checkpoint.async": name == "killed" and stage == 2})
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(rec))
    r = _launch(recipes["straight"])
    assert r.returncode == 0, r.stderr[-3000:]
    points = _kill_points(seed=stage)
    assert any("ckpt" in p for p in points)
    for p in points:
        r = _launch(recipes["killed"], kill=p)
        assert r.returncode != 0, f"{p} did not kill the run"
        if ":ckpt:" in p:  # killed while writing: a temporary folder, never a published checkpoint
            n = int(p.rsplit(":", 1)[1])
            ck = tmp_path / "killed" / "checkpoints"
            assert (ck / f".tmp-iter_{n:07d}").is_dir() and not (ck / f"iter_{n:07d}").exists()
    r = _launch(recipes["killed"])  # the same command, no flags: resumes and finishes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a = tmp_path / "straight" / "checkpoints" / f"iter_{ITERS:07d}"
    b = tmp_path / "killed" / "checkpoints" / f"iter_{ITERS:07d}"
    for role in ("student", "fake_teacher", "target_teacher"):
        wa, wb = role_weights(a, role), role_weights(b, role)
        _same(wa, wb, role)
        files = sorted(p.relative_to(a) for p in (a / role).rglob("*.pt"))
        assert files == sorted(p.relative_to(b) for p in (b / role).rglob("*.pt"))
        assert any("optim_states" in str(f) for f in files)  # the optimizer partitions are compared too
        for f in files:
            if stage == 3 and "optim_states" in f.name:
                r = int(f.name.split("_")[3])  # zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                _same(_zero3_unpadded(a / f.parent, f.name, r), _zero3_unpadded(b / f.parent, f.name, r), f"{role}/{f}")
            else:
                _same(_load_ds(a / f), _load_ds(b / f), f"{role}/{f}")
    for name in ("straight", "killed"):
        assert main(["export", "--run", str(tmp_path / name), "--out", str(tmp_path / f"export_{name}")]) == 0
    _same(load_file(str(tmp_path / "export_straight" / "unet" / "diffusion_pytorch_model.safetensors")),
          load_file(str(tmp_path / "export_killed" / "unet" / "diffusion_pytorch_model.safetensors")), "export")
