"""A text-conditioned backbone in pixel space (an SD1.5-form UNet with 3 input channels and no vae/, the
DeepFloyd-IF form; the built-in toy text teacher's): no VAE is looked for, prompts are encoded, every method
trains on it, and export writes its text encoder beside the UNet (no diffusers pipeline class runs it)."""
import json
import shutil

import pytest
import torch

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.core.draws import SampleDraws
from unidad_dist.errors import UserError
from unidad_dist.models.backbones import resolve_backbone


def test_the_backbone_is_text_conditioned_in_pixel_space(pipes, tmp_path):
    spec = resolve_backbone(str(pipes["pixel_text"]), "source_teacher")
    assert spec.kind == "sd15" and spec.text_conditioned and not spec.latent
    assert spec.pixel_resolution == 16 and spec.vae_factor == 1
    assert resolve_backbone(str(pipes["sd15"]), "source_teacher").latent  # a latent one stays latent
    # a 4-channel (latent) UNet whose vae/ is missing is still the clear error, not a pixel model
    broken = tmp_path / "no_vae"
    shutil.copytree(pipes["sd15"], broken)
    shutil.rmtree(broken / "vae")
    spec = resolve_backbone(str(broken), "source_teacher")
    assert spec.latent
    from unidad_dist.models.conditioning import LatentCodec

    with pytest.raises(UserError, match="needs 'vae/'"):
        LatentCodec(spec, torch.device("cpu"))


def test_unidad_trains_samples_and_exports_on_it(pipes, tmp_path, rt):
    from unidad_dist.config import config_from_dict
    from unidad_dist.train.build import build

    rec = testing.tiny_recipe(pipes["pixel_text"], pipes["shots"], tmp_path / "run")
    cfg = config_from_dict(rec)
    models = build(cfg, rt)
    assert models.codec is None and models.text is not None
    assert models.sample_shape == (3, 16, 16)
    b = models.data.batch(SampleDraws(0, 1, [0, 1], rt.device))
    # the shots go in as pixels (no encoding), with the prompts' embeddings
    assert b.real.shape == (2, 3, 16, 16) and b.real.min() >= -1 and b.real.max() <= 1
    assert b.cond["encoder_hidden_states"].shape[0] == 2
    assert not torch.equal(b.cond["encoder_hidden_states"], b.cond_src["encoder_hidden_states"])  # rare token
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rec))
    assert main(["train", "--config", str(f)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["proxy_distance_after"] > 0
    out = tmp_path / "export"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    info = json.loads((out / "unidad_student.json").read_text())
    assert info["pipeline"] is None  # no diffusers class for a pixel-space CLIP-conditioned UNet
    assert (out / "text_encoder" / "config.json").is_file() and (out / "tokenizer").is_dir()
    assert not (out / "vae").exists()
    # plan sizes it: its text encoder counted, no VAE
    assert main(["plan", "--config", str(f), "--world-size", "1"]) == 0
    # the export is a backbone folder again: it resolves as the same pixel-space text model
    spec = resolve_backbone(str(out), "source_teacher")
    assert spec.kind == "sd15" and not spec.latent


def test_opad_trains_its_kv_projections_on_it(pipes, tmp_path):
    rec = {
        "run": {"name": "opad", "dir": str(tmp_path / "run"), "seed": 0},
        "train": {"iterations": 2, "batch_size": 2},
        "algorithm": {"name": "opad", "features": "stand_in", "w_adv": 0.5},
        "concept_teacher": {"backbone": str(pipes["pixel_text"]), "precision": "fp32", "sample_steps": 3,
                            "optimizer": {"lr": 1e-2, "warmup": 0}},
        "student": {"precision": "fp32", "steps": 2, "optimizer": {"lr": 1e-2, "warmup": 0}},
        "discriminator": {"precision": "fp32", "optimizer": {"lr": 1e-2, "warmup": 0}},
        "data": {"target": {"path": str(pipes["shots"]), "class_name": "disc"}},
        "logging": {"progress": False, "grid_size": 4},
        "eval": {"num_samples": 4},
    }
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rec))
    assert main(["train", "--config", str(f)]) == 0
    from safetensors.torch import load_file

    from unidad_dist.train.checkpoint import role_weights

    init = load_file(str(pipes["pixel_text"] / "unet" / "diffusion_pytorch_model.safetensors"))
    ck = tmp_path / "run" / "checkpoints" / "iter_0000002"
    for role in ("student", "concept_teacher"):
        w = {k.removeprefix("module.unet."): v for k, v in role_weights(ck, role).items()}
        changed = sorted(k for k in init if not torch.equal(w[k], init[k]))
        assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), (role, changed)
