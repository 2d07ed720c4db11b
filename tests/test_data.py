"""Shards (make-shards), the manifest, precomputed encodings, split streams and their exact resume (issue 5 §1–3, §8)."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from unidad_dist.cli import main
from unidad_dist.data import shards as sh
from unidad_dist.data.make_shards import make_shards
from unidad_dist.data.stream import SplitStream, count_position, epoch_shards, reader_shards
from unidad_dist.data.target import list_images, load_image
from unidad_dist.errors import UserError
from unidad_dist.core.draws import SampleDraws, global_indices


def _prompt_file(tmp_path: Path, n: int) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(f"a photo of a {{rare}} {{cls}} number {i}" for i in range(n)) + "\n")
    return f


def test_make_shards_images_round_trip_and_manifest(pipes, tmp_path):
    out = tmp_path / "shards"
    assert main(["make-shards", "--images", str(pipes["shots"]), "--out", str(out), "--resolution", "16",
                 "--per-shard", "4", "--rare", "sks", "--cls", "disc"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == sh.FORMAT and m["kind"] == "images" and m["num_samples"] == 6
    assert [s["samples"] for s in m["shards"]] == [4, 2]
    for s in m["shards"]:
        assert sh.sha256_file(out / s["name"]) == s["sha256"]
    assert set(m["fields"]) == {"png", "txt"}
    got = list(sh.iter_all(sh.open_shards(str(out), None, "images", "t")))
    files = list_images(Path(pipes["shots"]))
    for g, f in zip(got, files):
        assert torch.equal(g["image"], load_image(f, 16))  # lossless: what training would load from the folder
        assert g["prompt"] == "a sks disc"
    # a brace pattern reads the same shards
    pattern = str(out / "shard-{000000..000001}.tar")
    again = list(sh.iter_all(sh.open_shards(str(out), pattern, "images", "t")))
    assert [a["key"] for a in again] == [g["key"] for g in got]
    # and a pipe: URL (object stores through their CLI)
    piped = sh.open_shards(str(out), f"pipe:cat {out}/shard-{{000000..000001}}.tar", "images", "t")
    assert len(list(sh.iter_all(piped))) == 6


def _members(out: Path, kind: str) -> list[dict]:
    """Every sample's members (field -> bytes) of a shard folder, read back from its tar files."""
    ss = sh.open_shards(str(out), None, kind, "t")
    return [{k: v for k, v in s.items() if not k.startswith("__") and k != "url"}
            for i in range(ss.num_shards) for s in ss.read_shard(i)]


def _described(name: str, data: bytes) -> dict:
    """A member described from its bytes, independently of the writer: PIL for images, safetensors' header
    for tensors, UTF-8 for text."""
    import io

    from PIL import Image

    if name == "txt":
        data.decode("utf-8")  # raises if it is not
        return {"type": "text", "encoding": "utf-8"}
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in load(data).items()}
    with Image.open(io.BytesIO(data)) as im:
        return {"type": "image", "format": im.format, "size": list(im.size), "mode": im.mode}


@pytest.mark.parametrize("kind", ["images", "prompts", "precomputed_images", "precomputed_prompts"])
def test_manifest_fields_describe_every_member(pipes, make_cfg, tmp_path, kind):
    """manifest.json's fields name every member of every sample with its description (images: format, size
    [w, h], mode; text: its encoding; precomputed tensors: shape and dtype), true of each sample."""
    out = tmp_path / "shards"
    prompts = _prompt_file(tmp_path, 5)
    if kind.startswith("precomputed"):
        import yaml

        from unidad_dist.config import to_dict

        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(to_dict(make_cfg("sd15"))))
        src = {"images": str(pipes["shots"])} if kind.endswith("images") else {"prompts": str(prompts)}
        m = make_shards(str(out), config=str(recipe), precompute=True, per_shard=4, **src)
    elif kind == "images":
        m = make_shards(str(out), images=str(pipes["shots"]), resolution=16, per_shard=4)
    else:
        m = make_shards(str(out), prompts=str(prompts), per_shard=4)
    members = _members(out, m["kind"])
    assert len(members) == m["num_samples"] > 0
    written = json.loads((out / "manifest.json").read_text())["fields"]
    assert written == m["fields"]
    expected = {"images": {"png", "txt"}, "prompts": {"txt"},
                "precomputed_images": {"png", "txt", "latents.safetensors", "emb.safetensors"},
                "precomputed_prompts": {"txt", "emb.safetensors"}}[kind]
    assert set(written) == expected
    for sample in members:
        assert set(sample) == expected
        for name, data in sample.items():
            assert written[name] == _described(name, data), name
    if "png" in written:
        assert written["png"] == {"type": "image", "format": "PNG", "size": [16, 16], "mode": "RGB"}
        small = sh.image_to_png(torch.zeros(3, 8, 8))  # a member unlike the first: the manifest could not say
        with pytest.raises(ValueError, match=r"sample 000000001: field .png. is .*size.: \[8, 8\]"):
            sh.write_shards(tmp_path / "mixed", [{"png": members[0]["png"]}, {"png": small}], 4, {"kind": "images"})
        assert not (tmp_path / "mixed").exists()
    if kind == "precomputed_images":  # SD1.5 form: 4 latent channels
        lat = written["latents.safetensors"]
        assert set(lat) == {"latent", "latent_flip"} and lat["latent"]["dtype"] == "float32"
        assert lat["latent"]["shape"][0] == 4 and lat["latent"] == lat["latent_flip"]
    if kind == "precomputed_prompts":
        assert {k.split(".")[0] for k in written["emb.safetensors"]} == {"cond", "cond_src"}


def test_make_shards_bad_input_writes_nothing(pipes, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_shards(str(out), images=str(pipes["shots"]), resolution=16)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    with pytest.raises(UserError, match="exactly one"):
        make_shards(str(tmp_path / "o1"), resolution=16)
    with pytest.raises(UserError, match="--config"):
        make_shards(str(tmp_path / "o2"), images=str(pipes["shots"]), resolution=16, precompute=True)
    with pytest.raises(UserError, match=r"overrides data.target.resolution=8 apply to the recipe given with --config"):
        make_shards(str(tmp_path / "o2"), images=str(pipes["shots"]), resolution=16,
                    overrides=("data.target.resolution=8",))  # without a recipe they would change nothing
    with pytest.raises(UserError, match="no prompt"):
        (tmp_path / "empty.txt").write_text("\n")
        make_shards(str(tmp_path / "o3"), prompts=str(tmp_path / "empty.txt"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    assert main(["make-shards", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o4"),
                 "--resolution", "16"]) == 2


@pytest.mark.parametrize("form", ["sd15", "sdxl"])
def test_precomputed_latents_and_embeddings_match_on_the_fly_encoding(form, make_cfg, rt, tmp_path):
    """The shards' latents (image + pixel-space flip) and embeddings (prompt, stripped prompt, uncond) equal
    what training computes on the fly from the image folder and prompt list."""
    import yaml

    from unidad_dist.train.build import build

    cfg = make_cfg(form, **{"data.source.prompts": ["a {rare} {cls} on a beach", "a {rare} {cls}"]})
    recipe = tmp_path / "recipe.yaml"
    from unidad_dist.config import to_dict

    recipe.write_text(yaml.safe_dump(to_dict(cfg)))
    tdir, sdir = tmp_path / "target_shards", tmp_path / "prompt_shards"
    make_shards(str(tdir), images=cfg.data.target.path, config=str(recipe), precompute=True, per_shard=4)
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(cfg.data.source.prompts))
    make_shards(str(sdir), prompts=str(pf), config=str(recipe), precompute=True)
    ref = build(cfg, rt, roles={"student"}, checks=False).data  # image folder + prompt list, encoded on the fly
    cfg2 = make_cfg(form, **{"data.target.path": str(tdir), "data.source.path": str(sdir)})
    models = build(cfg2, rt, roles={"student"}, checks=False)
    data = models.data
    calls = {"n": 0}
    enc = data.conditioner.encode

    def counting(prompts):
        calls["n"] += 1
        return enc(prompts)

    data.conditioner.encode = counting
    codec_calls = {"n": 0}
    data.codec.encode = lambda *a, **k: codec_calls.__setitem__("n", codec_calls["n"] + 1)
    torch.testing.assert_close(data.model_space, ref.model_space, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.model_space_flipped, ref.model_space_flipped, rtol=1e-5, atol=1e-5)
    assert torch.equal(data.images, ref.images)
    assert data.prompts == ref.prompts
    for it in range(3):
        d = SampleDraws(0, it, global_indices(it, 0, 1, 0, 1, 2), rt.device)
        a, b = data.batch(d), ref.batch(d)
        assert a.prompts == b.prompts and a.prompts_src == b.prompts_src
        torch.testing.assert_close(a.real, b.real, rtol=1e-5, atol=1e-5)
        for x, y in ((a.cond, b.cond), (a.cond_src, b.cond_src), (a.uncond, b.uncond), (a.real_cond, b.real_cond)):
            torch.testing.assert_close(sh.flatten(x), sh.flatten(y), rtol=1e-5, atol=1e-5)
    assert calls["n"] == 0 and codec_calls["n"] == 0  # training called neither the text encoders nor the VAE


def test_precomputed_shards_from_other_encoders_are_refused(pipes, make_cfg, tmp_path):
    import yaml

    from unidad_dist.config import to_dict

    cfg = make_cfg("sd15")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(cfg)))
    tdir = tmp_path / "t"
    make_shards(str(tdir), images=cfg.data.target.path, config=str(recipe), precompute=True)
    from unidad_dist.device import runtime_from_env
    from unidad_dist.train.build import build

    other = make_cfg("sdxl", **{"data.target.path": str(tdir)})
    with pytest.raises(UserError, match="other frozen encoders|resolution|px"):
        build(other, runtime_from_env(), roles={"student"}, checks=False)


# -- split streams --------------------------------------------------------------------------
def _prompt_shards(tmp_path, n=40, per_shard=5):
    out = tmp_path / f"ps_{n}_{per_shard}"
    make_shards(str(out), prompts=str(_prompt_file(tmp_path, n)), per_shard=per_shard, rare="sks", cls="dog")
    return sh.open_shards(str(out), None, "prompts", "data.source.path")


def test_order_is_a_pure_function_and_every_epoch_reads_every_shard_once(tmp_path):
    shards = _prompt_shards(tmp_path, 37, 5)  # 8 shards, the last one short
    assert epoch_shards(3, "source", 8, 0) == epoch_shards(3, "source", 8, 0)
    assert epoch_shards(3, "source", 8, 0) != epoch_shards(3, "source", 8, 1)
    for epoch in range(3):
        got = sorted(s for q in range(4) for s in reader_shards(3, "source", 8, epoch, q, 4))
        assert got == list(range(8))
    # count_position walks the same order the readers take
    from unidad_dist.data.stream import Reader

    r = Reader(shards, 3, "source", 1, 4)
    it = r((0, 0, 0))
    for k in range(1, 30):
        _, pos = next(it)
        assert pos == count_position(3, "source", shards.counts, 1, 4, k), k


def _run_stream(shards, ranks, workers, batch, n, state=None):
    """n micro-batches per rank; returns the keys each rank saw and each rank's final state."""
    seen, states = {}, {}
    for r in range(ranks):
        s = SplitStream(shards, 11, "source", r, ranks, workers, batch, state=None if state is None else state[r])
        seen[r] = [[x["key"] for x in s.next_batch()] for _ in range(n)]
        states[r] = json.loads(json.dumps(s.state()))  # what a checkpoint stores
        s.close()
    return seen, states


def test_split_stream_resumes_exactly_at_2_ranks_x_2_workers(tmp_path):
    shards = _prompt_shards(tmp_path, 43, 4)  # 11 uneven shards >= 2 ranks x 2 workers
    full, _ = _run_stream(shards, 2, 2, 3, 13)
    first, st = _run_stream(shards, 2, 2, 3, 5)
    rest, _ = _run_stream(shards, 2, 2, 3, 8, state=st)
    for r in range(2):
        assert first[r] + rest[r] == full[r]
    # ranks read disjoint shards within an epoch; the stream never ends (13 x 3 x 2 = 78 > 43 samples)
    assert set(k for b in full[0][:3] for k in b).isdisjoint(k for b in full[1][:3] for k in b)
    # workers = 0 reads in the process: the same order as one reader per rank
    w0, _ = _run_stream(shards, 2, 0, 3, 4)
    assert all(len(b) == 3 for b in w0[0])


def test_a_stream_resumed_at_another_world_size_continues_from_the_global_sample_count(tmp_path):
    """2 ranks x 2 workers read 5 micro-batches of 3; resumed on 1 rank x 2 workers from the saved global
    count (60), the stream yields exactly what a 1-rank run yields after its first 60 samples."""
    shards = _prompt_shards(tmp_path, 43, 4)
    _, st = _run_stream(shards, 2, 2, 3, 5)
    count = SplitStream(shards, 11, "source", 0, 2, 2, 3, state=st[0]).samples_seen()
    assert count == 5 * 3 * 2
    one, _ = _run_stream(shards, 1, 2, 3, count // 3 + 4)
    s = SplitStream(shards, 11, "source", 0, 1, 2, 3, global_count=count)
    assert s.samples_seen() == count
    assert [[x["key"] for x in s.next_batch()] for _ in range(4)] == one[0][count // 3:]
    s.close()


def test_corrupt_and_missing_shards_are_skipped_and_counted(tmp_path):
    shards = _prompt_shards(tmp_path, 20, 4)  # 5 shards
    Path(shards.urls[1]).write_bytes(Path(shards.urls[1]).read_bytes()[:700])  # truncated
    Path(shards.urls[3]).unlink()  # missing
    s = SplitStream(shards, 0, "source", 0, 1, 0, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        keys = [k["key"] for _ in range(6) for k in s.next_batch()]
    assert sorted(s.errors) == sorted([shards.urls[1], shards.urls[3]])
    assert any("skipping shard" in str(x.message) for x in w)
    assert len(keys) == 24 and len(set(keys[:12])) == 12  # 3 readable shards per epoch, none repeated within one
    for u in shards.urls:
        if Path(u).exists():
            Path(u).write_bytes(b"garbage")
    s2 = SplitStream(shards, 0, "source", 0, 1, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="no readable sample"):
            s2.next_batch()


def test_shard_url_count_must_match_the_manifest(tmp_path):
    shards = _prompt_shards(tmp_path, 10, 5)
    with pytest.raises(UserError, match="one URL per shard"):
        sh.open_shards(str(shards.root), str(shards.root / "shard-{000000..000004}.tar"), "prompts",
                       "data.source.path")
    with pytest.raises(UserError, match="holds prompts shards"):
        sh.open_shards(str(shards.root), None, "images", "data.target.path")


def test_training_on_split_streams_resumes_bit_identically_at_2_ranks_x_2_workers(tmp_path, pipes):
    """Text model, precomputed prompt and target shards, both streams split over 2 ranks x 2 workers:
    2 + 2 iterations with a restart equal 4 uninterrupted iterations, bit for bit, and the checkpoint holds
    each rank's stream positions."""
    import subprocess
    import sys

    import yaml
    from unidad_dist.train.checkpoint import role_weights

    from unidad_dist import testing
    from unidad_dist.config import config_from_dict, to_dict

    base = testing.tiny_recipe(pipes["sd15"], pipes["shots"], tmp_path / "x", **{"run.dist_timeout": 60.0})
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(config_from_dict(base))))
    tdir, sdir = tmp_path / "target_shards", tmp_path / "prompt_shards"
    make_shards(str(tdir), images=str(pipes["shots"]), config=str(recipe), precompute=True, per_shard=1)  # 6 shards
    make_shards(str(sdir), prompts=str(_prompt_file(tmp_path, 22)), config=str(recipe), precompute=True, per_shard=3)
    runs = {}
    for name, iters in (("full", 4), ("part", 2)):
        rec = testing.tiny_recipe(pipes["sd15"], tdir, tmp_path / name, **{
            "data.source.path": str(sdir), "data.workers": 2, "data.split_min_samples": 0,
            "train.iterations": iters, "train.fake_updates_per_student": 2, "checkpoint.every": 2,
            "run.dist_timeout": 60.0, "student.optimizer.eps": 1e-3, "fake_teacher.optimizer.eps": 1e-3,
            "target_teacher.optimizer.eps": 1e-3})
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(yaml.safe_dump(rec))

    def launch(recipe, *over):
        r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                            str(recipe), *over], capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    launch(runs["full"])
    launch(runs["part"])
    r = launch(runs["part"], "train.iterations=4")
    assert "resumed from" in r.stdout
    ck_full, ck_part = tmp_path / "full" / "checkpoints" / "iter_0000004", tmp_path / "part" / "checkpoints" / "iter_0000004"
    for role in ("student", "fake_teacher", "target_teacher"):
        a, b = role_weights(ck_full, role), role_weights(ck_part, role)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role}.{k}"
    for rank in (0, 1):
        st_full = json.loads((ck_full / f"data_rank{rank}.json").read_text())
        st_part = json.loads((ck_part / f"data_rank{rank}.json").read_text())
        assert st_full == st_part
        assert st_full["source"]["batches"] == 4 and st_full["target"]["batches"] == 4  # one micro-batch per iteration
        assert set(st_full["source"]["positions"]) == {"0", "1"}  # the two workers' readers
    state = json.loads((ck_full / "state.json").read_text())
    assert state["samples_seen"] == {"source": 16, "target": 16}  # 4 micro-batches x batch 2 x 2 ranks
