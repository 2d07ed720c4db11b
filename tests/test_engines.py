"""DeepSpeed engines on 2 ranks (gloo, CPU, tiny backbones, fp32): ZeRO stages agree, replicas agree,
frozen teachers stay frozen, no gradient crosses roles; generated configs and their bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unidad_dist import testing
from unidad_dist.errors import UserError

HERE = Path(__file__).resolve().parent

# a large Adam eps keeps updates proportional to gradients: reduction-order rounding stays at fp32 level
COMMON = {"train.iterations": 3, "train.batch_size": 2, "run.dist_timeout": 60.0,
          "student.optimizer.eps": 1e-3, "fake_teacher.optimizer.eps": 1e-3, "target_teacher.optimizer.eps": 1e-3,
          "gan_heads.lambda_g": 0.5}


def _stage(s: int) -> dict:
    over = {f"{r}.zero_stage": s for r in ("student", "fake_teacher", "target_teacher")}
    if s == 3:  # partition for real (tiny tensors would all stay whole under the default threshold)
        over.update({f"{r}.zero3_persistence_threshold": 0 for r in ("student", "fake_teacher", "target_teacher",
                                                                      "source_teacher")})
        over["source_teacher.zero_stage"] = 3  # the frozen teacher partitioned, without an optimizer
    return over


def run_worker(tmp_path: Path, backbone: Path, shots: Path, variants: dict, nproc: int = 2,
               common: dict | None = None, timeout: int = 600) -> dict:
    from unidad_dist.device import free_port

    spec = {"backbone": str(backbone), "shots": str(shots), "common": {**COMMON, **(common or {})},
            "variants": variants}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "dist_worker.py"), str(tmp_path / "spec.json"),
           str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp_path / "out" / "results.json").read_text())


def _weights(tmp_path, variant, role):
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "out" / variant / f"{role}.safetensors"))


@pytest.fixture(scope="module")
def stages_run(tmp_path_factory, pipes):
    tmp = tmp_path_factory.mktemp("stages")
    pipe = testing.write_pixel_pipeline(tmp / "v", prediction_type="v_prediction")
    variants = {f"zero{s}": _stage(s) for s in range(4)}
    variants["zero3_frozen_target"] = {**_stage(3), "target_teacher.mode": "frozen",
                                        "target_teacher.init": str(pipe), "target_teacher.zero_stage": 3}
    return tmp, run_worker(tmp, pipe, pipes["shots"], variants)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_weights(stages_run, stage):
    tmp, _ = stages_run
    for role in ("student", "fake_teacher", "target_teacher"):
        a, b = _weights(tmp, "zero0", role), _weights(tmp, f"zero{stage}", role)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=f"stage {stage} {role}.{k}")


def _init_unet(tmp):
    from safetensors.torch import load_file

    return load_file(str(next((tmp / "v" / "unet").glob("*.safetensors"))))


@pytest.mark.parametrize("variant", ["zero0", "zero3"])
def test_every_trainable_role_trained(stages_run, variant):
    tmp, _ = stages_run
    init = _init_unet(tmp)
    for role in ("student", "fake_teacher", "target_teacher"):
        w = _weights(tmp, variant, role)
        moved = [k for k, v in init.items() if not torch.equal(w[f"unet.{k}"], v)]
        assert len(moved) > len(init) // 2, f"{variant}: {role} barely trained ({len(moved)}/{len(init)} tensors moved)"


@pytest.mark.parametrize("variant", ["zero0", "zero1", "zero2", "zero3", "zero3_frozen_target"])
def test_replicas_agree_frozen_unchanged_no_cross_role_gradients(stages_run, variant):
    _, results = stages_run
    r = results[variant]
    for role in ("student", "fake_teacher", "target_teacher"):
        assert r[f"{role}_replicas_agree"], f"{variant}: ranks hold different {role} weights"
    assert r["source_unchanged"], f"{variant}: the frozen source teacher changed"
    assert r["n_leaks"] == 0, f"{variant}: gradients crossed roles: {r['leaks']}"


def test_frozen_partitioned_target_teacher_unchanged(stages_run):
    tmp, _ = stages_run
    w = _weights(tmp, "zero3_frozen_target", "target_teacher")
    init = _init_unet(tmp)
    for k, v in init.items():
        torch.testing.assert_close(w[f"unet.{k}"], v, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The logged grad_norm: the global norm before clipping, against a plain torch copy (tests/grad_norm_worker.py)
# ---------------------------------------------------------------------------------------------------
CLIP = 1e-3  # far below the gradients' norm: a norm taken after clipping would read ~1e-3
GRAD_NORM_CASES = {
    "zero0_fp32_clip": {"student.zero_stage": 0, "student.precision": "fp32"},  # the demo's set-up
    "zero0_fp32_noclip_accum2": {"student.zero_stage": 0, "student.optimizer.clip_grad_norm": 0.0,
                                 "student.grad_accum": 2},
    "zero0_bf16_clip": {"student.zero_stage": 0, "student.precision": "bf16"},
    "zero0_bf16_autocast_clip": {"student.zero_stage": 0, "student.precision": "bf16_autocast"},
    "zero1_bf16_clip": {"student.zero_stage": 1, "student.precision": "bf16"},
    "zero2_fp32_noclip_accum2": {"student.zero_stage": 2, "student.optimizer.clip_grad_norm": 0.0,
                                 "student.grad_accum": 2},
    "zero2_fp32_offload_clip": {"student.zero_stage": 2, "student.offload_optimizer": True},
    "zero3_fp32_clip": {"student.zero_stage": 3},
    "zero3_bf16_accum2_clip": {"student.zero_stage": 3, "student.precision": "bf16", "student.grad_accum": 2},
}


@pytest.fixture(scope="module")
def grad_norm_run(tmp_path_factory, pipes):
    from unidad_dist.device import free_port

    tmp = tmp_path_factory.mktemp("grad_norm")
    cases = {name: {"student.optimizer.clip_grad_norm": CLIP, "student.zero3_persistence_threshold": 0, **over}
             for name, over in GRAD_NORM_CASES.items()}
    (tmp / "spec.json").write_text(json.dumps({"backbone": str(pipes["pixel"]), "shots": str(pipes["shots"]),
                                               "cases": cases}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "grad_norm_worker.py"), str(tmp / "spec.json"),
           str(tmp / "out.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text()), cases


@pytest.mark.parametrize("case", list(GRAD_NORM_CASES))
def test_logged_grad_norm_is_the_global_norm_before_clipping(grad_norm_run, case):
    """On 2 ranks with different batches, every step logs grad_norm = torch.nn.utils.get_total_norm of the
    gradients a plain torch copy of the network gets from the mean loss over both ranks' micro-batches: the
    global norm (not a rank's shard), before clipping, after accumulation; the same on both ranks. (An fp32
    engine at ZeRO-0 keeps no norm: it was logged as 0.0, then not at all.)"""
    results, cases = grad_norm_run
    r = results[case]
    assert all("grad_norm" in k for k in r["keys"]), f"{case}: a step logged no grad_norm: {r['keys']}"
    # bf16 weights: bf16 gradients, accumulated and reduced in another order than by hand (rounding 2^-9)
    tol = 1e-3 if cases[case].get("student.precision") == "bf16" else 1e-5
    for it, (got, want) in enumerate(zip(r["logged"], r["expected"])):
        if cases[case]["student.optimizer.clip_grad_norm"] > 0:
            assert want > 100 * CLIP  # clipping acts: a norm after it would be ~CLIP
        assert abs(got - want) <= tol * want, f"{case} step {it}: logged {got}, gradients' norm {want}"
    assert r["same_on_every_rank"], f"{case}: the ranks logged different norms"


# ---------------------------------------------------------------------------------------------------
# Generated configs and the user's DeepSpeed JSON
# ---------------------------------------------------------------------------------------------------
def test_generated_config_follows_the_recipe(make_cfg):
    from unidad_dist.parallel.engines import engine_config

    cfg = make_cfg(**{"student.zero_stage": 2, "student.offload_optimizer": True, "student.grad_accum": 3,
                      "student.precision": "bf16", "student.optimizer.clip_grad_norm": 0.0})
    c = engine_config("student", cfg.student, cfg, 4, trainable=True)
    assert c["zero_optimization"]["stage"] == 2
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["gradient_accumulation_steps"] == 3 and c["train_batch_size"] == 2 * 3 * 4
    assert c["bf16"]["enabled"] is True and c["fp16"]["enabled"] is False
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["lr"] == cfg.student.optimizer.lr
    assert c["gradient_clipping"] == 0.0
    frozen = engine_config("source_teacher", cfg.source_teacher, cfg, 4, trainable=False)
    assert "optimizer" not in frozen and frozen["gradient_accumulation_steps"] == 1


def test_user_json_overrides_free_fields_and_rejects_contradictions(make_cfg, tmp_path):
    from unidad_dist.parallel.engines import engine_config

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000},
                                "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": True}))
    cfg = make_cfg(**{"student.zero_stage": 2, "student.deepspeed_config": str(good)})
    c = engine_config("student", cfg.student, cfg, 2, trainable=True)
    assert c["zero_optimization"]["overlap_comm"] is False and c["zero_optimization"]["reduce_bucket_size"] == 1000
    assert c["wall_clock_breakdown"] is True and c["train_micro_batch_size_per_gpu"] == 2

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = make_cfg(**{"student.zero_stage": 2, "student.deepspeed_config": str(bad)})
    with pytest.raises(UserError, match=r"zero_optimization.stage=3 but the recipe gives 2 \(from student.zero_stage\)"):
        engine_config("student", cfg.student, cfg, 2, trainable=True)
    nonorm = tmp_path / "nonorm.json"
    nonorm.write_text(json.dumps({"zero_optimization": {"compute_grad_norm": False}}))
    cfg = make_cfg(**{"student.zero_stage": 2, "student.optimizer.clip_grad_norm": 0.0,
                      "student.deepspeed_config": str(nonorm)})
    with pytest.raises(UserError, match=r"compute_grad_norm=False but the recipe gives True .*grad_norm"):
        engine_config("student", cfg.student, cfg, 2, trainable=True)  # the logged norm needs it
    sched = tmp_path / "sched.json"
    sched.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    cfg = make_cfg(**{"fake_teacher.deepspeed_config": str(sched)})
    with pytest.raises(UserError, match="LR schedule comes from the recipe"):
        engine_config("fake_teacher", cfg.fake_teacher, cfg, 2, trainable=True)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "unidad_dist", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("over,msg", [
    (["student.precision=fp16"], "student.precision=fp16 needs a CUDA device"),
    (["student.zero_stage=5"], "student.zero_stage=5 is not a valid ZeRO stage 0-3"),
    (["fake_teacher.deepspeed_config=CONTRA"], "fake_teacher.deepspeed_config sets gradient_clipping=1.0"),
    (["fake_teacher.deepspeed_config=MISSING"], "fake_teacher.deepspeed_config .* not found"),
])
def test_bad_engine_input_fails_before_anything_is_written(tmp_path, pipes, over, msg):
    import yaml

    contra = tmp_path / "contra.json"
    contra.write_text(json.dumps({"gradient_clipping": 1.0}))
    over = [o.replace("CONTRA", str(contra)).replace("MISSING", str(tmp_path / "nope.json")) for o in over]
    rdir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(testing.tiny_recipe(pipes["pixel"], pipes["shots"], rdir)))
    r = _cli("train", "--config", str(recipe), *over)
    assert r.returncode == 2, r.stderr[-2000:]
    import re

    assert re.search(msg, r.stderr), r.stderr[-2000:]
    assert not rdir.exists()


# ---------------------------------------------------------------------------------------------------
# Split placement: 4 ranks = 2 generator + 2 critic ranks, against colocated at the same global batch
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_run(tmp_path_factory, pipes):
    tmp = tmp_path_factory.mktemp("split")
    pipe = testing.write_pixel_pipeline(tmp / "v", prediction_type="v_prediction")
    variants = {
        "colocated": {"train.batch_size": 1},  # 4 ranks x 1 = 4 samples per iteration
        "split": {"placement.mode": "split"},  # 2 generator ranks x 2 (critic ranks see the same 4)
        "split_zero12": {"placement.mode": "split", "student.zero_stage": 2, "fake_teacher.zero_stage": 1,
                         "target_teacher.zero_stage": 2},
        "split_ratio_accum": {"placement.mode": "split", "train.fake_updates_per_student": 2,
                              "fake_teacher.grad_accum": 2},
        "colocated_ratio_accum": {"train.fake_updates_per_student": 2, "fake_teacher.grad_accum": 2,
                                  "train.batch_size": 1},
        # the same 4 samples per iteration as a global batch: 2 per side rank, in micro-batches of 1 (2 accumulated)
        "split_global": {"placement.mode": "split", "train.global_batch_size": 4, "train.batch_size": 1},
    }
    return tmp, run_worker(tmp, pipe, pipes["shots"], variants, nproc=4, common={"train.iterations": 3})


@pytest.mark.parametrize("variant", ["split", "split_zero12", "split_global"])
def test_split_equals_colocated(split_run, variant):
    tmp, results = split_run
    for role in ("student", "fake_teacher", "target_teacher"):
        a, b = _weights(tmp, "colocated", role), _weights(tmp, variant, role)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=f"{variant} {role}.{k}")
    r = results[variant]
    assert r["n_leaks"] == 0 and r["source_unchanged"]
    assert all(r[f"{role}_replicas_agree"] for role in ("student", "fake_teacher", "target_teacher"))


def test_split_with_update_ratio_and_accumulation(split_run):
    """micro-batches where only the critic side trains still exchange samples in step."""
    tmp, results = split_run
    for role in ("student", "fake_teacher", "target_teacher"):
        a, b = _weights(tmp, "colocated_ratio_accum", role), _weights(tmp, "split_ratio_accum", role)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=f"{role}.{k}")


@pytest.mark.parametrize("over,world,msg", [
    ({"placement.mode": "split"}, 1, "needs at least 2 ranks"),
    ({"placement.mode": "split", "placement.student": [0, 1, 2]}, 2, r"outside the world of 2 ranks"),
    ({"placement.mode": "split", "placement.fake_teacher": []}, 2, "placed on no rank"),
    ({"placement.mode": "split", "placement.student": [0], "placement.fake_teacher": [0]}, 2, "overlap"),
    ({"placement.mode": "split", "student.zero_stage": 3}, 2, "ZeRO-3 does not work on rank subgroups"),
    ({"placement.mode": "split", "placement.student": [0], "placement.fake_teacher": [1]}, 3, r"ranks \[2\] hold no role"),
    ({"placement.student": [0]}, 2, "only apply with placement.mode=split"),
    ({"placement.mode": "split", "placement.target_teacher": [0]}, 2, "target teacher lives with the fake teacher"),
    ({"placement.mode": "split", "placement.target_teacher": [1], "target_teacher.mode": "off", "algorithm.a": 0.0}, 2,
     r"placement.target_teacher place roles this recipe does not run"),
])
def test_bad_placement(make_cfg, over, world, msg):
    from unidad_dist.parallel.placement import resolve_groups

    with pytest.raises(UserError, match=msg):
        resolve_groups(make_cfg(**over), world)


def test_default_split_on_two_ranks(make_cfg):
    from unidad_dist.parallel.placement import resolve_groups

    g = resolve_groups(make_cfg(**{"placement.mode": "split"}), 2)
    assert g == {"student": [0], "fake_teacher": [1], "source_teacher": [0], "target_teacher": [1]}


def test_lora_offload_and_activation_checkpointing_train(make_cfg, rt):
    """A LoRA student on a ZeRO-2 engine with optimizer offload, and a fake teacher with activation
    checkpointing on ZeRO-1: only adapter weights (and the fake teacher's weights) change."""
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    cfg = make_cfg(**{"student.lora.rank": 4, "student.lora.target_modules": ["conv1", "conv2"],
                      "student.zero_stage": 2, "student.offload_optimizer": True,
                      "fake_teacher.activation_checkpointing": True, "fake_teacher.zero_stage": 1,
                      "gan_heads.lambda_g": 0.5, "target_teacher.lora.rank": 2,
                      "target_teacher.lora.target_modules": ["conv1"]})
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    method = UniDAD(cfg, models, rt)
    assert models.student.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert models.fake_teacher.unet.is_gradient_checkpointing
    names = {n for n, p in models.student.module.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in models.student.module.named_parameters()}
    fake_before = {n: p.detach().clone() for n, p in models.fake_teacher.module.named_parameters()}
    for it in range(2):
        method.step(it)
    after = dict(models.student.module.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in names), "the adapter did not train"
    assert all(torch.equal(before[n], after[n]) for n in before if n not in names), "a frozen base weight changed"
    fake_after = dict(models.fake_teacher.module.named_parameters())
    assert any(not torch.equal(fake_before[n], fake_after[n]) for n in fake_before)
    # an online target teacher takes a LoRA adapter the same way: only its adapter trains
    tnames = {n for n, p in models.target_teacher.module.named_parameters() if p.requires_grad}
    assert tnames and all("lora_" in n for n in tnames)
