"""Speed, memory and utilisation in metrics.jsonl (train/perf.py): FLOPs per iteration against torch's flop
counter over real iterations, phase times against the iteration time, memory from every rank, the peak table
and MFU (never on a CPU or an unknown device)."""
import json
import os
import random
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.utils.flop_counter as flop_counter
from torch.utils.flop_counter import FlopCounterMode

from unidad_dist import testing
from unidad_dist.config import config_from_dict
from unidad_dist.core import hardware
from unidad_dist.core.timing import PhaseTimer
from unidad_dist.device import Runtime, free_port
from unidad_dist.methods.unidad import UniDAD
from unidad_dist.parallel import engines
from unidad_dist.parallel.plan import IterationFlops, PlanCache, _rng_kept, make_plan
from unidad_dist.train.build import build
from unidad_dist.train.logging import RunLogger
from unidad_dist.train.loop import train
from unidad_dist.train import perf as perf_module
from unidad_dist.train.perf import Perf, peak_rss_bytes

ATEN = torch.ops.aten
# torch's counter has no formula for the CPU flash-attention kernel (its CUDA kernels have one): the same one
CPU_ATTENTION = {
    ATEN._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
}
PHASES = ("data", "student", "fake_teacher", "target_teacher", "checkpoint", "eval")


def test_flops_per_iteration_match_the_flop_counter(make_cfg, rt):
    """The FLOPs the run logs (IterationFlops: the planner's passes — CFG batches, GAN passes, backward
    simulation, the update ratio) equal what torch's flop counter counts over the same real iterations: one
    that steps the student and one that does not."""
    cfg = make_cfg("sd15", **{"train.fake_updates_per_student": 2, "gan_heads.lambda_g": 0.5,
                              "source_teacher.cfg": 2.0, "target_teacher.cfg": 1.5})
    fl = IterationFlops(cfg, 1, cache=PlanCache(disk=False))
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    method = UniDAD(cfg, models, rt)
    counted = []
    for it in range(2):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as fc:
            method.step(it)
        counted.append(fc.get_total_flops())
        assert fl.total(it) == pytest.approx(counted[-1], rel=0.10), (it, fl.roles(it))
    assert counted[1] < 0.8 * counted[0]  # the iteration without the student's update is cheaper


def test_the_run_counts_flops_as_plan_does(make_cfg):
    """`unidad-dist plan`'s FLOPs per iteration (per rank holding a role, averaged over the plan period) are the
    run's, in split placement too."""
    cfg = make_cfg("sd15", **{"train.fake_updates_per_student": 3, "source_teacher.cfg": 2.0,
                              "placement.mode": "split", "student.activation_checkpointing": True})
    plan = make_plan(cfg, 4)
    fl = IterationFlops(cfg, 4)
    for role, rp in plan.roles.items():
        assert sum(fl.roles(it).get(role, 0.0) for it in range(3)) / 3 == pytest.approx(rp.flops_per_iteration)
    assert fl.total(0) == pytest.approx(sum(f * 2 for f in fl.roles(0).values()))  # 2 ranks per side
    assert set(fl.ranks(0)[0]) == {"student", "source_teacher"} and set(fl.ranks(0)[3]) == {"fake_teacher",
                                                                                           "target_teacher"}


def test_iteration_flops_change_no_random_state(make_cfg):
    cfg = make_cfg("sd15", **{"student.lora.rank": 4})
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    fl = IterationFlops(cfg, 2, cache=PlanCache(disk=False, memory=False))  # every meta pass run afresh
    assert fl.total(0) > 0 and fl.total(7) > 0
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()
    # and the guard it runs under puts back what a constructor would draw
    with _rng_kept():
        torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()


@pytest.fixture(scope="module")
def trained(pipes, tmp_path_factory):
    """A 4-iteration run logged every 2 iterations, with a checkpoint and a sample grid inside a window."""
    rdir = tmp_path_factory.mktemp("perf") / "run"
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], rdir, **{
        "train.iterations": 4, "train.fake_updates_per_student": 2, "logging.every": 2, "checkpoint.every": 2,
        "logging.sample_every": 2, "gan_heads.lambda_g": 0.5})
    cfg = config_from_dict(rec)
    train(cfg)
    lines = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    return cfg, lines


def test_metrics_lines_carry_speed_memory_and_flops(trained):
    cfg, lines = trained
    assert [x["iteration"] for x in lines] == [0, 2, 3]
    for x in lines:
        for key in [f"time/{p}_s" for p in PHASES] + ["time/iteration_s", "throughput/samples_per_s",
                                                      "memory/rank0/rss_gib", "perf/flops_per_iteration",
                                                      "perf/achieved_tflops", "seconds_per_iteration"]:
            assert key in x, (key, x["iteration"])
        assert "perf/mfu" not in x  # a CPU: achieved FLOP/s only
        assert "memory/rank0/max_allocated_gib" not in x
        assert 0.1 < x["memory/rank0/rss_gib"] < 64
        # global samples: batch_size per rank and micro-batch x micro-batches x data-parallel ranks (1 x 1 here)
        assert x["throughput/samples_per_s"] * x["time/iteration_s"] == pytest.approx(cfg.train.batch_size)
        assert x["perf/achieved_tflops"] * 1e12 * x["time/iteration_s"] == pytest.approx(x["perf/flops_per_iteration"])
    fl = IterationFlops(cfg, 1)
    windows = {0: [0], 2: [1, 2], 3: [3]}
    for x in lines:
        its = windows[x["iteration"]]
        assert x["perf/flops_per_iteration"] == pytest.approx(sum(fl.total(i) for i in its) / len(its))
    # the save after iteration 2 and the grid after it fall in the window logged at iteration 2 (iterations 1-2)
    assert lines[1]["time/checkpoint_s"] > 0 and lines[1]["time/eval_s"] > 0
    assert lines[0]["time/checkpoint_s"] == 0 and lines[0]["time/eval_s"] == 0


def test_phase_times_add_up_to_the_iteration_time(trained):
    _, lines = trained
    for x in lines:
        phases = sum(x[f"time/{p}_s"] for p in PHASES)
        assert phases == pytest.approx(x["time/iteration_s"], rel=0.10), x


def test_phase_timer_partitions_nested_phases(monkeypatch):
    clock = iter(range(0, 100, 1))
    monkeypatch.setattr("unidad_dist.core.timing.time.perf_counter", lambda: float(next(clock)))
    t = PhaseTimer(torch.device("cpu"))
    with t.phase("a"):  # 0
        with t.phase("b"):  # 1 .. 2
            pass
        with t.phase("a"):  # 3 .. 4: counted once
            pass
    # a: 0-1, 2-3 (outer), 3-4 (inner), 4-5 (outer) = 4; b: 1
    t.add("c", 2.5)
    assert t.take() == {"a": 4.0, "b": 1.0, "c": 2.5}
    assert t.take() == {"a": 0.0, "b": 0.0, "c": 0.0}  # every phase met so far, 0 when absent since


@pytest.mark.parametrize("name,row,bf16", [
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5), ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5), ("NVIDIA H200", "H200", 989.5), ("NVIDIA GH200 480GB", "H200", 989.5),
    ("NVIDIA L40S", "L40S", 362.05), ("NVIDIA L40", "L40", 181.05), ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10", "A10", 125.0), ("Tesla V100-SXM2-16GB", "V100 SXM2", None),
    ("Tesla V100-PCIE-32GB", "V100 PCIe", None), ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ("NVIDIA A10G", None, None), ("NVIDIA GeForce RTX 3090 Ti", None, None), ("cpu", None, None),
    ("NVIDIA Some Future GPU", None, None)])
def test_peak_table(name, row, bf16):
    peak = hardware.device_peak(name)
    assert (peak.name if peak else None) == row
    got = hardware.peak_flops(peak, "bf16")
    assert got == (bf16 * 1e12 if bf16 else None)


def test_math_kind():
    assert [hardware.math_kind(p, False) for p in ("bf16", "bf16_autocast", "fp16", "fp32")] == \
        ["bf16", "bf16", "fp16", "fp32"]
    assert hardware.math_kind("fp32", True) == "tf32"
    assert hardware.peak_flops(hardware.device_peak("Tesla V100-SXM2-16GB"), "fp16") == 125e12


def test_mfu_only_on_known_devices(make_cfg, monkeypatch):
    """MFU = the FLOPs' time at the devices' peaks / the wall time of all devices; absent when any rank's device
    (or a role's precision on it) has no figure."""
    monkeypatch.setattr("unidad_dist.train.perf.tf32_enabled", lambda: False)
    perf = Perf()
    perf.flops = IterationFlops(make_cfg("pixel"), 2)  # every role fp32, 2 ranks colocated
    total = perf.flops.total(0) + perf.flops.total(1)
    h100 = "NVIDIA H100 80GB HBM3"
    got = perf._flops_logs([0, 1], 4.0, [h100, h100])
    assert got["perf/flops_per_iteration"] == pytest.approx(total / 2)
    assert got["perf/achieved_tflops"] == pytest.approx(total / 4.0 / 1e12)
    assert got["perf/mfu"] == pytest.approx(total / 67.0e12 / (2 * 4.0))  # fp32 peak, no TF32
    bf16 = make_cfg("pixel", **{f"{r}.precision": "bf16_autocast" for r in
                                ("student", "fake_teacher", "source_teacher", "target_teacher")})
    perf.flops = IterationFlops(bf16, 2)
    assert perf._flops_logs([0], 1.0, [h100, h100])["perf/mfu"] == pytest.approx(
        perf.flops.total(0) / 989.5e12 / 2)
    assert "perf/mfu" not in perf._flops_logs([0], 1.0, [h100, "cpu"])
    assert "perf/mfu" not in perf._flops_logs([0], 1.0, ["Tesla V100-SXM2-16GB"] * 2)  # no bf16 figure
    assert "perf/achieved_tflops" in perf._flops_logs([0], 1.0, ["cpu", "cpu"])


def test_progress_bar_leaves_out_speed_and_memory(make_cfg, tmp_path):
    cfg = make_cfg("pixel", **{"logging.progress": True})
    logger = RunLogger(tmp_path, cfg, True, 10, 0)
    shown = []
    logger.bar.set_postfix = lambda values, refresh=False: shown.append(values)
    logger.log(0, {"student/dmd": 1.0, "time/student_s": 2.0, "time/iteration_s": 3.0, "memory/rank0/rss_gib": 1.0,
                   "throughput/samples_per_s": 4.0, "perf/mfu": 0.3, "perf/flops_per_iteration": 1e9})
    logger.close()
    assert list(shown[0]) == ["student/dmd"]
    assert "time/student_s" in json.loads((tmp_path / "metrics.jsonl").read_text())


def _gather_worker(rank: int, world: int, port: int, rec: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = config_from_dict(rec)
    rt = Runtime(torch.device("cpu"), "gloo", rank, world, rank)
    run = types.SimpleNamespace(rt=rt, cfg=cfg, method=types.SimpleNamespace(timer=PhaseTimer()),
                                models=types.SimpleNamespace(exchange=types.SimpleNamespace(dp_size=world)))
    perf = Perf()
    perf.start(run)
    run.method.timer.add("own", 1.0 + rank)  # rank 1 is the busier: its phases are reported
    run.method.timer.add(f"only_rank{rank}", 0.5)
    # each rank's own reading, made distinct: a machine under memory pressure (CI) keeps real peaks too close
    perf_module.peak_rss_bytes = lambda: (rank + 1) * 2 ** 30
    perf.step_end(0)
    logs = perf.logs(run)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(logs, f)
    torch.distributed.destroy_process_group()


def test_peak_rss_is_the_kernels_high_water_mark():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    before = peak_rss_bytes()
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert before <= hwm <= peak_rss_bytes() + 2 ** 20  # bytes, not KiB or pages


def test_memory_of_every_rank(pipes, tmp_path):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run")
    out = tmp_path / "logs.json"
    mp.spawn(_gather_worker, args=(2, free_port(), rec, str(out)), nprocs=2, join=True)
    logs = json.loads(out.read_text())
    assert logs["memory/rank0/rss_gib"] == 1.0 and logs["memory/rank1/rss_gib"] == 2.0  # each rank's own value
    assert logs["perf/flops_per_iteration"] > 0
    assert logs["time/own_s"] == 2.0 and logs["time/only_rank1_s"] == 0.5 and logs["time/only_rank0_s"] == 0.0
    # global samples: batch_size per rank x the 2 data-parallel ranks
    assert logs["throughput/samples_per_s"] * logs["time/iteration_s"] == pytest.approx(2 * rec["train"]["batch_size"])
