"""Frozen helpers of text/latent backbones: tokenizers, text encoders (SD1.5: one; SDXL: two with pooled
embedding and ``add_time_ids``), the VAE, and rare-token stripping for the source teacher.

A *condition* is a dict the UNet forward understands: ``{}`` for pixel models,
``{"encoder_hidden_states": ...}`` for SD1.5 form, plus ``{"added_cond_kwargs": {"text_embeds",
"time_ids"}}`` for SDXL form.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from unidad_dist.errors import UserError
from unidad_dist.models.backbones import BackboneSpec


def fill_prompt(template: str, rare: str, cls: str) -> str:
    return re.sub(r"\s+", " ", template.replace("{rare}", rare).replace("{cls}", cls)).strip()


def read_prompt_file(path, rare: str, cls: str, what: str = "--prompts") -> list[str]:
    """The prompts of a text file, one per line (blank lines and lines starting with # skipped), with {rare}
    and {cls} filled in (the evaluation sets of the paper: 27 prompts a subject)."""
    f = Path(path).expanduser()
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} '{path}': cannot read it ({type(e).__name__}: {e}); give a text file with one "
                        "prompt per line ({rare} and {cls} are filled in)") from None
    prompts = [fill_prompt(line, rare, cls) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{what} '{path}' holds no prompt; write one prompt per line")
    return prompts


def strip_rare_token(prompt: str, rare: str) -> str:
    """'a sks cat on a beach' -> 'a cat on a beach': the source model never learned the rare token."""
    if not rare:
        return prompt
    out = re.sub(rf"(?<!\w){re.escape(rare)}(?!\w)", " ", prompt)
    return re.sub(r"\s+", " ", out).strip()


def cat_cond(conds: list[Optional[dict]]) -> Optional[dict]:
    """Concatenate conditions along the batch (e.g. [uncond, cond] for one CFG forward)."""
    if not conds or conds[0] is None or not conds[0]:
        return conds[0] if conds else None
    out = {}
    for k, v in conds[0].items():
        if isinstance(v, dict):
            out[k] = cat_cond([c[k] for c in conds])
        else:
            out[k] = torch.cat([c[k] for c in conds], dim=0)
    return out


class TextConditioner(nn.Module):
    """Encodes prompts with the backbone's frozen text encoder(s)."""

    def __init__(self, spec: BackboneSpec, device: torch.device):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.kind = spec.kind
        self.device = device
        self.resolution = spec.pixel_resolution  # SDXL add_time_ids: original = target size, no crop
        names = ["text_encoder", "text_encoder_2"] if self.kind == "sdxl" else ["text_encoder"]
        self.tokenizers = []
        encoders = []
        for i, name in enumerate(names):
            tok_name = name.replace("text_encoder", "tokenizer")
            enc_dir, tok_dir = spec.component(name), spec.component(tok_name)
            if enc_dir is None or tok_dir is None:
                raise UserError(
                    f"{spec.given}: a {self.kind.upper()}-form backbone needs '{name}/' and '{tok_name}/' in its "
                    "pipeline folder; point the recipe at the full pipeline folder"
                )
            try:
                self.tokenizers.append(AutoTokenizer.from_pretrained(str(tok_dir)))
                cls = CLIPTextModelWithProjection if (self.kind == "sdxl" and i == 1) else CLIPTextModel
                encoders.append(cls.from_pretrained(str(enc_dir)))
            except Exception as e:
                raise UserError(f"{spec.given}: cannot load '{name}' ({type(e).__name__}: {e}); re-save the pipeline") from None
        self.encoders = nn.ModuleList(encoders).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            if self.kind == "sdxl":
                hidden.append(out.hidden_states[-2])
                pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
            else:
                hidden.append(out.last_hidden_state)
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
        if self.kind == "sdxl":
            res = self.resolution
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=self.device)
            cond["added_cond_kwargs"] = {"text_embeds": pooled.float(),
                                         "time_ids": time_ids.repeat(len(prompts), 1)}
        return cond


class LatentCodec(nn.Module):
    """The frozen VAE: pixels in [-1, 1] <-> latents x scaling factor. Images already in [-1, 1] go in as
    they are (docs/algorithm.md §10.3)."""

    def __init__(self, spec: BackboneSpec, device: torch.device):
        super().__init__()
        from diffusers import AutoencoderKL

        vae_dir = spec.component("vae")
        if vae_dir is None:
            raise UserError(f"{spec.given}: a latent backbone needs 'vae/' in its pipeline folder")
        try:
            self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval().requires_grad_(False)
        except Exception as e:
            raise UserError(f"{spec.given}: cannot load the VAE ({type(e).__name__}: {e}); re-save the pipeline") from None
        self.scale = float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode().float() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_differentiable(latents).clamp(-1, 1)

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels of latents, with gradients to the latents (the VAE stays frozen) and no clamp (a clamp
        would stop them): for losses in image space."""
        return self.vae.decode((latents / self.scale).to(self.vae.dtype)).sample.float()
