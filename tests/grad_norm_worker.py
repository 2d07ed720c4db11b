"""The logged grad_norm against a hand computation (tests/test_engines.py).

For each case (a set of student overrides: ZeRO stage, precision, clipping, gradient accumulation, offload)
the tiny pixel student goes behind its DeepSpeed engine (``EngineRole``) and takes ``ITERATIONS`` steps of an
MSE loss on batches that differ per rank and micro-batch. Next to it, every rank keeps a plain torch copy of
the same network (same weights, same precision, autocast as the role) and back-propagates the loss of the
whole step by hand: the mean over ranks and micro-batches, which is the gradient DeepSpeed steps on. The
expected norm is ``torch.nn.utils.get_total_norm`` of the copy's gradients; after each step the copy takes
the engine's (gathered) weights, so later steps compare again.

In-process (``run_cases(...)``, one rank) or under torchrun:
    torchrun --nproc_per_node N tests/grad_norm_worker.py SPEC.json OUT.json
SPEC: {"backbone": pixel pipeline folder, "shots": folder, "cases": {name: {override: value}}}
OUT (rank 0): {name: {"logged": [...], "expected": [...], "keys": [...]}}
"""
import copy
import json
import sys
from pathlib import Path

import torch

ITERATIONS = 2


def _batch(iteration: int, rank: int, micro: int, n: int, shape, device):
    g = torch.Generator().manual_seed(1000 * iteration + 10 * rank + micro)
    x = torch.randn((n, *shape), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    target = torch.randn((n, *shape), generator=g)
    return x.to(device), t.to(device), target.to(device)


def _loss(out, target):
    return ((out.float() - target) ** 2).mean()


def run_case(name: str, over: dict, backbone: Path, shots: Path, rt, out_dir: Path) -> dict:
    from unidad_dist import testing
    from unidad_dist.config import config_from_dict
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    rec = testing.tiny_recipe(backbone, shots, out_dir / name, **{"train.batch_size": 2, **over})
    cfg = config_from_dict(rec)
    rc = cfg.student
    models = build(cfg, rt, roles={"student"}, checks=False)
    plain = models.roles["student"]
    hand = copy.deepcopy(plain.module).to(rt.device).train()  # the hand computation's network
    if rc.precision == "bf16":  # the engine trains bf16 weights (fp32 master copies in its optimizer)
        hand = hand.to(torch.bfloat16)
    engines.init_distributed(rt)
    role = engines.EngineRole(plain, rc, cfg, rt, rt.world_size)
    shape = tuple(models.sample_shape)
    B, G, W = cfg.train.batch_size, rc.grad_accum, rt.world_size
    logged, expected, keys = [], [], []
    for it in range(ITERATIONS):
        for m in range(G):  # this rank's micro-batches, through the role's interface
            x, t, target = _batch(it, rt.rank, m, B, shape, rt.device)
            role.backward(_loss(role.train_forward(x, t, None), target))
        # by hand: the gradient of the mean loss over every rank's micro-batches (one backward per micro-batch,
        # each forward in its own autocast region, as the ranks run them)
        hand.zero_grad(set_to_none=True)
        for r in range(W):
            for m in range(G):
                x, t, target = _batch(it, r, m, B, shape, rt.device)
                with plain.autocast():
                    loss = _loss(hand(x, t, None), target)
                (loss / (W * G)).backward()
        want = torch.nn.utils.get_total_norm([p.grad.float() for p in hand.parameters() if p.grad is not None],
                                             norm_type=2.0)  # in fp32 also for bf16 gradients
        got = role.step(it)
        role.zero_grad()
        keys.append(sorted(got))
        logged.append(got.get("grad_norm"))
        expected.append(float(want))
        whole = engines.gathered_state_dict(role.module, role.stage)  # the engine's weights, for the next step
        hand.load_state_dict({k: v.to(rt.device) for k, v in whole.items()})
    return {"logged": logged, "expected": expected, "keys": keys}


def run_cases(spec: dict, rt, out_dir: Path) -> dict:
    return {name: run_case(name, over, Path(spec["backbone"]), Path(spec["shots"]), rt, out_dir)
            for name, over in spec["cases"].items()}


def main() -> None:
    from unidad_dist.device import runtime_from_env

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rt = runtime_from_env(60.0)
    results = run_cases(spec, rt, out.parent / "runs")
    parts = [None] * rt.world_size
    torch.distributed.all_gather_object(parts, results)
    if rt.is_main:
        for name in results:  # every rank logs the same global norm
            results[name]["same_on_every_rank"] = all(p[name]["logged"] == results[name]["logged"] for p in parts)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
