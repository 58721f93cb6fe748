"""Support-loss gradients and Hessian-vector products of a plain MLP, written out by hand.

The adjoint's backward pass (and iMAML's conjugate gradient) need many Hessian-vector products
``H(u) v`` of the support loss at fixed states ``u``; the forward solve needs many gradients.
Through autograd each product builds the gradient's graph and pulls ``v`` back through it, and on
small nets most of that time is per-operator overhead. For an MLP of :func:`plain_layers`
(``nn.Linear`` and the activations of :data:`_ACTIVATIONS`) with a mean-square loss, the gradient
is the textbook backward pass and ``H v`` its directional derivative (Pearlmutter's R-operator,
1994): one forward pass of the perturbation ``v`` and one backward pass of the perturbed errors.
On the 2x32 tanh MLP of ``amaml-regression`` (5 tasks, 100 points, one CPU thread) a product takes
about a third of the time of the autograd one and a gradient about half. The results equal
autograd's to rounding (``tests/test_analytic.py`` checks them in float64).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import half_mse, mse
from ..models._stacked import linear, plain_layers

#: the mean-square losses and their scale: ``scale * mean((pred - y)^2)`` per task
_LOSS_SCALE = {mse: 1.0, F.mse_loss: 1.0, half_mse: 0.5}


def _tanh(h_in: Tensor, h_out: Tensor, module, second: bool) -> tuple[Tensor, Tensor | None]:
    d1 = 1 - h_out.square()
    return d1, (-2 * h_out * d1 if second else None)


def _sigmoid(h_in, h_out, module, second):
    d1 = h_out * (1 - h_out)
    return d1, (d1 * (1 - 2 * h_out) if second else None)


def _relu(h_in, h_out, module, second):
    return (h_in > 0).to(h_in.dtype), None


def _leaky_relu(h_in, h_out, module, second):
    return torch.where(h_in > 0, h_in.new_ones(()), h_in.new_full((), module.negative_slope)), None


def _identity(h_in, h_out, module, second):
    return None, None


#: elementwise activations with their first and second derivatives ``(d1, d2)`` from the layer's
#: input and output (``None``: 1 and 0 respectively; ``d2`` only if ``second``), as autograd
#: differentiates them
_ACTIVATIONS: dict[type, Callable] = {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.ReLU: _relu,
                                      nn.LeakyReLU: _leaky_relu, nn.Identity: _identity}


class AnalyticMLP:
    """Per-task losses, gradients and Hessian-vector products of ``scale * mean((mlp(x) - y)^2)``
    for stacked parameters ``{name: [tasks, *shape]}`` (every parameter of the model) and data
    ``x [tasks, *batch, in]``, ``y`` of the prediction's shape. Build with :func:`analytic_mlp`."""

    def __init__(self, layers: list[tuple[str, nn.Module]], scale: float):
        self.layers = layers
        self.scale = scale
        self.names = frozenset(f"{name}.{p}" for name, m in layers if type(m) is nn.Linear
                               for p, _ in m.named_parameters())
        self.first = next(i for i, (_, m) in enumerate(layers) if type(m) is nn.Linear)
        self.out_features = next(m.out_features for _, m in reversed(layers) if type(m) is nn.Linear)

    def applies(self, params: dict, x: Tensor, y: Tensor) -> bool:
        """Whether ``params`` holds exactly the model's parameters and ``y`` the prediction's shape."""
        return params.keys() == self.names and tuple(y.shape) == (*x.shape[:-1], self.out_features)

    def _forward(self, u: dict, x: Tensor, y: Tensor, second: bool):
        tasks = x.shape[0]
        h = x.reshape(tasks, -1, x.shape[-1])
        ins, derivs = [], []
        for name, m in self.layers:
            ins.append(h)
            if type(m) is nn.Linear:
                h = linear(h, u[f"{name}.weight"], u.get(f"{name}.bias"))
                derivs.append(None)
            else:
                out = m(h)
                derivs.append(_ACTIVATIONS[type(m)](h, out, m, second))
                h = out
        r = h - y.reshape(h.shape)
        loss = self.scale * r.square().flatten(1).mean(1)
        coef = 2 * self.scale / r[0].numel()  # d loss / d prediction = coef * r
        return ins, derivs, coef, r * coef, loss

    def _backward(self, u: dict, ins, derivs, delta: Tensor, keep: bool):
        """Gradients from the output error ``delta``; with ``keep`` also each layer's output error."""
        grads, deltas = {}, [None] * len(self.layers)
        for i in range(len(self.layers) - 1, self.first - 1, -1):
            name, m = self.layers[i]
            if keep:
                deltas[i] = delta
            if type(m) is nn.Linear:
                grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), ins[i])
                if f"{name}.bias" in u:
                    grads[f"{name}.bias"] = delta.sum(1)
                if i > self.first:
                    delta = torch.bmm(delta, u[f"{name}.weight"])
            elif derivs[i][0] is not None:
                delta = delta * derivs[i][0]
        return grads, deltas

    def grad(self, u: dict, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        """``(losses [tasks], {name: gradient [tasks, *shape]})``."""
        with torch.no_grad():
            ins, derivs, _, delta, loss = self._forward(u, x, y, second=False)
            grads, _ = self._backward(u, ins, derivs, delta, keep=False)
        return loss, {n: grads[n] for n in u}

    def linearize(self, u: dict, x: Tensor, y: Tensor):
        """``(hvp, losses [tasks])``: ``hvp(v) -> {name: H v}`` per task, ``H`` the support-loss
        Hessian at ``u``; the forward and backward passes at ``u`` are done once, here."""
        with torch.no_grad():
            ins, derivs, coef, delta, loss = self._forward(u, x, y, second=True)
            _, deltas = self._backward(u, ins, derivs, delta, keep=True)

        @torch.no_grad()
        def hvp(v: dict) -> dict:
            # R-forward: the perturbation of every layer's input (None: zero, the data)
            r, r_ins = None, []
            for i, (name, m) in enumerate(self.layers):
                r_ins.append(r)
                if type(m) is nn.Linear:
                    rn = linear(ins[i], v[f"{name}.weight"], v.get(f"{name}.bias"))
                    r = rn if r is None else rn.baddbmm_(r, u[f"{name}.weight"].transpose(1, 2))
                elif r is not None and derivs[i][0] is not None:
                    r = r * derivs[i][0]
            # R-backward: the perturbation of every layer's output error
            r_delta, out = coef * r, {}
            for i in range(len(self.layers) - 1, self.first - 1, -1):
                name, m = self.layers[i]
                d_out = deltas[i]
                if type(m) is nn.Linear:
                    w = f"{name}.weight"
                    hw = torch.bmm(r_delta.transpose(1, 2), ins[i])
                    out[w] = hw if r_ins[i] is None else hw.baddbmm_(d_out.transpose(1, 2), r_ins[i])
                    if f"{name}.bias" in u:
                        out[f"{name}.bias"] = r_delta.sum(1)
                    if i > self.first:
                        r_delta = torch.bmm(r_delta, u[w]).baddbmm_(d_out, v[w])
                else:
                    d1, d2 = derivs[i]
                    if d1 is not None:
                        r_delta = r_delta * d1
                    if d2 is not None and r_ins[i] is not None:
                        r_delta = r_delta + d_out * d2 * r_ins[i]
            return {n: out[n] for n in u}

        return hvp, loss


def analytic_mlp(model: nn.Module, loss_fn: Callable) -> AnalyticMLP | None:
    """The hand-written derivatives of ``loss_fn(model(x), y)`` where they are known to be exact: a
    plain MLP (:func:`~metagrad.models._stacked.plain_layers`) whose activations are in
    :data:`_ACTIVATIONS`, and a mean-square loss (``mse``, ``half_mse``, ``F.mse_loss``); else ``None``."""
    layers = plain_layers(model)
    scale = _LOSS_SCALE.get(loss_fn)
    if layers is None or scale is None:
        return None
    if any(type(m) is not nn.Linear and type(m) not in _ACTIVATIONS for _, m in layers):
        return None
    if not any(type(m) is nn.Linear for _, m in layers):
        return None
    return AnalyticMLP(layers, scale)
