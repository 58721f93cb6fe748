"""Rating readers (data/ratings.py) on tiny tables generated in each dataset's exact on-disk format;
downloads go through the local HTTP server of tests/conftest.py."""

import hashlib
import io
import os
import re
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

from metagrad.data import CorruptFileError, DownloadError
from metagrad.data import download as dl
from metagrad.data import ratings as rmod
from metagrad.data.download import RemoteFile
from metagrad.data.ratings import Jester, MovieLens

# ----------------------------------------------------------------------------- fixtures

# the documented lookup order
JESTER_NAMES = ["jester-data-1.xls", "jester-data-1.csv", "jester-data-1.zip", "jester_dataset_1_1.zip"]


def jester_table(users=7, seed=0):
    """float64 [users, 101]: count of rated jokes, then 100 ratings (2 decimals, 99 = not rated)."""
    rng = np.random.RandomState(seed)
    r = np.round(rng.uniform(-10, 10, (users, 100)), 2)
    r[rng.rand(users, 100) < 0.4] = 99
    r[0, :2] = [-10, 10]  # the scale's ends are valid ratings
    r[1] = np.round(rng.uniform(-10, 10, 100), 2)  # a user who rated every joke
    return np.column_stack([(r != 99).sum(1), r])


def _csv(table):
    return "".join(",".join(f"{v:g}" for v in row) + "\n" for row in table).encode()


def _xls(table):
    import xlwt

    wb, buf = xlwt.Workbook(), io.BytesIO()
    sheet = wb.add_sheet("jester-data-1")
    for (r, c), v in np.ndenumerate(table):
        sheet.write(r, c, float(v))
    wb.save(buf)
    return buf.getvalue()


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def jester_file(name, table):
    """The bytes of ``name`` (one of JESTER_NAMES) holding ``table``."""
    return {"jester-data-1.csv": lambda: _csv(table), "jester-data-1.xls": lambda: _xls(table),
            "jester-data-1.zip": lambda: _zip({"jester-data-1.csv": _csv(table)}),
            "jester_dataset_1_1.zip": lambda: _zip({"jester-data-1.xls": _xls(table)})}[name]()


def check_jester(ds, table):
    r = table[:, 1:]
    users, items = np.nonzero(r != 99)  # row-major: user by user, jokes in column order
    assert ds.index.dtype == torch.int64 and ds.index.tolist() == np.stack([users, items], 1).tolist()
    assert ds.ratings.dtype == torch.float32 and ds.ratings.tolist() == r[users, items].astype(np.float32).tolist()
    assert ds.user_ids == list(range(1, len(table) + 1)) and ds.item_ids == list(range(1, 101))
    assert len(ds) == table[:, 0].sum() and ds.scale == (-10.0, 10.0)
    np.testing.assert_array_equal(ds.matrix().numpy(), np.where(r == 99, np.nan, r).astype(np.float32))


ML = {"100k": ("ml-100k", "u.data", "\t"), "1m": ("ml-1m", "ratings.dat", "::")}


def ml_rows(seed=0, n=15):
    """int64 [n, 4] (user, item, rating, timestamp), distinct non-contiguous ids in shuffled order."""
    rng = np.random.RandomState(seed)
    users, items = np.array([42, 3, 1000, 7, 10]), np.array([2000, 5, 17, 3706, 1, 100])
    pairs = rng.permutation(len(users) * len(items))[:n]
    return np.column_stack([users[pairs // len(items)], items[pairs % len(items)], rng.randint(1, 6, n),
                            874_965_758 + rng.randint(0, 10**7, n)]).astype(np.int64)


def ml_text(rows, version):
    sep = ML[version][2]
    return "".join(sep.join(str(v) for v in row) + "\n" for row in rows).encode()


def ml_zip(rows, version):
    top, name, _ = ML[version]
    decoy = {"100k": "u.item", "1m": "movies.dat"}[version]
    return _zip({f"{top}/": b"", f"{top}/{name}": ml_text(rows, version), f"{top}/{decoy}": b"1|Toy Story|x\n"})


def check_ml(ds, rows):
    uids, iids = sorted(set(rows[:, 0].tolist())), sorted(set(rows[:, 1].tolist()))
    assert ds.user_ids == uids and ds.item_ids == iids  # dense indices in increasing id order
    ref = [[uids.index(u), iids.index(i)] for u, i in rows[:, :2].tolist()]
    assert ds.index.dtype == torch.int64 and ds.index.tolist() == ref
    assert ds.ratings.dtype == torch.float32 and ds.ratings.tolist() == rows[:, 2].astype(float).tolist()
    m = np.full((len(uids), len(iids)), np.nan, np.float32)
    m[tuple(np.array(ref).T)] = rows[:, 2]
    np.testing.assert_array_equal(ds.matrix().numpy(), m)
    assert ds.scale == (1.0, 5.0) and len(ds) == len(rows)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- Jester


@pytest.mark.parametrize("name", JESTER_NAMES)
def test_jester_each_format_gives_the_generated_triples(tmp_path, name):
    table = jester_table()
    _write(tmp_path / "jester" / name, jester_file(name, table))
    ds = Jester(tmp_path, cache=False)
    assert ds.source == tmp_path / "jester" / name
    check_jester(ds, table)


def test_jester_lookup_order(tmp_path):
    tables = {name: jester_table(users=3 + k, seed=k) for k, name in enumerate(JESTER_NAMES)}
    for name, table in tables.items():
        _write(tmp_path / "jester" / name, jester_file(name, table))
    for name in JESTER_NAMES:
        ds = Jester(tmp_path, cache=False)
        assert ds.source.name == name
        check_jester(ds, tables[name])
        (tmp_path / "jester" / name).unlink()


def _bad_rows(kind):
    rows = _csv(jester_table()).decode().splitlines()
    vals = rows[3].split(",")
    if kind == "short-row":
        rows[3] = ",".join(vals[:-1])
    elif kind == "100-columns":
        rows = [",".join(r.split(",")[:-1]) for r in rows]
    elif kind in ("out-of-range", "nan"):
        k = next(j for j in range(1, 101) if vals[j] != "99")
        rows[3] = ",".join(vals[:k] + ["10.5" if kind == "out-of-range" else "nan"] + vals[k + 1:])
    elif kind == "count":
        rows[3] = ",".join([str(int(vals[0]) + 1)] + vals[1:])
    return ("\n".join(rows) + "\n").encode()


@pytest.mark.parametrize("kind,msg", [("short-row", "not a table"), ("100-columns", "101 values"),
                                      ("out-of-range", r"outside \[-10, 10\]"), ("nan", r"outside \[-10, 10\]"),
                                      ("count", "row 4 says")])
def test_jester_malformed_table_names_file(tmp_path, kind, msg):
    path = _write(tmp_path / "jester" / "jester-data-1.csv", _bad_rows(kind))
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(path))}: .*{msg}"):
        Jester(tmp_path, cache=False)


@pytest.mark.parametrize("name", ["jester-data-1.zip", "jester_dataset_1_1.zip"])
@pytest.mark.parametrize("damage", ["truncated", "html", "no-member"])
def test_jester_bad_zip_names_file(tmp_path, name, damage):
    good = jester_file(name, jester_table())
    data = {"truncated": good[: len(good) // 2], "html": b"<!DOCTYPE html><html><body>Moved</body></html>",
            "no-member": _zip({"README": b"jokes"})}[damage]
    _write(tmp_path / "jester" / name, data)
    with pytest.raises(CorruptFileError, match=rf"{name}: .*(zip archive|expected one)"):
        Jester(tmp_path, cache=False)


@pytest.mark.parametrize("name", ["jester-data-1.xls", "jester_dataset_1_1.zip"])
def test_jester_xls_without_xlrd_says_what_to_install(tmp_path, monkeypatch, name):
    _write(tmp_path / "jester" / name, jester_file(name, jester_table()))
    monkeypatch.setitem(sys.modules, "xlrd", None)  # import xlrd -> ImportError
    with pytest.raises(ImportError, match=rf"{re.escape(name)}.*xlrd.*metagrad\[xls\]"):
        Jester(tmp_path, cache=False)


# ----------------------------------------------------------------------------- MovieLens


@pytest.mark.parametrize("version", ["100k", "1m"])
@pytest.mark.parametrize("form", ["zip", "extracted"])
def test_movielens_dense_indexing_and_values(tmp_path, version, form):
    rows = ml_rows(seed=len(version))
    top, name, _ = ML[version]
    path = (_write(tmp_path / "movielens" / f"{top}.zip", ml_zip(rows, version)) if form == "zip" else
            _write(tmp_path / "movielens" / top / name, ml_text(rows, version)))
    ds = MovieLens(tmp_path, version, cache=False)
    assert ds.source == path and ds.version == version
    check_ml(ds, rows)


@pytest.mark.parametrize("version", ["100k", "1m"])
@pytest.mark.parametrize("fields", [["1", "2", "3"], ["1", "2", "0", "9"], ["1", "2", "6", "9"],
                                    ["1", "x", "3", "9"], ["1", "2", "3.5", "9"], ["1", "2", "3", "9" * 20]])
def test_movielens_bad_line_names_file_and_line(tmp_path, version, fields):
    top, name, sep = ML[version]
    lines = ml_text(ml_rows(), version).decode().splitlines()
    lines[1:3] = ["", sep.join(fields)]  # a blank line 2 still counts: the bad line is line 3
    data = ("\n".join(lines) + "\n").encode()
    # 100k as the extracted file, 1m as the official zip
    path = (_write(tmp_path / "movielens" / top / name, data) if version == "100k" else
            _write(tmp_path / "movielens" / f"{top}.zip", _zip({f"{top}/{name}": data})))
    with pytest.raises(CorruptFileError, match=rf"{re.escape(str(path))}: line 3\b"):
        MovieLens(tmp_path, version, cache=False)


# ----------------------------------------------------------------------------- downloads


def _dataset(kind):
    """(folder, filename, files dict, key, body, make, check, checksum) of one downloadable dataset."""
    if kind == "jester":
        table = jester_table(users=5, seed=4)
        return ("jester", "jester_dataset_1_1.zip", rmod.JESTER_FILES, "jester_dataset_1_1.zip",
                jester_file("jester_dataset_1_1.zip", table), lambda root, **kw: Jester(root, **kw),
                lambda ds: check_jester(ds, table), "sha256")
    rows = ml_rows(seed=5)
    return ("movielens", f"{ML[kind][0]}.zip", rmod.MOVIELENS_FILES, kind, ml_zip(rows, kind),
            lambda root, **kw: MovieLens(root, kind, **kw), lambda ds: check_ml(ds, rows), "md5")


def _serve(server, monkeypatch, kind, body=None, mode="ok", digest=None):
    folder, fname, files, key, good, make, check, algo = _dataset(kind)
    server.files[f"/d/{fname}"] = (good if body is None else body, mode)
    sums = {algo: digest or hashlib.new(algo, good).hexdigest()}
    urls = [f"{server.url}/gone/{fname}", f"{server.url}/d/{fname}"]  # official URL 404s: the mirror
    monkeypatch.setitem(files, key, RemoteFile(fname, urls, size=len(good), **sums))
    monkeypatch.setattr(dl, "time", types.SimpleNamespace(sleep=lambda s: None))  # no retry backoff
    return folder, fname, good, make, check


@pytest.mark.parametrize("kind", ["jester", "100k", "1m"])
def test_download_fetches_verifies_and_reads(server, tmp_path, monkeypatch, kind):
    folder, fname, good, make, check = _serve(server, monkeypatch, kind)
    check(make(tmp_path, download=True))
    assert (tmp_path / folder / fname).read_bytes() == good
    assert sorted(os.listdir(tmp_path / folder)) == [fname, f"{fname}.ratings.pt"]
    n = len(server.requests)
    check(make(tmp_path, download=True))  # present: no new request
    assert len(server.requests) == n


@pytest.mark.parametrize("kind", ["jester", "100k", "1m"])
@pytest.mark.parametrize("damage", ["checksum", "html", "html-body", "short-file"])
def test_failed_download_leaves_nothing(server, tmp_path, monkeypatch, kind, damage):
    good, algo = _dataset(kind)[4], _dataset(kind)[7]
    body = {"html-body": b"\n<!DOCTYPE html><html>moved</html>" + b" " * 500, "short-file": good[: len(good) // 2]}
    zeros = "0" * hashlib.new(algo).digest_size * 2 if damage == "checksum" else None
    folder, fname, _, make, _ = _serve(server, monkeypatch, kind, body=body.get(damage),
                                       mode="html" if damage == "html" else "ok", digest=zeros)
    msg = {"checksum": rf"checksum mismatch for {fname}(\.part)?: expected {algo} 0+, got", "html": "HTML",
           "html-body": "HTML", "short-file": f"size mismatch for {fname}"}[damage]
    with pytest.raises(DownloadError, match=rf"could not download {fname}(.|\n)*{msg}"):
        make(tmp_path, download=True)
    assert os.listdir(tmp_path / folder) == []  # neither the file, nor a .part, nor a cache


@pytest.mark.parametrize("kind", ["jester", "1m"])
def test_truncated_transfer_fails_then_a_good_server_completes(server, tmp_path, monkeypatch, kind):
    folder, fname, good, make, check = _serve(server, monkeypatch, kind, mode="always-short")
    with pytest.raises(DownloadError, match=rf"{fname}: truncated transfer"):
        make(tmp_path, download=True)
    final = tmp_path / folder / fname
    assert not final.exists() and not (tmp_path / folder / f"{fname}.ratings.pt").exists()
    part = final.with_name(fname + ".part")  # kept for resuming: a strict prefix of the file
    assert not part.exists() or good.startswith(part.read_bytes()) and part.stat().st_size < len(good)
    server.files[f"/d/{fname}"] = (good, "ok")
    check(make(tmp_path, download=True))
    assert final.read_bytes() == good and not part.exists()


@pytest.mark.parametrize("kind,fname", [("jester", "jester_dataset_1_1.zip"), ("100k", "ml-100k.zip"),
                                        ("1m", "ml-1m.zip")])
def test_missing_without_download_names_file(tmp_path, kind, fname):
    with pytest.raises(FileNotFoundError, match=rf"{fname} not found in .*download=True"):
        _dataset(kind)[5](tmp_path, download=False)
    with pytest.raises(ValueError, match=r"'10m'.*\('100k', '1m'\)"):
        MovieLens(tmp_path, "10m")


# ----------------------------------------------------------------------------- decoded cache


def test_cache_reused_rebuilt_when_source_changes_or_cache_is_corrupt(tmp_path, monkeypatch):
    t0, t1 = jester_table(seed=0), jester_table(users=6, seed=1)
    src = _write(tmp_path / "jester" / "jester-data-1.csv", _csv(t0))
    check_jester(Jester(tmp_path), t0)
    cache = tmp_path / "jester" / "jester-data-1.csv.ratings.pt"
    assert sorted(os.listdir(cache.parent)) == [src.name, cache.name]  # no .tmp left over

    calls, real = [], rmod.read_jester_table
    monkeypatch.setattr(rmod, "read_jester_table", lambda p: calls.append(p) or real(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_jester(Jester(tmp_path), t0)
    assert calls == []  # loaded from the cache, parser not called

    src.write_bytes(_csv(t1))  # rewritten source
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(RuntimeWarning, match="source files changed"):
        check_jester(Jester(tmp_path), t1)
    assert len(calls) == 1
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched only
    with pytest.warns(RuntimeWarning, match="source files changed"):
        check_jester(Jester(tmp_path), t1)
    assert len(calls) == 2

    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # truncated cache
    with pytest.warns(RuntimeWarning, match="rebuilding decoded cache.*unreadable"):
        check_jester(Jester(tmp_path), t1)
    obj = torch.load(cache, weights_only=True)
    obj["ratings"][0] += 1  # valid file, altered bytes
    torch.save(obj, cache)
    with pytest.warns(RuntimeWarning, match="rebuilding decoded cache.*checksum"):
        check_jester(Jester(tmp_path), t1)
    assert len(calls) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_jester(Jester(tmp_path), t1)  # fresh again
    assert len(calls) == 4


def test_cache_dir_and_no_cache(tmp_path, monkeypatch):
    rows = ml_rows(seed=3)
    _write(tmp_path / "movielens" / "ml-100k.zip", ml_zip(rows, "100k"))
    check_ml(MovieLens(tmp_path, "100k", cache=False), rows)
    assert os.listdir(tmp_path / "movielens") == ["ml-100k.zip"]  # cache=False writes nothing
    check_ml(MovieLens(tmp_path, "100k", cache_dir=tmp_path / "c"), rows)
    assert os.listdir(tmp_path / "c") == ["ml-100k.zip.ratings.pt"]
    assert os.listdir(tmp_path / "movielens") == ["ml-100k.zip"]

    monkeypatch.setattr(rmod, "read_movielens", None)  # calling the parser now fails
    check_ml(MovieLens(tmp_path, "100k", cache_dir=tmp_path / "c"), rows)
    with pytest.raises(TypeError, match="not callable"):  # cache=False does parse
        MovieLens(tmp_path, "100k", cache=False)
    with pytest.raises(TypeError, match="cache_dir"):
        MovieLens(tmp_path, "100k", cache_dir=3)
