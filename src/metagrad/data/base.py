"""Common base class of the image dataset readers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .cache import load_or_build
from .download import resolve_root

__all__ = ["ImageDataset"]


class ImageDataset:
    """A fully decoded image classification split held in memory.

    Attributes:
        root: data root folder.
        split: split name.
        images: uint8 tensor ``[N, C, H, W]``.
        labels: int64 tensor ``[N]`` with values in ``0 .. num_classes - 1``.
        class_names: list of ``num_classes`` names, ``class_names[label]``.
    """

    folder: str = ""
    splits: tuple[str, ...] = ()

    root: Path
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def _init_common(self, root, split, cache_dir) -> None:
        self.root = resolve_root(root)
        if not isinstance(split, str):
            raise TypeError(f"split must be a str, got {type(split).__name__}: {split!r}")
        if split not in self.splits:
            raise ValueError(f"unknown {type(self).__name__} split {split!r}; expected one of {self.splits}")
        self.split = split
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path or None, got {cache_dir!r}")
        self._cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()

    @property
    def data_dir(self) -> Path:
        """Folder holding this dataset's raw files: ``root / folder``."""
        return self.root / self.folder

    def _cache_path(self, name: str, cache: bool) -> Path | None:
        if not cache:
            return None
        base = self._cache_dir if self._cache_dir is not None else self.data_dir
        return base / name

    def _load(self, cache_name, sources, params, build, cache: bool):
        images, labels, meta = load_or_build(self._cache_path(cache_name, cache), sources, params, build)
        return images, labels, meta

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image uint8 [C, H, W], label)``."""
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
            f"shape={tuple(self.images.shape[1:])}, root={str(self.root)!r})"
        )


def check_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Sanity-check decoded tensors, raising ValueError naming ``source``."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{source}: expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError(f"{source}: labels {labels.dtype} {tuple(labels.shape)} do not match {images.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{source}: labels outside 0..{num_classes - 1}")
