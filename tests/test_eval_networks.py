"""The paper's evaluation networks and metrics (eval/networks.py, eval/paper.py), without torchvision:
the official key layouts and the reference outputs come from tests/data/eval_reference.json, written by
tools/check_eval_networks.py with pytorch-fid and lpips themselves; the weights are deterministic stand-ins
(tests/eval_fixtures.py) — nothing here is a real network."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_fixtures import seeded_images, seeded_state
from unidad_dist.core.images import to_uint8
from unidad_dist.errors import UserError
from unidad_dist.eval import networks, paper

FIXTURE = json.loads((Path(__file__).parent / "data" / "eval_reference.json").read_text())


def _file(tmp_path: Path, name: str, state: dict) -> Path:
    f = tmp_path / name
    torch.save(state, f)
    return f


def _located(name: str, path: Path) -> networks.Located:
    return networks.Located(networks.SPECS[name], path=path, sha256=networks.sha256_of(path))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    f = _file(tmp_path_factory.mktemp("inc"), "inc.pth", seeded_state(FIXTURE["inception_keys"]))
    return networks.load_inception(_located("inception", f))


def test_inception_has_exactly_the_official_keys_and_reproduces_pytorch_fid(inception):
    ours = {k: list(v.shape) for k, v in inception.state_dict().items()}
    assert ours == FIXTURE["inception_keys"]  # every key of pt_inception-2015-12-05, with its shape
    x = seeded_images(**{k: FIXTURE["inception_input"][k] for k in ("n", "size", "seed")})
    f = inception(to_uint8(x).float() / 255)
    ref = torch.tensor(FIXTURE["inception_pool3"])
    assert f.shape == (6, 2048)
    assert torch.allclose(f, ref, atol=2e-5, rtol=1e-4), float((f - ref).abs().max())


def test_fid_reproduces_pytorch_fid_on_two_sets(inception):
    sets = FIXTURE["fid_sets"]
    a = seeded_images(sets["a"]["n"], sets["a"]["size"], sets["a"]["seed"])
    b = (seeded_images(sets["b"]["n"], sets["b"]["size"], sets["b"]["seed"]) * sets["b"]["scale"]).clamp(-1, 1)
    sa = paper.FidStats.of(paper.inception_features(inception, to_uint8(a)))
    sb = paper.FidStats.of(paper.inception_features(inception, to_uint8(b)))
    assert paper.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(FIXTURE["fid"], rel=1e-4)


def test_frechet_distance_against_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    # tr((S1 S2)^1/2) from the eigenvalues of the non-symmetric product
    tr = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    want = float((mu1 - mu2) @ (mu1 - mu2) + torch.trace(s1) + torch.trace(s2) - 2 * tr)
    assert paper.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # diagonal covariances: sum (sqrt a - sqrt b)^2
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    assert paper.frechet_distance(torch.zeros(3), torch.diag(d1), torch.ones(3), torch.diag(d2)) == pytest.approx(3 + 1 + 0 + 4)
    assert paper.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_lpips_has_the_official_layouts_and_reproduces_lpips(tmp_path):
    trunk = _file(tmp_path, "vgg.pth", seeded_state(FIXTURE["vgg16_keys"]))  # features.* and classifier.*
    heads = _file(tmp_path, "heads.pth", seeded_state(FIXTURE["lpips_heads_keys"]))
    net = networks.load_lpips(_located("vgg16", trunk), _located("lpips_heads", heads))
    io = FIXTURE["lpips_input"]
    p, q = seeded_images(**io["p"]), seeded_images(**io["q"])
    d = net(p, q)
    ref = torch.tensor(FIXTURE["lpips_stand_in_heads"])
    assert torch.allclose(d, ref.float(), rtol=1e-4, atol=1e-7), (d, ref)
    assert torch.allclose(net(p, p), torch.zeros(8), atol=1e-6)
    # a trunk missing a layer, or a heads file of another net, is refused by name
    broken = {k: v for k, v in seeded_state(FIXTURE["vgg16_keys"]).items() if k != "features.28.weight"}
    with pytest.raises(UserError, match="features.28.weight"):
        networks.load_lpips(_located("vgg16", _file(tmp_path, "b.pth", broken)), _located("lpips_heads", heads))
    with pytest.raises(UserError, match="lin0..lin4"):
        networks.load_lpips(_located("vgg16", trunk), _located("lpips_heads", trunk))


def test_inception_file_with_a_wrong_shape_or_missing_key_is_refused(tmp_path):
    state = seeded_state(FIXTURE["inception_keys"])
    state.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(UserError, match="Mixed_7c.branch_pool.conv.weight"):
        networks.load_inception(_located("inception", _file(tmp_path, "a.pth", state)))
    state = seeded_state(FIXTURE["inception_keys"])
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet Inception, not the FID one
    with pytest.raises(UserError, match="fc.weight"):
        networks.load_inception(_located("inception", _file(tmp_path, "b.pth", state)))


def test_locate_checks_the_hash_and_says_what_is_needed(tmp_path, monkeypatch):
    for spec in networks.SPECS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setattr(networks, "_installed_lpips_heads", lambda: None)
    missing = networks.locate("inception")
    assert not missing.available and "pt_inception-2015-12-05-6726825d.pth" in missing.reason
    assert "eval.weights.inception" in missing.reason and "UNIDAD_FID_INCEPTION" in missing.reason
    f = _file(tmp_path, "pt_inception-2015-12-05-6726825d.pth", {"x": torch.zeros(3)})
    wrong = networks.locate("inception", str(f))  # the right name, not the right bytes
    assert not wrong.available and "6726825d" in wrong.reason and "different or damaged" in wrong.reason
    monkeypatch.setenv("UNIDAD_FID_INCEPTION", str(f))
    assert "$UNIDAD_FID_INCEPTION" in networks.locate("inception").reason
    digest = networks.sha256_of(f)
    monkeypatch.setitem(networks.SPECS, "inception",
                        networks.dataclasses.replace(networks.SPECS["inception"], sha256_prefix=digest[:8]))
    ok = networks.locate("inception")
    assert ok.available and ok.sha256 == digest and ok.path == f
    assert not networks.locate("vgg16", str(tmp_path / "nope.pth")).available


def test_lpips_heads_are_found_in_the_installed_package_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    heads = seeded_state(FIXTURE["lpips_heads_keys"])
    torch.save(heads, pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("UNIDAD_LPIPS_HEADS", raising=False)
    found = networks.locate("lpips_heads")
    assert "lpips" not in sys.modules
    assert not found.available and "the installed lpips package" in found.reason  # stand-in bytes: hash refused
    assert "a78928a0" in found.reason


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from unidad_dist.testing import write_tokenizer

    torch.manual_seed(0)
    write_tokenizer(folder)
    vocab = len(CLIPTokenizer.from_pretrained(folder))
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=vocab, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _tiny_dino(folder: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_and_dino_folders_are_checked_and_scored_as_transformers_computes(tmp_path):
    from transformers import CLIPModel, ViTModel

    clip_dir, dino_dir = _tiny_clip(tmp_path / "clip"), _tiny_dino(tmp_path / "dino")
    refused = networks.locate("clip", str(clip_dir))
    assert not refused.available and "not CLIP ViT-B/32" in refused.reason and "patch_size = 8, not 32" in refused.reason
    refused = networks.locate("dino", str(dino_dir))
    assert not refused.available and "hidden_size = 32, not 384" in refused.reason
    clip_loc = networks.locate("clip", str(clip_dir), check=(("model_type", "clip"), ("vision_config.patch_size", 8)))
    dino_loc = networks.locate("dino", str(dino_dir), check=(("model_type", "vit"),))
    assert clip_loc.available and dino_loc.available
    assert clip_loc.sha256 == networks.sha256_of(clip_dir / "model.safetensors")

    gen, refs = seeded_images(5, 32, seed=7), seeded_images(3, 32, seed=8)
    model, proc, tok = networks.load_clip(clip_loc)
    got = got_clip_i = paper.mean_cosine(paper.clip_image_embeddings(model, proc, to_uint8(gen)),
                            paper.clip_image_embeddings(model, proc, to_uint8(refs)))
    # independently: CLIPModel's own forward (image_embeds) on pixels normalised by hand (32 px: no resize)
    mean, std = torch.tensor(proc.image_mean).view(1, 3, 1, 1), torch.tensor(proc.image_std).view(1, 3, 1, 1)
    ref_model = CLIPModel.from_pretrained(clip_dir).eval()

    def embeds(x):
        px = (to_uint8(x).float() / 255 - mean) / std
        out = ref_model(pixel_values=px, input_ids=torch.tensor([[0, 1]]))
        return torch.nn.functional.normalize(out.image_embeds, dim=-1)

    assert got == pytest.approx(float((embeds(gen) @ embeds(refs).T).mean()), abs=1e-5)

    dmodel, dproc = networks.load_dino(dino_loc)
    got = paper.mean_cosine(paper.dino_embeddings(dmodel, dproc, to_uint8(gen)),
                            paper.dino_embeddings(dmodel, dproc, to_uint8(refs)))
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    dmean, dstd = torch.tensor(dproc.image_mean).view(1, 3, 1, 1), torch.tensor(dproc.image_std).view(1, 3, 1, 1)

    def cls(x):
        hidden = vit(pixel_values=(to_uint8(x).float() / 255 - dmean) / dstd, output_hidden_states=True)
        return torch.nn.functional.normalize(vit.layernorm(hidden.hidden_states[-1])[:, 0], dim=-1)

    assert got == pytest.approx(float((cls(gen) @ cls(refs).T).mean()), abs=1e-5)

    # CLIP-T through paper_metrics: sample i against its own prompt i, the rare token removed
    prompts = ["a photo of sks dog", "a sks dog on a beach", "sksy dog", "a red sks dog", "a dog"]
    res = {r["metric"]: r for r in paper.paper_metrics(
        paper.Inputs(samples=gen, shots=refs, steps=1, prompts=prompts, rare_token="sks"), weights=None,
        locate=lambda name, configured=None, check=None: clip_loc if name == "clip" else networks.locate(name))}
    texts = [paper.without_rare_token(p, "sks") for p in prompts]
    assert texts == ["a photo of dog", "a dog on a beach", "sksy dog", "a red dog", "a dog"]
    ids = tok(texts, padding=True, return_tensors="pt")
    out = ref_model(pixel_values=(to_uint8(gen).float() / 255 - mean) / std, input_ids=ids["input_ids"],
                    attention_mask=ids["attention_mask"])
    img, txt = (torch.nn.functional.normalize(e, dim=-1) for e in (out.image_embeds, out.text_embeds))
    assert res["CLIP-T"]["available"]
    assert res["CLIP-T"]["value"] == pytest.approx(float((img * txt).sum(-1).mean()), abs=1e-5)  # paired, not all pairs
    assert res["CLIP-I"]["value"] == pytest.approx(got_clip_i, abs=1e-6)
    # a folder without its processor (or tokenizer) is refused before anything is computed
    (clip_dir / "preprocessor_config.json").unlink()
    lacking = networks.locate("clip", str(clip_dir), check=(("model_type", "clip"),))
    assert not lacking.available and "preprocessor_config.json" in lacking.reason


class _PixelNet:
    """A stand-in LPIPS: mean squared pixel difference (so clusters and pairs can be brute-forced)."""

    def to(self, device):
        return self

    def taps(self, x):
        return [x]

    def between(self, fx, fy):
        return (fx[0] - fy[0]).pow(2).mean(dim=(1, 2, 3))


def test_intra_lpips_clusters_by_nearest_shot_and_averages_within():
    g = torch.Generator().manual_seed(3)
    shots = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    samples = torch.cat([shots[i % 3] + 0.05 * torch.randn(1, 3, 8, 8, generator=g) for i in range(14)]
                        + [shots[3:4] + 0.05 * torch.randn(1, 3, 8, 8, generator=g)])
    value, info = paper.intra_lpips(_PixelNet(), samples, shots, per_cluster=4, batch=3)
    near = torch.stack([((samples - s) ** 2).mean(dim=(1, 2, 3)) for s in shots], 1).argmin(1)
    per = []
    for j in range(4):
        m = samples[near == j][:4]
        if len(m) >= 2:
            per.append(np.mean([float(((m[a] - m[b]) ** 2).mean()) for a in range(len(m)) for b in range(a + 1, len(m))]))
    assert info["cluster_sizes"] == [5, 5, 4, 1] and info["clusters_used"] == 3  # the singleton is skipped
    assert value == pytest.approx(float(np.mean(per)), rel=1e-9)
    with pytest.raises(UserError, match="no shot is the nearest of 2"):
        paper.intra_lpips(_PixelNet(), samples[:3], shots)


def test_fid_stats_round_trip_and_bad_files(tmp_path):
    f = torch.randn(10, 2048, dtype=torch.float64)
    s = paper.FidStats.of(f, "ab" * 32)
    back = paper.FidStats.load(s.save(tmp_path / "stats.npz"))
    assert back.count == 10 and back.weights_sha256 == "ab" * 32
    assert np.allclose(back.mu, f.mean(0).numpy()) and np.allclose(back.sigma, np.cov(f.numpy(), rowvar=False))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(64), sigma=np.eye(64), count=5)
    with pytest.raises(UserError, match=r"mu has shape \(64,\)"):
        paper.FidStats.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "zero.npz", mu=np.zeros(2048), sigma=np.eye(2048), count=0)
    with pytest.raises(UserError, match="count is 0"):
        paper.FidStats.load(tmp_path / "zero.npz")
    with pytest.raises(UserError, match="fid-stats"):
        paper.FidStats.load(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="at least 2 images"):
        paper.FidStats.of(f[:1])


def test_paper_metrics_without_weights_are_unavailable_with_what_they_need(monkeypatch):
    for spec in networks.SPECS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setattr(networks, "_installed_lpips_heads", lambda: None)
    x = seeded_images(4, 16)
    res = paper.paper_metrics(paper.Inputs(samples=x, shots=x[:2], steps=2), weights=None)
    by = {r["metric"]: r for r in res}
    assert list(by) == list(paper.PAPER_METRICS)
    assert all(not r["available"] and r["value"] is None and r["num_samples"] == 4 and r["steps"] == 2 for r in res)
    assert "pt_inception-2015-12-05-6726825d.pth" in by["FID"]["reason"] and "fid-stats" in by["FID"]["reason"]
    assert "vgg16-397923af.pth" in by["Intra-LPIPS"]["reason"] and "lpips" in by["Intra-LPIPS"]["reason"]
    assert "clip-vit-base-patch32" in by["CLIP-I"]["reason"] and "dino-vits16" in by["DINO-I"]["reason"]
    assert by["CLIP-T"]["reason"].startswith("not applicable")
    text = paper.format_results(res)
    assert "FID          (FID Inception-v3" in text and "4 samples, 2 steps): unavailable" in text


def test_paper_metrics_compute_with_located_weights(tmp_path, monkeypatch):
    """FID and Intra-LPIPS through paper_metrics on stand-in files: the values equal the direct computations,
    and the result records each file's sha256."""
    inc = _file(tmp_path, "inc.pth", seeded_state(FIXTURE["inception_keys"]))
    trunk = _file(tmp_path, "vgg.pth", seeded_state(FIXTURE["vgg16_keys"]))
    heads = _file(tmp_path, "heads.pth", seeded_state(FIXTURE["lpips_heads_keys"]))
    files = {"inception": inc, "vgg16": trunk, "lpips_heads": heads}

    def locate(name, configured=None, check=None):
        return _located(name, files[name]) if name in files else networks.locate(name, configured, check)

    ref_imgs = seeded_images(6, 32, seed=11)
    net = networks.load_inception(_located("inception", inc))
    ref_features = paper.inception_features(net, to_uint8(ref_imgs))
    stats = paper.FidStats.of(ref_features, networks.sha256_of(inc))
    stats_file = stats.save(tmp_path / "stats.npz")
    samples, shots = seeded_images(6, 32, seed=12), seeded_images(2, 32, seed=13)
    res = {r["metric"]: r for r in paper.paper_metrics(
        paper.Inputs(samples=samples, shots=shots, steps=1, fid_stats=str(stats_file)), weights=None, locate=locate)}
    gen = paper.FidStats.of(paper.inception_features(net, to_uint8(samples)))
    assert res["FID"]["available"] and res["FID"]["value"] == pytest.approx(
        paper.frechet_distance(gen.mu, gen.sigma, stats.mu, stats.sigma))
    assert res["FID"]["weights_sha256"] == {"inception": networks.sha256_of(inc)} and res["FID"]["reference_count"] == 6
    lp = networks.load_lpips(_located("vgg16", trunk), _located("lpips_heads", heads))
    want, _ = paper.intra_lpips(lp, *(to_uint8(x).float() / 127.5 - 1 for x in (samples, shots)))  # 8-bit, as saved
    assert res["Intra-LPIPS"]["available"] and res["Intra-LPIPS"]["value"] == pytest.approx(want)
    # statistics made with other Inception weights are refused, not compared
    paper.FidStats.of(ref_features, "0" * 64).save(tmp_path / "o.npz")
    other = {r["metric"]: r for r in paper.paper_metrics(
        paper.Inputs(samples=samples, shots=shots, steps=1, fid_stats=str(tmp_path / "o.npz")), weights=None, locate=locate)}
    assert not other["FID"]["available"] and "computed with Inception weights 000000000000" in other["FID"]["reason"]
