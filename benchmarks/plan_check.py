"""`unidad-dist plan` estimate / measured for model states, activations and FLOPs (goal 0.9-1.1).

Model states: bytes reachable from each engine before its optimizer step; activations: bytes saved for
backward per micro-batch (saved-tensor hooks); FLOPs: torch.utils.flop_counter over `ratio` iterations.

usage: python benchmarks/plan_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {
    "pixel, ZeRO 3/2/1, ratio 3, fake accumulation 2": ("pixel", {
        "student.zero_stage": 3, "student.zero3_persistence_threshold": 0, "fake_teacher.zero_stage": 2,
        "target_teacher.zero_stage": 1, "train.fake_updates_per_student": 3, "fake_teacher.grad_accum": 2}),
    "pixel, K=3 full unroll": ("pixel", {"student.unroll": "full", "student.steps": 3}),
    "SD1.5-form, CFG 3 / 2": ("sd15", {"source_teacher.cfg": 3.0, "target_teacher.cfg": 2.0}),
    "SDXL-form, CFG 3, ZeRO-2": ("sdxl", {"source_teacher.cfg": 3.0, "student.zero_stage": 2,
                                          "fake_teacher.zero_stage": 2}),
    "SDXL-form, bf16 weights (known gap)": ("sdxl", {"student.precision": "bf16", "fake_teacher.precision": "bf16"}),
}


def main() -> None:
    from unidad_dist import builtin, testing
    from unidad_dist.config import config_from_dict
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.measure import compare_with_plan

    root = Path(tempfile.mkdtemp(prefix="unidad_plan_"))
    pipes = {"pixel": testing.write_pixel_pipeline(root / "pixel"),
             "sd15": testing.write_text_pipeline(root / "sd15", "sd15"),
             "sdxl": testing.write_text_pipeline(root / "sdxl", "sdxl")}
    shots = builtin.make_shots(root / "shots", "blue_discs", 6, 16, seed=3)
    rt = runtime_from_env()
    worst = []
    for name, (form, over) in CASES.items():
        cfg = config_from_dict(testing.tiny_recipe(pipes[form], shots, root / name.replace(" ", "_"), **over))
        ratios = compare_with_plan(cfg, rt)
        print(f"{name}:")
        for k, v in ratios.items():
            print(f"    {k:28} estimate/measured = {v:.3f}")
        if "known gap" not in name:
            worst.extend(ratios.values())
    print(f"range over the fp32 cases: {min(worst):.3f} - {max(worst):.3f}  (goal 0.9 - 1.1)")


if __name__ == "__main__":
    main()
