"""Dataset download helpers: urllib only, checksummed, atomic and resumable.

A file is downloaded into ``<name>.part`` next to its final location and only
moved to the final name (with :func:`os.replace`) once its size and MD5 have
been verified, so a file under its final name is always complete.  When a
transfer is interrupted, the next attempt resumes the ``.part`` file with an
HTTP ``Range`` request if the server supports it (and starts over otherwise).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "DownloadError",
    "CorruptFileError",
    "default_root",
    "resolve_root",
    "md5sum",
    "download_url",
    "RemoteFile",
]

_USER_AGENT = "metagrad-data/0.1 (+urllib)"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download failed: network error, truncated transfer, checksum mismatch or HTML page."""


class CorruptFileError(ValueError):
    """A local data file is truncated, corrupt or not in the expected format."""


class RemoteFile:
    """Description of one downloadable file.

    Args:
        filename: name of the file under the dataset folder.
        urls: candidate URLs, tried in order (official first, then mirrors).
        md5: expected MD5 hex digest, or ``None`` to skip verification.
        size: expected size in bytes, or ``None`` if unknown.
        sha256: expected SHA-256 hex digest, or ``None`` (for files whose publisher gives no MD5).
    """

    __slots__ = ("filename", "urls", "md5", "size", "sha256")

    def __init__(self, filename: str, urls: Sequence[str], md5: str | None = None, size: int | None = None,
                 sha256: str | None = None):
        if not urls:
            raise ValueError(f"RemoteFile {filename!r} needs at least one URL, got {urls!r}")
        self.filename = filename
        self.urls = tuple(urls)
        self.md5 = md5
        self.size = size
        self.sha256 = sha256

    def __repr__(self) -> str:
        return f"RemoteFile({self.filename!r}, md5={self.md5!r}, size={self.size!r})"


def default_root() -> Path:
    """Return the default data root: ``$METAGRAD_DATA`` if set, else ``~/.cache/metagrad``."""
    env = os.environ.get("METAGRAD_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/metagrad").expanduser()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """Turn a user-supplied ``root`` (``None`` meaning :func:`default_root`) into a :class:`Path`."""
    if root is None:
        return default_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path or None, got {type(root).__name__}: {root!r}")
    return Path(root).expanduser()


def md5sum(path: str | os.PathLike, *, chunk_size: int = 1 << 20, algorithm: str = "md5") -> str:
    """Return the MD5 (or another ``hashlib`` ``algorithm``'s) hex digest of the file at ``path``."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:64].lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in start


class _HTMLServed(DownloadError):
    pass


class _Truncated(DownloadError):
    pass


def _attempt(url: str, part: Path, *, timeout: float, name: str) -> None:
    """One transfer attempt into ``part``, resuming from its current size.

    Raises :class:`_Truncated` (retryable) when fewer bytes than announced arrived,
    :class:`_HTMLServed` when the server answered with an HTML page.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range not satisfiable: the partial file may already be complete
            # (verified by the caller) or be garbage; let the caller decide.
            e.close()
            return
        raise
    with resp:
        status = getattr(resp, "status", 200)
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if "text/html" in ctype:
            raise _HTMLServed(
                f"{name}: {url} served an HTML page (Content-Type {ctype!r}) instead of the file; "
                "the URL may have moved or require a login"
            )
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        if status == 206 and offset:
            crange = resp.headers.get("Content-Range", "")
            # "bytes START-END/TOTAL"
            try:
                start = int(crange.split()[1].split("-")[0])
            except (IndexError, ValueError):
                start = -1
            if start != offset:
                part.unlink(missing_ok=True)  # server resumed at the wrong place: restart
                raise _Truncated(f"{name}: server answered Range {offset}- with {crange!r}; restarting")
            mode = "ab"
        else:
            mode, offset = "wb", 0  # no range support: start over
        received = 0
        first = True
        with open(part, mode) as f:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
                    raise _Truncated(f"{name}: connection lost after {offset + received} bytes from {url}: {e!r}") from e
                if not block:
                    break
                if first and offset == 0:
                    first = False
                    if _looks_like_html(block):
                        raise _HTMLServed(
                            f"{name}: {url} served an HTML page instead of the file; "
                            "the URL may have moved or require a login"
                        )
                f.write(block)
                received += len(block)
        if expected is not None and received < expected:
            raise _Truncated(
                f"{name}: truncated transfer from {url}: got {received} of {expected} bytes (Content-Length)"
            )


def download_url(
    urls: str | Iterable[str],
    path: str | os.PathLike,
    *,
    md5: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 0.5,
) -> Path:
    """Download a file to ``path`` atomically, with MD5 verification and resume.

    Args:
        urls: a URL or an iterable of URLs (official first, then mirrors), tried in order.
        path: final destination.  If it already exists and matches ``md5``/``size`` nothing is done.
        md5: expected MD5 hex digest (strongly recommended).
        size: expected size in bytes.
        sha256: expected SHA-256 hex digest.
        retries: attempts per URL; interrupted transfers resume with HTTP ``Range``.
        timeout: socket timeout in seconds.
        backoff: base of the exponential sleep between attempts, in seconds.

    Returns:
        ``Path(path)``.

    Raises:
        DownloadError: naming the file, for checksum or size mismatch, truncated
            transfers, HTML pages served instead of the file, or network errors.
    """
    path = Path(path)
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError(f"download_url: no URL given for {path}")
    if retries < 1:
        raise ValueError(f"download_url: retries must be >= 1, got {retries!r}")
    if path.exists() and _verify(path, md5, size, sha256) is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    errors: list[str] = []
    for url in url_list:
        restarted = False
        for attempt in range(retries):
            try:
                _attempt(url, part, timeout=timeout, name=path.name)
            except _HTMLServed as e:
                part.unlink(missing_ok=True)
                errors.append(str(e))
                break  # no point retrying this URL
            except _Truncated as e:
                errors.append(str(e))
                if attempt + 1 < retries:
                    time.sleep(backoff * (2**attempt))
                continue
            except urllib.error.HTTPError as e:
                errors.append(f"{path.name}: HTTP {e.code} {e.reason} from {url}")
                if e.code in (404, 403, 410):
                    break
                time.sleep(backoff * (2**attempt))
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                errors.append(f"{path.name}: {type(e).__name__}: {e} ({url})")
                if attempt + 1 < retries:
                    time.sleep(backoff * (2**attempt))
                continue
            problem = _verify(part, md5, size, sha256)
            if problem is None:
                os.replace(part, path)
                return path
            part.unlink(missing_ok=True)
            errors.append(f"{path.name}: {problem} (from {url})")
            if restarted:
                break
            restarted = True  # a stale resumed .part can cause this: retry once from scratch
    raise DownloadError(f"could not download {path.name} to {path}:\n  " + "\n  ".join(errors))


def _verify(path: Path, md5: str | None, size: int | None, sha256: str | None = None) -> str | None:
    """Return ``None`` if ``path`` matches, else a description of the mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch for {path.name}: expected {size} bytes, got {actual_size}"
    if md5 is not None:
        digest = md5sum(path)
        if digest != md5.lower():
            return f"checksum mismatch for {path.name}: expected md5 {md5}, got {digest}"
    if sha256 is not None:
        digest = md5sum(path, algorithm="sha256")
        if digest != sha256.lower():
            return f"checksum mismatch for {path.name}: expected sha256 {sha256}, got {digest}"
    return _archive_problem(path)


def _archive_problem(path: Path) -> str | None:
    """Cheap structural check of archives by final name (matters when no md5 is known)."""
    name = path.name[: -len(".part")] if path.name.endswith(".part") else path.name
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{name} is not a valid zip archive (truncated download?): {e}"
    elif name.endswith((".gz", ".tgz")):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return f"{name} is not gzip data (truncated or wrong file?)"
    return None


def fetch(remote: RemoteFile, folder: Path, *, download: bool, retries: int = 3, timeout: float = 60.0) -> Path:
    """Return the local path of ``remote`` under ``folder``, downloading it if allowed.

    Raises:
        FileNotFoundError: the file is missing and ``download`` is false.
        DownloadError: the download failed.
    """
    path = folder / remote.filename
    if path.exists():
        return path
    if not download:
        raise FileNotFoundError(
            f"{remote.filename} not found in {folder}; pass download=True to fetch it from {remote.urls[0]}"
        )
    return download_url(remote.urls, path, md5=remote.md5, size=remote.size, sha256=remote.sha256, retries=retries,
                        timeout=timeout)
