"""Folder locks: ``fcntl.flock`` on a file inside the folder, held while a process works there.

The kernel drops a ``flock`` when its process dies, however it dies, so a lock left by a killed
process is free again at once: there is no stale lock to break by hand (the holder's details
that the file still names are simply overwritten). :func:`try_lock` is the bare mechanism (the
sweep's per-trial locks use it); :func:`hold` is the lock of a run folder that ``metagrad run``,
``--resume``, ``eval`` and ``merge`` take, failing fast with the holder's pid and host.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

#: the lock file of a run folder
RUN_LOCK = ".metagrad.lock"

_HELD: dict[Path, list] = {}  # folder -> [open lock file, depth]: this process's run-folder locks


class FolderInUseError(FileExistsError):
    """Another process holds the folder's lock (a subclass of ``FileExistsError``: the command line
    reports it as a one-line error with exit code 2)."""


def try_lock(path: str | os.PathLike):
    """The file ``path`` (created if need be), opened and ``flock``-ed exclusively by this
    process, or ``None`` if another open file holds its lock. Closing the file releases it."""
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def holder(folder: str | os.PathLike) -> str:
    """Who holds (or last held) ``folder``'s run lock, as its lock file says: ``"pid P on host H
    (metagrad run ..., since ...)"``."""
    try:
        info = json.loads((Path(folder) / RUN_LOCK).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} ({info.get('command', 'metagrad')}, since {since})"


@contextlib.contextmanager
def hold(folder: str | os.PathLike, *, what: str = "run"):
    """Hold ``folder``'s run lock (the folder must exist) for the ``with`` block; re-entrant within
    a process. Raises :class:`FolderInUseError` naming the holder if another process has it."""
    key = Path(folder).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    f = try_lock(key / RUN_LOCK)
    if f is None:
        raise FolderInUseError(f"{folder} is in use by {holder(folder)}: wait for that {what} to end or stop it "
                               f"(a killed process frees the folder at once)")
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": " ".join(["metagrad", *sys.argv[1:]]) if sys.argv[1:] else what,
                            "since": time.time()}) + "\n")
        f.flush()
        _HELD[key] = [f, 1]
        yield
    finally:
        _HELD.pop(key, None)
        f.close()
