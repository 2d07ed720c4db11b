"""The GPU check (issue 14 §4): benchmarks/gpu_check.py, the wheels it installs (tools/fetch_wheels.py) and the
1-rank test subset it runs (tests/conftest.py marks a test `multirank` when it starts ranks).

The check itself needs a GPU for its figures; here its CPU path (--tiny) runs end to end (slow), and its
parts are tested alone: the subset, the reading of a run's metrics, the time boxes, the wheel set."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load("gpu_check", ROOT / "benchmarks" / "gpu_check.py")


# ------------------------------------------------------------------------------------------------
# The 1-rank subset
# ------------------------------------------------------------------------------------------------
def _starts_two_ranks():
    return subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2"])


def _through_a_helper():
    return _starts_two_ranks()


def _one_process():
    return subprocess.run([sys.executable, "-m", "unidad_dist", "train"])


def test_a_test_that_starts_ranks_is_found_through_its_helpers():
    from conftest import starts_ranks

    assert starts_ranks(_starts_two_ranks)
    assert starts_ranks(_through_a_helper)  # the launch is one call away
    assert not starts_ranks(_one_process)
    assert not starts_ranks(len)  # not a function of tests/


def test_the_one_rank_subset_leaves_out_the_multirank_tests():
    files = ["tests/test_multirank.py", "tests/test_engines.py", "tests/test_losses.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                        "not slow and not multirank", *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert ids, r.stdout[-2000:] + r.stderr[-2000:]
    assert not [i for i in ids if i.startswith("tests/test_multirank.py")], ids  # every one launches 2 ranks
    assert any(i.startswith("tests/test_losses.py") for i in ids), ids
    engines = {i.split("::")[1].split("[")[0] for i in ids if i.startswith("tests/test_engines.py")}
    assert "test_generated_config_follows_the_recipe" in engines  # one process
    assert "test_zero_stages_give_the_same_weights" not in engines  # its fixture runs torch.distributed.run


# ------------------------------------------------------------------------------------------------
# Reading a run's figures
# ------------------------------------------------------------------------------------------------
def _metrics(tmp_path: Path, records: list) -> Path:
    rdir = tmp_path / "run"
    rdir.mkdir()
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 3, "cut')
    return rdir


def test_a_runs_figures_are_its_warm_iterations_and_absent_keys_are_named(tmp_path):
    rdir = _metrics(tmp_path, [
        {"iteration": 0, "seconds_per_iteration": 9.0, "time/student_s": 5.0, "time/iteration_s": 9.0},
        {"iteration": 1, "seconds_per_iteration": 2.0, "time/student_s": 0.0, "time/iteration_s": 2.0},
        {"iteration": 2, "seconds_per_iteration": 4.0, "time/student_s": 3.0, "time/iteration_s": 4.0},
    ])
    got = gpu_check.read_run(rdir, 3, estimate_gib=10.0)
    assert got["iterations_logged"] == 3  # the cut line is skipped
    assert got["phases"]["time/student_s"] == {"median": 1.5, "mean": 1.5, "first": 5.0, "n": 2}
    assert got["phases"]["seconds_per_iteration"]["median"] == 3.0
    assert got["metrics"]["time/iteration_s"]["median"] == 3.0
    assert "memory/rank0/max_allocated_gib" in got["absent"] and "perf/mfu" in got["absent"]
    assert "time/iteration_s" not in got["absent"]
    assert got["memory"] == {"plan_estimate_gib": 10.0, "max_allocated_gib": None, "max_reserved_gib": None,
                             "plan_over_measured": None}


def test_the_peak_is_the_largest_logged_and_set_against_the_plan(tmp_path):
    rdir = _metrics(tmp_path, [
        {"iteration": 0, "memory/rank0/max_allocated_gib": 7.0, "memory/rank0/max_reserved_gib": 9.0, "perf/mfu": 0.1},
        {"iteration": 1, "memory/rank0/max_allocated_gib": 8.0, "memory/rank0/max_reserved_gib": 9.5, "perf/mfu": 0.4},
    ])
    got = gpu_check.read_run(rdir, 2, estimate_gib=10.0)
    assert got["memory"]["max_allocated_gib"] == 8.0 and got["memory"]["max_reserved_gib"] == 9.5
    assert got["memory"]["plan_over_measured"] == pytest.approx(1.25)
    assert got["metrics"]["perf/mfu"]["median"] == 0.4  # the first iteration is the warm-up
    assert "time/<phase>_s" in got["absent"]


# ------------------------------------------------------------------------------------------------
# Time boxes and bad input
# ------------------------------------------------------------------------------------------------
def _run_check(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_stage_with_too_little_time_left_is_skipped_with_the_reason(tmp_path):
    args = gpu_check.build_parser().parse_args(["--tiny", "--out", str(tmp_path / "out"), "--work",
                                                str(tmp_path / "work")])
    check = gpu_check.Check(args)
    check.budget.end = time.time() + 15  # below what tests (20 s) and sd15 (40 s) need, above install's 10 s
    assert check.gate("tests") is None
    check.model("sd15")  # gated the same way: nothing is started
    assert check.gate("install") is not None
    got = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    for stage, need in (("tests", 20), ("sd15", 40)):
        assert got["stages"][stage]["status"] == "skipped"
        assert f"budget left, the stage needs at least {need} s" in got["stages"][stage]["reason"]
    assert not (tmp_path / "work" / "sd15").exists()


def test_unused_time_passes_to_the_next_stage():
    b = gpu_check.Budget(1000, {"tests": 100, "sd15": 50})
    now = time.time()
    b.done("tests", now - 40)  # 60 s of its box unused
    assert b.start("sd15") == pytest.approx(time.time() + 110, abs=1)
    b.last = "tests"
    assert b.start("tests") == b.end  # the last stage gets all that is left
    b.end = time.time() + 30
    assert b.start("sd15") == pytest.approx(b.end)  # never past the total


@pytest.mark.parametrize("args, says", [
    (["--wheels", "no/such/folder"], "no such folder; fetch them here"),
    (["--stages", "tests,sd21"], "unknown sd21"),
    (["--stage-seconds", "tests=abc"], "tests=abc"),
])
def test_bad_input_is_one_line(tmp_path, args, says):
    r = _run_check(*args, "--out", str(tmp_path / "out"), timeout=60)
    assert r.returncode != 0
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------------------------------------
# The wheel set
# ------------------------------------------------------------------------------------------------
def test_the_wheel_set_is_the_pinned_closure_without_torch_and_what_it_brings():
    fw = _load("fetch_wheels", ROOT / "tools" / "fetch_wheels.py")
    pins = fw.pins(ROOT / "requirements-ci.txt")
    got = fw.wanted("3.12", fw.OMIT)
    for name in ("deepspeed", "diffusers", "transformers", "peft", "webdataset", "safetensors", "xxhash", "numpy",
                 "pillow", "pytest", "pydantic-core", "tokenizers", "filelock"):
        assert name in got, name
    for name in ("deepspeed", "diffusers", "transformers", "numpy", "pytest"):
        assert got[name] == f"{name}=={pins[name]}"  # the versions CI tests
    for name in ("torch", "sympy", "networkx", "jinja2", "fsspec", "hf-xet", "matplotlib", "wandb", "ray"):
        assert name not in got, name
    # markers are read for the target Python: huggingface_hub needs tomli below 3.11 only
    assert "tomli" not in got and "tomli" in fw.wanted("3.10", fw.OMIT)


# ------------------------------------------------------------------------------------------------
# The CPU path, end to end
# ------------------------------------------------------------------------------------------------
def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel: the install stage must put it where the later stages import from."""
    folder.mkdir(parents=True)
    whl = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe/__init__.py": "__version__ = '0.1'\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


@pytest.mark.slow
def test_the_cpu_path_runs_every_stage_end_to_end(tmp_path):
    wheels = _probe_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    r = _run_check("--tiny", "--wheels", str(wheels), "--tests", "tests/test_losses.py", "--iterations", "2",
                   "--out", str(out), "--budget", "3000", "--stage-seconds", "install=600,tests=600,sd15=900,sdxl=900",
                   timeout=3600)
    got = json.loads((out / "gpu_check.json").read_text())
    assert r.returncode == 0, json.dumps(got, indent=1)[-4000:] + r.stdout[-2000:]
    install = got["stages"]["install"]
    assert install["status"] == "ok" and install["wheels"] == 1
    probe = install["site_modules"]["gpu_check_probe"]
    assert probe["version"] == "0.1" and "/site/gpu_check_probe/" in probe["file"]  # imported from the install
    tests = got["stages"]["tests"]
    assert tests["status"] == "ok" and tests["counts"].get("passed", 0) >= 5 and not tests["failures"], tests
    for arch in ("sd15", "sdxl"):
        st = got["stages"][arch]
        assert st["status"] == "ok", st
        assert st["iterations_logged"] == 2 and st["plan"]["batch"] == 2  # capped at --max-batch (2 with --tiny)
        assert st["batch_choice"]["largest_fitting_batch"] >= 2 and st["plan"]["estimate_gib"] > 0
        assert "seconds_per_iteration" in st["phases"]
        for key in gpu_check.METRIC_KEYS:  # each figure is read from the run, or named as absent
            assert (key in st["metrics"]) != (key in st["absent"]), key
        roles = st["plan"]["roles"]
        assert all(r["precision"] == "bf16" for r in roles.values())
        assert any(r["trainable"] for r in roles.values())
        assert (out / f"train_{arch}.log").is_file()
    assert (out / "tests.log").is_file()
    assert "gpu_check: no CUDA device" in r.stdout or got["tiny"]
