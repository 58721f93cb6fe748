"""Explicit-rating readers for A-MAML's collaborative filtering (section 5.3): Jester-1,
MovieLens-100K and MovieLens-1M.

Every reader holds one table of ratings in memory: ``index`` (int64 ``[N, 2]``, rows of
``(user, item)`` in ``0 .. num_users - 1`` and ``0 .. num_items - 1``) and ``ratings`` (float32
``[N]``), with the dataset's own ids in ``user_ids`` / ``item_ids``. Conventions are the image
readers' (:mod:`metagrad.data.omniglot`): files under ``root / folder``; ``download=True`` fetches
a missing file from its official URL (then mirrors) into a ``.part`` file, checks its size and
checksum and only then moves it into place; the decoded table is cached beside the files
(``cache=False`` to skip, ``cache_dir`` to put it elsewhere); a truncated or malformed file raises
:class:`~metagrad.data.CorruptFileError` naming it.

MovieLens may not be redistributed: :class:`MovieLens` downloads it for the user (GroupLens
licence) and metagrad never ships it.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .cache import load_or_build
from .download import CorruptFileError, RemoteFile, fetch, resolve_root

__all__ = ["Ratings", "Jester", "MovieLens", "JESTER_FILES", "MOVIELENS_FILES", "read_jester_table"]

JESTER_UNRATED = 99.0

#: The official Jester-1 archive (its member is ``jester-data-1.xls``). The publisher gives no
#: MD5; the SHA-256 and size are those of the archive served by the Berkeley site (also kept by
#: the Internet Archive, the mirror).
JESTER_FILES = {
    "jester_dataset_1_1.zip": RemoteFile(
        "jester_dataset_1_1.zip",
        ["https://eigentaste.berkeley.edu/dataset/archive/jester_dataset_1_1.zip",
         "http://eigentaste.berkeley.edu/dataset/jester_dataset_1_1.zip",
         "https://web.archive.org/web/20250409222630/https://eigentaste.berkeley.edu/dataset/archive/"
         "jester_dataset_1_1.zip"],
        size=4_171_628, sha256="cb7841756ded125b15f3d95c9f8241224065e96354c132a46ae4214deeab7615"),
}

#: The official MovieLens archives (GroupLens; MD5s from their ``.md5`` sidecar files).
MOVIELENS_FILES = {
    "100k": RemoteFile("ml-100k.zip", ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"],
                       md5="0e33842e24a9c977be4e0107933c0723", size=4_924_029),
    "1m": RemoteFile("ml-1m.zip", ["https://files.grouplens.org/datasets/movielens/ml-1m.zip"],
                     md5="c4d9eecfca2ab87c1945afe126590906"),
}

_CACHE_NAMES = ("index", "ratings")


def _check_table(tensors: dict) -> str | None:
    index, ratings = tensors.get("index"), tensors.get("ratings")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 2 or index.shape[1] != 2:
        return "bad index tensor"
    if not isinstance(ratings, torch.Tensor) or ratings.dtype != torch.float32 or ratings.shape != index.shape[:1]:
        return "bad ratings tensor"
    return None


class Ratings:
    """A table of explicit ratings held in memory (base class of the rating readers).

    Attributes:
        root: data root folder.
        index: int64 ``[N, 2]``, the ``(user, item)`` of each rating (0-based, dense).
        ratings: float32 ``[N]``.
        user_ids / item_ids: the dataset's ids of users ``0 ..`` and items ``0 ..``.
        scale: ``(lowest, highest)`` rating the dataset allows.
        source: the file the table was read from.
    """

    folder: str = ""
    scale: tuple[float, float] = (0.0, 0.0)

    root: Path
    index: torch.Tensor
    ratings: torch.Tensor
    user_ids: list[int]
    item_ids: list[int]
    source: Path

    def _load(self, path: Path, cache: bool, cache_dir, params: dict, build) -> None:
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path or None, got {cache_dir!r}")
        self.source = path
        cache_path = None
        if cache:
            base = Path(cache_dir).expanduser() if cache_dir is not None else self.data_dir
            cache_path = base / f"{path.name}.ratings.pt"
        self.index, self.ratings, meta = load_or_build(cache_path, [path], params, build, names=_CACHE_NAMES,
                                                        check=_check_table)
        self.user_ids, self.item_ids = meta["user_ids"], meta["item_ids"]

    @property
    def data_dir(self) -> Path:
        """Folder holding this dataset's raw files: ``root / folder``."""
        return self.root / self.folder

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    def matrix(self) -> torch.Tensor:
        """Dense float32 ``[num_users, num_items]`` with NaN where a user did not rate an item."""
        out = torch.full((self.num_users, self.num_items), float("nan"))
        out[self.index[:, 0], self.index[:, 1]] = self.ratings
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ratings={len(self)}, users={self.num_users}, items={self.num_items}, "
                f"source={str(self.source)!r})")


def _table(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> tuple:
    """``(index, ratings, meta)`` of raw ids and values: ids mapped to dense 0-based indices in
    increasing id order."""
    user_ids, u = np.unique(users, return_inverse=True)
    item_ids, i = np.unique(items, return_inverse=True)
    index = torch.from_numpy(np.stack([u.reshape(-1), i.reshape(-1)], 1).astype(np.int64))
    meta = {"user_ids": [int(v) for v in user_ids], "item_ids": [int(v) for v in item_ids]}
    return index, torch.from_numpy(ratings.astype(np.float32)), meta


def _zip_member(path: Path, suffix: str | tuple[str, ...]) -> tuple[str, bytes]:
    """The name and bytes of the one member of the zip ``path`` whose name ends with ``suffix``
    (one of them, for a tuple)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise CorruptFileError(f"{path}: expected one member ending in {suffix!r}, found {names or 'none'}")
            return names[0], zf.read(names[0])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise CorruptFileError(f"{path}: not a readable zip archive (truncated or corrupt download?): {e}") from e


# ---------------------------------------------------------------------------- Jester-1
def _parse_jester_csv(data: bytes, path: Path) -> np.ndarray:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not a text CSV table ({e})") from e
    rows = [line for line in text.splitlines() if line.strip()]
    try:
        table = np.array([[float(v) for v in line.split(",")] for line in rows], dtype=np.float64)
    except ValueError as e:
        raise CorruptFileError(f"{path}: not a table of comma-separated numbers ({e}); truncated?") from e
    return table


def _parse_jester_xls(data: bytes, path: Path) -> np.ndarray:
    try:
        import xlrd
    except ImportError:
        raise ImportError(f"reading {path.name} (the official Jester-1 .xls) needs the xlrd package: "
                          "pip install 'metagrad[xls]' (or pip install xlrd), or use the table as CSV "
                          "(jester-data-1.csv)") from None
    try:
        sheet = xlrd.open_workbook(file_contents=data).sheet_by_index(0)
        return np.array([sheet.row_values(r) for r in range(sheet.nrows)], dtype=np.float64)
    except Exception as e:  # xlrd raises its own XLRDError, struct.error, ValueError...
        raise CorruptFileError(f"{path}: not a readable .xls workbook ({type(e).__name__}: {e})") from e


def read_jester_table(path: str | os.PathLike) -> np.ndarray:
    """Read Jester-1's table (one row per user: number of jokes rated, then 100 ratings in
    [-10, 10], 99 = not rated) from ``jester-data-1.xls``, ``jester-data-1.csv`` or a zip holding
    either; float64 ``[users, 101]``. Raises :class:`CorruptFileError` naming the file if a row has
    the wrong length, a rating is out of range or a count disagrees with its row."""
    path = Path(path)
    if path.suffix == ".zip":
        name, data = _zip_member(path, (".xls", ".csv"))
        kind = Path(name).suffix
    else:
        data, kind = path.read_bytes(), path.suffix
    table = _parse_jester_xls(data, path) if kind == ".xls" else _parse_jester_csv(data, path)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] != 101:
        raise CorruptFileError(f"{path}: expected rows of 101 values (count, then 100 ratings), got shape "
                               f"{table.shape}; truncated?")
    ratings = table[:, 1:]
    rated = ratings != JESTER_UNRATED
    if not (np.abs(ratings[rated]) <= 10).all():  # also catches NaN
        raise CorruptFileError(f"{path}: ratings outside [-10, 10] (99 marks a joke not rated)")
    bad = np.nonzero(rated.sum(1) != table[:, 0])[0]
    if bad.size:
        raise CorruptFileError(f"{path}: row {int(bad[0]) + 1} says {table[bad[0], 0]:g} jokes rated but holds "
                               f"{int(rated[bad[0]].sum())} ratings")
    return table


class Jester(Ratings):
    """Jester-1 (Goldberg et al. 2001): 24,983 users' ratings of 100 jokes in [-10, 10].

    Looked up in ``root / "jester"`` in this order: ``jester-data-1.xls`` (needs ``xlrd``),
    ``jester-data-1.csv``, ``jester-data-1.zip`` (a zip of the CSV, as in metagrad's shared data)
    and the official ``jester_dataset_1_1.zip`` (a zip of the .xls), which ``download=True``
    fetches when none is present. User ``k`` is row ``k + 1`` of the table; items are the jokes in
    column order.

    Args:
        root: data root (``None`` = default root).

    Keyword Args:
        download: fetch the official archive if no copy is present.
        cache / cache_dir: the decoded-table cache (see :mod:`metagrad.data.ratings`).
    """

    folder = "jester"
    scale = (-10.0, 10.0)
    names = ("jester-data-1.xls", "jester-data-1.csv", "jester-data-1.zip", "jester_dataset_1_1.zip")

    def __init__(self, root=None, *, download: bool = False, cache: bool = True, cache_dir=None):
        self.root = resolve_root(root)
        path = next((self.data_dir / n for n in self.names if (self.data_dir / n).exists()), None)
        if path is None:
            path = fetch(JESTER_FILES["jester_dataset_1_1.zip"], self.data_dir, download=download)

        def build():
            table = read_jester_table(path)
            users, items = np.nonzero(table[:, 1:] != JESTER_UNRATED)
            index = torch.from_numpy(np.stack([users, items], 1).astype(np.int64))
            ratings = torch.from_numpy(table[:, 1:][users, items].astype(np.float32))
            return index, ratings, {"user_ids": list(range(1, table.shape[0] + 1)), "item_ids": list(range(1, 101))}

        self._load(path, cache, cache_dir, {"format": "jester-1"}, build)


# ---------------------------------------------------------------------------- MovieLens
_MOVIELENS = {  # version: (archive member / extracted file, separator, expected rows of the official file)
    "100k": ("ml-100k/u.data", "\t", 100_000),
    "1m": ("ml-1m/ratings.dat", "::", 1_000_209),
}


def _is_int(v: str) -> bool:
    try:
        return abs(int(v)) < 2**63
    except ValueError:
        return False


def read_movielens(path: str | os.PathLike, version: str) -> np.ndarray:
    """The ``(user, item, rating, timestamp)`` rows, int64 ``[N, 4]``, of MovieLens ``version``
    (``"100k"``: ``u.data``, tab-separated; ``"1m"``: ``ratings.dat``, ``::``-separated) from the
    file itself or the official zip holding it."""
    path = Path(path)
    member, sep, _ = _MOVIELENS[version]
    data = _zip_member(path, member)[1] if path.suffix == ".zip" else path.read_bytes()
    numbered = [(n + 1, line) for n, line in enumerate(data.decode("latin-1").splitlines()) if line.strip()]
    lineno = np.array([n for n, _ in numbered], dtype=np.int64)
    fields = [line.split(sep) for _, line in numbered]
    bad = next((k for k, f in enumerate(fields) if len(f) != 4), None)
    if bad is not None:
        raise CorruptFileError(f"{path}: line {lineno[bad]} has {len(fields[bad])} fields, expected 4 "
                               f"(user{sep}item{sep}rating{sep}timestamp); truncated?")
    try:
        rows = np.array(fields, dtype=np.int64).reshape(-1, 4)
    except (ValueError, OverflowError) as e:
        bad = next((k for k, f in enumerate(fields) if not all(_is_int(v) for v in f)), 0)
        raise CorruptFileError(f"{path}: line {lineno[bad]}: not integers separated by {sep!r} ({e})") from e
    if rows.shape[0] == 0:
        raise CorruptFileError(f"{path}: no ratings")
    out = np.nonzero((rows[:, 2] < 1) | (rows[:, 2] > 5))[0]
    if out.size:
        raise CorruptFileError(f"{path}: line {lineno[out[0]]}: rating {rows[out[0], 2]} outside 1..5")
    return rows


class MovieLens(Ratings):
    """MovieLens-100K (``version="100k"``: 100,000 ratings, 943 users, 1,682 movies) or
    MovieLens-1M (``"1m"``: 1,000,209 ratings, 6,040 users, 3,706 rated movies), ratings 1-5.

    Looked up in ``root / "movielens"`` as the extracted file (``ml-100k/u.data``,
    ``ml-1m/ratings.dat``) or the official zip (``ml-100k.zip``, ``ml-1m.zip``), which
    ``download=True`` fetches from GroupLens (md5-checked). Users and items are indexed in
    increasing id order. Keyword args as :class:`Jester`.
    """

    folder = "movielens"
    scale = (1.0, 5.0)

    def __init__(self, root=None, version: str = "100k", *, download: bool = False, cache: bool = True,
                 cache_dir=None):
        if version not in _MOVIELENS:
            raise ValueError(f"unknown MovieLens version {version!r}; expected one of {tuple(_MOVIELENS)}")
        self.root = resolve_root(root)
        self.version = version
        extracted = self.data_dir / _MOVIELENS[version][0]
        path = extracted if extracted.exists() else fetch(MOVIELENS_FILES[version], self.data_dir, download=download)

        def build():
            rows = read_movielens(path, version)
            return _table(rows[:, 0], rows[:, 1], rows[:, 2])

        self._load(path, cache, cache_dir, {"format": f"movielens-{version}"}, build)
