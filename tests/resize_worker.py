"""Run under torchrun by tests/test_resize.py: a list of jobs at this world size, in order.

* ``{"train": RECIPE}`` trains (or resumes) the recipe's run through the training loop.
* ``{"probe": RUN_DIR, "iteration": N, "out": FILE}`` builds the run's models and engines here, restores
  checkpoint N exactly as a resume does (through the universal conversion when it was written at another
  world size), and writes, from rank 0, every trainable role's whole weights (``<role>/w/<name>``) and its
  gathered Adam moments (``<role>/exp_avg/<name>``, ``<role>/exp_avg_sq/<name>``) to FILE (safetensors).

usage: torchrun --nproc_per_node N tests/resize_worker.py JOBS.json
"""
import json
import sys
from pathlib import Path

import yaml


def probe(run_dir: Path, iteration: int, out: Path, rt) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from unidad_dist.config import config_from_dict
    from unidad_dist.parallel import engines
    from unidad_dist.parallel.placement import setup_placement
    from unidad_dist.train import checkpoint
    from unidad_dist.train.build import build

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    models = build(cfg, rt, placement=setup_placement(cfg, rt))
    engines.attach(models, cfg, rt)
    checkpoint.load(run_dir / "checkpoints" / checkpoint.ckpt_name(iteration), models, rt)
    found = {}
    for name, role in models.trainable_roles().items():
        link = getattr(role.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 link the Adam state to parameters at the first step; do it now
            link()
        for pname, p in role.module.named_parameters():
            if not p.requires_grad:
                continue
            # every rank calls these (collectives), in the same order
            found[f"{name}/w/{pname}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                found[f"{name}/{key}/{pname}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    if rt.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in found.items()}, str(out))


def main() -> None:
    import torch

    from unidad_dist.config import config_from_dict
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.loop import train

    rt = runtime_from_env()
    for job in json.loads(Path(sys.argv[1]).read_text()):
        if "train" in job:
            train(config_from_dict(yaml.safe_load(Path(job["train"]).read_text())), rt)
        else:
            probe(Path(job["probe"]), int(job["iteration"]), Path(job["out"]), rt)
        if rt.distributed:
            torch.distributed.barrier()


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
