"""Few-shot data: image and rating readers, downloads, decoded cache and episodic sampling."""

from .cifar import CIFARFS
from .download import CorruptFileError, DownloadError, default_root, download_url, md5sum
from .miniimagenet import MiniImageNet
from .meta_splits import VISION_DATASETS, downsample, input_shape, load_meta_split
from .mnist import MNIST, mnist_splits
from .omniglot import Omniglot, omniglot_splits
from .ratings import Jester, MovieLens, Ratings
from .sampler import Episode, EpisodeSampler

__all__ = [
    "Omniglot",
    "MNIST",
    "CIFARFS",
    "MiniImageNet",
    "Jester",
    "MovieLens",
    "Ratings",
    "EpisodeSampler",
    "Episode",
    "default_root",
    "download_url",
    "md5sum",
    "DownloadError",
    "CorruptFileError",
    "omniglot_splits",
    "mnist_splits",
    "VISION_DATASETS",
    "downsample",
    "input_shape",
    "load_meta_split",
]
