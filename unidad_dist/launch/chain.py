"""Chained recipes: stages that run one after another, each a run of its own, a stage's exported weights the
next stages' init (the paper's two-stage baselines: recipes/adapt_then_distill.yaml, distill_then_adapt.yaml).

A chained recipe is a YAML mapping with ``stages:`` (and optionally ``run: {name, dir, seed}``)::

    stages:
      - name: adapt                      # [A-Za-z0-9_-]+, unique
        recipe: {algorithm: {name: finetune}, ...}   # a mapping, or a recipe file / shipped recipe name
        overrides: {train.iterations: 300}           # dotted keys on top of it (optional)
      - name: distill
        recipe: demo
        overrides: {target_teacher.init: "{stage:adapt}/unet", ...}

Each stage runs in ``<run.dir>/<stage name>`` (run.dir defaults to runs/<chain name>); when it has finished,
rank 0 exports its sampler to ``<run.dir>/<stage name>/export`` (a diffusers folder, ``unidad-dist export``'s),
and ``{stage:NAME}`` in any string of a later stage stands for that folder. Every stage's config is built and
checked before anything runs; overrides given on the command line apply to every stage. Running the same
command again skips the stages whose export exists and resumes the first one that has none at the iteration
where it stopped (the run folder's checkpoints). A stage whose input is missing at its start (an earlier
stage's export deleted) is one error naming the stage.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.config import (_method_of, batch_for_world, config_class, from_dict, load_config, load_recipe_dict,
                                recipe_path, validate)
from unidad_dist.core.schema import deep_merge, nest_dotted, parse_overrides, resolve_recipe_paths
from unidad_dist.core.io import atomic_write_text
from unidad_dist.device import Runtime, host_group, runtime_from_env
from unidad_dist.errors import UserError
from unidad_dist.export import export
from unidad_dist.train import checkpoint
from unidad_dist.train.loop import say, train
from unidad_dist.train.sampling import from_rank0

STAGE_REF = re.compile(r"\{stage:([^}]*)\}")
STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
EXPORT = "export"


@dataclass
class Stage:
    name: str
    cfg: object
    needs: list = field(default_factory=list)  # earlier stages whose export it reads


@dataclass
class Chain:
    name: str
    dir: Path
    stages: list


def is_chain(path: str | Path) -> bool:
    """Whether the recipe file (or shipped recipe name) is a chained recipe (has ``stages:``)."""
    return "stages" in load_recipe_dict(path)


def _dotted(over: dict, where: str) -> dict:
    if not isinstance(over, dict):
        raise UserError(f"{where}: overrides must be a mapping of dotted keys to values (train.iterations: 300)")
    return nest_dotted(over)


def _substitute(value, stage: str, earlier: dict, needs: list):
    """``{stage:NAME}`` in strings -> that earlier stage's export folder."""
    if isinstance(value, dict):
        return {k: _substitute(v, stage, earlier, needs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, stage, earlier, needs) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m):
        name = m.group(1)
        if name not in earlier:
            raise UserError(f"stage '{stage}' refers to {{stage:{name}}}, which is not an earlier stage of the chain "
                            f"(earlier: {', '.join(earlier) or 'none'}); a stage can use the output of those before it")
        if name not in needs:
            needs.append(name)
        return str(earlier[name])

    return STAGE_REF.sub(repl, value)


def load_chain(path: str | Path, overrides: Optional[list[str]] = None) -> Chain:
    """Every stage's config, built and checked (nothing runs)."""
    file = recipe_path(path)
    data = load_recipe_dict(file)
    unknown = sorted(set(data) - {"stages", "run"})
    if unknown:
        raise UserError(f"chained recipe '{path}': unknown top-level keys {unknown}; a chain has stages: and "
                        "optionally run: (name, dir, seed); a stage's settings go in its recipe/overrides")
    run = data.get("run") or {}
    if not isinstance(run, dict) or set(run) - {"name", "dir", "seed"}:
        raise UserError(f"chained recipe '{path}': run: may hold name, dir and seed only (each stage's run "
                        "folder is <run.dir>/<stage name>)")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise UserError(f"chained recipe '{path}': stages: must be a non-empty list of {{name, recipe, overrides}}")
    name = str(run.get("name") or file.stem)
    cli = parse_overrides(overrides or [])
    if "run" in cli and set(cli["run"]) & {"name", "dir"}:
        chain_run = {k: cli["run"][k] for k in ("name", "dir") if k in cli["run"]}
        name = str(chain_run.get("name", name))
        run = {**run, **chain_run}
        cli = {**cli, "run": {k: v for k, v in cli["run"].items() if k not in ("name", "dir")}}
    base = Path(run["dir"]) if run.get("dir") else Path("runs") / name  # relative: to the working directory
    out: list[Stage] = []
    earlier: dict = {}
    for i, st in enumerate(stages):
        where = f"chained recipe '{path}', stage {i + 1}"
        if not isinstance(st, dict) or set(st) - {"name", "recipe", "overrides"} or "name" not in st or "recipe" not in st:
            raise UserError(f"{where}: a stage is a mapping with name, recipe (a mapping or a recipe file) and "
                            "optionally overrides")
        sname = str(st["name"])
        if not STAGE_NAME.match(sname) or sname in earlier:
            raise UserError(f"{where}: stage name {sname!r} must be unique and made of letters, digits, _ and -")
        recipe, here = st["recipe"], file.resolve().parent
        if isinstance(recipe, dict):
            rec, rfolder = recipe, here
        elif isinstance(recipe, str):  # a file beside the chain (or absolute), else a shipped recipe's name
            rfile = Path(recipe) if Path(recipe).is_absolute() else here / recipe
            try:
                rfile = rfile if rfile.is_file() else recipe_path(recipe)
            except UserError as e:
                raise UserError(f"{where} ({sname}): {e}") from None
            rec, rfolder = load_recipe_dict(rfile), rfile.resolve().parent
        else:
            raise UserError(f"{where} ({sname}): recipe must be a mapping or a recipe file name")
        if "stages" in rec:
            raise UserError(f"{where} ({sname}): its recipe is itself a chain; stages hold plain recipes")
        needs: list = []
        over = _substitute(_dotted(st.get("overrides") or {}, f"{where} ({sname})"), sname, earlier, needs)
        rec = _substitute(rec, sname, earlier, needs)
        try:
            method = config_class(_method_of(deep_merge(rec, over)))
            # paths in the stage's recipe are relative to its file, those in the chain's overrides to the chain's
            merged = deep_merge(resolve_recipe_paths(method, rec, rfolder), resolve_recipe_paths(method, over, here))
            merged = deep_merge(merged, cli)
            merged = deep_merge(merged, {"run": {"name": f"{name}.{sname}", "dir": str(base / sname),
                                                 **({"seed": run["seed"]} if "seed" in run and "seed" not in
                                                    (cli.get("run") or {}) else {})}})
            cfg = from_dict(config_class(_method_of(merged)), merged)
            validate(cfg)
        except UserError as e:
            raise UserError(f"stage '{sname}' of '{path}': {e}") from None
        out.append(Stage(sname, cfg, needs))
        earlier[sname] = (base / sname / EXPORT).resolve()  # absolute: recipe paths resolve against their file
    return Chain(name, base, out)


def stage_output(chain: Chain, stage: Stage) -> Path:
    return chain.dir / stage.name / EXPORT


EXPORT_TIMEOUT = 4 * 3600.0  # the other ranks wait this long (on a gloo group) while rank 0 exports a stage


def _finished(stage: Stage, rdir: Path) -> bool:
    last = checkpoint.latest_complete(rdir)
    return last is not None and checkpoint.iteration_of(last) >= stage.cfg.train.iterations


def run_chain(chain: Chain, rt: Runtime, hooks: Optional[list] = None) -> Path:
    """Run the stages in order on every rank (skipping those already exported); rank 0 exports each. Rank 0
    decides what is done (one view of the shared folders) and tells the others; a stage stopped before its
    last iteration (a signal, a launcher's stop request) ends the chain there, to be resumed by the same
    command."""
    for stage in chain.stages:  # a later stage's global batch this world cannot split fails now, not hours later
        batch_for_world(stage.cfg, rt.world_size)
    group = host_group(EXPORT_TIMEOUT) if rt.world_size > 1 else None
    last = chain.dir
    for i, stage in enumerate(chain.stages):
        out = stage_output(chain, stage)
        done, missing = from_rank0(rt, ((out / "unidad_student.json").is_file(),
                                        [n for n in stage.needs
                                         if not (chain.dir / n / EXPORT / "unidad_student.json").is_file()]))
        if done:
            say(rt, f"chain {chain.name}: stage {i + 1}/{len(chain.stages)} '{stage.name}' is done ({out}); skipped")
            last = out.parent
            continue
        if missing:
            need = missing[0]
            raise UserError(f"stage '{stage.name}' needs the output of stage '{need}' ({chain.dir / need / EXPORT}), "
                            f"which is missing; remove {chain.dir / need} and run the same command again to make it "
                            "anew")
        say(rt, f"chain {chain.name}: stage {i + 1}/{len(chain.stages)} '{stage.name}' ({stage.cfg.method.name})")
        rdir = train(stage.cfg, rt, hooks)
        if not from_rank0(rt, _finished(stage, rdir)):
            say(rt, f"chain {chain.name}: stage '{stage.name}' stopped before its last iteration; the same command "
                    "resumes it")
            return rdir
        error = None
        if rt.is_main:
            gc.collect()  # the stage's networks are gone; export builds its sampler anew
            try:
                export(str(rdir), str(out))
                atomic_write_text(chain.dir / "chain.json", _progress(chain, i))
            except Exception as e:  # every rank fails with it, none waits for an export that will not come
                error = f"{type(e).__name__}: {e}"
        if group is not None:  # the others wait on a gloo group with a long timeout: a big export takes a while
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0, group=group)
            error = box[0]
        if error is not None:
            raise UserError(f"chain {chain.name}: exporting stage '{stage.name}' to {out} failed ({error}); the "
                            "stage's run is intact: run the same command again to retry the export")
        last = rdir
    return last


def _progress(chain: Chain, done: int) -> str:
    return json.dumps({"chain": chain.name, "stages": [s.name for s in chain.stages],
                       "done": [s.name for s in chain.stages[: done + 1]]}, indent=2)


def launch_config(config: str | Path, overrides: Optional[list[str]] = None):
    """What a launcher's front end checks and sizes: the recipe's config, or for a chain (every stage checked)
    its first stage's, with the chain's name and folder as the run's (where launchers keep their logs)."""
    if not is_chain(config):
        return load_config(config, overrides)
    chain = load_chain(config, overrides)
    first = chain.stages[0].cfg
    return dataclasses.replace(first, run=dataclasses.replace(first.run, name=chain.name, dir=str(chain.dir)))


def run_folders(config: str | Path, overrides: Optional[list[str]] = None) -> list[Path]:
    """The folders a launcher checks for a live run and follows the train.log of: the run's, or a chain's own
    folder and each stage's in order."""
    if not is_chain(config):
        return [load_config(config, overrides).run.folder()]
    chain = load_chain(config, overrides)
    return [chain.dir] + [st.cfg.run.folder() for st in chain.stages]


def run_recipe(config: str | Path, overrides: Optional[list[str]] = None, rt: Optional[Runtime] = None,
               hooks: Optional[list] = None, device=None) -> Path:
    """``unidad-dist train``'s work on this rank, for every launcher: a plain recipe's run, or a chain's stages.
    Returns the run folder (a chain: its last stage's)."""
    if is_chain(config):
        chain = load_chain(config, overrides)
        rt = rt or runtime_from_env(max(st.cfg.run.dist_timeout for st in chain.stages), device=device)
        return run_chain(chain, rt, hooks)
    cfg = load_config(config, overrides)
    if rt is None and device is not None:
        rt = runtime_from_env(cfg.run.dist_timeout, device=device)
    return train(cfg, rt, hooks)
