"""Omniglot reader (Lake et al. 2015) from the official ``brendenlake/omniglot`` zips.

Splits
------
``"background"``, ``"evaluation"``
    The official ``images_background.zip`` (30 alphabets, 964 characters) and
    ``images_evaluation.zip`` (20 alphabets, 659 characters).
``"small1"``, ``"small2"``
    ``images_background_small1.zip`` / ``images_background_small2.zip`` subsets.
``"maml-train"``, ``"maml-val"``, ``"maml-test"``
    All 1623 characters, ordered as below, permuted with
    ``numpy.random.RandomState(0).permutation(1623)``: positions ``[0, 1100)`` are
    train, ``[1100, 1200)`` validation and ``[1200, 1623)`` test (1100/100/423).
``"vinyals-train"``, ``"vinyals-val"``, ``"vinyals-test"``
    No shuffling: characters ``[0, 1028)`` of the ordering below are train,
    ``[1028, 1200)`` validation and ``[1200, 1623)`` test (1028/172/423).  Train is thus
    all 964 background characters plus the first 64 evaluation characters, and
    validation/test are evaluation characters only.  This is a deterministic
    derivation with the 1028/172/423 sizes of Vinyals et al. (2016) / Snell et al.
    (2017); it is *not* their exact character list.

The "ordering" of all 1623 characters is: the background zip's characters, then the
evaluation zip's, each sorted by ``"<Alphabet>/<character>"`` (Python string order).
Within a split, class labels follow that same ordering.

Images are 105x105 1-bit PNGs (white background = 255, strokes = 0), resized to
``image_size`` with Pillow and stored as uint8 ``[N, 1, S, S]``.  With
``rotations=True`` each character yields 4 classes (rotated by 0/90/180/270 degrees
counter-clockwise): label ``4 * character + r`` for a rotation of ``90 * r`` degrees.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset, check_images
from .download import CorruptFileError, RemoteFile, fetch, resolve_root

__all__ = ["Omniglot", "OMNIGLOT_FILES", "omniglot_split_classes", "omniglot_splits"]

_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"

OMNIGLOT_FILES = {
    "background": RemoteFile(
        "images_background.zip", [_BASE_URL + "images_background.zip"], "68d2efa1b9178cc56df9314c21c6e718", 9464212
    ),
    "evaluation": RemoteFile(
        "images_evaluation.zip", [_BASE_URL + "images_evaluation.zip"], "6b91aef0f799c5bb55b94e3f2daec811", 6462886
    ),
    "small1": RemoteFile(
        "images_background_small1.zip",
        [_BASE_URL + "images_background_small1.zip"],
        "e704a628b5459e08445c13499850abc4",
        1319022,
    ),
    "small2": RemoteFile(
        "images_background_small2.zip",
        [_BASE_URL + "images_background_small2.zip"],
        "b75a71a51d3b13f821f212756fe481fd",
        1580917,
    ),
}

_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}

NUM_BACKGROUND, NUM_EVALUATION = 964, 659
NUM_CHARACTERS = NUM_BACKGROUND + NUM_EVALUATION  # 1623
MAML_SEED = 0
_PROTOCOL_SIZES = {"maml": (1100, 100, 423), "vinyals": (1028, 172, 423)}


def omniglot_split_classes(protocol: str, part: str, num_characters: int = NUM_CHARACTERS) -> np.ndarray:
    """Indices (sorted) into the 1623-character ordering for a protocol split.

    Args:
        protocol: ``"maml"`` (seeded permutation, 1100/100/423) or ``"vinyals"``
            (contiguous, 1028/172/423).
        part: ``"train"``, ``"val"`` or ``"test"``.
        num_characters: must be 1623 (checked, to catch incomplete archives).
    """
    if protocol not in _PROTOCOL_SIZES:
        raise ValueError(f"unknown Omniglot protocol {protocol!r}; expected 'maml' or 'vinyals'")
    parts = ("train", "val", "test")
    if part not in parts:
        raise ValueError(f"unknown Omniglot protocol part {part!r}; expected one of {parts}")
    if num_characters != NUM_CHARACTERS:
        raise ValueError(
            f"the {protocol} split needs all {NUM_CHARACTERS} characters of images_background.zip + "
            f"images_evaluation.zip, found {num_characters}"
        )
    sizes = _PROTOCOL_SIZES[protocol]
    order = np.random.RandomState(MAML_SEED).permutation(NUM_CHARACTERS) if protocol == "maml" else np.arange(NUM_CHARACTERS)
    i = parts.index(part)
    start = sum(sizes[:i])
    return np.sort(order[start : start + sizes[i]])


def omniglot_splits(root, download: bool, full: tuple[str, str] = ("maml-train", "maml-test")) -> tuple[str, str]:
    """(train, test) Omniglot splits for what is under ``root``: ``full`` (default the
    learn2learn-style maml-train/maml-test; ``("background", "evaluation")`` for the official
    split) when both full zips are there or ``download`` is set, else ``("small1", "small2")``
    when both small subsets are. ``FileNotFoundError`` if neither."""
    folder = resolve_root(root) / "omniglot"
    if download or ((folder / "images_background.zip").exists() and (folder / "images_evaluation.zip").exists()):
        return full
    if (folder / "images_background_small1.zip").exists() and (folder / "images_background_small2.zip").exists():
        return "small1", "small2"
    raise FileNotFoundError(
        f"no Omniglot data under {folder}: need images_background.zip + images_evaluation.zip (or the "
        f"small1/small2 subsets); pass --set download=true to fetch the full data, or point "
        f"--set data_root=DIR / METAGRAD_DATA at a folder holding omniglot/"
    )


def decode_omniglot_zip(path: Path, image_size: int, resample: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Decode an Omniglot zip into uint8 images ``[N, 1, S, S]``, labels and class names.

    Member layout: ``<top>/<Alphabet>/<character>/<file>.png``.  Classes are sorted by
    ``"<Alphabet>/<character>"``; drawings within a class by file name.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptFileError(f"{path}: not a readable zip archive (truncated or corrupt download?): {e}") from e
    groups: dict[str, list[str]] = {}
    with zf:
        for name in zf.namelist():
            if not name.lower().endswith(".png"):
                continue
            parts = name.split("/")
            if len(parts) != 4:
                raise CorruptFileError(
                    f"{path}: unexpected member {name!r}; expected <top>/<Alphabet>/<character>/<file>.png"
                )
            groups.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
        if not groups:
            raise CorruptFileError(f"{path}: no PNG images found in the archive")
        class_names = sorted(groups)
        count = sum(len(v) for v in groups.values())
        images = np.empty((count, 1, image_size, image_size), dtype=np.uint8)
        labels = np.empty(count, dtype=np.int64)
        filt = _RESAMPLE[resample]
        i = 0
        for c, cname in enumerate(class_names):
            for member in sorted(groups[cname]):
                try:
                    data = zf.read(member)
                    with Image.open(io.BytesIO(data)) as im:
                        im = im.convert("L")
                        if im.size != (image_size, image_size):
                            im = im.resize((image_size, image_size), filt)
                        images[i, 0] = np.asarray(im, dtype=np.uint8)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                    raise CorruptFileError(f"{path}: cannot decode member {member!r}: {e}") from e
                labels[i] = c
                i += 1
    return torch.from_numpy(images), torch.from_numpy(labels), {"class_names": class_names}


class Omniglot(ImageDataset):
    """Omniglot characters as an in-memory uint8 tensor dataset.

    Args:
        root: data root (``None`` = :func:`~metagrad.data.download.default_root`); files
            live in ``root / "omniglot"``.
        split: one of :attr:`splits` (see the module docstring for exact definitions).

    Keyword Args:
        download: fetch missing zips from the brendenlake/omniglot GitHub repository.
        image_size: side of the square output images (105 keeps the originals).
        rotations: add rotated copies (90/180/270 degrees) as extra classes.
        resample: Pillow filter, ``"lanczos"`` (default) or ``"bilinear"``.
        cache: keep a decoded ``.pt`` cache beside the zips (or in ``cache_dir``).
        cache_dir: alternative folder for the decoded cache (e.g. when ``root`` is read-only).

    Attributes:
        images: uint8 ``[N, 1, image_size, image_size]``, white background (255).
        labels: int64 ``[N]``.
        class_names: ``"<Alphabet>/<character>"`` (``"/rotNNN"`` appended with rotations).
    """

    folder = "omniglot"
    splits = (
        "background",
        "evaluation",
        "small1",
        "small2",
        "maml-train",
        "maml-val",
        "maml-test",
        "vinyals-train",
        "vinyals-val",
        "vinyals-test",
    )

    def __init__(
        self,
        root=None,
        split: str = "background",
        *,
        download: bool = False,
        image_size: int = 28,
        rotations: bool = False,
        resample: str = "lanczos",
        cache: bool = True,
        cache_dir=None,
    ):
        self._init_common(root, split, cache_dir)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.image_size = image_size
        self.rotations = bool(rotations)
        self.resample = resample

        if split in OMNIGLOT_FILES:
            images, labels, names = self._zip(split, download, cache)
        else:
            protocol, part = split.split("-")
            parts = [self._zip(k, download, cache) for k in ("background", "evaluation")]
            offset = len(parts[0][2])
            images = torch.cat([parts[0][0], parts[1][0]])
            labels = torch.cat([parts[0][1], parts[1][1] + offset])
            all_names = parts[0][2] + parts[1][2]
            chosen = torch.from_numpy(omniglot_split_classes(protocol, part, len(all_names)))
            remap = torch.full((len(all_names),), -1, dtype=torch.int64)
            remap[chosen] = torch.arange(len(chosen))
            keep = remap[labels] >= 0
            images, labels = images[keep], remap[labels[keep]]
            names = [all_names[i] for i in chosen.tolist()]
        if self.rotations:
            images = torch.stack([torch.rot90(images, r, dims=(2, 3)) for r in range(4)], dim=1)
            images = images.reshape(-1, *images.shape[2:])
            labels = (labels[:, None] * 4 + torch.arange(4)).reshape(-1)
            names = [f"{n}/rot{90 * r:03d}" for n in names for r in range(4)]
        self.images, self.labels, self.class_names = images, labels, names
        check_images(images, labels, len(names), str(self.data_dir))

    def _zip(self, key: str, download: bool, cache: bool):
        remote = OMNIGLOT_FILES[key]
        path = fetch(remote, self.data_dir, download=download)
        stem = remote.filename[: -len(".zip")]
        params = {"format": "omniglot-zip", "image_size": self.image_size, "resample": self.resample}
        images, labels, meta = self._load(
            f"{stem}.{self.image_size}px.{self.resample}.pt",
            [path],
            params,
            lambda: decode_omniglot_zip(path, self.image_size, self.resample),
            cache,
        )
        return images, labels, list(meta["class_names"])
