"""Few-shot image data: dataset readers, downloads, decoded cache and episodic sampling."""

from .cifar import CIFARFS
from .download import CorruptFileError, DownloadError, default_root, download_url, md5sum
from .miniimagenet import MiniImageNet
from .mnist import MNIST
from .omniglot import Omniglot
from .sampler import Episode, EpisodeSampler

__all__ = [
    "Omniglot",
    "MNIST",
    "CIFARFS",
    "MiniImageNet",
    "EpisodeSampler",
    "Episode",
    "default_root",
    "download_url",
    "md5sum",
    "DownloadError",
    "CorruptFileError",
]
