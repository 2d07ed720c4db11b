"""Bad input (issue 12): every malformed override is one `error:` line, exit status 2 and no run folder;
results are staged in folders of their own, so a user's `<out>.tmp` is never deleted."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unidad_dist import testing
from unidad_dist.cli import main

MALFORMED = [
    # types
    "train.iterations=abc", "train.iterations=1.5", "train.iterations=true", "train.iterations=[1, 2]",
    "train.iterations={a: 1}", "student.optimizer.lr=fast", "student.optimizer.lr=[1e-4]", "student.steps=2.0",
    "gan_heads.enabled=maybe", "student.timesteps=999", "student.timesteps=[999, x]", "run.seed=null",
    # empty values and keys
    "train.iterations=", "run.dir=", "run.name=", "student.optimizer.lr=", "=5", ".iterations=5",
    "train..iterations=5", "train.iterations", "   ",
    # unknown (nested) keys, a key below a value
    "student.optimizer.lrr=1e-4", "student.foo.bar=1", "nosuchsection=1", "train.iterations.sub=1",
    "student.optimizer=1e-4", "train=5",
    # unicode
    "train.itérations=5", "ruñ.name=x", "run.name=a/ü", "run.name=..", "run.name=../escape", "run.name=a/b",
    # huge and non-finite numbers
    "student.optimizer.lr=1e999", "student.optimizer.lr=-1e999", "student.optimizer.lr=.nan", "student.optimizer.lr=.inf",
    "run.dist_timeout=1e999", "gan_heads.lambda_g=.nan", "algorithm.a=1e999", "train.iterations=1e30",
    "train.batch_size=-1", "train.batch_size=0", "student.optimizer.lr=0", "student.optimizer.lr=-1e-4",
    "student.optimizer.clip_grad_norm=-1", "student.steps=0", "student.steps=-2",
    "student.timesteps=[999, -5]", "student.timesteps=[999, 999]",
    # YAML tags and syntax
    "run.name=!!python/object/apply:os.system ['echo pwned']", "train.iterations=!!python/name:os.system",
    "run.name=!!binary aGk=", "train.iterations=!!float 5", "run.name=[unclosed", "run.name={a: ",
    "student.optimizer.lr=!!str 1e-4", "run.name=*a",
]


@pytest.fixture
def recipe(tmp_path, pipes, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/<name> would appear here
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


@pytest.mark.parametrize("override", MALFORMED)
def test_a_malformed_override_is_one_error_line_and_no_run_folder(recipe, tmp_path, capsys, override):
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_no_yaml_tag_runs_code(recipe, tmp_path, capsys):
    marker = tmp_path / "pwned"
    assert main(["train", "--config", str(recipe), f"run.name=!!python/object/apply:os.system ['touch {marker}']"]) == 2
    assert not marker.exists()


def test_student_steps_above_the_schedule_fail_before_training(recipe, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "student.steps=1001"]) == 2
    assert "student.steps=1001" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "student.steps=2", "student.timesteps=[1000, 10]"]) == 2
    assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_export_and_make_shards_leave_a_users_tmp_folder_alone(tmp_path, pipes):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run", **{"train.iterations": 0})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    assert main(["train", "--config", str(path)]) == 0
    for out in (tmp_path / "export", tmp_path / "shards"):
        (tmp_path / f"{out.name}.tmp").mkdir()
        (tmp_path / f"{out.name}.tmp" / "mine.txt").write_text("the user's")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert main(["make-shards", "--images", str(pipes["shots"]), "--out", str(tmp_path / "shards"), "--resolution", "16"]) == 0
    for name in ("export", "shards"):
        assert (tmp_path / f"{name}.tmp" / "mine.txt").read_text() == "the user's"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_failing_make_shards_leaves_nothing(tmp_path, pipes, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(Path(pipes["shots"]).iterdir())[:2]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rc = main(["make-shards", "--images", str(images), "--out", str(tmp_path / "shards"), "--resolution", "16"])
    assert rc == 2, capsys.readouterr()
    assert capsys.readouterr().err.count("error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def _png_header_only(path, w, h):
    """A PNG that declares w x h pixels in a few dozen bytes (no pixel data): what a decompression bomb or a
    damaged file looks like to a reader that trusts the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_odd_target_images(tmp_path):
    """Issue 12 §5: 16-bit images are scaled, not clipped to white; absurd declared sizes are refused before
    decoding (one line naming the file); an extreme aspect ratio is warned about."""
    import numpy as np
    from PIL import Image

    from unidad_dist.data.target import load_image
    from unidad_dist.errors import UserError

    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 16-bit grey
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    x = load_image(tmp_path / "grey16.png", 32)
    assert torch_allclose(x, 128 / 127.5 - 1)  # mid grey, as an 8-bit reader shows it
    for name, (w, h) in {"claims_12k.png": (12000, 12000), "bomb_40k.png": (40000, 40000)}.items():
        _png_header_only(tmp_path / name, w, h)
        with pytest.raises(UserError, match=name):
            load_image(tmp_path / name, 32)
    Image.new("RGB", (300, 3), (10, 200, 30)).save(tmp_path / "strip.png")
    with pytest.warns(UserWarning, match="300x3"):
        load_image(tmp_path / "strip.png", 32)


def torch_allclose(x, value):
    return bool((x - value).abs().max() < 1e-6)


def test_a_bomb_in_make_shards_is_one_line_and_leaves_nothing(tmp_path, pipes, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(Path(pipes["shots"]).iterdir())[:2]:
        (images / p.name).write_bytes(p.read_bytes())
    _png_header_only(images / "zz_bomb.png", 40000, 40000)
    capsys.readouterr()
    assert main(["make-shards", "--images", str(images), "--out", str(tmp_path / "shards"), "--resolution", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "zz_bomb.png" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_in_memory_shards_count_what_they_skip_and_name_a_bad_member(tmp_path, pipes):
    """Issue 12 §5-6: a target read whole counts its skipped shards in the logs, as a split stream does; a
    hash-valid shard whose image cannot be decoded is one line naming the shard and sample."""
    import json
    import warnings

    from unidad_dist.config import config_from_dict
    from unidad_dist.data import shards as sh
    from unidad_dist.device import runtime_from_env
    from unidad_dist.errors import UserError
    from unidad_dist.train.build import build

    out = tmp_path / "t"
    assert main(["make-shards", "--images", str(pipes["shots"]), "--out", str(out), "--resolution", "16",
                 "--per-shard", "2"]) == 0
    urls = sh.open_shards(str(out), None, "images", "t").urls
    assert len(urls) >= 2
    Path(urls[0]).write_bytes(Path(urls[0]).read_bytes()[:300])  # truncated: skipped
    cfg = config_from_dict(testing.tiny_recipe(pipes["pixel"], out, tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = build(cfg, runtime_from_env())
    assert models.data.logs() == {"data/target/skipped_shards": 1.0}
    # a shard whose checksum matches but whose png member is garbage
    raw = sh.open_shards(str(out), None, "images", "t").read_shard(1)
    bad = [{"png": b"\x89PNG garbage", "txt": s["txt"].decode()} for s in raw]
    bad_dir = tmp_path / "bad"
    sh.write_shards(bad_dir, bad, 10, {k: v for k, v in json.loads((out / "manifest.json").read_text()).items()
                                       if k in ("kind", "precomputed", "resolution")})
    cfg = config_from_dict(testing.tiny_recipe(pipes["pixel"], bad_dir, tmp_path / "run2"))
    with pytest.raises(UserError, match=r"shard .*shard-000000\.tar sample 000000000: a member cannot be decoded"):
        build(cfg, runtime_from_env())
    # and one whose samples lost their image member
    no_png = tmp_path / "no_png"
    sh.write_shards(no_png, [{"txt": s["txt"].decode()} for s in raw], 10,
                    {k: v for k, v in json.loads((out / "manifest.json").read_text()).items()
                     if k in ("kind", "precomputed", "resolution")})
    cfg = config_from_dict(testing.tiny_recipe(pipes["pixel"], no_png, tmp_path / "run3"))
    with pytest.raises(UserError, match=r"samples 000000000, 000000001 hold no image"):
        build(cfg, runtime_from_env())
