"""Backbones: resolve a user's diffusers folder, build UNets, load weights safely, run forwards and the
encoder-only feature pass used by the GAN heads.

Three forms are supported (docs/algorithm.md §1): pixel-space ``UNet2DModel`` (unconditional),
``UNet2DConditionModel`` in SD1.5 form, and in SDXL form (``addition_embed_type="text_time"``); an SD1.5-form
UNet with 3 input channels and no ``vae/`` works in pixel space (the DeepFloyd-IF form). A
backbone is given as a diffusers *pipeline* folder (``model_index.json``, ``unet/``, ``scheduler/``, and
for text models ``text_encoder*/``, ``tokenizer*/``, ``vae/``) or a bare UNet folder with a
``scheduler_config.json`` beside it. Built-in tiny models (``builtin:<name>``) are written to such a
folder first, so they take the very same path as a user's checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from unidad_dist import builtin
from unidad_dist.device import CPU
from unidad_dist.errors import UserError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclass
class BackboneSpec:
    given: str  # as written in the recipe
    root: Optional[Path]  # pipeline folder, when there is one
    unet_dir: Path
    unet_class: str
    unet_config: dict
    scheduler_config: Optional[dict]

    @property
    def kind(self) -> str:
        if self.unet_class == "UNet2DModel":
            return "pixel"
        if self.unet_config.get("addition_embed_type") == "text_time":
            return "sdxl"
        return "sd15"

    @property
    def text_conditioned(self) -> bool:
        return self.kind != "pixel"

    @property
    def latent(self) -> bool:
        """Works in a VAE's latent space: every text-conditioned backbone except a pixel-space one (3 input
        channels and no ``vae/``, the DeepFloyd-IF form; e.g. the built-in toy text teacher)."""
        return self.text_conditioned and not (self.in_channels == 3 and self.component("vae") is None)

    @property
    def in_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 3))

    @property
    def sample_size(self) -> int:
        s = self.unet_config.get("sample_size", 32)
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side: 2^(VAE blocks - 1); 1 for a pixel backbone."""
        vae = self.component("vae")
        if not self.latent or vae is None or not (vae / "config.json").is_file():
            return 1
        return 2 ** (len(_read_json(vae / "config.json", "VAE config").get("block_out_channels", [0])) - 1)

    @property
    def pixel_resolution(self) -> int:
        return self.sample_size * self.vae_factor

    def component(self, name: str) -> Optional[Path]:
        if self.root is None:
            return None
        p = self.root / name
        return p if p.is_dir() else None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: '{path}' is missing; point the recipe at a complete diffusers folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: '{path}' is not valid JSON ({e}); re-save the model with save_pretrained") from None


def resolve_backbone(given: str, role: str) -> BackboneSpec:
    """Turn a recipe's backbone entry into a checked ``BackboneSpec`` (no weights are read)."""
    what = f"{role}.backbone"
    path = builtin.resolve(given) if given.startswith("builtin:") else Path(given).expanduser()
    if not path.exists():
        raise UserError(f"{what}: folder '{given}' does not exist (looked for {path.resolve()}); give a diffusers "
                        "pipeline or UNet folder")
    if not path.is_dir():
        raise UserError(f"{what}: '{given}' is a file; give a diffusers folder (weights files go in {role}.init)")
    root: Optional[Path] = None
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        root = path
        unet_dir = path / "unet"
        if not (unet_dir / "config.json").is_file():
            raise UserError(f"{what}: pipeline folder '{given}' has no unet/config.json; re-save it with save_pretrained")
        sched_path = path / "scheduler" / "scheduler_config.json"
    elif (path / "config.json").is_file():
        unet_dir = path
        sched_path = path / "scheduler_config.json"
        if not sched_path.is_file() and (path.parent / "scheduler" / "scheduler_config.json").is_file():
            sched_path = path.parent / "scheduler" / "scheduler_config.json"
            root = path.parent if (path.parent / "model_index.json").is_file() else None
    else:
        raise UserError(
            f"{what}: '{given}' is not a diffusers folder (no model_index.json, unet/config.json or config.json); "
            "save the model with save_pretrained"
        )
    unet_config = _read_json(unet_dir / "config.json", what)
    cls = unet_config.get("_class_name")
    if cls not in UNET_CLASSES:
        raise UserError(
            f"{what}: '{unet_dir / 'config.json'}' describes a {cls!r}, not one of {', '.join(UNET_CLASSES)}"
        )
    sched = _read_json(sched_path, what) if sched_path.is_file() else None
    return BackboneSpec(given=given, root=root, unet_dir=unet_dir, unet_class=cls, unet_config=unet_config,
                        scheduler_config=sched)


def unet_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_unet(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised UNet of the spec's architecture (weights are loaded separately)."""
    cls = unet_class(spec.unet_class)
    try:
        return cls.from_config(spec.unet_config)
    except Exception as e:  # diffusers raises many kinds on a malformed config
        raise UserError(
            f"{spec.given}: cannot build {spec.unet_class} from '{spec.unet_dir / 'config.json'}' ({e}); "
            "fix or re-save the model config"
        ) from None


# --------------------------------------------------------------------------------------------------
# Safe weight loading: safetensors, or torch.load(weights_only=True)
# --------------------------------------------------------------------------------------------------
def _load_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                sd.update(_load_file(path.parent / shard, what))
            return sd
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(CPU))
        obj = torch.load(str(path), map_location=CPU, weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{what}: cannot read weights '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "give a .safetensors file, a state-dict .bin, or a diffusers folder"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what}: '{path}' does not hold a state dict of tensors")
    return obj


def weights_file(folder: Path) -> Optional[Path]:
    for sub in (folder, folder / "unet"):
        for name in WEIGHT_NAMES:
            if (sub / name).is_file():
                return sub / name
    return None


def read_state_dict(init: str | Path, what: str) -> dict[str, torch.Tensor]:
    p = Path(init).expanduser()
    if not p.exists():
        raise UserError(f"{what}: '{init}' does not exist (looked for {p.resolve()}); give a diffusers folder, "
                        ".safetensors or .bin file")
    if p.is_dir():
        f = weights_file(p)
        if f is None:
            raise UserError(
                f"{what}: folder '{init}' holds no weights ({', '.join(WEIGHT_NAMES[:1] + WEIGHT_NAMES[3:4])}); "
                "save the model with save_pretrained"
            )
        p = f
    return _load_file(p, what)


def _strip_prefix(sd: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "unet.", "model."):
        if not (set(sd) & keys) and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(module: nn.Module, init: str | Path, strict: bool, what: str) -> None:
    """Load weights into ``module``; missing/unexpected keys are listed and fatal unless ``strict`` is false."""
    sd = read_state_dict(init, what)
    own = module.state_dict()
    sd = _strip_prefix(sd, set(own))
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if shape_bad:
        k = shape_bad[0]
        raise UserError(
            f"{what}: '{init}' has {len(shape_bad)} tensors of the wrong shape (e.g. {k}: "
            f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)}); it was trained for another architecture"
        )
    if (missing or unexpected) and strict:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise UserError(f"{what}: '{init}' does not match the architecture ({'; '.join(parts)}); "
                        f"set {what.rsplit('.', 1)[0]}.strict=false to load it anyway")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_unet(spec: BackboneSpec, init: Optional[str], strict: bool, role: str) -> nn.Module:
    unet = build_unet(spec)
    if init is None:
        if weights_file(spec.unet_dir) is None:
            raise UserError(
                f"{role}.backbone: '{spec.given}' has a config but no weights in '{spec.unet_dir}'; "
                f"save the model with save_pretrained or give {role}.init"
            )
        load_weights(unet, spec.unet_dir, strict=True, what=f"{role}.backbone")
    else:
        load_weights(unet, init, strict=strict, what=f"{role}.init")
    return unet


# --------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------
def is_conditional(unet: nn.Module) -> bool:
    return type(unet).__name__ == "UNet2DConditionModel"


def _param_dtype(unet: nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def _cast_cond(cond: dict, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _cast_cond(v, dtype)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.to(dtype)
        else:
            out[k] = v
    return out


def unet_forward(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[dict]) -> torch.Tensor:
    """The raw network output (ε, v or x0, as the backbone was trained)."""
    dtype = _param_dtype(unet)
    x_t = x_t.to(dtype)
    if is_conditional(unet):
        cond = _cast_cond(cond or {}, dtype)
        return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    return unet(x_t, t).sample


def encoder_features(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[dict]) -> list[torch.Tensor]:
    """Run only the encoder half (time/added embeddings, conv_in, down blocks, mid block) and return the
    output of every down block and of the mid block. Mirrors diffusers' forward up to the mid block."""
    dtype = _param_dtype(unet)
    sample = x_t.to(dtype)
    feats: list[torch.Tensor] = []
    if is_conditional(unet):
        cond = _cast_cond(cond or {}, dtype)
        ehs = cond["encoder_hidden_states"]
        added = cond.get("added_cond_kwargs")
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=t)
        emb = unet.time_embedding(t_emb, None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        sample = unet.conv_in(sample)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            feats.append(sample)
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=ehs)
            else:
                sample = unet.mid_block(sample, emb)
            feats.append(sample)
        return feats
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = t.to(sample.device) * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=dtype))
    skip = sample
    sample = unet.conv_in(sample)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, _, skip = block(hidden_states=sample, temb=emb, skip_sample=skip)
        else:
            sample, _ = block(hidden_states=sample, temb=emb)
        feats.append(sample)
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb)
        feats.append(sample)
    return feats


def feature_channels(unet_config: dict) -> list[int]:
    """Channels of every tapped map (down blocks + mid block), from the config alone."""
    ch = list(unet_config["block_out_channels"])
    n_down = len(unet_config["down_block_types"])
    out = ch[:n_down]
    mid = unet_config.get("mid_block_type", "UNetMidBlock2D" if "UNet2DModel" == unet_config.get("_class_name") else "UNetMidBlock2DCrossAttn")
    if mid is not None:
        out.append(ch[-1])
    return out
