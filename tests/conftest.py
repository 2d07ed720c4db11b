import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a stray launcher variable must not change what tests see
    os.environ.pop(var, None)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (the demo acceptance); run in CI with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    """Tiny pixel, SD1.5-form and SDXL-form pipelines saved with save_pretrained, plus target shots."""
    from unidad_dist import builtin, testing

    root = tmp_path_factory.mktemp("pipes")
    out = {
        "pixel": testing.write_pixel_pipeline(root / "pixel"),
        "sd15": testing.write_text_pipeline(root / "sd15", "sd15"),
        "sdxl": testing.write_text_pipeline(root / "sdxl", "sdxl"),
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
