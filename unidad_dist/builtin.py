"""Built-in models and data for the demo and tests: procedurally generated image domains and a tiny
pixel-space teacher pretrained on one of them.

``builtin:<name>`` in a recipe resolves to a folder under ``$UNIDAD_CACHE`` (default
``~/.cache/unidad_dist``), keyed by a hash of the builder's config. The first run builds it: global rank 0
takes a file lock, builds into a temporary folder and renames it into place, while other ranks wait for it.
The result is an ordinary diffusers pipeline folder (or a folder of PNGs), loaded by the same code path as
a user's checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from unidad_dist import device
from unidad_dist.core.images import save_images
from unidad_dist.core.io import cache_root, sha256_file
from unidad_dist.core.progress import progress_bar
from unidad_dist.errors import UserError
from unidad_dist.models.schedule import NoiseSchedule

BUILD_VERSION = 2
# Seconds spent building built-ins in this process (reported in the demo's summary).
BUILD_SECONDS: dict[str, float] = {}

SHAPES = ("disc", "square", "triangle", "ring", "cross")
BACKGROUNDS = ("mid", "dark", "light", "textured")

# name -> a domain for render_shapes
DOMAINS = {
    "red_discs": {"shape": "disc", "color": [0.85, 0.15, 0.12], "color_jitter": 0.12},
    "blue_discs": {"shape": "disc", "color": [0.15, 0.3, 0.9], "color_jitter": 0.12},
    "green_squares": {"shape": "square", "color": [0.15, 0.8, 0.2], "color_jitter": 0.12},
    "yellow_triangles": {"shape": "triangle", "color": [0.9, 0.8, 0.1], "color_jitter": 0.12},
    # the built-in teacher's source domain: every shape, in red, on a mid-grey background
    "red_shapes": {"shape": list(SHAPES), "color": [0.85, 0.15, 0.12], "color_jitter": 0.12},
    # every shape, in red, on every kind of background: a broader source measured for issue 11 (the same tiny
    # network reached proxy distance 1.29 to it after 3000 steps, not the 0.6 a shipped teacher needs)
    "red_shapes_any_background": {"shape": list(SHAPES), "color": [0.85, 0.15, 0.12], "color_jitter": 0.12,
                                  "background": list(BACKGROUNDS)},
    # every shape in one of seven named colours (not blue) on mid grey: the text teacher's source, captioned
    # "a <colour> <shape>"
    "palette_shapes": {"shape": list(SHAPES), "color": {
        "red": [0.85, 0.15, 0.12], "orange": [0.95, 0.55, 0.1], "yellow": [0.9, 0.8, 0.1], "green": [0.15, 0.8, 0.2],
        "cyan": [0.1, 0.8, 0.85], "purple": [0.55, 0.25, 0.85], "white": [0.92, 0.92, 0.92]}, "color_jitter": 0.08},
    # every shape, any saturated hue, every kind of background (a broader source, for tests and comparisons)
    "shapes_family": {"shape": list(SHAPES), "color": "any", "color_jitter": 0.05, "background": list(BACKGROUNDS)},
}


def _target(shape: str, color: list, background: str) -> dict:
    return {"shape": shape, "color": color, "color_jitter": 0.12, "background": background}


# Target domains for adaptation (issue 11). The recipe and teacher were tuned on TUNED only; HELD_OUT were
# never used for a choice, and benchmarks/heldout_domains.py reports on them. Each earlier held-out family moved
# to TUNED once a choice had looked at it (more than the two issue 11 allows — see its notes): the first two
# (yellow triangles, magenta rings) chose the student's start, the target teacher's warm start and the fake
# teacher's rate; orange discs the noise levels and the student's second timestep; cyan crosses confirmed that
# step and the shots' translation; red triangles and green rings checked the student's trajectory warm start and
# the target teacher's EMA; the eight after them chose the student's four steps, the warm starts' lengths and
# EMAs, the last step's weight and the 100 iterations; the eight after those (rose discs to mint crosses) the
# target teacher's 2000-step fit; the eight after those (salmon squares to crimson crosses, drawn at random) the
# student's warm-start refinement; the eight after those (lilac rings to scarlet triangles, drawn at random) the
# refinement's EMA and length, dropping the warm start's copies, translate 0.125 and the 200 iterations; the eight
# after those (vermilion rings to cherry discs, drawn at random) the copy rate's measurement over 512 samples
# (docs/heldout.md §10; the recipe was fixed before they ran). The eight in HELD_OUT were drawn at random
# (random.Random(20261209): each of the five shapes once and three more, the backgrounds 3 light / 3 dark /
# 2 textured, eight of fifteen colour names none of the earlier families used; docs/heldout.md §11) and written
# down before any run on them, with the recipe and the 512-sample copy measurement fixed before. CI's held-out
# test trains the first light-ground one, fixed when the family was drawn.
TUNED_TARGETS = {
    "yellow_triangles_dark": _target("triangle", [0.9, 0.8, 0.1], "dark"),
    "magenta_rings_light": _target("ring", [0.85, 0.2, 0.8], "light"),
    "orange_discs_light": _target("disc", [0.95, 0.55, 0.1], "light"),
    "cyan_crosses_textured": _target("cross", [0.1, 0.8, 0.85], "textured"),
    "red_triangles_light": _target("triangle", [0.85, 0.15, 0.12], "light"),
    "green_rings_dark": _target("ring", [0.2, 0.75, 0.3], "dark"),
    "lime_triangles_textured": _target("triangle", [0.6, 0.85, 0.1], "textured"),
    "amber_rings_textured": _target("ring", [0.95, 0.7, 0.15], "textured"),
    "purple_squares_textured": _target("square", [0.55, 0.25, 0.85], "textured"),
    "white_crosses_dark": _target("cross", [0.92, 0.92, 0.92], "dark"),
    "orange_triangles_dark": _target("triangle", [0.95, 0.5, 0.1], "dark"),
    "azure_rings_light": _target("ring", [0.3, 0.6, 0.95], "light"),
    "teal_discs_dark": _target("disc", [0.1, 0.6, 0.55], "dark"),
    "pink_squares_light": _target("square", [0.95, 0.45, 0.65], "light"),
    "rose_discs_textured": _target("disc", [0.9, 0.3, 0.45], "textured"),
    "gold_squares_dark": _target("square", [0.85, 0.65, 0.2], "dark"),
    "navy_squares_light": _target("square", [0.15, 0.2, 0.55], "light"),
    "sky_triangles_light": _target("triangle", [0.35, 0.7, 0.95], "light"),
    "rust_triangles_textured": _target("triangle", [0.7, 0.3, 0.1], "textured"),
    "coral_rings_dark": _target("ring", [0.95, 0.45, 0.35], "dark"),
    "indigo_rings_textured": _target("ring", [0.3, 0.25, 0.8], "textured"),
    "mint_crosses_light": _target("cross", [0.45, 0.9, 0.6], "light"),
    "salmon_squares_light": _target("square", [0.98, 0.55, 0.45], "light"),
    "maroon_discs_textured": _target("disc", [0.5, 0.1, 0.15], "textured"),
    "violet_discs_textured": _target("disc", [0.6, 0.3, 0.9], "textured"),
    "olive_squares_light": _target("square", [0.5, 0.5, 0.1], "light"),
    "plum_rings_dark": _target("ring", [0.55, 0.2, 0.45], "dark"),
    "emerald_triangles_dark": _target("triangle", [0.1, 0.65, 0.35], "dark"),
    "turquoise_crosses_light": _target("cross", [0.2, 0.85, 0.75], "light"),
    "crimson_crosses_dark": _target("cross", [0.8, 0.1, 0.25], "dark"),
    "lilac_rings_light": _target("ring", [0.78, 0.64, 0.78], "light"),
    "tangerine_discs_textured": _target("disc", [0.95, 0.52, 0.0], "textured"),
    "ochre_discs_dark": _target("disc", [0.8, 0.55, 0.15], "dark"),
    "chartreuse_crosses_light": _target("cross", [0.5, 1.0, 0.0], "light"),
    "aqua_triangles_dark": _target("triangle", [0.0, 0.9, 0.9], "dark"),
    "ruby_squares_dark": _target("square", [0.88, 0.07, 0.37], "dark"),
    "fuchsia_squares_textured": _target("square", [1.0, 0.0, 1.0], "textured"),
    "scarlet_triangles_light": _target("triangle", [1.0, 0.14, 0.0], "light"),
    "vermilion_rings_light": _target("ring", [0.89, 0.26, 0.2], "light"),
    "peach_squares_light": _target("square", [1.0, 0.8, 0.64], "light"),
    "periwinkle_triangles_textured": _target("triangle", [0.8, 0.8, 1.0], "textured"),
    "jade_squares_light": _target("square", [0.0, 0.66, 0.42], "light"),
    "denim_triangles_dark": _target("triangle", [0.08, 0.38, 0.74], "dark"),
    "bronze_crosses_textured": _target("cross", [0.8, 0.5, 0.2], "textured"),
    "brick_crosses_dark": _target("cross", [0.7, 0.25, 0.2], "dark"),
    "cherry_discs_dark": _target("disc", [0.87, 0.19, 0.39], "dark"),
}
TUNED = ("blue_discs", "green_squares", *TUNED_TARGETS)
HELD_OUT = {
    "cobalt_squares_textured": _target("square", [0.0, 0.28, 0.67], "textured"),
    "forest_discs_light": _target("disc", [0.13, 0.55, 0.13], "light"),
    "seafoam_rings_light": _target("ring", [0.62, 0.89, 0.75], "light"),
    "saffron_triangles_dark": _target("triangle", [0.96, 0.77, 0.19], "dark"),
    "lemon_squares_light": _target("square", [1.0, 0.97, 0.0], "light"),
    "apricot_crosses_dark": _target("cross", [0.98, 0.81, 0.69], "dark"),
    "sapphire_triangles_textured": _target("triangle", [0.06, 0.32, 0.73], "textured"),
    "raspberry_crosses_dark": _target("cross", [0.89, 0.04, 0.36], "dark"),
}
DOMAINS.update(TUNED_TARGETS)
DOMAINS.update(HELD_OUT)

TEACHER = {
    "domain": "red_shapes",
    "resolution": 32,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "steps": 2500,
    "warmup": 100,
    "batch": 64,
    "lr": 2e-3,
    "ema": 0.999,
    "seed": 0,
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    # Zero terminal SNR (Lin et al., 2024) with v-prediction: with the plain linear schedule x_999 keeps
    # sqrt(alpha_bar) = 0.0064 of the image, while the mean colour of 32x32 noise has std 0.03 per channel,
    # so a sample's background took a random colour from its starting noise (measured: grey backgrounds
    # once the noise's mean was removed). v-prediction because epsilon cannot give x0 where alpha_bar = 0.
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
}

# A broader source teacher (issue 11): the same network on every shape, in any saturated hue (saturation 0.6-1,
# value 0.65-1: not white, pale pink or dark teal, which three held-out domains use), on every kind of
# background (mid, dark, light, textured) — a prior that holds most target domains' shape, colour and
# background, as a large source model's holds a few-shot domain (FFHQ and babies) — trained longer than the
# demo teacher (red shapes on every background alone were at proxy distance 1.3 after 3000 steps). A long
# build: tools/build_demo_teacher.py --name broad_teacher --state build/teachers continues it across sessions.
BROAD_TEACHER = dict(TEACHER, domain="shapes_family", steps=9000)

# A tiny *text-conditioned* teacher (issue 17's toy domain for the methods that need a prompt: OPAD, the
# baselines' DreamBooth-style fine-tune): every shape in seven named colours — not blue, the demo shots' colour,
# so a concept "a sks disc" of blue discs is new to it — on mid grey, captioned "a <colour> <shape>" (10 % empty
# captions, for classifier-free guidance), read through cross-attention from a tiny CLIP text encoder with a
# character-level tokenizer (random weights, seeded, frozen — any fixed map from prompts to distinct
# embeddings serves a toy). Colour reaches the image only through the text, so cross-attention key/value
# projections can steer it (OPAD's K/V-only training). The demo teacher's UNet with attention (self and cross)
# on its lowest (8 x 8) level and in the middle block.
TEXT_TEACHER = dict(TEACHER, domain="palette_shapes", lr=1e-3, steps=2500,
                    text={"hidden": 32, "layers": 2, "heads": 4, "max_length": 24, "attention_head_dim": 8,
                          "attention_levels": 1, "caption": "a {color} {shape}", "dropout": 0.1, "seed": 0})

BUILTINS = {
    "demo_teacher": ("teacher", TEACHER),
    "broad_teacher": ("teacher", BROAD_TEACHER),
    "text_teacher": ("teacher", TEXT_TEACHER),
    "demo_target": ("shots", {"domain": "blue_discs", "n": 10, "resolution": 32, "seed": 1234}),
}


ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_KINDS = ("teacher",)  # built-ins whose files ship in ASSETS (tools/build_demo_teacher.py)
_SHIPPED_OK: dict[str, Path] = {}  # built-ins whose shipped files were checked in this process


# --------------------------------------------------------------------------------------------------
# Procedural domains
# --------------------------------------------------------------------------------------------------
_BG_LEVEL = {"mid": (0.25, 0.2), "dark": (0.03, 0.12), "light": (0.72, 0.2), "textured": (0.3, 0.4)}  # lo, span


def _shape_sdf(shape, dx, dy, size, angle):
    """Signed distance (pixels, < 0 inside) of each image's shape, (N, R, R)."""
    if shape == "disc":
        return (dx ** 2 + dy ** 2).sqrt() - size
    c, s = angle.cos()[:, None, None], angle.sin()[:, None, None]
    rx, ry = c * dx + s * dy, -s * dx + c * dy
    if shape == "square":
        return torch.maximum(rx.abs(), ry.abs()) - 0.85 * size
    if shape == "triangle":
        k = math.sqrt(3.0)
        return torch.maximum(ry - 0.5 * size, torch.maximum((k * rx - ry) / 2 - 0.5 * size, (-k * rx - ry) / 2 - 0.5 * size))
    if shape == "ring":  # an annulus of width 0.4 x radius
        return ((dx ** 2 + dy ** 2).sqrt() - 0.8 * size).abs() - 0.2 * size
    if shape == "cross":  # two bars of half-width 0.3 x size
        ax, ay = rx.abs(), ry.abs()
        return torch.minimum(torch.maximum(ax - size, ay - 0.3 * size), torch.maximum(ax - 0.3 * size, ay - size))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _hsv_to_rgb(h, s, v):
    """(N,) each in [0, 1] -> (N, 3)."""
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], dim=1)


def render_shapes(domain: dict, n: int, resolution: int, generator: torch.Generator, return_labels: bool = False):
    """n images (n, 3, R, R) in [-1, 1]: one anti-aliased shape of the domain's colour on a soft
    gradient background; position, size, rotation, shade and background vary per image.

    ``domain``: ``shape`` (one of SHAPES, or a list to draw from per image), ``color`` (RGB in [0, 1], or
    "any": a random saturated hue per image, or a dict name -> RGB: one of them per image) with ``color_jitter``,
    and ``background`` (one of BACKGROUNDS,
    or a list; default "mid"; "textured" adds stripes of random frequency and orientation). A domain that
    sets only shape, colour and jitter renders exactly as before these options existed. With
    ``return_labels``: (images, [{"shape": name, "color": name or None}] per image) — a text teacher's
    captions."""
    R = resolution
    u = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(R, dtype=torch.float32) + 0.5, torch.arange(R, dtype=torch.float32) + 0.5,
                            indexing="ij")
    cx = R * (0.3 + 0.4 * u(n))
    cy = R * (0.3 + 0.4 * u(n))
    size = R * (0.16 + 0.14 * u(n))
    angle = math.pi * 2 * u(n)
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    shapes = domain["shape"]
    if isinstance(shapes, str):
        sd = _shape_sdf(shapes, dx, dy, size[:, None, None], angle)
        names = [shapes] * n
    else:
        pick = torch.randint(0, len(shapes), (n,), generator=generator)
        sd = torch.stack([_shape_sdf(shapes[int(i)], dx[j:j + 1], dy[j:j + 1], size[j:j + 1, None, None],
                                     angle[j:j + 1])[0] for j, i in enumerate(pick)])
        names = [shapes[int(i)] for i in pick]
    mask = torch.sigmoid(-sd * 2.5)[:, None]  # soft edge ~1 px
    jit = domain.get("color_jitter", 0.1)
    colours = [None] * n
    if isinstance(domain["color"], dict):  # a named palette
        palette = list(domain["color"].items())
        pick_c = torch.randint(0, len(palette), (n,), generator=generator)
        colours = [palette[int(i)][0] for i in pick_c]
        base = torch.tensor([palette[int(i)][1] for i in pick_c])[:, :, None, None]
    elif domain["color"] == "any":
        base = _hsv_to_rgb(u(n), 0.6 + 0.4 * u(n), 0.65 + 0.35 * u(n))[:, :, None, None]
    else:
        base = torch.tensor(domain["color"])[None, :, None, None]
    color = (base + jit * (2 * u(n, 3, 1, 1) - 1)).clamp(0, 1)
    kind = domain.get("background", "mid")
    kinds = [kind] * n if isinstance(kind, str) else [kind[int(i)] for i in torch.randint(0, len(kind), (n,), generator=generator)]
    for k in set(kinds):
        if k not in _BG_LEVEL:
            raise ValueError(f"unknown background {k!r}; known: {', '.join(BACKGROUNDS)}")
    lo = torch.tensor([_BG_LEVEL[k][0] for k in kinds])[:, None, None, None]
    span = torch.tensor([_BG_LEVEL[k][1] for k in kinds])[:, None, None, None]
    bg_level = lo + span * u(n, 1, 1, 1)
    bg_tint = 0.05 * (2 * u(n, 3, 1, 1) - 1)
    grad_dir = 2 * u(n, 1, 1, 1) - 1
    background = bg_level + bg_tint + 0.12 * grad_dir * (ys[None, None] / R - 0.5)
    if "textured" in kinds:
        textured = torch.tensor([k == "textured" for k in kinds], dtype=torch.float32)[:, None, None, None]
        freq = (2.5 + 3.5 * u(n))[:, None, None] * 2 * math.pi / R
        theta = math.pi * u(n)[:, None, None]
        phase = 2 * math.pi * u(n)[:, None, None]
        stripes = torch.sin(freq * (xs[None] * theta.cos() + ys[None] * theta.sin()) + phase)[:, None]
        background = background + textured * 0.1 * stripes
    img = background.clamp(0, 1) * (1 - mask) + color * mask
    img = (img * 2 - 1).clamp(-1, 1)
    return (img, [{"shape": sh, "color": c} for sh, c in zip(names, colours)]) if return_labels else img


def make_shots(folder: Path, domain: str | dict, n: int, resolution: int, seed: int) -> Path:
    """Write an n-shot folder of PNGs for a named (or given) procedural domain."""
    d = DOMAINS[domain] if isinstance(domain, str) else domain
    g = torch.Generator().manual_seed(seed)
    save_images(render_shapes(d, n, resolution, g), Path(folder), pattern="shot_{:03d}.png")
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# The tiny teacher
# --------------------------------------------------------------------------------------------------
def tiny_pixel_unet_config(resolution: int, block_out_channels, layers_per_block: int, norm_num_groups: int) -> dict:
    n = len(block_out_channels)
    return dict(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=list(block_out_channels),
                layers_per_block=layers_per_block, down_block_types=["DownBlock2D"] * n,
                up_block_types=["UpBlock2D"] * n, norm_num_groups=norm_num_groups, add_attention=False)


def tiny_text_unet_config(resolution: int, block_out_channels, layers_per_block: int, norm_num_groups: int,
                          cross_attention_dim: int, attention_head_dim: int, attention_levels: int = 1) -> dict:
    """A pixel-space UNet2DConditionModel: attention (self and cross) on its ``attention_levels`` lowest
    levels and in the middle block."""
    n, a = len(block_out_channels), attention_levels
    return dict(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=list(block_out_channels),
                layers_per_block=layers_per_block,
                down_block_types=["DownBlock2D"] * (n - a) + ["CrossAttnDownBlock2D"] * a,
                up_block_types=["CrossAttnUpBlock2D"] * a + ["UpBlock2D"] * (n - a), norm_num_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim)


def _teacher_unet(cfg: dict):
    text = cfg.get("text")
    if text is None:
        from diffusers import UNet2DModel

        return UNet2DModel(**tiny_pixel_unet_config(cfg["resolution"], cfg["block_out_channels"],
                                                    cfg["layers_per_block"], cfg["norm_num_groups"]))
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**tiny_text_unet_config(cfg["resolution"], cfg["block_out_channels"],
                                                        cfg["layers_per_block"], cfg["norm_num_groups"],
                                                        text["hidden"], text["attention_head_dim"],
                                                        text["attention_levels"]))


TOKENIZER_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789{}_-.,'!?"


def write_tokenizer(folder: Path, max_length: int = 16) -> Path:
    """A character-level CLIP tokenizer (every character a token; no merges) written from files, offline."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in TOKENIZER_CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return folder


def _write_text_encoder(text: dict, out: Path) -> None:
    """The text teacher's frozen encoder and tokenizer, from its seed (the same files on every machine)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tokenizer(out / "tokenizer", max_length=text["max_length"])
    cfg = CLIPTextConfig(hidden_size=text["hidden"], intermediate_size=2 * text["hidden"],
                         num_attention_heads=text["heads"], num_hidden_layers=text["layers"],
                         vocab_size=2 + 2 * len(TOKENIZER_CHARS), max_position_embeddings=text["max_length"],
                         projection_dim=text["hidden"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(text["seed"])
        CLIPTextModel(cfg).save_pretrained(out / "text_encoder", safe_serialization=True)


def text_encoder_fn(folder: Path):
    """prompts -> encoder_hidden_states, read from a pipeline folder's text_encoder/ and tokenizer/ exactly as
    models.conditioning.TextConditioner reads them (padded to the tokenizer's length, last hidden state)."""
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
    enc = CLIPTextModel.from_pretrained(str(Path(folder) / "text_encoder")).eval().requires_grad_(False)
    cache: dict[str, torch.Tensor] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        new = sorted(set(prompts) - set(cache))
        if new:
            ids = tok(new, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                for p, h in zip(new, enc(ids).last_hidden_state):
                    cache[p] = h
        return torch.stack([cache[p] for p in prompts])

    return encode


def teacher_prompts(cfg: dict, n: int) -> list[str]:
    """A text teacher's sampling prompts: its caption of each shape (and palette colour) of its domain, in turn
    (shape i mod the shapes, colour i mod the colours)."""
    d = DOMAINS[cfg["domain"]]
    shapes = [d["shape"]] if isinstance(d["shape"], str) else list(d["shape"])
    colours = list(d["color"]) if isinstance(d["color"], dict) else [None]
    return [cfg["text"]["caption"].format(shape=shapes[i % len(shapes)], color=colours[i % len(colours)])
            for i in range(n)]


def _scheduler(cfg: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=cfg["beta_schedule"],
                         prediction_type=cfg["prediction_type"],
                         rescale_betas_zero_snr=cfg.get("rescale_betas_zero_snr", False))


def pretrain_teacher(cfg: dict, out: Path, progress: bool = True, snapshot=None,
                     state_file: Optional[Path] = None, state_every: int = 250) -> None:
    """Train the tiny DDPM teacher of ``cfg`` on its domain and save it as a diffusers pipeline folder in
    ``out``. ``snapshot(step, ema_unet)`` (optional) is called at every quarter of the run. With
    ``state_file``, the training state (weights, EMA, optimiser, random generator, step) is written there every
    ``state_every`` steps and a run that finds it continues from it, bit for bit, so a long build can be
    stopped and resumed (tools/build_demo_teacher.py --state)."""
    text = cfg.get("text")
    encode = None
    if text is not None:  # written first: the training reads its captions through the files it ships
        _write_text_encoder(text, out)
        encode = text_encoder_fn(out)
    torch.manual_seed(cfg["seed"])
    unet = _teacher_unet(cfg)
    sched = _scheduler(cfg)
    schedule = NoiseSchedule(sched.alphas_cumprod, cfg["prediction_type"])
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    domain = DOMAINS[cfg["domain"]]
    steps, warmup = cfg["steps"], cfg["warmup"]
    bar = progress_bar(steps, "pretraining built-in teacher", leave=False) if progress else None
    quarters = {int(steps * f) for f in (0.25, 0.5, 0.75)}
    start = 0
    if state_file is not None and Path(state_file).exists():
        state = torch.load(state_file, map_location=device.CPU, weights_only=True)
        if state["cfg"] != json.dumps(cfg, sort_keys=True):
            raise UserError(f"{state_file} holds the state of another teacher config; remove it to start anew")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start = state["step"]
        if bar is not None:
            bar.update(start)
    for step in range(start, steps):
        x0, labels = render_shapes(domain, cfg["batch"], cfg["resolution"], g, return_labels=True)
        t = torch.randint(0, cfg["num_train_timesteps"], (cfg["batch"],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if encode is None:
            pred = unet(schedule.add_noise(x0, noise, t), t).sample
        else:
            keep = torch.rand(cfg["batch"], generator=g) >= text["dropout"]
            prompts = [text["caption"].format(**lab) if k else "" for lab, k in zip(labels, keep.tolist())]
            pred = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=encode(prompts)).sample
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        # linear warmup, then cosine from lr to lr / 10
        lr_scale = min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * lr_scale
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))  # the EMA's warm-up: early weights fade fast
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if snapshot is not None and step + 1 in quarters:
            snapshot(step + 1, ema)
        if state_file is not None and (step + 1) % state_every == 0 and step + 1 < steps:
            tmp = Path(f"{state_file}.tmp")
            torch.save({"cfg": json.dumps(cfg, sort_keys=True), "unet": unet.state_dict(), "ema": ema.state_dict(),
                        "opt": opt.state_dict(), "generator": g.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, state_file)
    if bar is not None:
        bar.close()
    ema.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    if text is not None:  # no diffusers pipeline class runs a pixel-space UNet on CLIP text: none is named
        index.update(_class_name=None, unet=["diffusers", "UNet2DConditionModel"],
                     text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def teacher_samples(unet, cfg: dict, n: int, steps: int = 25, seed: int = 0, batch: int = 256,
                    folder: Optional[Path] = None) -> torch.Tensor:
    """n deterministic DDIM (eta = 0) samples of a tiny teacher, in [-1, 1] (its grids and quality checks).
    A text teacher samples teacher_prompts(cfg, n), encoded by the text encoder in ``folder``."""
    schedule = NoiseSchedule(_scheduler(cfg).alphas_cumprod, cfg["prediction_type"])
    cond = None
    if cfg.get("text") is not None:
        if folder is None:
            raise ValueError("a text teacher's samples need the folder of its text encoder")
        cond = text_encoder_fn(folder)(teacher_prompts(cfg, n))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, 3, cfg["resolution"], cfg["resolution"]), generator=g)
    ts = torch.linspace(cfg["num_train_timesteps"] - 1, 0, steps).round().long().tolist()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            x = z[start:start + batch]
            for i, t in enumerate(ts):
                tt = torch.full((x.shape[0],), t, dtype=torch.long)
                kw = {} if cond is None else {"encoder_hidden_states": cond[start:start + batch]}
                x0 = schedule.to_x0(unet(x, tt, **kw).sample, x, tt).clamp(-1, 1)
                if i + 1 == len(ts):
                    break
                a, s = schedule.coefficients(tt, x.ndim, x.device)
                a2, s2 = schedule.coefficients(torch.full_like(tt, ts[i + 1]), x.ndim, x.device)
                x = a2 * x0 + s2 * (x - a * x0) / s
            out.append(x0)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
def _key(kind: str, cfg: dict) -> str:
    blob = json.dumps({"kind": kind, "cfg": cfg, "v": BUILD_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build(kind: str, cfg: dict, out: Path) -> None:
    if kind == "teacher":
        pretrain_teacher(cfg, out, progress=True)
    elif kind == "shots":
        make_shots(out, cfg["domain"], cfg["n"], cfg["resolution"], cfg["seed"])
    else:
        raise ValueError(kind)


def shipped(name: str) -> tuple[Optional[Path], str]:
    """The folder of a built-in shipped in the package (``assets/<name>``, written by
    tools/build_demo_teacher.py) when it is there, was built from today's configuration and every file
    matches the sha256 in its manifest; else (None, why not)."""
    if name in _SHIPPED_OK:
        return _SHIPPED_OK[name], ""
    folder = ASSETS / name
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None, f"no shipped weights ({manifest} is missing)"
    try:
        m = json.loads(manifest.read_text())
        files = dict(m["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{manifest} is unreadable ({type(e).__name__}: {e})"
    kind, cfg = BUILTINS[name]
    if m.get("key") != _key(kind, cfg):
        return None, (f"the shipped weights in {folder} were built from another configuration than this version's "
                      f"(key {m.get('key')} != {_key(kind, cfg)})")
    for rel, digest in files.items():
        f = folder / rel
        if not f.is_file():
            return None, f"{f} is missing"
        if sha256_file(f) != digest:
            return None, f"{f} does not match the sha256 in {manifest}"
    _SHIPPED_OK[name] = folder
    return folder, ""


def resolve(given: str, wait_timeout_s: float = 3600.0) -> Path:
    """Path of the folder for ``builtin:<name>``: the shipped one when intact, else the cached one, built on
    first use (and saying why the shipped one was not used)."""
    name = given.split(":", 1)[1]
    if name not in BUILTINS:
        raise UserError(f"unknown built-in '{given}'; available: {', '.join('builtin:' + n for n in BUILTINS)}")
    kind, cfg = BUILTINS[name]
    if kind in SHIPPED_KINDS:
        folder, why = shipped(name)
        if folder is not None:
            return folder
    root = cache_root() / "builtin"
    final = root / f"{name}-{_key(kind, cfg)}"
    if (final / ".complete").is_file():
        return final
    if kind in SHIPPED_KINDS and int(os.environ.get("RANK", "0")) == 0:
        print(f"{given}: {why}; pretraining it into {final} instead (tens of minutes on 2 cores; once per cache, "
              "$UNIDAD_CACHE)", flush=True)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # other ranks wait for global rank 0 to publish it
        deadline = time.time() + wait_timeout_s
        while not (final / ".complete").is_file():
            if time.time() > deadline:
                raise UserError(f"waited {wait_timeout_s:.0f}s for rank 0 to build '{given}' in {final}; check rank 0's log")
            time.sleep(0.5)
        return final
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (final / ".complete").is_file():
            return final
        t0 = time.time()
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build(kind, cfg, tmp)
        (tmp / ".complete").write_text(json.dumps({"kind": kind, "cfg": cfg}, indent=2))
        if final.exists():  # an incomplete leftover from a killed build
            shutil.rmtree(final)
        os.replace(tmp, final)
        BUILD_SECONDS[name] = time.time() - t0
    return final


def resolve_path(given: str) -> Path:
    return resolve(given) if given.startswith("builtin:") else Path(given).expanduser()


def domain_names() -> list[str]:
    return sorted(DOMAINS)

