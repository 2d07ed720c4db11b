import json

import pytest
import torch

from unidad_dist.errors import UserError
from unidad_dist.models.backbones import (encoder_features, feature_channels, load_unet, load_weights,
                                          resolve_backbone, unet_forward, build_unet)
from unidad_dist.models.conditioning import TextConditioner
from unidad_dist.models.gan_heads import GanHeads
from unidad_dist.device import CPU

FORMS = ["pixel", "sd15", "sdxl"]


def _inputs(spec, unet, batch=2):
    torch.manual_seed(0)
    x = torch.randn(batch, spec.in_channels, spec.sample_size, spec.sample_size)
    t = torch.tensor([10, 900])[:batch]
    cond = TextConditioner(spec, CPU).encode(["a sks cat", "a dog"][:batch]) if spec.text_conditioned else None
    return x, t, cond


@pytest.mark.parametrize("form", FORMS)
def test_kind_detection_and_loading(pipes, form):
    spec = resolve_backbone(str(pipes[form]), "source_teacher")
    assert spec.kind == form
    unet = load_unet(spec, None, True, "source_teacher")
    x, t, cond = _inputs(spec, unet)
    out = unet_forward(unet, x, t, cond)
    assert out.shape == x.shape
    # A bare UNet folder inside a pipeline finds the scheduler beside it.
    spec2 = resolve_backbone(str(pipes[form] / "unet"), "student")
    assert spec2.scheduler_config is not None


@pytest.mark.parametrize("form", FORMS)
def test_gan_heads_one_per_down_block_plus_mid(pipes, form):
    spec = resolve_backbone(str(pipes[form]), "fake_teacher")
    heads = GanHeads.for_backbone(spec.unet_config)
    assert len(heads.heads) == len(spec.unet_config["down_block_types"]) + 1
    unet = load_unet(spec, None, True, "fake_teacher")
    x, t, cond = _inputs(spec, unet)
    feats = encoder_features(unet, x, t, cond)
    assert [f.shape[1] for f in feats] == feature_channels(spec.unet_config)
    assert heads(feats).shape == (2,)


@pytest.mark.parametrize("form", FORMS)
def test_encoder_only_features_equal_full_forward(pipes, form):
    spec = resolve_backbone(str(pipes[form]), "fake_teacher")
    unet = load_unet(spec, None, True, "fake_teacher").eval()
    x, t, cond = _inputs(spec, unet)
    captured = []

    def hook(_m, _inp, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    handles = [b.register_forward_hook(hook) for b in unet.down_blocks] + [unet.mid_block.register_forward_hook(hook)]
    with torch.no_grad():
        unet_forward(unet, x, t, cond)
        full = list(captured)
        enc = encoder_features(unet, x, t, cond)
    for h in handles:
        h.remove()
    assert len(full) == len(enc)
    for a, b in zip(full, enc):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_pass_skips_decoder(pipes):
    spec = resolve_backbone(str(pipes["pixel"]), "fake_teacher")
    unet = load_unet(spec, None, True, "fake_teacher")
    calls = []
    hs = [b.register_forward_hook(lambda *a: calls.append(1)) for b in unet.up_blocks]
    encoder_features(unet, *_inputs(spec, unet))
    assert calls == []
    for h in hs:
        h.remove()


def test_init_formats_and_strictness(pipes, tmp_path):
    from safetensors.torch import save_file

    spec = resolve_backbone(str(pipes["pixel"]), "student")
    ref = load_unet(spec, None, True, "source_teacher")
    sd = {k: v.clone() + 1.0 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "w.bin")  # DDP-style prefix
    for init in (tmp_path / "w.safetensors", tmp_path / "w.bin"):
        unet = build_unet(spec)
        load_weights(unet, init, strict=True, what="student.init")
        for k, v in unet.state_dict().items():
            torch.testing.assert_close(v, sd[k])
    partial = {k: v for i, (k, v) in enumerate(sd.items()) if i > 0}
    partial["extra.weight"] = torch.zeros(1)
    save_file(partial, str(tmp_path / "p.safetensors"))
    with pytest.raises(UserError, match=r"missing keys: .*unexpected keys: extra.weight.*strict=false"):
        load_weights(build_unet(spec), tmp_path / "p.safetensors", strict=True, what="student.init")
    load_weights(build_unet(spec), tmp_path / "p.safetensors", strict=False, what="student.init")


def test_bad_model_folders(tmp_path, pipes):
    with pytest.raises(UserError, match="does not exist"):
        resolve_backbone(str(tmp_path / "missing"), "source_teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers folder"):
        resolve_backbone(str(tmp_path / "empty"), "source_teacher")
    bad = tmp_path / "bad"
    (bad / "unet").mkdir(parents=True)
    (bad / "model_index.json").write_text("{}")
    (bad / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_backbone(str(bad), "source_teacher")
    (bad / "unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UserError, match="not one of UNet2DModel"):
        resolve_backbone(str(bad), "source_teacher")
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b"\x00garbage")
    spec = resolve_backbone(str(pipes["pixel"]), "student")
    with pytest.raises(UserError, match="cannot read weights"):
        load_weights(build_unet(spec), garbage, strict=True, what="student.init")


def test_unsafe_pickle_is_refused(pipes, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    spec = resolve_backbone(str(pipes["pixel"]), "student")
    with pytest.raises(UserError, match="cannot read weights"):
        load_weights(build_unet(spec), tmp_path / "evil.bin", strict=True, what="student.init")
