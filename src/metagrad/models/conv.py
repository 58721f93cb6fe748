"""Convolutional few-shot classifiers usable with ``torch.func`` (vmap / functional_call).

BatchNorm layers use ``track_running_stats=False``: they always normalise with the
statistics of the current batch and hold no buffers, so a model is a pure function of
its parameters and inputs (the transductive setting of Finn et al. 2017).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN", "MNISTNet"]


class _ShiftBatchNorm2d(nn.Module):
    """Batch normalization with a learned per-channel shift and no scale (``tf.contrib.layers.
    batch_norm``'s defaults, as in Finn et al.'s code). The unit scale is passed to
    ``F.batch_norm`` as a constant: its double backward needs a weight tensor."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, None, None, torch.ones_like(self.bias), self.bias, True, 0.0, self.eps)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class CNN(nn.Module):
    """Finn et al. (2017) convolutional classifier: ``k`` conv blocks, flatten (or spatial mean),
    linear ``head``.

    Each block is a 3x3 convolution (padding 1), ``BatchNorm2d(track_running_stats=False)``
    and ReLU, followed by 2x2 max-pooling (``downsample="maxpool"``; skipped once the
    feature map is 1x1) or with the convolution itself of stride 2 (``downsample="stride"``).

    Args:
        k: number of conv blocks (4 in the MAML paper).
        ways: number of output classes.

    Keyword Args:
        channels: filters per block (64 for Omniglot, 32 for mini-ImageNet in MAML).
        in_channels: input channels (1 for Omniglot/MNIST, 3 for RGB).
        image_size: input height/width, used to size ``head``.
        downsample: ``"maxpool"`` or ``"stride"``.
        init: ``"torch"`` (PyTorch's default initialization), ``"maml"`` (Finn et al.'s code:
            Xavier-uniform conv weights, zero conv biases, a standard-normal ``head`` weight and a
            zero head bias) or ``"xavier"`` (learn2learn's CNN4, used by Arnold et al.:
            Xavier-uniform conv and ``head`` weights, zero biases). With BatchNorm after each conv
            the conv weights' scale does not change the function but does change the effective
            inner learning rate (the gradient scales as ``1 / ||w||``), so an inner lr tuned for one
            init does not carry to the other.
            ``"l2l"``: learn2learn's ``OmniglotCNN`` (Xavier-uniform conv weights, zero biases,
            BatchNorm scales uniform in [0, 1), a standard-normal ``head`` weight, zero head bias).
        norm: ``"affine"`` (PyTorch's BatchNorm: learned scale and shift, eps 1e-5) or
            ``"center"`` (Finn et al.'s TensorFlow code, ``tf.contrib.layers.batch_norm`` defaults:
            a learned shift only, no scale, eps 1e-3).
        pool: ``"flatten"`` (the head sees every position of the last feature map) or ``"mean"``
            (the head sees the per-channel mean over positions, ``feature_dim = channels``: Finn et
            al.'s Omniglot network without max-pooling and learn2learn's ``OmniglotCNN``, i.e.
            ``downsample="stride", pool="mean", init="l2l"``).

    Attributes:
        features: the ``nn.Sequential`` of blocks.
        head: the final ``nn.Linear``.
        feature_dim: input size of ``head``.
    """

    def __init__(
        self,
        k: int,
        ways: int,
        *,
        channels: int = 64,
        in_channels: int = 1,
        image_size: int = 28,
        downsample: str = "maxpool",
        init: str = "torch",
        norm: str = "affine",
        pool: str = "flatten",
    ):
        super().__init__()
        _check_int("k", k)
        _check_int("ways", ways)
        _check_int("channels", channels)
        _check_int("in_channels", in_channels)
        _check_int("image_size", image_size)
        if downsample not in ("maxpool", "stride"):
            raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")
        if init not in ("torch", "maml", "xavier", "l2l"):
            raise ValueError(f"init must be 'torch', 'maml', 'xavier' or 'l2l', got {init!r}")
        if norm not in ("affine", "center"):
            raise ValueError(f"norm must be 'affine' or 'center', got {norm!r}")
        if pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean', got {pool!r}")
        self.k, self.ways, self.downsample, self.pool = k, ways, downsample, pool
        layers: list[nn.Module] = []
        size, cin = image_size, in_channels
        for _ in range(k):
            stride = 2 if downsample == "stride" else 1
            bn = _ShiftBatchNorm2d(channels) if norm == "center" else nn.BatchNorm2d(channels, track_running_stats=False)
            layers += [nn.Conv2d(cin, channels, 3, stride=stride, padding=1), bn, nn.ReLU()]
            if downsample == "stride":
                size = (size - 1) // 2 + 1
            elif size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = channels
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels if pool == "mean" else channels * size * size
        self.head = nn.Linear(self.feature_dim, ways)
        if init != "torch":
            with torch.no_grad():
                for m in self.features:
                    if isinstance(m, nn.Conv2d):
                        nn.init.xavier_uniform_(m.weight)
                        m.bias.zero_()
                    elif init == "l2l" and isinstance(m, nn.BatchNorm2d):
                        nn.init.uniform_(m.weight)
                if init in ("maml", "l2l"):
                    self.head.weight.normal_()
                else:
                    nn.init.xavier_uniform_(self.head.weight)
                self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, ways]`` for images ``[B, in_channels, image_size, image_size]``."""
        h = self.features(x)
        return self.head(h.mean((2, 3)) if self.pool == "mean" else h.flatten(1))


class MNISTNet(nn.Module):
    """LeNet-style MNIST classifier (the small net of the Wormhole MAML experiments).

    Two 5x5 convolutions (no padding), each followed by ReLU and 2x2 max-pooling, then
    ``Linear -> ReLU -> head``.  For 28x28 inputs: 28 -> 24 -> 12 -> 8 -> 4.

    Args:
        ways: number of output classes.

    Keyword Args:
        channels: filters of the two convolutions (default ``(20, 50)``).
        hidden: width of the hidden linear layer (default 500).
        in_channels: input channels.
        image_size: input height/width (must leave a positive feature map).
    """

    def __init__(
        self,
        ways: int,
        *,
        channels: tuple[int, int] = (20, 50),
        hidden: int = 500,
        in_channels: int = 1,
        image_size: int = 28,
    ):
        super().__init__()
        _check_int("ways", ways)
        _check_int("hidden", hidden)
        _check_int("in_channels", in_channels)
        _check_int("image_size", image_size)
        if len(channels) != 2:
            raise ValueError(f"channels must be a pair of ints, got {channels!r}")
        c1, c2 = (_check_int("channels[i]", c) for c in channels)
        size = ((image_size - 4) // 2 - 4) // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for MNISTNet (needs >= 16)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.feature_dim = c2 * size * size
        self.fc = nn.Linear(self.feature_dim, hidden)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, ways]`` for images ``[B, in_channels, image_size, image_size]``."""
        return self.head(torch.relu(self.fc(self.features(x).flatten(1))))
