"""CIFAR-FS (Bertinetto et al. 2019): a 64/16/20 class split of CIFAR-100.

Read from the official CIFAR-100 python tarball ``cifar-100-python.tar.gz``.  The
split class lists ship with the package in ``metagrad/data/splits/cifar_fs_*.txt``
(one CIFAR-100 fine label name per line; the same lists as torchmeta's
``cifar100/cifar-fs`` assets, derived from the R2D2 repository's split).  All 600
images of a class (500 from ``train``, then 100 from ``test``) are used.
"""

from __future__ import annotations

import tarfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ._pickle import safe_load, str_keys
from .base import ImageDataset, check_images
from .download import CorruptFileError, RemoteFile, fetch

__all__ = ["CIFARFS", "CIFAR100_FILE", "cifar_fs_classes", "read_cifar100"]

CIFAR100_FILE = RemoteFile(
    "cifar-100-python.tar.gz",
    ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"],
    "eb9058c3a382ffc7106e4002c42a8d85",
)


def cifar_fs_classes(split: str) -> list[str]:
    """CIFAR-100 fine label names of a CIFAR-FS split (``"train"``, ``"val"`` or ``"test"``)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown CIFAR-FS split {split!r}; expected 'train', 'val' or 'test'")
    text = resources.files(__package__).joinpath("splits", f"cifar_fs_{split}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_cifar100(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the CIFAR-100 python tarball.

    Returns:
        ``(images uint8 [60000, 3, 32, 32], fine labels int64 [60000], fine_label_names)``,
        the ``train`` batch followed by the ``test`` batch.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            parts = {}
            for key in ("train", "test", "meta"):
                if key not in members:
                    raise CorruptFileError(f"{path}: member 'cifar-100-python/{key}' missing from the archive")
                parts[key] = str_keys(safe_load(tf.extractfile(members[key])))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CorruptFileError(f"{path}: not a readable .tar.gz archive (truncated or corrupt download?): {e}") from e
    except Exception as e:  # unpickling errors
        if isinstance(e, CorruptFileError):
            raise
        raise CorruptFileError(f"{path}: cannot unpickle CIFAR-100 data: {type(e).__name__}: {e}") from e
    names = list(parts["meta"].get("fine_label_names", []))
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    if len(names) != 100:
        raise CorruptFileError(f"{path}: meta has {len(names)} fine_label_names, expected 100")
    images, labels = [], []
    for key in ("train", "test"):
        d = parts[key]
        if "data" not in d or "fine_labels" not in d:
            raise CorruptFileError(f"{path}: {key} batch lacks 'data' or 'fine_labels' (keys {sorted(d)})")
        data = np.asarray(d["data"], dtype=np.uint8)
        lab = np.asarray(d["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != lab.shape[0]:
            raise CorruptFileError(f"{path}: {key} data shape {data.shape} / {lab.shape[0]} labels is not N x 3072")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    labels_all = np.concatenate(labels)
    if labels_all.size and (labels_all.min() < 0 or labels_all.max() > 99):
        raise CorruptFileError(f"{path}: fine label outside 0..99")
    return np.concatenate(images), labels_all, names


class CIFARFS(ImageDataset):
    """CIFAR-FS few-shot split of CIFAR-100 as an in-memory uint8 tensor dataset.

    Args:
        root: data root (``None`` = default root); the tarball lives in ``root / "cifar100"``.
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).

    Keyword Args:
        download: fetch ``cifar-100-python.tar.gz`` from www.cs.toronto.edu (md5-verified).
        cache: keep a decoded ``.pt`` cache beside the tarball (or in ``cache_dir``).
        cache_dir: alternative folder for the decoded cache.

    Attributes:
        images: uint8 ``[600 * classes, 3, 32, 32]``.
        labels: int64, ``i`` = ``class_names[i]`` in split-file order.
    """

    folder = "cifar100"
    splits = ("train", "val", "test")

    def __init__(self, root=None, split: str = "train", *, download: bool = False, cache: bool = True, cache_dir=None):
        self._init_common(root, split, cache_dir)
        wanted = cifar_fs_classes(split)
        path = fetch(CIFAR100_FILE, self.data_dir, download=download)

        def build():
            images, labels, names = read_cifar100(path)
            missing = [w for w in wanted if w not in names]
            if missing:
                raise CorruptFileError(f"{path}: CIFAR-FS classes {missing} not among fine_label_names")
            remap = np.full(100, -1, dtype=np.int64)
            for i, w in enumerate(wanted):
                remap[names.index(w)] = i
            new = remap[labels]
            keep = new >= 0
            return torch.from_numpy(np.ascontiguousarray(images[keep])), torch.from_numpy(new[keep]), {}

        self.images, self.labels, _ = self._load(
            f"cifar_fs-{split}.pt", [path], {"format": "cifar-fs", "classes": wanted}, build, cache
        )
        self.class_names = wanted
        check_images(self.images, self.labels, len(wanted), str(path))
