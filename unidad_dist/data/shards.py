"""WebDataset shards: writing (``unidad-dist make-shards``), the manifest, and reading one shard.

A shard folder holds ``shard-000000.tar …`` and ``manifest.json``::

    {"format": "unidad_dist.shards/1",
     "kind": "images" | "prompts",          # the target stream / the source stream
     "precomputed": true|false,             # latents + text embeddings from the recipe's frozen models
     "num_samples": N, "resolution": R,
     "fields": {"png": {"type": "image", "format": "PNG", "size": [R, R], "mode": "RGB"},
                "txt": {"type": "text", "encoding": "utf-8"},
                "latents.safetensors": {"latent": {"shape": [...], "dtype": "float32"}, ...}, ...},
     "shards": [{"name": "shard-000000.tar", "samples": n, "sha256": "…"}, …],
     "uncond": {"file": "uncond.safetensors", "sha256": "…"}}   # text models, precomputed only

Each sample is ``<key>.<field>``: ``png`` (the image, center-cropped and resized with bicubic to R),
``txt`` (its prompt: the caption beside the image, or the template ``a {rare} {cls}`` filled in),
``latents.safetensors`` (``latent`` and ``latent_flip``: the VAE latents of the image and of its horizontal
flip, flipped in pixel space), ``emb.safetensors`` (``cond.*`` the prompt's embeddings; for the source
stream also ``cond_src.*``, those of the prompt without the rare token). Tensors are stored as safetensors
bytes, so reading never unpickles. The shards and the manifest are written into a new ``.<out>.tmp-XXXX`` folder and renamed
into place when complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from unidad_dist.errors import UserError
from unidad_dist.builtin import resolve_path
from unidad_dist.core.images import to_uint8
from unidad_dist.core.io import sha256_file, staging_dir  # noqa: F401 (sha256_file: also this module's API)

FORMAT = "unidad_dist.shards/1"
MANIFEST = "manifest.json"
KINDS = ("images", "prompts")
SHARD_PATTERN = "shard-{:06d}.tar"


# -- tensors <-> bytes (safetensors; nested dicts flattened with dotted keys) ----------------------
def flatten(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def tensors_to_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in flatten(tensors).items()})


def bytes_to_tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return unflatten(load(data))


def image_to_png(image: torch.Tensor) -> bytes:
    """An image in [-1, 1] (3, H, W) whose values are k/127.5 - 1 (as ``load_image`` gives) -> lossless PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def png_to_image(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def _describe(tensors: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in flatten(tensors).items()}


def describe_member(value) -> dict:
    """A member's entry in the manifest's ``fields``: tensors -> each one's shape and dtype; text -> its
    encoding; an image -> its format, size [width, height] and mode (read from its header); other bytes ->
    their kind only."""
    if isinstance(value, dict):
        return _describe(value)
    if isinstance(value, str):
        return {"type": "text", "encoding": "utf-8"}
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(value)) as im:
            return {"type": "image", "format": im.format, "size": list(im.size), "mode": im.mode}
    except (UnidentifiedImageError, OSError, ValueError):
        return {"type": "bytes"}


# -- writing ---------------------------------------------------------------------------------
def write_shards(out: Path, samples: Iterable[dict], per_shard: int, meta: dict) -> dict:
    """Write ``samples`` (dicts field -> bytes | str | tensor dict) as tar shards of ``per_shard`` samples
    into ``out`` (which must not exist or be empty), atomically; return the manifest."""
    import webdataset as wds

    out = Path(out)
    if per_shard < 1:
        raise UserError(f"--per-shard must be >= 1, got {per_shard}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' exists and is not empty; choose a new folder (nothing was written)")
    with staging_dir(out) as tmp:  # removed (only it) if anything below fails
        shards: list[dict] = []
        fields: dict = {}
        writer, count, total = None, 0, 0

        def close():
            nonlocal writer
            if writer is not None:
                writer.close()
                name = SHARD_PATTERN.format(len(shards))
                shards.append({"name": name, "samples": count, "sha256": sha256_file(tmp / name)})
                writer = None

        for sample in samples:
            if writer is None:
                count = 0
                writer = wds.TarWriter(str(tmp / SHARD_PATTERN.format(len(shards))), encoder=False, mtime=0.0)
            rec = {"__key__": f"{total:09d}"}
            for k, v in sample.items():
                desc = describe_member(v)
                if fields.setdefault(k, desc) != desc:
                    raise ValueError(f"sample {rec['__key__']}: field '{k}' is {desc}, but the first sample's is "
                                     f"{fields[k]}; the manifest gives one description per field")
                if isinstance(v, dict):
                    v = tensors_to_bytes(v)
                elif isinstance(v, str):
                    v = v.encode()
                rec[k] = v
            writer.write(rec)
            count += 1
            total += 1
            if count == per_shard:
                close()
        close()
        if total == 0:
            raise UserError("no sample to write; check the input folder or prompt file (nothing was written)")
        extra = meta.pop("_files", {})
        for name, tensors in extra.items():
            (tmp / name).write_bytes(tensors_to_bytes(tensors))
            meta[name.split(".")[0]] = {"file": name, "sha256": sha256_file(tmp / name)}
        manifest = {"format": FORMAT, **meta, "num_samples": total, "fields": fields, "shards": shards}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# -- reading ---------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """A manifest and where its shards are read from (local paths, a brace pattern or ``pipe:`` URLs)."""

    manifest: dict
    urls: list[str]
    root: Path
    errors: dict = field(default_factory=dict)  # url -> reason of the shards skipped so far

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def counts(self) -> list[int]:
        return [int(s["samples"]) for s in self.manifest["shards"]]

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def extra(self, name: str) -> Optional[dict]:
        """A side file of the manifest (``uncond``), checked against its sha256."""
        ent = self.manifest.get(name)
        if not ent:
            return None
        path = self.root / ent["file"]
        if not path.is_file() or sha256_file(path) != ent["sha256"]:
            raise UserError(f"{path} is missing or does not match its sha256 in {self.root / MANIFEST}; rerun make-shards")
        return bytes_to_tensors(path.read_bytes())

    def read_shard(self, i: int, on_error: Optional[Callable[[str, str], None]] = None) -> list[dict]:
        """All samples of shard ``i`` in their stored order (each: key -> bytes), or [] when the shard is
        missing, truncated or does not match its sha256 (reported through ``on_error``)."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, ent = self.urls[i], self.manifest["shards"][i]
        try:
            with gopen(url, "rb") as f:
                data = f.read()
            if ent.get("sha256") and hashlib.sha256(data).hexdigest() != ent["sha256"]:
                raise ValueError("sha256 mismatch (truncated or corrupt)")
            stream = [{"url": url, "stream": io.BytesIO(data)}]
            samples = list(group_by_keys(tar_file_expander(stream)))
            if len(samples) != int(ent["samples"]):
                raise ValueError(f"{len(samples)} samples, the manifest says {ent['samples']}")
        except Exception as e:  # noqa: BLE001 - any read failure skips the shard, counted
            reason = f"{type(e).__name__}: {e}"
            self.errors[url] = reason
            if on_error is not None:
                on_error(url, reason)
            else:
                warnings.warn(f"skipping shard {url}: {reason}")
            return []
        return samples


def expand_urls(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return [u for part in pattern.split("::") for u in braceexpand(part)]


def is_shard_folder(path: Path) -> bool:
    return (path / MANIFEST).is_file() if path.is_dir() else path.name == MANIFEST and path.is_file()


def open_shards(path: str, urls: Optional[str], expect_kind: str, key: str) -> ShardSet:
    """The manifest at ``path`` (a shard folder or its manifest.json) and its shard URLs: the local files
    beside it, or ``urls`` (a brace pattern / ``pipe:`` command, one URL per manifest shard, in order)."""
    p = resolve_path(path)
    mf = p / MANIFEST if p.is_dir() else p
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{key} '{path}': cannot read {mf.name} ({type(e).__name__}); rerun make-shards") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
        raise UserError(f"{key} '{path}': {mf} is not a unidad_dist shard manifest; write shards with "
                        "`unidad-dist make-shards`")
    if manifest["kind"] != expect_kind:
        raise UserError(f"{key} '{path}' holds {manifest['kind']} shards, but this stream needs {expect_kind}; "
                        f"write them with `unidad-dist make-shards --{expect_kind} …`")
    root = mf.parent
    if urls:
        lst = expand_urls(urls)
        if len(lst) != len(manifest["shards"]):
            raise UserError(f"{key.rsplit('.', 1)[0]}.shards gives {len(lst)} URLs but the manifest lists "
                            f"{len(manifest['shards'])} shards; give one URL per shard, in manifest order")
    else:
        lst = [str(root / s["name"]) for s in manifest["shards"]]
    return ShardSet(manifest=manifest, urls=lst, root=root)


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> {"image": tensor, "prompt": str, "latents": {...}, "emb": {...}} (those present).
    A member that cannot be decoded (its shard's checksum matched: it was written so) is a UserError naming
    the shard and the sample."""
    out: dict = {"key": sample.get("__key__")}
    try:
        return _decode(sample, out)
    except Exception as e:  # noqa: BLE001 - whatever a damaged member raises, one line that names it
        raise UserError(f"shard {sample.get('__url__', '?')} sample {out['key']}: a member cannot be decoded "
                        f"({type(e).__name__}: {e}); the shard was written so — rerun make-shards") from None


def _decode(sample: dict, out: dict) -> dict:
    if "png" in sample:
        out["image"] = png_to_image(sample["png"])
    if "txt" in sample:
        out["prompt"] = sample["txt"].decode()
    if "latents.safetensors" in sample:
        out["latents"] = bytes_to_tensors(sample["latents.safetensors"])
    if "emb.safetensors" in sample:
        out["emb"] = bytes_to_tensors(sample["emb.safetensors"])
    return out


def iter_all(shards: ShardSet) -> Iterator[dict]:
    for i in range(shards.num_shards):
        for s in shards.read_shard(i):
            yield decode_sample(s)
