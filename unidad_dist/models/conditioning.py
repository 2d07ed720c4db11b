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


class TokenEmbedding(nn.Module):
    """A text encoder's token embedding with a new token (Custom Diffusion's modifier token): every other id
    reads the frozen table, ``new_id`` reads ``rows`` — the run's current value of the trained embedding — or,
    inside ``TextConditioner.encode_ids``, a row given with gradients. ``new_id`` is the tokenizer's next id:
    the row after the table, or an unused row of a table padded beyond the tokenizer."""

    def __init__(self, base: nn.Embedding, new_id: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.new_id = new_id
        self.register_buffer("rows", rows, persistent=False)
        self.given: list = [None]  # rows given with gradients (a list: a Parameter here must not become ours)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        rows = self.given[0] if self.given[0] is not None else self.rows
        return torch.where((ids == self.new_id).unsqueeze(-1), rows[0].to(out.dtype), out)

    def full_table(self) -> nn.Embedding:
        """One plain table holding the new row (for a saved encoder)."""
        w = self.base.weight.detach().cpu()
        n = max(w.shape[0], self.new_id + 1)
        table = nn.Embedding(n, w.shape[1])
        table.weight.data[:w.shape[0]] = w
        table.weight.data[self.new_id] = self.rows[0].detach().cpu().to(w.dtype)
        return table


class TokenRows(nn.Module):
    """The trainable embedding of a run's new token, one row per text encoder (SDXL: two): a module of the role
    that trains it, called inside that role's forward (a ZeRO-3 engine gathers its parameters there).
    ``forward(cond)`` turns a condition of token ids (``TextConditioner.tokenize``) into the encoder's hidden
    states with gradients to these rows, in fp32 as every other prompt is encoded (outside a role's autocast).
    Their current value: ``Role.read_params("tokens.")``."""

    def __init__(self, text: "TextConditioner"):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(r.detach().clone()) for r in text.token_rows()])
        self._text = [text]  # the run's shared conditioner: not a submodule (not this role's weights)

    def forward(self, cond: dict) -> dict:
        with torch.autocast(device_type=cond["input_ids"].device.type, enabled=False):
            return self._text[0].encode_ids(cond, [w.float() for w in self.weights])


class TextConditioner(nn.Module):
    """Encodes prompts with the backbone's frozen text encoder(s). ``add_token`` appends a new token whose
    embedding a method trains (its rows live in the training role's ``TokenRows``; ``set_token_rows`` puts
    their current value here, where every other role reads them)."""

    def __init__(self, spec: BackboneSpec, device: torch.device):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.kind = spec.kind
        self.device = device
        self.resolution = spec.pixel_resolution  # SDXL add_time_ids: original = target size, no crop
        self.names = ["text_encoder", "text_encoder_2"] if self.kind == "sdxl" else ["text_encoder"]
        self.token: Optional[str] = None  # the new token add_token appended
        self.tokenizers = []
        encoders = []
        for i, name in enumerate(self.names):
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

    # -- a new token (Custom Diffusion's modifier token) -----------------------------------------------
    def add_token(self, token: str, init: str, key: str = "data.target.rare_token") -> None:
        """Append ``token`` to every tokenizer; its embedding starts as the mean embedding of ``init``'s tokens."""
        from transformers import AddedToken

        for name, tok, enc in zip(self.names, self.tokenizers, self.encoders):
            table = enc.get_input_embeddings()
            # a word of its own: "sks" as a new token does not match inside "asks"
            if token in tok.get_vocab() or tok.add_tokens([AddedToken(token, single_word=True)]) != 1:
                raise UserError(f"{key}='{token}' is already a token of {name}'s tokenizer, so its embedding is "
                                "the pretrained one and is shared with other prompts; choose a new token (e.g. "
                                "<new1>) to train its embedding")
            new_id = tok.convert_tokens_to_ids(token)
            init_ids = tok(init, add_special_tokens=False).input_ids
            if not init_ids or any(i >= table.num_embeddings or i == new_id for i in init_ids):
                raise UserError(f"the new token's initial embedding comes from '{init}', which {name}'s tokenizer "
                                "does not read as existing tokens; give a word it knows (e.g. the class name)")
            rows = table.weight.detach()[init_ids].mean(0, keepdim=True).clone()
            enc.set_input_embeddings(TokenEmbedding(table, new_id, rows))
            # pool at the first end-of-text token, not at the largest id (the new token's id is larger)
            getattr(enc, "text_model", enc).eos_token_id = enc.config.eos_token_id = tok.eos_token_id
        self.token = token

    def _tables(self) -> list[TokenEmbedding]:
        return [enc.get_input_embeddings() for enc in self.encoders]

    def token_rows(self) -> list[torch.Tensor]:
        return [t.rows for t in self._tables()]

    def set_token_rows(self, rows: list[torch.Tensor]) -> None:
        for t, r in zip(self._tables(), rows):
            t.rows = r.detach().to(t.rows.device, t.rows.dtype).reshape(t.rows.shape).clone()

    def component_names(self) -> list[str]:
        """Its pipeline components: the text encoder(s) and tokenizer(s)."""
        return [n for name in self.names for n in (name, name.replace("text_encoder", "tokenizer"))]

    def save_components(self, out: Path) -> None:
        """The text encoder(s) and tokenizer(s) with the new token and its current embedding, as diffusers
        pipeline components (``text_encoder/``, ``tokenizer/``, ...)."""
        for name, tok, enc in zip(self.names, self.tokenizers, self.encoders):
            emb = enc.get_input_embeddings()
            enc.set_input_embeddings(emb.full_table().to(emb.base.weight.device))
            vocab = enc.config.vocab_size
            enc.config.vocab_size = enc.get_input_embeddings().num_embeddings
            try:
                enc.save_pretrained(str(out / name), safe_serialization=True)
            finally:
                enc.set_input_embeddings(emb)
                enc.config.vocab_size = vocab
            tok.save_pretrained(str(out / name.replace("text_encoder", "tokenizer")))

    # -- encoding ----------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict:
        """A condition of token ids (``input_ids``; SDXL also ``input_ids_2``): what a role whose forward
        encodes prompts itself (``TokenRows``) takes instead of hidden states."""
        out = {}
        for i, tok in enumerate(self.tokenizers):
            out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids.to(self.device)
        return out

    def encode_ids(self, ids: dict, rows: Optional[list] = None) -> dict:
        """Hidden states of token ids; with ``rows``, the new token reads them (gradients flow to them)."""
        hidden, pooled = [], None
        tables = self._tables() if rows is not None else []
        for t, r in zip(tables, rows or []):
            t.given[0] = r
        try:
            for i, enc in enumerate(self.encoders):
                out = enc(ids["input_ids" if i == 0 else f"input_ids_{i + 1}"], output_hidden_states=True)
                if self.kind == "sdxl":
                    hidden.append(out.hidden_states[-2])
                    pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
                else:
                    hidden.append(out.last_hidden_state)
        finally:
            for t in tables:
                t.given[0] = None
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
        if self.kind == "sdxl":
            res = self.resolution
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=self.device)
            cond["added_cond_kwargs"] = {"text_embeds": pooled.float(),
                                         "time_ids": time_ids.repeat(hidden[0].shape[0], 1)}
        return cond

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        return self.encode_ids(self.tokenize(prompts))


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
