"""mini-ImageNet reader (Ravi & Larochelle 64/16/20 split) for the pickle caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._pickle import safe_load, str_keys
from .base import ImageDataset, check_images
from .download import CorruptFileError, DownloadError

__all__ = ["MiniImageNet", "read_mini_imagenet_pickle"]

_HOWTO = (
    "mini-ImageNet has no stable official download URL. Obtain the pickle caches "
    "mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl and mini-imagenet-cache-test.pkl "
    "(dict with 'image_data' uint8 N x 84 x 84 x 3 and 'class_dict' wnid -> indices; e.g. the "
    "versions distributed with learn2learn or built from ImageNet with the Ravi & Larochelle "
    "split CSVs) and place them in {folder}"
)


def read_mini_imagenet_pickle(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a ``mini-imagenet-cache-*.pkl`` file.

    Returns:
        ``(images uint8 [N, 84, 84, 3], labels int64 [N], wnids)`` with labels indexing the
        sorted wnids.  Raises :class:`CorruptFileError` naming the file on bad content.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = safe_load(f)
    except (EOFError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: truncated or corrupt pickle: {type(e).__name__}: {e}") from e
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CorruptFileError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a dict, got {type(obj).__name__}")
    obj = str_keys(obj)
    if "image_data" not in obj or "class_dict" not in obj:
        raise CorruptFileError(f"{path}: expected keys 'image_data' and 'class_dict', got {sorted(obj)}")
    images = obj["image_data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        desc = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise CorruptFileError(f"{path}: image_data must be uint8 N x H x W x 3, got {desc}")
    class_dict = str_keys(obj["class_dict"])
    wnids = sorted(class_dict)
    labels = np.full(images.shape[0], -1, dtype=np.int64)
    for c, w in enumerate(wnids):
        idx = np.asarray(class_dict[w], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= images.shape[0]):
            raise CorruptFileError(f"{path}: class {w!r} has indices outside 0..{images.shape[0] - 1}")
        if (labels[idx] >= 0).any():
            raise CorruptFileError(f"{path}: class {w!r} shares image indices with another class")
        labels[idx] = c
    if (labels < 0).any():
        raise CorruptFileError(f"{path}: {int((labels < 0).sum())} images belong to no class in class_dict")
    return images, labels, wnids


class MiniImageNet(ImageDataset):
    """mini-ImageNet as an in-memory uint8 tensor dataset.

    Args:
        root: data root (``None`` = default root); files live in ``root / "mini-imagenet"``.
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).

    Keyword Args:
        download: mini-ImageNet has no stable official URL, so ``download=True`` with a
            missing file raises :class:`DownloadError` explaining where to get it.
        cache: keep a decoded ``.pt`` cache beside the pickles (or in ``cache_dir``).
        cache_dir: alternative folder for the decoded cache.

    Attributes:
        images: uint8 ``[N, 3, 84, 84]``.
        labels: int64 ``[N]`` indexing ``class_names`` (sorted wnids).
    """

    folder = "mini-imagenet"
    splits = ("train", "val", "test")

    def __init__(self, root=None, split: str = "train", *, download: bool = False, cache: bool = True, cache_dir=None):
        self._init_common(root, split, cache_dir)
        path = self.data_dir / f"mini-imagenet-cache-{split}.pkl"
        if not path.exists():
            msg = _HOWTO.format(folder=self.data_dir)
            if download:
                raise DownloadError(f"cannot download {path.name}: " + msg)
            raise FileNotFoundError(f"{path} not found. " + msg)

        def build():
            images, labels, wnids = read_mini_imagenet_pickle(path)
            t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            return t, torch.from_numpy(labels), {"class_names": wnids}

        self.images, self.labels, meta = self._load(
            f"mini-imagenet-{split}.pt", [path], {"format": "mini-imagenet-pkl"}, build, cache
        )
        self.class_names = list(meta["class_names"])
        check_images(self.images, self.labels, len(self.class_names), str(path))
