"""Checksums, a checksumming writer, fsync and atomic writes.

Checkpoint manifests use xxHash's XXH3-128 (a checksum against truncated / partial / corrupt files, ~16
GB/s, so computing it while writing costs next to nothing); sha256 stays for the frozen-teacher record
and the shard manifests.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

CHECKSUM = "xxh3_128"
_DIGESTS: dict[str, str] = {}  # absolute path -> checksum of files this process wrote through HashingWriter
_DIGESTS_LOCK = threading.Lock()  # an asynchronous checkpoint's writer thread adds to it too


def cache_root() -> Path:
    """The project's cache ($UNIDAD_CACHE, default ~/.cache/unidad_dist): built-ins, DeepSpeed's JIT builds."""
    return Path(os.environ.get("UNIDAD_CACHE", Path.home() / ".cache" / "unidad_dist")).expanduser()

def _new_hash(algorithm: str = CHECKSUM):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


def checksum_file(path: Path, algorithm: str = CHECKSUM) -> str:
    h = _new_hash(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return checksum_file(path, "sha256")


class HashingWriter:
    """A file opened for writing that computes its checksum (``CHECKSUM``) from the bytes as they go out, so
    a checkpoint's manifest needs no second read of what was just written. It is not fsync'd on close:
    ``fsync_written`` does that for all of a checkpoint's files once they are written, so the disk writes
    back one file while the next is still being written."""

    def __init__(self, path):
        self.path = os.path.abspath(str(path))
        self._f = open(self.path, "wb")
        self._h = _new_hash()

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self._h.update(mv)
        return self._f.write(mv)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            with _DIGESTS_LOCK:
                _DIGESTS[self.path] = self._h.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def torch_save_hashed(obj, path, **kw) -> None:
    import torch

    with HashingWriter(path) as f:
        torch.save(obj, f, **kw)


def _under(folder: Path) -> list[str]:
    root = Path(os.path.abspath(folder))
    with _DIGESTS_LOCK:
        return [p for p in _DIGESTS if Path(p).is_relative_to(root)]


def fsync_written(folder: Path, extra: tuple = ()) -> None:
    """fsync every file this process wrote through HashingWriter under ``folder`` (and ``extra``), after
    all of them were written: the disk writes back one file while the next is still being written."""
    for p in [Path(p) for p in _under(folder)] + [Path(p) for p in extra]:
        fsync(p)


def take_digests(folder: Path) -> dict[str, str]:
    """The checksums of the files this process wrote under ``folder`` (relative names), forgotten here."""
    root = Path(os.path.abspath(folder))
    out = {}
    for p in _under(folder):
        with _DIGESTS_LOCK:
            out[str(Path(p).relative_to(root))] = _DIGESTS.pop(p)
    return out


def fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place (readers never see a
    half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def staging_dir(out: Path):
    """A new, uniquely named folder beside ``out`` (``.<name>.tmp-XXXX``) to write a result into; published as
    ``out`` (which must not exist, or be an empty folder) when the block succeeds, removed when it fails. Only
    the folder made here is ever removed: a user's ``<out>.tmp`` is never touched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked by the caller); fails loudly if someone wrote into it meanwhile
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
