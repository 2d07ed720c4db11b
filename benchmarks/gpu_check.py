"""One check of the framework on a single CUDA GPU: install, 4-role Uni-DAD iterations at SD1.5 and SDXL size,
and the 1-rank tests on CUDA, within a time budget (default 560 s), with a JSON of the figures.

It is written for a machine that has PyTorch (a CUDA build) but none of our other dependencies and no network
(the lent H200 machine): ``tools/fetch_wheels.py`` downloads the wheels here into ``build/wheels/`` and the
device tool carries that folder. Stages, each time-boxed (``--stage-seconds``; unused time passes on to the
next, the last stage gets all that is left; a stage that runs out is stopped and recorded with what it got,
a stage with too little time left is skipped with the reason). The model stages come before the tests: their
time is predictable and their figures are the point; the test suite is open-ended and records each outcome
as it comes, so a stop at the deadline still reports every test that ran.

1. install: ``pip install --no-index --no-deps --target <work>/site <wheels>/*.whl`` into a folder put first
   on PYTHONPATH (the machine's torch stays the one used), the repository on PYTHONPATH (no install); then
   the modules the check needs are imported (each recorded with its version and file, as is every top-level
   module the wheels installed). Without ``--wheels`` this Python's own packages are used.
2. sd15, sdxl: the shipped recipes ``sd15_subject`` / ``sdxl_subject`` on a pipeline written with random
   weights from ``configs/sd15`` / ``configs/sdxl`` (UNet saved in bf16, text encoders and VAE in fp32, a
   character-level CLIP tokenizer: the real vocabulary is not shipped) and 10 generated target shots at the
   model's resolution; every role in bf16 (DeepSpeed bf16 weights, fp32 master), ZeRO-0, trainable roles as
   LoRA adapters of rank ``--lora`` (64). LoRA, not full fine-tuning, because the normal train entry writes
   checkpoint 0 and a last checkpoint: three full-weight bf16 roles with their fp32 master and Adam state
   are ~36 GB per checkpoint at SD1.5 size (~110 GB at SDXL size), more than the machine's 64 GiB disk.
   The per-GPU batch is chosen by ``unidad-dist plan``'s memory model: planned at batch 1 (model states +
   helpers S, activations A per sample), the largest b with S + A*b within 90 % of the GPU's memory, capped
   at ``--max-batch`` (16; iteration time grows with it), then planned again at b for the estimate (on the
   written pipeline, so the run's own FLOPs count finds those network costs in the plan cache). Then the
   normal train entry (``python -m unidad_dist train --config <recipe> k=v ...``) runs one plan period + 1
   iterations with ``logging.every=1`` (the student steps every ``ratio`` iterations: iteration 0, cold, and
   the period's last, warm) and the figures are read from the run's ``metrics.jsonl`` — ``time/<phase>_s``,
   ``throughput/samples_per_s``, ``memory/rank0/max_allocated_gib`` / ``max_reserved_gib``,
   ``perf/flops_per_iteration``, ``perf/achieved_tflops``, ``perf/mfu`` (median and mean over the
   iterations after the first); a key the run did not log is listed under ``absent``, never filled in. The
   run's wall time by phase comes from its ``summary.json``.
3. tests: the 1-rank subset — ``pytest -m "not slow and not multirank"`` (tests/conftest.py marks a test
   ``multirank`` when it, a helper it calls or a fixture it uses starts ranks: several ranks on one GPU
   do not make an NCCL group) — in ``--test-shards`` parallel pytest processes (default 8 on CUDA, the
   machine's cores shared out through OMP_NUM_THREADS), ``--continue-on-collection-errors``; the tests run on
   CUDA because ``unidad_dist.device`` picks it whenever it is available. Each outcome (a file that cannot be
   collected too) is recorded as it ends — this module is also the pytest plugin that records them — and a
   failure for a package the wheels leave out on purpose (wandb, matplotlib, ...) is marked so.

``--tiny`` (automatic without CUDA) runs the same stages with the tiny SD1.5-form and SDXL-form pipelines
of ``unidad_dist.testing`` on this machine's device; tests/test_gpu_check.py runs it end to end.

usage (the lent GPU machine; see benchmarks/README.md for the device tool call):
    python3 benchmarks/gpu_check.py --wheels build/wheels --out $OUT
here:
    .venv/bin/python benchmarks/gpu_check.py --tiny --tests tests/test_losses.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
GIB = 1024 ** 3
ARCHS = ("sd15", "sdxl")
RECIPES = {"sd15": "recipes/sd15_subject.yaml", "sdxl": "recipes/sdxl_subject.yaml"}
# seconds per stage, from the first run on an H200 (2026-12-04: install 30 s; sd15 152 s for 11 iterations at batch
# 16 with the pipeline written and planned twice; sdxl had not reached its first iteration after 211 s: pipeline
# 35 s, plans 63 s, build 57 s, engines 19 s, evaluation before + checkpoint 0 25 s); the last stage run gets
# whatever is left
STAGE_SECONDS = {"install": 35, "sd15": 160, "sdxl": 270, "tests": 95}
MIN_SECONDS = {"install": 10, "tests": 20, "sd15": 40, "sdxl": 60}  # a stage with less left is skipped
# the modules the check imports (the install stage records where each comes from)
MODULES = ("numpy", "PIL", "yaml", "safetensors", "xxhash", "tqdm", "filelock", "webdataset", "transformers",
           "diffusers", "peft", "accelerate", "deepspeed", "pytest")
METRIC_KEYS = ("time/iteration_s", "throughput/samples_per_s", "memory/rank0/max_allocated_gib",
               "memory/rank0/max_reserved_gib", "perf/flops_per_iteration", "perf/achieved_tflops", "perf/mfu")
TEST_LOG_ENV = "GPU_CHECK_TEST_LOG"
# left out of the wheels on purpose (tools/fetch_wheels.py: the optional extras and OMIT): a test failing for
# one of them is marked so in the JSON
NOT_SHIPPED = {"wandb", "ray", "submitit", "hf-xet", "matplotlib", "typer", "click"}
LOG_TAIL = 2_000_000  # characters of each log kept in the output folder


# ------------------------------------------------------------------------------------------------
# The pytest plugin (``-p gpu_check``): one JSON line per test outcome, written as the test ends
# ------------------------------------------------------------------------------------------------
def pytest_collectreport(report) -> None:
    """A test file that cannot be collected (an import error) is recorded as an error of that file."""
    path = os.environ.get(TEST_LOG_ENV)
    if not path or not report.failed:
        return
    text = str(report.longrepr or "")
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.strip().splitlines()[-1:]
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": "collect", "outcome": "error", "duration_s": 0.0,
                            "message": lines[-1][:500] if lines else ""}) + "\n")


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(TEST_LOG_ENV)
    if not path or (report.when != "call" and report.passed):
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when != "call" and report.failed:
        outcome = "error"
    else:
        outcome = report.outcome
    message = ""
    if report.failed:
        text = getattr(report, "longreprtext", "") or ""
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.strip().splitlines()[-1:]
        message = lines[-1][:500] if lines else ""
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:300]
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                            "duration_s": round(report.duration, 3), "message": message}) + "\n")


# ------------------------------------------------------------------------------------------------
# Workers (run in subprocesses, with the installed packages on PYTHONPATH)
# ------------------------------------------------------------------------------------------------
def worker_probe(args) -> dict:
    """Which device the stages will run on, and the versions of what the check imports."""
    import importlib

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "modules": {}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    def load(name: str) -> dict:
        try:
            m = importlib.import_module(name)
            return {"version": str(getattr(m, "__version__", "?")), "file": str(getattr(m, "__file__", ""))}
        except Exception as e:  # noqa: BLE001 - recorded
            return {"error": f"{type(e).__name__}: {e}"[:300]}

    out["modules"] = {name: load(name) for name in MODULES}
    if args.site:  # every top-level module the wheels installed (recorded; only MODULES decide the stage)
        site = Path(args.site)
        names = sorted({p.stem if p.suffix == ".py" else p.name for p in site.iterdir()
                        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
                        and not p.name.startswith("_") and p.name != "bin"})
        out["site_modules"] = {name: load(name) for name in names}
    return out


def write_random_pipeline(config_dir: Path, out: Path, device: str) -> Path:
    """A diffusers pipeline folder with the architecture of ``config_dir`` (configs/<arch>) and random weights:
    the UNet built on ``device`` and saved in bf16, the text encoder(s) and VAE in fp32, a character-level CLIP
    tokenizer per encoder (padded to the encoder's positions), the scheduler config as shipped."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from unidad_dist import testing

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    unet.to(device="cpu", dtype=torch.bfloat16).save_pretrained(out / "unet", safe_serialization=True)
    del unet
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if not (config_dir / sub / "config.json").is_file():
            continue
        tc = CLIPTextConfig.from_pretrained(config_dir / sub)
        with torch.device(device):
            enc = cls(tc)
        enc.to(device="cpu", dtype=torch.float32).save_pretrained(out / sub, safe_serialization=True)
        del enc
        testing.write_tokenizer(out / sub.replace("text_encoder", "tokenizer"), max_length=tc.max_position_embeddings)
    with torch.device(device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    vae.to(device="cpu", dtype=torch.float32).save_pretrained(out / "vae", safe_serialization=True)
    del vae
    shutil.copytree(config_dir / "scheduler", out / "scheduler")
    shutil.copy(config_dir / "model_index.json", out / "model_index.json")
    return out


def worker_write(args) -> dict:
    """The stage's pipeline (random weights) and target shots."""
    import torch

    from unidad_dist import builtin, testing
    from unidad_dist.models.backbones import resolve_backbone

    work = Path(args.work)
    t0 = time.time()
    if args.tiny:
        pipe = testing.write_text_pipeline(work / "pipeline", args.arch)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = write_random_pipeline(ROOT / "configs" / args.arch, work / "pipeline", device)
    res = resolve_backbone(str(pipe), "backbone").pixel_resolution
    t1 = time.time()
    shots = builtin.make_shots(work / "shots", "blue_discs", 10, res, seed=3)
    return {"pipeline": str(pipe), "shots": str(shots), "resolution": res, "pipeline_s": t1 - t0,
            "shots_s": time.time() - t1}


def stage_overrides(recipe: str, shots: str, lora: int) -> tuple[list[str], str]:
    """The overrides that run ``recipe`` on ``shots`` with every role that names its own init or backbone
    (other than the method's primary role) starting as the method's copy instead, every role in bf16 at ZeRO-0,
    trainable roles as LoRA adapters of rank ``lora`` (0: full weights). Returns (overrides, the primary role:
    its ``backbone`` is the caller's)."""
    from unidad_dist.config import load_config

    cfg = load_config(ROOT / recipe, check=False)
    method = cfg.method
    over = [f"data.target.path={shots}"]
    for rs in method.roles(cfg):
        rc = getattr(cfg, rs.name)
        if getattr(rc, "init", None) is not None:
            over.append(f"{rs.name}.init=null")
        if rs.name != method.primary and getattr(rc, "backbone", None) is not None:
            over.append(f"{rs.name}.backbone=null")
        over += [f"{rs.name}.precision=bf16", f"{rs.name}.zero_stage=0"]
        if rs.trainable and lora > 0 and hasattr(rc, "lora"):
            over.append(f"{rs.name}.lora.rank={lora}")
    return over, method.primary


def worker_plan(args) -> dict:
    """Without ``--batch``: the batch — planned at batch 1 (model states + helpers S, activations A per sample,
    which scale with the batch), the largest b with S + A*b within 90 % of ``--gpu-memory``, capped at
    ``--max-batch``. With ``--batch``: the plan at that batch (lowered while it does not fit), whose estimate
    the run's peak is compared with, and the overrides the run takes."""
    from unidad_dist.config import load_config
    from unidad_dist.parallel.plan import GIB as _G, make_plan

    over, primary = stage_overrides(args.recipe, args.shots, args.lora)
    mem = int(args.gpu_memory)

    def plan(batch):
        cfg = load_config(ROOT / args.recipe, [f"{primary}.backbone={args.backbone}"] + over
                          + [f"train.batch_size={batch}"])
        return cfg, make_plan(cfg, 1, mem)

    t0 = time.time()
    if args.batch is None:
        _, p1 = plan(1)
        states = sum(r.model_state_bytes for r in p1.roles.values() if 0 in r.ranks) + p1.frozen_helpers_bytes
        act = max(p1.per_rank_bytes[0] - states, 1.0)
        fit = int((0.9 * mem - states) // act)
        return {"batch": max(1, min(args.max_batch, fit)), "largest_fitting_batch": fit, "max_batch": args.max_batch,
                "fits_at_batch_1": bool(p1.fits), "estimate_at_batch_1_gib": p1.per_rank_bytes[0] / _G,
                "states_and_helpers_gib": states / _G, "activations_per_sample_gib": act / _G,
                "gpu_memory_gib": mem / _G, "plan_s": time.time() - t0}
    batch = args.batch
    cfg, p = plan(batch)
    while not p.fits and batch > 1:  # the linear model missed (it should not: activations scale with the batch)
        batch -= 1
        cfg, p = plan(batch)
    return {
        "overrides": over, "primary": primary, "batch": batch, "fits": bool(p.fits),
        "plan_period": cfg.method.plan_period(cfg), "estimate_gib": p.per_rank_bytes[0] / _G,
        "flops_per_iteration": sum(r.flops_per_iteration for r in p.roles.values() if 0 in r.ranks),
        "roles": {n: {"params": r.params, "trainable": r.trainable, "precision": r.precision,
                      "zero_stage": r.zero_stage, "states_gib": r.model_state_bytes / _G,
                      "activations_gib": r.activation_bytes / _G, "flops_per_iteration": r.flops_per_iteration}
                  for n, r in p.roles.items()},
        "notes": p.notes, "plan_s": time.time() - t0,
    }


WORKERS = {"probe": worker_probe, "write": worker_write, "plan": worker_plan}


# ------------------------------------------------------------------------------------------------
# The orchestrator (standard library only: it runs before anything is installed)
# ------------------------------------------------------------------------------------------------
class Budget:
    """A total deadline, and per-stage boxes: a stage gets its box plus what earlier stages left unused."""

    def __init__(self, total: float, boxes: dict):
        self.t0 = time.time()
        self.end = self.t0 + total
        self.boxes = boxes
        self.saved = 0.0
        self.last = None  # the stage that gets everything left

    def left(self) -> float:
        return self.end - time.time()

    def start(self, stage: str) -> float:
        """The deadline (absolute) for ``stage``."""
        if stage == self.last:
            return self.end
        return min(self.end, time.time() + self.boxes.get(stage, 0) + self.saved)

    def done(self, stage: str, started: float) -> None:
        self.saved = max(0.0, self.saved + self.boxes.get(stage, 0) - (time.time() - started))


def _kill(p: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_until(cmd: list, env: dict, log: Path, deadline: float, grace: float = 5.0, cwd=ROOT) -> tuple[int, bool]:
    """Run ``cmd`` (its own process group) with stdout+stderr into ``log``; stop it at ``deadline``.
    Returns (exit code, timed out)."""
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, deadline - time.time())), False
        except subprocess.TimeoutExpired:
            _kill(p, grace)
            return (p.returncode if p.returncode is not None else -9), True


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(args.budget, {**STAGE_SECONDS, **parse_seconds(args.stage_seconds)})
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(
                        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(var, None)
        self.result = {"budget_s": args.budget, "work": str(self.work), "stages": {}}
        self.tiny = args.tiny

    # -- helpers --------------------------------------------------------------------------------
    def worker(self, name: str, extra: list, log: Path, deadline: float) -> tuple[dict | None, str]:
        res = self.work / f"{name}_{os.getpid()}_{time.time_ns()}.json"
        rc, timed_out = run_until([sys.executable, str(Path(__file__).resolve()), "--worker", name,
                                   "--result", str(res), *extra], self.env, log, deadline)
        if timed_out:
            return None, f"timed out (worker {name})"
        if rc != 0 or not res.is_file():
            return None, f"worker {name} failed (exit {rc}): {tail(log, 8)}"
        return json.loads(res.read_text()), ""

    def record(self, stage: str, info: dict) -> None:
        self.result["stages"][stage] = info
        self.result["elapsed_s"] = round(time.time() - self.budget.t0, 1)
        self.write_json()

    def write_json(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def gate(self, stage: str) -> float | None:
        """The stage's deadline, or None (recorded as skipped) when too little time is left."""
        left = self.budget.left()
        if left < MIN_SECONDS[stage]:
            self.record(stage, {"status": "skipped", "reason": f"{left:.0f} s of the {self.args.budget:.0f} s budget "
                                f"left, the stage needs at least {MIN_SECONDS[stage]} s"})
            return None
        return self.budget.start(stage)

    # -- stages ---------------------------------------------------------------------------------
    def install(self) -> bool:
        t0 = time.time()
        info: dict = {}
        if self.args.wheels:
            deadline = self.gate("install")
            if deadline is None:
                return False
            wheels = Path(self.args.wheels)
            files = sorted(wheels.glob("*.whl"))
            manifest = wheels / "manifest.json"
            want = json.loads(manifest.read_text()).get("python_version") if manifest.is_file() else None
            have = f"{sys.version_info[0]}.{sys.version_info[1]}"
            if want and want != have:
                self.record("install", {"status": "failed", "reason": f"the wheels in {wheels} are for Python {want}, "
                            f"this is {have}: fetch them with tools/fetch_wheels.py --python-version {have}"})
                return False
            site = self.work / "site"
            log = self.out / "install.log"
            rc, timed_out = run_until([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                       "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target",
                                       str(site), *map(str, files)], self.env, log, deadline)
            info.update(wheels=len(files), wheel_bytes=sum(f.stat().st_size for f in files), site=str(site))
            if timed_out or rc != 0:
                info.update(status="failed", reason=("timed out" if timed_out else f"pip exit {rc}") + ": " + tail(log, 8),
                            seconds=round(time.time() - t0, 1))
                self.record("install", info)
                return False
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
        else:
            info["note"] = "no --wheels: this Python's own packages are used"
        site_arg = ["--site", str(self.work / "site")] if self.args.wheels else []
        probe, why = self.worker("probe", site_arg, self.out / "install.log", min(self.budget.end, time.time() + 180))
        if probe is None:
            info.update(status="failed", reason=why, seconds=round(time.time() - t0, 1))
            self.record("install", info)
            return False
        self.result["device"] = {k: v for k, v in probe.items() if k not in ("modules", "site_modules")}
        broken = {k: v["error"] for k, v in probe["modules"].items() if "error" in v}
        info.update(modules=probe["modules"], site_modules=probe.get("site_modules", {}),
                    seconds=round(time.time() - t0, 1),
                    status="failed" if broken else "ok", **({"reason": f"cannot import {', '.join(broken)}"} if broken else {}))
        self.record("install", info)
        if not probe["cuda_available"] and not self.tiny:
            print("gpu_check: no CUDA device: running the CPU path (--tiny)", flush=True)
            self.tiny = True
        self.result["tiny"] = self.tiny
        self.budget.done("install", t0)
        return not broken

    def tests(self) -> None:
        deadline = self.gate("tests")
        if deadline is None:
            return
        t0 = time.time()
        files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("test_*.py"))] \
            if not self.args.tests else self.args.tests.split(",")
        shards = max(1, min(self.args.test_shards or (1 if self.tiny else 8), len(files)))
        groups: list[list] = [[] for _ in range(shards)]
        weight = [0] * shards
        for f in sorted(files, key=lambda f: -(ROOT / f.split("::")[0]).stat().st_size):  # big files first, greedy
            i = weight.index(min(weight))
            groups[i].append(f)
            weight[i] += (ROOT / f.split("::")[0]).stat().st_size
        env = {**self.env, "PYTHONPATH": os.pathsep.join([str(HERE), self.env["PYTHONPATH"]])}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // shards)))  # the shards share the cores
        procs = []
        for i, group in enumerate(groups):
            log = self.work / f"tests_{i}.jsonl"
            log.unlink(missing_ok=True)
            out = self.work / f"tests_{i}.log"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_check", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-m", self.args.test_marker,
                   f"--basetemp={self.work / f'pytest_{i}'}", *group]
            f = open(out, "wb")
            procs.append((subprocess.Popen(cmd, env={**env, TEST_LOG_ENV: str(log)}, cwd=str(ROOT), stdout=f,
                                           stderr=subprocess.STDOUT, start_new_session=True), f, log, out))
        timed_out = False
        for p, f, _, _ in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p, _, _, _ in procs:
                if p.poll() is None:
                    _kill(p, 5.0)
        records = []
        for p, f, log, out in procs:
            f.close()
            for line in log.read_text().splitlines() if log.is_file() else []:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # the line a stopped shard was writing
        with open(self.out / "tests.log", "w") as f:
            for i, (_, _, _, out) in enumerate(procs):
                f.write(f"===== shard {i}: {' '.join(groups[i])}\n")
                f.write(out.read_text(errors="replace")[-LOG_TAIL // len(procs):] + "\n")
        counts: dict = {}
        for r in records:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        codes = [p.returncode for p, _, _, _ in procs]
        # pytest exits 0 (all passed), 1 (some failed), 5 (nothing collected in a shard: all deselected)
        bad_exit = [c for c in codes if c not in (0, 1, 5)]
        failed = counts.get("failed", 0) + counts.get("error", 0)
        status = "timeout" if timed_out else ("failed" if failed or bad_exit else "ok")
        info = {"status": status, "seconds": round(time.time() - t0, 1), "marker": self.args.test_marker,
                "shards": shards, "files": files, "counts": counts, "exit_codes": codes,
                "failures": [{"nodeid": r["nodeid"], "when": r["when"], "message": r["message"],
                              **({"cause": f"not shipped: {m}"} if (m := not_shipped(r["message"])) else {})}
                             for r in records if r["outcome"] in ("failed", "error")],
                "slowest": sorted(({"nodeid": r["nodeid"], "duration_s": r["duration_s"]} for r in records
                                   if r["when"] == "call"), key=lambda r: -r["duration_s"])[:10]}
        if timed_out:
            info["reason"] = f"stopped at the stage's deadline; {len(records)} test outcomes recorded before it"
        if bad_exit:
            info["reason"] = f"pytest exit codes {codes}: see tests.log"
        self.budget.done("tests", t0)
        self.record("tests", info)

    def spawn(self, name: str, extra: list, work: Path) -> tuple[subprocess.Popen, Path]:
        res, log = work / f"{name}.json", open(work / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", name.split("_")[0],
                              "--result", str(res), *extra], env=self.env, cwd=str(ROOT), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return p, res

    @staticmethod
    def wait(procs: list, deadline: float) -> str:
        """'' when every worker ended in time with its result, else why not (the others are stopped)."""
        try:
            for p, _ in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                if p.poll() is None:
                    _kill(p, 2.0)
            return "timed out while writing the pipeline or planning"
        bad = [f"{res.stem} (exit {p.returncode}): {tail(res.with_suffix('.log'), 6)}" for p, res in procs
               if p.returncode != 0 or not res.is_file()]
        return "failed: " + "; ".join(bad) if bad else ""

    def model(self, arch: str) -> None:
        deadline = self.gate(arch)
        if deadline is None:
            return
        t0 = time.time()
        work = self.work / arch
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log = self.out / f"train_{arch}.log"
        log.unlink(missing_ok=True)
        info: dict = {"recipe": RECIPES[arch], "arch": f"tiny {arch}-form (unidad_dist.testing)" if self.tiny
                      else f"configs/{arch}, random weights"}
        lora = self.args.lora if self.args.lora is not None else (4 if self.tiny else 64)
        max_batch = self.args.max_batch or (2 if self.tiny else 16)
        mem = self.args.gpu_memory or self.result.get("device", {}).get("memory_bytes") or 8 * GIB
        pipe = work / "pipeline"
        plan_args = ["--recipe", RECIPES[arch], "--shots", str(work / "shots"), "--lora", str(lora),
                     "--gpu-memory", str(int(mem)), "--max-batch", str(max_batch)]
        common = ["--arch", arch, "--work", str(work)] + (["--tiny"] if self.tiny else [])
        # 1. the pipeline and shots (GPU, disk) beside the batch choice (meta device, CPU) on configs/<arch>; the
        #    tiny architecture exists only as the written pipeline, so there the choice waits for the writer.
        # 2. the plan at that batch on the written pipeline: the same network costs as the run's FLOPs count
        #    (train/perf.py), which then come from the plan cache.
        writer = self.spawn("write", common, work)
        why = ""
        if self.tiny:
            why = self.wait([writer], deadline)
            choose = None if why else self.spawn("plan_choose", ["--backbone", str(pipe)] + plan_args + common, work)
        else:
            choose = self.spawn("plan_choose", ["--backbone", str(ROOT / "configs" / arch)] + plan_args + common, work)
        why = why or self.wait([writer, choose], deadline)
        if not why:
            ch = json.loads(choose[1].read_text())
            info["batch_choice"] = {k: v for k, v in ch.items() if k != "batch"}
            if not ch["fits_at_batch_1"]:
                self.finish_model(arch, work, t0, {**info, "status": "skipped", "reason": "plan: the recipe does not "
                                  f"fit one GPU at batch 1 ({ch['estimate_at_batch_1_gib']:.1f} GiB > 90 % of "
                                  f"{ch['gpu_memory_gib']:.1f} GiB)"})
                return
            at = self.spawn("plan_at", ["--backbone", str(pipe), "--batch", str(ch["batch"])] + plan_args + common,
                            work)
            why = self.wait([at], deadline)
        with open(log, "ab") as f:
            for name in ("write", "plan_choose", "plan_at"):
                if (work / f"{name}.log").is_file():
                    f.write(f"===== {name}\n".encode() + (work / f"{name}.log").read_bytes())
        if why:
            self.finish_model(arch, work, t0, {**info, "status": "timeout" if why.startswith("timed out") else "failed",
                                                "reason": why})
            return
        w, pl = json.loads(writer[1].read_text()), json.loads(at[1].read_text())
        info.update(prepare={"pipeline_s": round(w["pipeline_s"], 1), "shots_s": round(w["shots_s"], 1),
                             "plan_choose_s": round(ch["plan_s"], 1), "plan_s": round(pl["plan_s"], 1)},
                    resolution=w["resolution"], lora_rank=lora,
                    plan={k: v for k, v in pl.items() if k not in ("overrides", "primary", "plan_s")})
        iterations = self.args.iterations or pl["plan_period"] + 1
        rdir = work / "run"
        over = [f"{pl['primary']}.backbone={w['pipeline']}"] + pl["overrides"] + [
            f"run.dir={rdir}", f"train.iterations={iterations}", f"train.batch_size={pl['batch']}", "logging.every=1",
            "logging.progress=false", "logging.sample_every=0", "logging.grid_size=2", "eval.num_samples=2",
            "checkpoint.every=0", "checkpoint.keep=1", "checkpoint.on_signal=false"]
        cmd = [sys.executable, "-m", "unidad_dist", "train", "--config", str(ROOT / RECIPES[arch]), *over]
        info["command"] = " ".join(cmd[1:])
        t_train = time.time()
        with open(log, "ab") as f:
            f.write(b"===== train\n")
        rc, timed_out = run_until(cmd, self.env, log, deadline, grace=30.0)
        info["train_s"] = round(time.time() - t_train, 1)
        info.update(read_run(rdir, iterations, pl["estimate_gib"]))
        if timed_out:
            info.update(status="timeout", reason=f"stopped at the stage's deadline after {info['iterations_logged']} "
                                                 f"of {iterations} iterations")
        elif rc != 0:
            info.update(status="failed", reason=f"train exit {rc}: {tail(log, 6)}")
        else:
            info["status"] = "ok"
        self.finish_model(arch, work, t0, info)

    def finish_model(self, arch: str, work: Path, t0: float, info: dict) -> None:
        info["seconds"] = round(time.time() - t0, 1)
        if not self.args.keep:
            shutil.rmtree(work, ignore_errors=True)  # tens of GB at SDXL size: the next stage needs the disk
        self.budget.done(arch, t0)
        self.record(arch, info)

    def run(self) -> dict:
        stages = [s.strip() for s in self.args.stages.split(",") if s.strip()]
        self.budget.last = stages[-1] if stages else None
        ok = self.install()
        for stage in stages:
            if not ok:
                self.record(stage, {"status": "skipped", "reason": "the install stage failed"})
            elif stage == "tests":
                self.tests()
            elif stage in ARCHS:
                self.model(stage)
        self.result["elapsed_s"] = round(time.time() - self.budget.t0, 1)
        self.write_json()
        for f in sorted(self.work.glob("tests_*.log")):
            f.unlink()
        if not self.args.keep and not self.args.work:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.result


def not_shipped(message: str):
    """The package a test failed for when the wheels leave it out on purpose (tools/fetch_wheels.py: OMIT and the
    optional extras), read from its message; else None."""
    m = re.search(r"No module named '([\w]+)|\b([\w-]+) is not installed", message or "")
    name = (m.group(1) or m.group(2)) if m else None
    return name if name and name.replace("_", "-").lower() in NOT_SHIPPED else None


def summarise(values: list) -> dict:
    warm = values[1:] or values
    return {"median": statistics.median(warm), "mean": statistics.fmean(warm), "first": values[0], "n": len(warm)}


def read_run(rdir: Path, iterations: int, estimate_gib: float) -> dict:
    """The figures a run logged: per key of metrics.jsonl, median/mean over the iterations after the first."""
    recs = []
    f = rdir / "metrics.jsonl"
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    out: dict = {"iterations": iterations, "iterations_logged": len(recs)}
    keys = [k for r in recs for k in r]
    timing = sorted({k for k in keys if k.startswith("time/")} | {"seconds_per_iteration"} & set(keys))
    out["phases"] = {k: summarise([r[k] for r in recs if k in r]) for k in timing}
    out["metrics"] = {k: summarise([r[k] for r in recs if k in r]) for k in METRIC_KEYS if k in keys}
    out["absent"] = [k for k in METRIC_KEYS if k not in keys] + ([] if any(k.startswith("time/") for k in keys)
                                                                 else ["time/<phase>_s"])
    peak = max((r[k] for r in recs for k in r if re.fullmatch(r"memory/rank0/max_allocated_gib", k)), default=None)
    out["memory"] = {"plan_estimate_gib": estimate_gib, "max_allocated_gib": peak,
                     "max_reserved_gib": max((r["memory/rank0/max_reserved_gib"] for r in recs
                                              if "memory/rank0/max_reserved_gib" in r), default=None),
                     "plan_over_measured": (estimate_gib / peak) if peak else None}
    s = rdir / "summary.json"
    if s.is_file():
        try:
            out["wall_time_s"] = json.loads(s.read_text()).get("wall_time_s")
        except ValueError:
            pass
    return out


def parse_seconds(text: str) -> dict:
    out = {}
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = -1.0
        if k not in STAGE_SECONDS or out[k] < 0:
            raise SystemExit(f"gpu_check: --stage-seconds {part!r}: give stage=seconds (a number >= 0) with stage "
                             f"one of {', '.join(STAGE_SECONDS)}")
    return out


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.2f} MiB"


def report(result: dict) -> str:
    lines = [f"gpu_check: {result.get('device', {}).get('device', 'no CUDA device')}, "
             f"{'tiny configs' if result.get('tiny') else 'real configs'}, {result.get('elapsed_s')} s of "
             f"{result['budget_s']} s"]
    for name, st in result["stages"].items():
        lines.append(f"[{name}] {st['status']}" + (f" ({st['reason']})" if st.get("reason") else "")
                     + (f" in {st['seconds']} s" if "seconds" in st else ""))
        if name == "tests" and "counts" in st:
            lines.append("  " + ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items())))
            lines += [f"  FAILED ({f['when']}) {f['nodeid']}: {f['message']}" for f in st["failures"][:20]]
            miss = sorted({f["cause"] for f in st["failures"] if "cause" in f})
            if miss:
                lines.append(f"  {sum('cause' in f for f in st['failures'])} of the failures: "
                             f"{'; '.join(miss)} (left out of the wheels on purpose)")
        if name in ARCHS and "plan" in st:
            p = st["plan"]
            ch = st.get("batch_choice", {})
            lines.append(f"  batch {p['batch']} (plan: largest fitting {ch.get('largest_fitting_batch')}, cap "
                         f"{ch.get('max_batch')}), {st.get('iterations_logged', 0)}/{st.get('iterations')} iterations, "
                         f"LoRA rank {st['lora_rank']}")
            for k, v in st.get("phases", {}).items():
                lines.append(f"  {k:34} median {v['median']:9.4f}  mean {v['mean']:9.4f}  (first {v['first']:.4f})")
            m = st.get("memory", {})
            if m.get("max_allocated_gib") is not None:
                reserved = _size(m["max_reserved_gib"]) if m["max_reserved_gib"] is not None else "?"
                lines.append(f"  peak memory {_size(m['max_allocated_gib'])} allocated ({reserved} reserved); plan "
                             f"estimate {_size(m['plan_estimate_gib'])}: estimate / measured "
                             f"{m['plan_over_measured']:.3f}")
            elif m:
                lines.append(f"  peak memory: not logged; plan estimate {_size(m['plan_estimate_gib'])}")
            for k in ("perf/mfu", "perf/achieved_tflops", "throughput/samples_per_s"):
                if k in st.get("metrics", {}):
                    lines.append(f"  {k:34} median {st['metrics'][k]['median']:.4f}")
            if st.get("absent"):
                lines.append(f"  not logged by the run: {', '.join(st['absent'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--wheels", default=None, help="folder of wheels to install first (tools/fetch_wheels.py)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "build" / "gpu_check"),
                    help="folder for gpu_check.json and the logs (default: $OUT when set)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (pipelines, runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny SD1.5-/SDXL-form configs (automatic without CUDA)")
    ap.add_argument("--stages", default="sd15,sdxl,tests", help="which stages after the install, in order (the "
                    "last gets all the time left)")
    ap.add_argument("--budget", type=float, default=560.0, help="seconds for everything")
    ap.add_argument("--stage-seconds", default="", help="per-stage boxes, e.g. sd15=100,sdxl=150 (defaults: "
                    + ", ".join(f"{k}={v}" for k, v in STAGE_SECONDS.items()) + ")")
    ap.add_argument("--tests", default=None, help="comma-separated test files or node ids (default: tests/test_*.py)")
    ap.add_argument("--test-marker", default="not slow and not multirank", help="pytest -m expression")
    ap.add_argument("--test-shards", type=int, default=None, help="parallel pytest processes (default 8; 1 --tiny)")
    ap.add_argument("--lora", type=int, default=None, help="LoRA rank of the trainable roles (default 64; 4 --tiny)")
    ap.add_argument("--max-batch", type=int, default=None, help="cap on the per-GPU batch (default 16; 2 --tiny)")
    ap.add_argument("--gpu-memory", type=int, default=None, help="bytes the plan may fill (default: the GPU's; 8 GiB "
                    "on a CPU)")
    ap.add_argument("--iterations", type=int, default=None, help="training iterations (default: one plan period + 1)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--arch", choices=ARCHS, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    ap.add_argument("--shots", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        out = WORKERS[args.worker](args)
        Path(args.result).write_text(json.dumps(out, default=str))
        return 0
    if args.wheels and not Path(args.wheels).is_dir():
        raise SystemExit(f"gpu_check: --wheels {args.wheels}: no such folder; fetch them here with "
                         "`.venv/bin/python tools/fetch_wheels.py` and carry build/wheels")
    if args.wheels and not list(Path(args.wheels).glob("*.whl")):
        raise SystemExit(f"gpu_check: --wheels {args.wheels} holds no .whl file; fetch them with tools/fetch_wheels.py")
    unknown = [s for s in args.stages.split(",") if s.strip() and s.strip() not in ("tests",) + ARCHS]
    if unknown:
        raise SystemExit(f"gpu_check: --stages: unknown {', '.join(unknown)}; choose from tests, sd15, sdxl")
    parse_seconds(args.stage_seconds)
    result = Check(args).run()
    print(report(result), flush=True)
    print(f"wrote {Path(args.out) / 'gpu_check.json'}", flush=True)
    bad = [n for n, s in result["stages"].items() if s["status"] not in ("ok",)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
