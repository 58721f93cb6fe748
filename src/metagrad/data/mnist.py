"""MNIST reader for the official IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import ImageDataset, check_images
from .download import CorruptFileError, RemoteFile, fetch, resolve_root

__all__ = ["MNIST", "MNIST_FILES", "MNIST_MIRRORS", "read_idx_images", "read_idx_labels", "mnist_splits"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

#: Base URLs tried in order: the official site first, then a mirror.
MNIST_MIRRORS = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

MNIST_FILES = {name: RemoteFile(name, [m + name for m in MNIST_MIRRORS], md5) for name, md5 in _MD5.items()}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise CorruptFileError(f"{path}: truncated or corrupt gzip data: {e}") from e
    return data


def _header(data: bytes, path: Path, magic: int, ndim: int) -> list[int]:
    head = 4 + 4 * ndim
    if len(data) < 4:
        raise CorruptFileError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise CorruptFileError(f"{path}: bad IDX magic number {found} (expected {magic})")
    if len(data) < head:
        raise CorruptFileError(f"{path}: file too short for an IDX header ({len(data)} bytes); truncated?")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = head + int(np.prod(dims))
    if len(data) != expected:
        raise CorruptFileError(
            f"{path}: size {len(data)} bytes does not match IDX dimensions {dims} (expected {expected}); truncated?"
        )
    return dims


def read_idx_images(path) -> torch.Tensor:
    """Read an IDX image file (magic 2051, optionally gzipped) as uint8 ``[N, 1, rows, cols]``."""
    path = Path(path)
    data = _read_bytes(path)
    n, rows, cols = _header(data, path, IDX_IMAGES_MAGIC, 3)
    arr = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(arr.copy())


def read_idx_labels(path) -> torch.Tensor:
    """Read an IDX label file (magic 2049, optionally gzipped) as int64 ``[N]``."""
    path = Path(path)
    data = _read_bytes(path)
    (n,) = _header(data, path, IDX_LABELS_MAGIC, 1)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64))


class MNIST(ImageDataset):
    """MNIST digits as an in-memory uint8 tensor dataset.

    Files are looked up in ``root / "mnist"`` as ``<prefix>-images-idx3-ubyte`` (raw) or
    with a ``.gz`` suffix, ``prefix`` being ``train`` or ``t10k``.

    Args:
        root: data root (``None`` = default root).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Keyword Args:
        download: fetch missing ``.gz`` files (official URL, then mirrors), md5-verified.
        cache: keep a decoded ``.pt`` cache beside the files (or in ``cache_dir``).
        cache_dir: alternative folder for the decoded cache.

    Attributes:
        images: uint8 ``[N, 1, 28, 28]`` (black background).
        labels: int64 ``[N]`` digits 0..9.
    """

    folder = "mnist"
    splits = ("train", "test")

    def __init__(self, root=None, split: str = "train", *, download: bool = False, cache: bool = True, cache_dir=None):
        self._init_common(root, split, cache_dir)
        prefix = _SPLIT_PREFIX[split]
        paths = [self._locate(f"{prefix}-{kind}", download) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]

        def build():
            images = read_idx_images(paths[0])
            labels = read_idx_labels(paths[1])
            if images.shape[0] != labels.shape[0]:
                raise CorruptFileError(
                    f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels"
                )
            if labels.numel() and int(labels.max()) > 9:
                raise CorruptFileError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
            return images, labels, {}

        self.images, self.labels, _ = self._load(f"mnist-{split}.pt", paths, {"format": "mnist-idx"}, build, cache)
        self.class_names = [str(d) for d in range(10)]
        check_images(self.images, self.labels, 10, str(self.data_dir))

    def _locate(self, stem: str, download: bool) -> Path:
        for name in (stem, stem + ".gz"):
            if (self.data_dir / name).exists():
                return self.data_dir / name
        return fetch(MNIST_FILES[stem + ".gz"], self.data_dir, download=download)


def _mnist_has(root: Path, prefix: str) -> bool:
    folder = root / "mnist"
    return all(any((folder / (f"{prefix}-{kind}" + gz)).exists() for gz in ("", ".gz"))
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def mnist_splits(data_root, source: str = "auto"):
    """``(source, (train_images, train_labels), (test_images, test_labels))`` for ``wormhole-mnist``.

    ``"full"``: meta-train on the 60k train split, meta-test on t10k. ``"t10k-halves"``: the t10k
    file only; digit ``d``'s images in file order, the first ``ceil(n_d / 2)`` meta-train, the rest
    meta-test. ``"auto"``: ``"full"`` when the train files are present, else ``"t10k-halves"``.
    """
    root = resolve_root(data_root)
    if source not in ("auto", "full", "t10k-halves"):
        raise ValueError(f"source must be 'auto', 'full' or 't10k-halves', got {source!r}")
    if source == "auto":
        source = "full" if _mnist_has(root, "train") else "t10k-halves"
    if not _mnist_has(root, "t10k"):
        raise FileNotFoundError(f"wormhole-mnist needs {root / 'mnist'}/t10k-images-idx3-ubyte(.gz) and the labels "
                                "file: --set data_root=DIR / METAGRAD_DATA at a folder holding mnist/")
    test = MNIST(root, "test", cache=False)
    if source == "full":
        train = MNIST(root, "train", cache=False)
        return source, (train.images, train.labels), (test.images, test.labels)
    first = torch.zeros(test.labels.shape[0], dtype=torch.bool)
    for d in test.labels.unique().tolist():
        idx = (test.labels == d).nonzero().reshape(-1)
        first[idx[: (idx.numel() + 1) // 2]] = True
    return source, (test.images[first], test.labels[first]), (test.images[~first], test.labels[~first])
