"""Download tests against a local threaded http.server on 127.0.0.1 (the `server` fixture, tests/conftest.py)."""

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metagrad.data import download as dl
from metagrad.data.download import DownloadError, RemoteFile, default_root, download_url


def _blob(n=200_000, seed=0):
    return np.random.RandomState(seed).randint(0, 256, n, dtype=np.uint8).tobytes()


def _md5(b):
    return hashlib.md5(b).hexdigest()


def test_download_ok_verifies_md5_and_leaves_no_partial(server, tmp_path):
    body = _blob()
    server.files["/a.bin"] = (body, "ok")
    out = download_url(server.url + "/a.bin", tmp_path / "a.bin", md5=_md5(body), backoff=0)
    assert out.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_resume_with_range_after_dropped_connection(server, tmp_path):
    body = _blob(seed=1)
    server.files["/b.bin"] = (body, "drop")
    download_url(server.url + "/b.bin", tmp_path / "b.bin", md5=_md5(body), backoff=0)
    assert (tmp_path / "b.bin").read_bytes() == body
    ranges = [r for p, r in server.requests if p == "/b.bin"]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={len(body) // 2}-"  # resumed exactly where the first transfer stopped
    assert not (tmp_path / "b.bin.part").exists()


def test_restart_when_server_ignores_range(server, tmp_path):
    body = _blob(seed=2)
    server.files["/c.bin"] = (body, "drop-norange")
    download_url(server.url + "/c.bin", tmp_path / "c.bin", md5=_md5(body), backoff=0)
    assert (tmp_path / "c.bin").read_bytes() == body
    assert len([p for p, _ in server.requests if p == "/c.bin"]) == 2


def test_checksum_mismatch_names_file_and_writes_nothing(server, tmp_path):
    body = _blob(seed=3)
    server.files["/d.bin"] = (body, "ok")
    with pytest.raises(DownloadError, match=r"d\.bin.*checksum mismatch|checksum mismatch for d\.bin"):
        download_url(server.url + "/d.bin", tmp_path / "d.bin", md5="0" * 32, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_html_page_is_rejected(server, tmp_path):
    server.files["/e.zip"] = (b"", "html")
    with pytest.raises(DownloadError, match=r"e\.zip.*HTML"):
        download_url(server.url + "/e.zip", tmp_path / "e.zip", md5="0" * 32, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_html_body_with_binary_content_type_is_rejected(server, tmp_path):
    server.files["/f.zip"] = (b"\n<!DOCTYPE html><html>moved</html>" + b" " * 100, "ok")
    with pytest.raises(DownloadError, match=r"f\.zip.*HTML"):
        download_url(server.url + "/f.zip", tmp_path / "f.zip", backoff=0)
    assert not (tmp_path / "f.zip").exists()


def test_truncated_zip_without_md5_is_rejected(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/b.txt", _blob(50_000, seed=9))
    half = buf.getvalue()[: len(buf.getvalue()) // 2]  # server really only has half (no Content-Length lie)
    server.files["/t.zip"] = (half, "ok")
    with pytest.raises(DownloadError, match=r"t\.zip is not a valid zip archive"):
        download_url(server.url + "/t.zip", tmp_path / "t.zip", backoff=0)
    assert not (tmp_path / "t.zip").exists()


def test_persistently_truncated_transfer_fails_clearly(server, tmp_path):
    body = _blob(seed=4)
    server.files["/g.bin"] = (body, "always-short")
    with pytest.raises(DownloadError, match=r"g\.bin.*truncated"):
        download_url(server.url + "/g.bin", tmp_path / "g.bin", md5=_md5(body), retries=2, backoff=0)
    assert not (tmp_path / "g.bin").exists()


def test_mirror_fallback_and_no_redownload(server, tmp_path):
    body = _blob(seed=5)
    server.files["/mirror/h.bin"] = (body, "ok")
    urls = [server.url + "/missing/h.bin", server.url + "/mirror/h.bin"]
    download_url(urls, tmp_path / "h.bin", md5=_md5(body), backoff=0)
    assert (tmp_path / "h.bin").read_bytes() == body
    n = len(server.requests)
    download_url(urls, tmp_path / "h.bin", md5=_md5(body), backoff=0)  # already there and valid
    assert len(server.requests) == n


def test_stale_partial_file_is_discarded(server, tmp_path):
    body = _blob(seed=6)
    server.files["/i.bin"] = (body, "ok")
    (tmp_path / "i.bin.part").write_bytes(b"garbage!" * 10)  # wrong prefix from some older run
    download_url(server.url + "/i.bin", tmp_path / "i.bin", md5=_md5(body), backoff=0)
    assert (tmp_path / "i.bin").read_bytes() == body


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("METAGRAD_DATA", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv("METAGRAD_DATA")
    assert default_root() == Path(os.path.expanduser("~")) / ".cache" / "metagrad"


def test_reader_download_through_local_server(server, tmp_path, monkeypatch):
    from metagrad.data import omniglot

    buf = io.BytesIO()
    rng = np.random.RandomState(0)
    arrays = {}
    with zipfile.ZipFile(buf, "w") as zf:
        for c in range(3):
            for d in range(2):
                a = rng.rand(105, 105) > 0.5
                arrays[(c, d)] = a
                png = io.BytesIO()
                Image.fromarray(a).convert("1").save(png, format="PNG")
                zf.writestr(f"images_background_small1/Alpha/character{c + 1:02d}/x_{d + 1:02d}.png", png.getvalue())
    body = buf.getvalue()
    server.files["/images_background_small1.zip"] = (body, "drop")
    remote = RemoteFile("images_background_small1.zip", [server.url + "/images_background_small1.zip"], _md5(body))
    monkeypatch.setitem(omniglot.OMNIGLOT_FILES, "small1", remote)
    ds = omniglot.Omniglot(tmp_path, "small1", download=True, image_size=105)
    assert (tmp_path / "omniglot" / "images_background_small1.zip").read_bytes() == body
    ref = np.stack([arrays[(c, d)] for c in range(3) for d in range(2)]).astype(np.uint8) * 255
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), ref)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_fetch_without_download_raises_file_not_found(tmp_path):
    remote = RemoteFile("nothing.zip", ["http://127.0.0.1:9/nothing.zip"])
    with pytest.raises(FileNotFoundError, match=r"nothing\.zip.*download=True"):
        dl.fetch(remote, tmp_path, download=False)
