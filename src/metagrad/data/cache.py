"""Decoded-tensor cache: each split is decoded once into a ``.pt`` file beside its raw data.

The cache file holds named tensors (the image readers': ``images`` uint8 ``[N, C, H, W]``
and ``labels`` int64 ``[N]``; the rating readers': ``index`` and ``ratings``), ``meta`` (a dict
of plain values), the decoding ``params``, a fingerprint of the source files (name, size,
mtime), each tensor's shape and a CRC32 of its bytes.  It is validated
on load and rebuilt when stale or corrupt; writes are atomic (temporary file in the
same folder, then :func:`os.replace`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["load_or_build", "check_images", "tensor_crc32", "source_fingerprint", "CACHE_VERSION"]

CACHE_VERSION = 2


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of the raw bytes of a CPU tensor (made contiguous first)."""
    arr = t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    return zlib.crc32(memoryview(arr)) & 0xFFFFFFFF


def source_fingerprint(paths: Sequence[Path]) -> list[list]:
    """(name, size, mtime_ns) of each source file; a change makes the cache stale."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([Path(p).name, int(st.st_size), int(st.st_mtime_ns)])
    return out


def check_images(tensors: dict) -> str | None:
    """The image readers' check: uint8 ``images [N, C, H, W]`` and int64 ``labels [N]``."""
    images, labels = tensors.get("images"), tensors.get("labels")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        return "bad images tensor"
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        return "bad labels tensor"
    if images.shape[0] != labels.shape[0]:
        return f"{images.shape[0]} images but {labels.shape[0]} labels"
    return None


def _validate(obj: Any, params: dict, fingerprint: list, names: Sequence[str], check) -> str | None:
    if not isinstance(obj, dict):
        return "not a dict"
    if obj.get("version") != CACHE_VERSION:
        return f"version {obj.get('version')!r} != {CACHE_VERSION}"
    if obj.get("params") != params:
        return "decoding parameters differ"
    if obj.get("sources") != fingerprint:
        return "source files changed (size/mtime)"
    tensors = {name: obj.get(name) for name in names}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"no {name} tensor"
        if list(t.shape) != obj.get("shapes", {}).get(name):
            return f"{name} shape {tuple(t.shape)} does not match recorded {obj.get('shapes', {}).get(name)}"
        if obj.get("crc_" + name) != tensor_crc32(t):
            return "tensor checksum mismatch"
    problem = check(tensors)
    if problem is not None:
        return problem
    if not isinstance(obj.get("meta"), dict):
        return "bad meta"
    return None


def _writable(folder: Path) -> bool:
    """Whether ``folder`` may be written to.

    Besides :func:`os.access`, a folder whose mode has no write bit at all is treated
    as read-only even for root (shared, read-only data folders).
    """
    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _atomic_save(obj: dict, path: Path) -> None:
    if not _writable(path.parent):
        raise PermissionError(f"folder {path.parent} is read-only")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_or_build(
    cache_path: Path | None,
    sources: Sequence[Path],
    params: dict,
    build: Callable[[], tuple],
    *,
    names: Sequence[str] = ("images", "labels"),
    check: Callable[[dict], str | None] = check_images,
) -> tuple:
    """Load ``(*tensors, meta)`` from ``cache_path``, or build and cache them.

    Args:
        cache_path: where the decoded tensors live, or ``None`` to disable caching.
        sources: raw files the tensors are decoded from (their size/mtime guard staleness).
        params: decoding parameters (plain values); a different value invalidates the cache.
        build: decodes the raw files, returning one tensor per entry of ``names`` (in order)
            and then a ``meta`` dict of plain values.
        names: the tensors' names in the file (default: the image readers' ``images``
            uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``).
        check: ``check({name: tensor}) -> problem or None``, the dtype and shape rules a
            loaded file must meet (default: :func:`check_images`).

    A cache that is stale or fails validation is rebuilt.  If the folder is not
    writable a warning is issued and the decoded tensors are returned uncached.
    """
    names = tuple(names)
    fingerprint = source_fingerprint(sources)
    if cache_path is not None and cache_path.exists():
        try:
            obj = torch.load(cache_path, map_location="cpu", weights_only=True)
            problem = _validate(obj, params, fingerprint, names, check)
        except Exception as e:  # corrupt/truncated file: any unpickling error
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return (*(obj[name] for name in names), obj["meta"])
        warnings.warn(f"rebuilding decoded cache {cache_path}: {problem}", RuntimeWarning, stacklevel=3)
    *tensors, meta = build()
    if len(tensors) != len(names):
        raise ValueError(f"build returned {len(tensors)} tensors for the names {names}")
    tensors = [t.contiguous() for t in tensors]
    if cache_path is not None:
        obj = {"version": CACHE_VERSION, "params": params, "sources": fingerprint, "meta": meta,
               "shapes": {name: list(t.shape) for name, t in zip(names, tensors)}}
        for name, t in zip(names, tensors):
            obj[name] = t
            obj["crc_" + name] = tensor_crc32(t)
        try:
            _atomic_save(obj, cache_path)
        except OSError as e:
            warnings.warn(f"could not write decoded cache {cache_path}: {e}", RuntimeWarning, stacklevel=3)
    return (*tensors, meta)
