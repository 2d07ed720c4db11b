"""Run under torchrun by tests/test_engines.py: for each variant (a set of recipe overrides) build the
models, attach the engines, train a few iterations and record, per role:

* the whole weights (gathered under ZeRO-3) -> <out>/<variant>/<role>.safetensors (rank 0);
* whether every rank holds the same whole weights (sha256 of the gathered bytes, compared on rank 0);
* every gradient that reached a parameter while another role's loss was back-propagated;
* whether the frozen source teacher changed.

usage: torchrun --nproc_per_node N tests/dist_worker.py SPEC.json OUT_DIR
"""
import hashlib
import json
import sys
from pathlib import Path

import torch


def _digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _whole(role) -> dict:
    from unidad_dist.parallel.engines import gathered_state_dict

    stage = getattr(role, "stage", None)
    if stage is None:
        stage = 3 if role.engine is not None else 0
    return gathered_state_dict(role.module, stage)


def run_variant(name: str, spec: dict, out: Path, rt) -> dict:
    from safetensors.torch import save_file

    from unidad_dist import testing
    from unidad_dist.config import batch_for_world, config_from_dict
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.parallel.placement import setup_placement
    from unidad_dist.train.build import build

    rec = testing.tiny_recipe(Path(spec["backbone"]), Path(spec["shots"]), out / name / "run",
                              **{**spec.get("common", {}), **spec["variants"][name]})
    cfg = batch_for_world(config_from_dict(rec), rt.world_size)
    pl = setup_placement(cfg, rt)
    models = build(cfg, rt, placement=pl)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    src = models.source_teacher
    src_before = _digest(_whole(src)) if src is not None else None

    # gradient-leak probe: which role's backward is running, and which parameters receive gradients
    current = {"role": None}
    leaks = []
    roles = {"student": models.student, "fake_teacher": models.fake_teacher, "target_teacher": models.target_teacher}
    for rname, role in roles.items():
        if role is None or not role.trainable:
            continue
        for pname, p in role.module.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, rname=rname, pname=pname: leaks.append(
                    (rname, pname, current["role"])) if current["role"] != rname else None)
        orig = role.backward

        def backward(loss, rname=rname, orig=orig):
            current["role"] = rname
            try:
                orig(loss)
            finally:
                current["role"] = None
        role.backward = backward

    for it in range(cfg.train.iterations):
        method.step(it)
    local = {"leaks": leaks[:5], "n_leaks": len(leaks),
             "source_unchanged": None if src is None else _digest(_whole(src)) == src_before}
    for rname, role in roles.items():
        if role is None:  # on the other group
            continue
        sd = _whole(role)
        local[f"{rname}_digest"] = _digest(sd)
        if pl.leader(rname):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out / name / f"{rname}.safetensors"))
    parts = [None] * rt.world_size
    torch.distributed.all_gather_object(parts, local)
    result = {"leaks": sum((p["leaks"] for p in parts), [])[:5], "n_leaks": sum(p["n_leaks"] for p in parts),
              "source_unchanged": all(p["source_unchanged"] in (None, True) for p in parts)}
    for rname in roles:
        digests = {p[f"{rname}_digest"] for p in parts if f"{rname}_digest" in p}
        result[f"{rname}_replicas_agree"] = len(digests) == 1
    return result


def main() -> None:
    from unidad_dist.device import runtime_from_env

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rt = runtime_from_env(60.0)
    results = {}
    for name in spec["variants"]:
        if rt.is_main:
            (out / name).mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        results[name] = run_variant(name, spec, out, rt)
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
