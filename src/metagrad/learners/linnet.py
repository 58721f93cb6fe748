"""LinNet: linear layers appended to a model's output (Arnold et al., 2021, section 3)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LinNet(nn.Module):
    """``base`` followed by bias-free linear layers ``widths[0] -> ... -> out_features``.

    The appended layers add depth without changing the function class (a product of matrices is a
    matrix). :meth:`collapse` multiplies them into a single ``nn.Linear`` computing the same map.

    Args:
        base: the model whose output is extended; its output's last dimension is ``in_features``.
        in_features: width of ``base``'s output.
        widths: hidden widths of the appended layers (``[]`` appends one layer).
        out_features: output width of the last appended layer (default ``in_features``).
    """

    def __init__(self, base: nn.Module, in_features: int, widths: Sequence[int] = (), out_features: int | None = None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        dims = [in_features, *widths, out_features]
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"LinNet widths must be positive integers, got {dims}")
        self.base = base
        self.linear = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])))

    def forward(self, x):
        return self.linear(self.base(x))

    def collapsed_weight(self) -> torch.Tensor:
        """The single matrix ``W_L ... W_1`` equal to the appended layers' composition."""
        w = None
        for layer in self.linear:
            w = layer.weight if w is None else layer.weight @ w
        return w

    def collapse(self) -> nn.Module:
        """A new module ``base`` + one ``nn.Linear`` computing exactly this model's function."""
        w = self.collapsed_weight().detach()
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w)
        with torch.no_grad():
            layer.weight.copy_(w)
        import copy

        return nn.Sequential(copy.deepcopy(self.base), layer)
