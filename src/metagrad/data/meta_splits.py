"""The meta-training and meta-test image splits of the few-shot vision datasets, loaded as the
experiments use them: uint8 images and labels, mini-ImageNet downsampled to 32x32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cifar import CIFARFS
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot, omniglot_splits

__all__ = ["VISION_DATASETS", "downsample", "input_shape", "load_meta_split"]

#: dataset names of :func:`load_meta_split`
VISION_DATASETS = ("omniglot", "cifar-fs", "mini-imagenet")


def _check(dataset: str) -> None:
    if dataset not in VISION_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(VISION_DATASETS)}")


def input_shape(dataset: str) -> dict:
    """``{"in_channels", "image_size"}`` of the images :func:`load_meta_split` gives for ``dataset``."""
    _check(dataset)
    if dataset == "omniglot":
        return {"in_channels": 1, "image_size": 28}
    return {"in_channels": 3, "image_size": 32}


def downsample(images: torch.Tensor, size: int = 32, chunk: int = 1000) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]`` (antialiased bilinear), in chunks."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp_(0, 255).to(torch.uint8)
    return out


def load_meta_split(dataset: str, which: str, *, root=None, cache_dir=None,
                    download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the meta-``which`` (``"train"`` or ``"test"``) split of ``dataset``.

    Omniglot: the splits of :func:`~metagrad.data.omniglot.omniglot_splits` (maml-train/maml-test
    with the full data, else small1/small2); CIFAR-FS and mini-ImageNet: their train and test
    splits, mini-ImageNet downsampled from 84x84 to 32x32 (:func:`downsample`)."""
    _check(dataset)
    if dataset == "omniglot":
        split = omniglot_splits(root, download)[which == "test"]
        d = Omniglot(root, split, download=download, cache_dir=cache_dir)
        return d.images, d.labels
    if dataset == "cifar-fs":
        d = CIFARFS(root, which, download=download, cache_dir=cache_dir)
        return d.images, d.labels
    d = MiniImageNet(root, which, download=download, cache_dir=cache_dir)
    return downsample(d.images, 32), d.labels
