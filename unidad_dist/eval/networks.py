"""The paper's evaluation networks, loaded from weight files the user supplies (nothing is downloaded).

- ``FIDInception``: the FID Inception-v3 of pytorch-fid / torch-fidelity (TensorFlow's 2015-12-05 graph ported
  to PyTorch; pool3, 2048-d), in plain torch, with parameter names that load
  ``pt_inception-2015-12-05-6726825d.pth`` as it is. Its input: images in [0, 1] (quantised to uint8
  levels, as the PNG files pytorch-fid reads), resized bilinearly to 299 x 299, scaled to [-1, 1].
- ``LPIPSVGG``: torchvision's VGG16 feature trunk (keys ``features.N.*`` of ``vgg16-397923af.pth``; the
  classifier's keys in that file are ignored) and the linear heads of LPIPS v0.1 (``lin{k}.model.1.weight``
  of the ``lpips`` package's ``weights/v0.1/vgg.pth``), computed as lpips.LPIPS(net='vgg') does.
- CLIP ViT-B/32 and DINO ViT-S/16 through transformers (``CLIPModel``, ``ViTModel``) from a local model
  folder; its config is checked against the network the paper names.

A weight file is named in the recipe (``eval.weights.<name>``) or by an environment variable and checked
before use (the sha256 prefix of its official name; a folder by its config). ``locate`` says where each
comes from or why it is unavailable: a metric without its weights is reported unavailable, never computed
with random ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unidad_dist.device import CPU
from unidad_dist.errors import UserError


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    name: str  # eval.weights.<name>
    env: str  # the environment variable naming it
    what: str  # the network, as results name it
    file_name: str  # the official file (or folder) name
    sha256_prefix: Optional[str] = None  # files: the prefix of the sha256 that the official name carries
    sha256: Optional[str] = None  # files: the whole sha256, where known
    folder: bool = False  # a transformers model folder
    config: tuple = ()  # folders: (dotted config key, expected value) pairs
    where: str = ""  # where the user gets it


SPECS = {
    "inception": WeightSpec(
        "inception", "UNIDAD_FID_INCEPTION", "FID Inception-v3 (pt_inception-2015-12-05, pool3 2048-d)",
        "pt_inception-2015-12-05-6726825d.pth", sha256_prefix="6726825d",
        where="the FID weights release of pytorch-fid (mseitzer/pytorch-fid, tag fid_weights)"),
    "vgg16": WeightSpec(
        "vgg16", "UNIDAD_LPIPS_VGG16", "VGG16 trunk of LPIPS (torchvision ImageNet weights)",
        "vgg16-397923af.pth", sha256_prefix="397923af",
        where="torchvision's model zoo (torchvision.models.vgg16(weights='IMAGENET1K_V1') caches it in "
              "~/.cache/torch/hub/checkpoints/)"),
    "lpips_heads": WeightSpec(
        "lpips_heads", "UNIDAD_LPIPS_HEADS", "LPIPS v0.1 linear heads (vgg)", "weights/v0.1/vgg.pth",
        sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
        where="inside the lpips package (`pip install --no-deps lpips==0.1.4` is enough: it is found there "
              "without importing lpips)"),
    "clip": WeightSpec(
        "clip", "UNIDAD_CLIP", "CLIP ViT-B/32", "clip-vit-base-patch32", folder=True,
        config=(("model_type", "clip"), ("vision_config.patch_size", 32), ("vision_config.hidden_size", 768),
                ("vision_config.num_hidden_layers", 12), ("vision_config.image_size", 224), ("projection_dim", 512)),
        where="a transformers CLIPModel folder (openai/clip-vit-base-patch32 saved with save_pretrained)"),
    "dino": WeightSpec(
        "dino", "UNIDAD_DINO", "DINO ViT-S/16", "dino-vits16", folder=True,
        config=(("model_type", "vit"), ("patch_size", 16), ("hidden_size", 384), ("num_hidden_layers", 12),
                ("num_attention_heads", 6)),
        where="a transformers ViTModel folder (facebook/dino-vits16 saved with save_pretrained)"),
}


@dataclasses.dataclass
class Located:
    """Where a network's weights are (``path``) and their sha256 — or why they are unavailable."""
    spec: WeightSpec
    path: Optional[Path] = None
    sha256: Optional[str] = None
    reason: Optional[str] = None

    @property
    def available(self) -> bool:
        return self.path is not None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _installed_lpips_heads() -> Optional[Path]:
    """The heads file inside an installed ``lpips`` package, found without importing it (importing lpips
    imports torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        f = Path(folder) / "weights" / "v0.1" / "vgg.pth"
        if f.is_file():
            return f
    return None


def _config_value(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _model_file(folder: Path) -> Optional[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(name: str, configured: Optional[str] = None, check=None) -> Located:
    """Find and check the weights of network ``name`` (a key of SPECS): ``configured`` (the recipe's
    ``eval.weights.<name>``), else its environment variable, else (LPIPS heads) the installed lpips
    package. ``check`` (tests only) replaces the folder config expectations. Never raises for what is
    missing or wrong: the result says why it is unavailable."""
    spec = SPECS[name]
    source = configured or os.environ.get(spec.env) or None
    how = f"eval.weights.{name}" if configured else f"${spec.env}"
    if source is None and name == "lpips_heads":
        found = _installed_lpips_heads()
        source, how = (str(found), "the installed lpips package") if found else (None, how)
    if source is None:
        kind = "model folder" if spec.folder else "file"
        return Located(spec, reason=f"needs {spec.what}: the {kind} {spec.file_name} ({spec.where}); name it with "
                                    f"eval.weights.{name}=PATH or ${spec.env}")
    path = Path(source).expanduser()
    if spec.folder:
        return _check_folder(spec, path, how, check)
    if not path.is_file():
        return Located(spec, reason=f"{how}: {path} is not a file (expected {spec.file_name}, {spec.what})")
    digest = sha256_of(path)
    if spec.sha256_prefix and not digest.startswith(spec.sha256_prefix):
        return Located(spec, reason=f"{how}: {path} has sha256 {digest[:16]}..., not the {spec.sha256_prefix}... "
                                    f"that {spec.file_name} carries in its name: a different or damaged file")
    if spec.sha256 and digest != spec.sha256:
        return Located(spec, reason=f"{how}: {path} has sha256 {digest[:16]}..., not {spec.sha256[:16]}... of "
                                    f"lpips 0.1.4's {spec.file_name}: a different or damaged file")
    return Located(spec, path=path, sha256=digest)


def _check_folder(spec: WeightSpec, path: Path, how: str, check) -> Located:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return Located(spec, reason=f"{how}: {path} has no config.json (expected {spec.where})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        return Located(spec, reason=f"{how}: {cfg_file} cannot be read: {e}")
    wrong = [f"{key} = {_config_value(cfg, key)!r}, not {want!r}"
             for key, want in (spec.config if check is None else check) if _config_value(cfg, key) != want]
    if wrong:
        return Located(spec, reason=f"{how}: {path} is not {spec.what}: {'; '.join(wrong)}")
    weights = _model_file(path)
    if weights is None:
        return Located(spec, reason=f"{how}: {path} has no model.safetensors or pytorch_model.bin")
    needed = ["preprocessor_config.json"] + (["tokenizer.json|vocab.json+merges.txt"] if spec.name == "clip" else [])
    lacking = [n for n in needed if not any(all((path / f).is_file() for f in alt.split("+")) for alt in n.split("|"))]
    if lacking:
        return Located(spec, reason=f"{how}: {path} lacks {', '.join(lacking)} (save the model's processor"
                                    f"{' and tokenizer' if spec.name == 'clip' else ''} into the folder too)")
    return Located(spec, path=path, sha256=sha256_of(weights))


def _load_state(path: Path) -> dict:
    state = torch.load(path, map_location=CPU, weights_only=True)
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_exact(module: nn.Module, state: dict, path: Path, what: str) -> None:
    """Load ``state`` into ``module``: every key of the module present with its shape (BatchNorm's
    num_batches_tracked may be absent, as in the ported Inception file); keys it lacks are reported."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise UserError(f"{path} is not {what}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                        f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}, wrong shapes {shapes[:3]}")
    module.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------
# FID Inception-v3 (torchvision's module names, pytorch-fid's FID blocks)
# --------------------------------------------------------------------------------------------------
class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TensorFlow's average pool does not count the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _B(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _C(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _D(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """The FID Inception-v3 up to pool3 (2048-d). ``forward`` takes images in [0, 1], any size."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _A(192, 32)
        self.Mixed_5c = _A(256, 64)
        self.Mixed_5d = _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b = _C(768, 128)
        self.Mixed_6c = _C(768, 160)
        self.Mixed_6d = _C(768, 160)
        self.Mixed_6e = _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b = _E(1280, max_pool=False)
        self.Mixed_7c = _E(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weight file (1008 TF classes); not used for pool3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------------
# LPIPS-VGG
# --------------------------------------------------------------------------------------------------
VGG_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
             (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSVGG(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk: ``forward(x, y)`` -> per-pair distance, images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for item in VGG_CONVS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(item[0], item[1], 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)  # indices as torchvision's vgg16().features[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised feature maps of images ``x`` in [-1, 1]."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
                if i == LPIPS_TAPS[-1]:
                    break
        return out

    def between(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """The distance between feature lists (broadcast over the batch)."""
        return sum(lin((a - b).pow(2)).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.between(self.taps(x), self.taps(y))


def load_inception(loc: Located) -> FIDInception:
    net = FIDInception()
    _load_exact(net, _load_state(loc.path), loc.path, loc.spec.what)
    return net.eval().requires_grad_(False)


def load_lpips(trunk: Located, heads: Located) -> LPIPSVGG:
    net = LPIPSVGG()
    state = _load_state(trunk.path)
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    want = {f"features.{k}" for k in net.features.state_dict()}
    if set(feats) != want or any(not k.startswith(("features.", "classifier.")) for k in state):
        raise UserError(f"{trunk.path} is not {trunk.spec.what}: expected the keys features.N.weight/bias and "
                        f"classifier.* of torchvision's vgg16; missing {sorted(want - set(feats))[:3]}, unexpected "
                        f"{sorted(set(feats) - want)[:3]}")
    _load_exact(net.features, {k[len("features."):]: v for k, v in feats.items()}, trunk.path, trunk.spec.what)
    head_state = _load_state(heads.path)
    lin = {f"{k}.weight": head_state.get(f"lin{k}.model.1.weight") for k in range(len(LPIPS_CHANNELS))}
    if any(v is None for v in lin.values()):
        raise UserError(f"{heads.path} is not {heads.spec.what}: expected keys lin0..lin4.model.1.weight")
    _load_exact(net.lins, lin, heads.path, heads.spec.what)
    return net.eval().requires_grad_(False)


def _from_pretrained(loc: Located, cls, **kw):
    """A transformers model whose every weight comes from the folder: a key missing from its file (which
    from_pretrained would fill with random values) or of another shape is an error, as is an unreadable folder."""
    try:
        model, info = cls.from_pretrained(loc.path, output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{loc.path}: cannot load {loc.spec.what} ({type(e).__name__}: {str(e)[:300]})") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{loc.path} is not a complete {loc.spec.what}: {', '.join(f'{k} {list(v)[:3]}' for k, v in bad.items())}")
    return model.eval().requires_grad_(False)


def _processor(loc: Located, cls):
    try:
        return cls.from_pretrained(loc.path)
    except (OSError, ValueError) as e:
        raise UserError(f"{loc.path}: cannot load the {cls.__name__} of {loc.spec.what} ({str(e)[:300]})") from None


def load_clip(loc: Located):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = _from_pretrained(loc, CLIPModel)
    tok = _processor(loc, CLIPTokenizer)
    if len(tok) != model.config.text_config.vocab_size:
        raise UserError(f"{loc.path}: its tokenizer has {len(tok)} tokens but the model {model.config.text_config.vocab_size}; "
                        "save the model's own tokenizer into the folder")
    return model, _processor(loc, CLIPImageProcessorPil), tok


def load_dino(loc: Located):
    from transformers import ViTImageProcessorPil, ViTModel

    # no pooling layer: DINO's checkpoint has none (a pooler would be random); DINO-I uses the CLS token
    return _from_pretrained(loc, ViTModel, add_pooling_layer=False), _processor(loc, ViTImageProcessorPil)
