"""Export (issue 5 §7): a plain diffusers pipeline call on the exported folder gives the images of
`unidad-dist sample` to 1e-5 for the same generator; LoRA students export adapter + merged weights; EMA."""
import json
import warnings

import numpy as np
import pytest
import torch
import yaml

from unidad_dist import testing
from unidad_dist.cli import main


def _train(tmp_path, pipe, shots, **over):
    rec = testing.tiny_recipe(pipe, shots, tmp_path / "run", **{"train.iterations": 2, **over})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    assert main(["train", "--config", str(recipe)]) == 0
    return tmp_path / "run"


def _ours(tmp_path, run, n, seed, *extra):
    from safetensors.torch import load_file

    f = tmp_path / f"ours_{seed}.safetensors"
    assert main(["sample", "--run", str(run), "--num", str(n), "--generator-seed", str(seed), "--out", str(f),
                 *extra]) == 0
    return load_file(str(f))["images"]


def _load(out):
    """The exported pipeline, loaded as unidad_student.json's call_precision says (dtype; UNet autocast), and
    the warnings (Python's and diffusers' logger's) that loading emitted."""
    import logging

    from diffusers import DiffusionPipeline

    info = json.loads((out / "unidad_student.json").read_text())
    prec = info["call_precision"]
    kwargs = {} if prec["torch_dtype"] is None else {"torch_dtype": getattr(torch, prec["torch_dtype"])}
    records: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = DiffusionPipeline.from_pretrained(str(out), **kwargs)
    finally:
        diffusers_logger.removeHandler(handler)
    if prec["unet_autocast"] is not None:  # the lines the JSON gives, as a user pastes them
        exec(prec["code"], {"torch": torch, "pipe": pipe})
    return pipe, info, [str(w.message) for w in caught] + [r.getMessage() for r in records]


def _pipeline_images(out, form, n, seed, prompt="a sks cat", loaded=None):
    pipe, info, _ = loaded or _load(out)
    g = torch.Generator().manual_seed(seed)
    if form == "pixel":
        img = pipe(batch_size=n, generator=g, output_type="np", **info["pipeline_call"]).images
        return torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).float(), pipe
    img = pipe(prompt=prompt, num_images_per_prompt=n, generator=g, output_type="pt", **info["pipeline_call"]).images
    return img.float(), pipe


@pytest.mark.parametrize("form,over", [
    ("pixel", {"student.prediction": "x0", "student.ema": 0.5}),
    ("sd15", {"student.steps": 3}),
    ("sdxl", {"student.steps": 2}),
])
def test_exported_pipeline_equals_unidad_sample(tmp_path, pipes, form, over):
    run = _train(tmp_path, pipes[form], pipes["shots"], **over)
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    info = json.loads((out / "unidad_student.json").read_text())
    assert info["pipeline"] == {"pixel": "DDPMPipeline", "sd15": "StableDiffusionPipeline",
                                "sdxl": "StableDiffusionXLPipeline"}[form]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    extra = ["--prompt", "a sks cat"] if form != "pixel" else []
    ours = _ours(tmp_path, run, 3, 7, *extra)
    loaded = _load(out)
    assert loaded[2] == [], f"loading the export warned: {loaded[2]}"  # e.g. the steps_offset deprecation
    assert info["call_precision"]["unet_autocast"] is None  # an fp32 student: a plain call
    theirs, pipe = _pipeline_images(out, form, 3, 7, loaded=loaded)
    assert type(pipe).__name__ == info["pipeline"] and type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.scheduler.set_timesteps(info["steps"])
    assert pipe.scheduler.timesteps.tolist() == info["timesteps"]  # set_timesteps(K) gives the trained timesteps
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0.01  # not a constant image
    if form == "pixel":  # EMA by default; --raw gives the trained weights, which differ
        raw = _ours(tmp_path, run, 3, 7, "--raw")
        assert not torch.allclose(raw, ours, atol=1e-4)
        assert info["ema"] is True


@pytest.mark.parametrize("form,over", [
    ("pixel", {}),  # epsilon output: x̂0 at t = 999 divides by a small sqrt(alpha_bar), so errors show
    ("sd15", {"student.steps": 3}),  # text encoder and VAE: they stay outside autocast
])
def test_bf16_autocast_student_export_reproduces_sample_as_the_json_says(tmp_path, pipes, form, over):
    """A bf16_autocast student: `sample` runs its UNet under bf16 autocast. Loaded and called as
    unidad_student.json's call_precision says (UNet under autocast, its output in fp32), the pipeline gives
    sample's images to 1e-5; called plainly in fp32 it does not."""
    run = _train(tmp_path, pipes[form], pipes["shots"], **{"student.precision": "bf16_autocast", **over})
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    prec = json.loads((out / "unidad_student.json").read_text())["call_precision"]
    assert prec["student_precision"] == "bf16_autocast" and prec["unet_autocast"] == "bfloat16"
    extra = ["--prompt", "a sks cat"] if form != "pixel" else []
    ours = _ours(tmp_path, run, 3, 7, *extra)
    loaded = _load(out)
    assert loaded[2] == [], f"loading the export warned: {loaded[2]}"
    theirs, pipe = _pipeline_images(out, form, 3, 7, loaded=loaded)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0.01
    del pipe.unet.forward  # the lines undone: the plain fp32 call
    plain, _ = _pipeline_images(out, form, 3, 7, loaded=(pipe, *loaded[1:]))
    assert (plain - ours).abs().max() > 1e-3  # the precision matters here: the test above means something


def test_lora_student_exports_adapter_and_merged_weights(tmp_path, pipes):
    run = _train(tmp_path, pipes["sd15"], pipes["shots"], **{
        "student.lora.rank": 4, "student.lora.target_modules": ["to_q", "to_v"],
        "student.optimizer.lr": 1e-2})
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert (out / "unet_lora" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "unet_lora" / "adapter_config.json").read_text())["r"] == 4
    ours = _ours(tmp_path, run, 2, 3, "--prompt", "a sks cat")
    theirs, pipe = _pipeline_images(out, "sd15", 2, 3)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)  # merged weights sample like the adapter
    # the adapter on the base UNet, through peft, gives the merged weights
    from peft import PeftModel  # noqa: F401
    from peft import inject_adapter_in_model, LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(pipes["sd15"] / "unet"))
    cfg = LoraConfig.from_pretrained(str(out / "unet_lora"))
    inject_adapter_in_model(cfg, base)
    set_peft_model_state_dict(base, load_file(str(out / "unet_lora" / "adapter_model.safetensors")))
    merged = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    c = torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, c).sample, merged(x, t, c).sample, rtol=1e-4, atol=1e-5)


def test_export_checkpoint_choice_and_bad_input(tmp_path, pipes, capsys):
    run = _train(tmp_path, pipes["pixel"], pipes["shots"], **{"checkpoint.every": 1, "checkpoint.keep": 5})
    out = tmp_path / "e1"
    assert main(["export", "--run", str(run), "--out", str(out), "--checkpoint", "1"]) == 0
    assert json.loads((out / "unidad_student.json").read_text())["checkpoint"] == "iter_0000001"
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "e2"), "--checkpoint", "9"]) == 2
    assert "no checkpoint of iteration 9" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2  # not empty: nothing overwritten
    assert "not empty" in capsys.readouterr().err
