"""Small fully connected models used by the synthetic experiments."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """``in -> hidden... -> out`` with ``activation`` (``"relu"`` or ``"tanh"``) between layers.

    Layers are named ``fc0, <activation>0, fc1, ...`` and the last one ``head`` (so a tanh MLP's
    parameters are ``fc0.weight``, ..., ``head.bias``)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu"):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        dims = [in_features, *hidden]
        layers: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"{activation}{i}", _ACTIVATIONS[activation]())]
        layers.append(("head", nn.Linear(dims[-1], out_features)))
        super().__init__(OrderedDict(layers))


def linear_chain(dims: Sequence[int]) -> nn.Sequential:
    """Bias-free linear layers ``dims[0] -> dims[1] -> ...``: the Shallow/Deep/LR(+LinNet) models.

    ``linear_chain([1, 1])`` is Shallow ``y = c x``; ``linear_chain([1, 1, 1])`` is Deep
    ``y = a b x``; ``linear_chain([2, 1])`` is logistic regression ``c^T x``.
    """
    if len(dims) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"linear_chain needs at least two positive integer widths, got {list(dims)}")
    return nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])))
