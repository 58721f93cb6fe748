"""T-Nets (Lee & Choi, 2018): meta-learned linear transforms after each layer, not adapted.

Arnold et al. (2021) eq. (25): the task loss is ``l(A(theta) - alpha grad l(A(theta)))`` where the
transform ``T`` of ``A`` is shared by all tasks (meta-learned) and the layer weights ``W`` are
task-specific (adapted). After a layer ``y = W x + b`` a T-Net applies ``T y``: a square matrix
over the output features of an ``nn.Linear``, a 1x1 convolution over the channels of an
``nn.Conv2d``. ``T`` starts at the identity, so a fresh :class:`TNet` computes its base model's
function.

Adapting ``W`` under ``T`` is a preconditioned step on the product ``T W``: with ``g`` the gradient
with respect to the layer output, ``grad_W = T^T g x^T`` and ``T W' = T W - alpha (T T^T) g x^T``.
Since ``T`` is linear, :meth:`TNet.absorb` multiplies it into the layer (``W' = T W``,
``b' = T b``), giving a plain model of the base architecture.

Usage::

    tnet = TNet(CNN(4, ways=5))
    learner = MetaLearner(tnet, F.cross_entropy, adapt=tnet.base_parameter_patterns(), lr=0.4)
    ...  # meta-train: the transforms receive meta-gradients, the inner loop adapts only W, b
    plain = tnet.absorb()  # same architecture and parameter count as the base model
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRANSFORM = "transform"  # parameter name of a layer's T


class _TLinear(nn.Linear):
    """``nn.Linear`` followed by ``T`` (``[out, out]``); shares the wrapped layer's parameters."""

    def __init__(self, layer: nn.Linear):
        p = layer.weight
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None,
                         device="meta")  # placeholders, replaced by the layer's own parameters below
        self.weight = layer.weight
        self.bias = layer.bias
        self.transform = nn.Parameter(torch.eye(layer.out_features, dtype=p.dtype, device=p.device))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.weight, self.bias), self.transform)


class _TConv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by a 1x1 convolution ``T`` over channels (stored as ``[C, C]``)."""

    def __init__(self, layer: nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"TNet supports only groups=1 convolutions (a channel transform cannot be "
                             f"absorbed into a grouped one), got {layer}")
        p = layer.weight
        super().__init__(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=1,
                         bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
        self.weight = layer.weight
        self.bias = layer.bias
        self.transform = nn.Parameter(torch.eye(layer.out_channels, dtype=p.dtype, device=p.device))

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        c = self.out_channels
        return F.conv2d(y, self.transform.reshape(c, c, 1, 1))


# exact types: a subclass may have its own forward (or, like MultiheadAttention's out_proj, not be
# called through forward at all), so it is left as it is
_WRAP = {nn.Conv2d: _TConv2d, nn.Linear: _TLinear}


def _absorbed(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Linear``/``nn.Conv2d`` with ``T`` multiplied in (detached copies)."""
    t = layer.transform.detach()
    if isinstance(layer, _TLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=t.device, dtype=t.dtype)
        w = t @ layer.weight.detach()
    else:
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                          padding_mode=layer.padding_mode, device=t.device, dtype=t.dtype)
        w = torch.einsum("oc,cikl->oikl", t, layer.weight.detach())
    with torch.no_grad():
        plain.weight.copy_(w)
        if layer.bias is not None:
            plain.bias.copy_(t @ layer.bias.detach())
    return plain


class TNet(nn.Module):
    """A copy of ``model`` with a meta-learned transform ``T`` (identity init) after each layer.

    Every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (exactly those types: subclasses, which may
    have their own forward, are left alone) is wrapped; the base
    parameters keep their names under the prefix ``model.`` (``model.fc.weight``) and each
    wrapped layer gains ``model.<layer>.transform``. ``model`` itself is not modified: the TNet
    holds a deep copy, and the wrapped layers share that copy's parameters.

    Pass ``adapt=tnet.base_parameter_patterns()`` to :class:`~metagrad.MetaLearner` so that the inner
    loop adapts only the base parameters while the transforms are meta-learned (eq. 25). Everything
    is out-of-place, so the model runs under ``torch.func.functional_call`` and ``vmap``.

    Raises ``ValueError`` if ``model`` has no ``Linear``/``Conv2d`` layer or has a grouped
    convolution, and ``TypeError`` if it is not an ``nn.Module``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = copy.deepcopy(model)
        wrapped = []
        if type(model) in _WRAP:  # a bare layer: wrap it as the root
            model, wrapped = _WRAP[type(model)](model), [""]
        for name, module in list(model.named_modules()):
            wrapper = _WRAP.get(type(module))
            if wrapper is not None:
                _replace(model, name, wrapper(module))
                wrapped.append(name)
        if not wrapped:
            raise ValueError(f"TNet found no nn.Linear or nn.Conv2d layer in {type(model).__name__}")
        self.model = model
        self.layer_names: tuple[str, ...] = tuple(wrapped)

    def forward(self, x):
        return self.model(x)

    def transform_names(self) -> tuple[str, ...]:
        """Full names of the transforms (the meta-learned, non-adapted parameters)."""
        return tuple(".".join(p for p in ("model", layer, TRANSFORM) if p) for layer in self.layer_names)

    def base_parameter_patterns(self) -> tuple[str, ...]:
        """The exact names of the base model's parameters: what to pass as ``adapt=``."""
        t = set(self.transform_names())
        return tuple(n for n, _ in self.named_parameters() if n not in t)

    def absorb(self) -> nn.Module:
        """A plain model of the base architecture with each ``T`` multiplied into its layer.

        ``W' = T W`` (for a convolution ``W'[o] = sum_c T[o, c] W[c]``) and ``b' = T b``; other
        parameters and buffers are copied. The result computes the same function, has exactly the
        base model's parameters (names without the ``model.`` prefix) and shares no tensors with
        this module.
        """
        plain = copy.deepcopy(self.model)
        if self.layer_names == ("",):
            return _absorbed(plain)
        for name in self.layer_names:
            _replace(plain, name, _absorbed(_get(plain, name)))
        return plain


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(_get(root, parent), leaf, new)
