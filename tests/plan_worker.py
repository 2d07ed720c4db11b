"""Run under torchrun by tests/test_plan.py (and benchmarks/plan_check.py): for each variant (recipe
overrides on a tiny backbone) compare ``unidad-dist plan``'s estimate with what this rank measures at the
step's peaks (``train.measure_peaks``); rank 0 writes {variant: {quantity: estimate / measured}}.

usage: torchrun --nproc_per_node N tests/plan_worker.py SPEC.json OUT.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(spec_path: str, out_path: str) -> None:
    from unidad_dist import testing
    from unidad_dist.config import config_from_dict
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.measure_peaks import compare_peaks_with_plan

    spec = json.loads(Path(spec_path).read_text())
    rt = runtime_from_env()
    out = {}
    for name, over in spec["variants"].items():
        run = Path(spec["out"]) / name / f"rank{rt.rank}"
        cfg = config_from_dict(testing.tiny_recipe(Path(spec["backbone"]), Path(spec["shots"]), run, **over))
        out[name] = compare_peaks_with_plan(cfg, rt)
        torch_barrier()
    if rt.rank == 0:
        Path(out_path).write_text(json.dumps(out))


def torch_barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
