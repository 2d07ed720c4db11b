import ast
import inspect
import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a stray launcher variable must not change what tests see
    os.environ.pop(var, None)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--run-rebuild", action="store_true", default=False,
                     help="also run tests marked rebuild (the built-in teacher's rebuild, ~25 min on 2 cores; "
                          "`make test-rebuild`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (the demo acceptance); run in CI with --run-slow")
    config.addinivalue_line("markers", "multirank: starts ranks in other processes (set automatically: see "
                                       "starts_ranks); `-m 'not multirank'` is the 1-rank subset")
    config.addinivalue_line("markers", "rebuild: rebuilds the shipped demo teacher (~25 min on 2 cores, more than CI's "
                                       "budget allows beside the rest); run with --run-rebuild")


TESTS = Path(__file__).resolve().parent


def starts_ranks(fn, seen=None) -> bool:
    """Whether a test function (or fixture) starts ranks in other processes: its source, or that of a function of
    tests/ it names (followed through the names it uses, imported helpers included), mentions ``nproc`` — the
    rank count of `unidad-dist launch local --nproc` and `torch.distributed.run --nproc_per_node`. Such a test
    needs a process group of several ranks (on one GPU, NCCL refuses two ranks of one device), so the 1-rank
    subset (benchmarks/gpu_check.py) leaves it out."""
    seen = set() if seen is None else seen
    fn = inspect.unwrap(fn)
    if not inspect.isfunction(fn) or fn in seen:
        return False
    seen.add(fn)
    try:
        if TESTS not in Path(inspect.getsourcefile(fn)).resolve().parents:
            return False
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return False
    if "nproc" in src:
        return True
    names = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
    return any(starts_ranks(fn.__globals__.get(n), seen) for n in sorted(names))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects on the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs = [getattr(item, "function", None)] + [d.func for name in getattr(item, "fixturenames", ())
                                                     for d in fixtures.get(name, ())]
        seen: set = set()
        if any(starts_ranks(f, seen) for f in funcs if f is not None):
            item.add_marker(pytest.mark.multirank)
    skips = {"slow": None if config.getoption("--run-slow") else "slow: pass --run-slow (CI does)",
             "rebuild": None if config.getoption("--run-rebuild") else "rebuilds the teacher: pass --run-rebuild"}
    for item in items:
        for marker, reason in skips.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    """Tiny pixel, SD1.5-form, SDXL-form and pixel-space text (SD1.5-form UNet, no VAE) pipelines saved with
    save_pretrained, plus target shots."""
    from unidad_dist import builtin, testing

    root = tmp_path_factory.mktemp("pipes")
    out = {
        "pixel": testing.write_pixel_pipeline(root / "pixel"),
        "sd15": testing.write_text_pipeline(root / "sd15", "sd15"),
        "sdxl": testing.write_text_pipeline(root / "sdxl", "sdxl"),
        "pixel_text": testing.write_text_pipeline(root / "pixel_text", "pixel_text", latent_size=16),
        "shots": builtin.make_shots(root / "shots", "blue_discs", 6, 16, seed=3),
    }
    return out


@pytest.fixture
def make_cfg(pipes, tmp_path):
    """make_cfg(form, **overrides) -> a validated Config on a tiny backbone."""
    from unidad_dist import testing
    from unidad_dist.config import config_from_dict

    def _make(form="pixel", **overrides):
        rec = testing.tiny_recipe(pipes[form], pipes["shots"], tmp_path / f"run_{form}", **overrides)
        return config_from_dict(rec)

    return _make


@pytest.fixture
def rt():
    from unidad_dist.device import runtime_from_env

    return runtime_from_env()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
