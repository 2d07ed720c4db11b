"""Tiny diffusers pipelines written to disk, for tests and benchmarks.

They are saved with ``save_pretrained`` and loaded back through the same code path as a user's real
model folder (nothing is downloaded). The tokenizer is a character-level CLIP tokenizer built from files
we write (docs/clusters.md, "Tiny diffusers pipelines, offline").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unidad_dist.builtin import tiny_pixel_unet_config, tiny_text_unet_config, write_tokenizer  # noqa: F401 (tests import it from here)
from unidad_dist.core.schema import nest_dotted
from unidad_dist.device import prepare_deepspeed_env


def _scheduler(prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)


def write_pixel_pipeline(folder: Path, resolution: int = 16, prediction_type: str = "epsilon",
                         block_out_channels=(16, 32), seed: int = 0) -> Path:
    from diffusers import UNet2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_pixel_unet_config(resolution, list(block_out_channels), 1, 8))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    _scheduler(prediction_type, "linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def _text_config(hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=200, max_position_embeddings=16, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def write_text_pipeline(folder: Path, form: str = "sd15", prediction_type: str = "epsilon", seed: int = 0,
                        latent_size: int = 8) -> Path:
    """A tiny SD1.5-form (one text encoder) or SDXL-form (two encoders, pooled, add_time_ids) pipeline; form
    "pixel_text": an SD1.5-form UNet in pixel space (3 channels, no VAE; ``latent_size`` is its resolution)."""
    prepare_deepspeed_env()  # saving the text encoders makes transformers import DeepSpeed
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    if form == "pixel_text":
        UNet2DConditionModel(**tiny_text_unet_config(latent_size, (16, 32), 1, 8, 32, 4)).save_pretrained(
            folder / "unet", safe_serialization=True)
        CLIPTextModel(_text_config()).save_pretrained(folder / "text_encoder", safe_serialization=True)
        write_tokenizer(folder / "tokenizer")
        _scheduler(prediction_type).save_pretrained(folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": None, "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"]}))
        return folder
    sdxl = form == "sdxl"
    unet_kwargs = dict(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=64 if sdxl else 32,
    )
    if sdxl:
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)
    UNet2DConditionModel(**unet_kwargs).save_pretrained(folder / "unet", safe_serialization=True)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=latent_size * 2).save_pretrained(folder / "vae", safe_serialization=True)
    CLIPTextModel(_text_config()).save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tokenizer(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    if sdxl:
        CLIPTextModelWithProjection(_text_config()).save_pretrained(folder / "text_encoder_2", safe_serialization=True)
        write_tokenizer(folder / "tokenizer_2")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    _scheduler(prediction_type).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def tiny_recipe(backbone: Path, target: Path, run_dir: Path, **overrides) -> dict:
    """A minimal fp32 recipe dict on a tiny backbone (tests merge their overrides into it)."""
    rec = {
        "run": {"name": "tiny", "dir": str(run_dir), "seed": 0},
        "train": {"iterations": 2, "batch_size": 2, "fake_updates_per_student": 1},
        "source_teacher": {"backbone": str(backbone), "precision": "fp32"},
        "student": {"steps": 2, "precision": "fp32", "optimizer": {"lr": 1e-4, "warmup": 0}},
        "fake_teacher": {"precision": "fp32", "optimizer": {"lr": 1e-4, "warmup": 0}},
        "target_teacher": {"mode": "online", "precision": "fp32", "optimizer": {"lr": 1e-4, "warmup": 0}},
        "algorithm": {"a": 0.5},
        "data": {"target": {"path": str(target), "class_name": "cat"}},
        "logging": {"progress": False, "grid_size": 4},
        "eval": {"num_samples": 4},
    }
    return apply_overrides(rec, overrides)


def apply_overrides(rec: dict, overrides: dict) -> dict:
    """Set dotted keys (``"train.iterations": 4``) in a recipe dict, creating sections as needed; returns it."""
    return nest_dotted(overrides, rec)
