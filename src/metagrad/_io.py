"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be readable
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise _naming(err, path) from None  # the file meant, not the temporary one
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` (the same type and errno) naming ``path``, the file being written."""
    return type(err)(err.errno, err.strerror, str(path))


def clean_tmp(folder: str | os.PathLike, *, depth: int = 1) -> list[Path]:
    """Remove the temporary files :func:`atomic_open` leaves behind when its process is killed
    mid-write (``.NAME.XXXX.tmp``) in ``folder`` and its sub-folders down to ``depth`` levels;
    returns them. Call it only while holding the folder's lock (:mod:`metagrad._lock`), so that
    no other process is writing there."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and depth > 0:
            removed += clean_tmp(entry, depth=depth - 1)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, writer: Callable[[IO], Any], mode: str = "wb") -> None:
    with atomic_open(path, mode) as f:
        writer(f)


def write_json(path, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path) -> Any:
    """The JSON in ``path``; ``ValueError`` naming the file where it is not valid JSON."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): it was truncated or edited by hand; "
                             f"repair it, or restore it from a copy") from None
