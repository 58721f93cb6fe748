"""LinNet: linear layers appended to a model's output (Arnold et al., 2021, section 3 and suppl. B.3).

:class:`LinNet` adds depth without changing the function class (a product of matrices is a matrix);
:meth:`LinNet.collapse` and :func:`collapse_linear_chain` multiply bias-free linear layers into one.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

#: hidden widths of the linear network the paper appends on the vision datasets (suppl. D).
PAPER_VISION_WIDTHS: tuple[int, ...] = (256, 128, 64, 64)


def _product(layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``W_L ... W_1`` of ``layers`` (first layer applied first)."""
    w = None
    for layer in layers:
        w = layer.weight if w is None else layer.weight @ w
    return w


def _single_linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w.detach())
    return layer


def collapse_linear_chain(chain: nn.Module) -> nn.Linear:
    """One bias-free ``nn.Linear`` computing the same map as a chain of bias-free linear layers.

    ``chain`` is an ``nn.Sequential`` of bias-free ``nn.Linear`` layers (e.g.
    :func:`metagrad.models.linear_chain` ``([2, h, 1])``, LR + LinNet) or a single such layer; the
    result is the logistic-regression-shaped layer with weight ``W_L ... W_1`` (a detached copy).
    Raises ``TypeError`` for any other module and ``ValueError`` for a layer with a bias.
    """
    layers = [chain] if isinstance(chain, nn.Linear) else list(chain) if isinstance(chain, nn.Sequential) else None
    if not layers or not all(isinstance(m, nn.Linear) for m in layers):
        raise TypeError(f"collapse_linear_chain needs nn.Linear layers in an nn.Sequential, got {chain!r}")
    for i, m in enumerate(layers):
        if m.bias is not None:
            raise ValueError(f"layer {i} of the chain has a bias; only bias-free linear layers collapse to one matrix")
    return _single_linear(_product(layers))


class LinNet(nn.Module):
    """``base`` followed by bias-free linear layers ``in_features -> widths... -> out_features``.

    The appended layers add depth without changing the function class. :meth:`collapse` multiplies
    them into a single ``nn.Linear`` computing the same map (suppl. B.3: the collapsed model no longer
    adapts well). Parameter names are ``base.*`` and ``linear.<i>.weight``.

    Args:
        base: the model whose output is extended; its output's last dimension is ``in_features``
            (``nn.Identity()`` for LR + LinNet on raw inputs).
        in_features: width of ``base``'s output.
        widths: hidden widths of the appended layers (``()`` appends one layer; the paper's vision
            setting is :data:`PAPER_VISION_WIDTHS` ``= (256, 128, 64, 64)``).
        out_features: output width of the last appended layer (default ``in_features``).
    """

    def __init__(self, base: nn.Module, in_features: int, widths: Sequence[int] = (), out_features: int | None = None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
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
        """The single matrix ``W_L ... W_1`` equal to the appended layers' composition (differentiable)."""
        return _product(list(self.linear))

    def collapse(self) -> nn.Sequential:
        """A new ``nn.Sequential(base copy, one bias-free nn.Linear)`` computing this model's function.

        The result has parameter names ``0.*`` (the base) and ``1.weight``; it shares no tensors
        with this model.
        """
        return nn.Sequential(copy.deepcopy(self.base), _single_linear(self.collapsed_weight()))
