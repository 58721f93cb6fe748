"""Backends: the per-task support loss and its derivatives over a whole meta-batch.

A backend evaluates ``loss_fn(model(x), y)`` for every task of a meta-batch at once, with the
tensors of all tasks stacked on dim 0 (``{name: [tasks, *shape]}``, data ``[tasks, *batch, ...]``),
and differentiates it with plain autograd: task ``i``'s loss depends only on slice ``i``, so the
gradient of the sum holds every task's own gradient and a pullback of that gradient is every
task's Hessian-vector product. One autograd graph for the whole batch is cheaper than a ``vmap``
of ``torch.func`` transforms on small nets. :class:`MetaLearner` picks one when it is built
(:func:`make_backend`, readable as ``learner.backend.name``); the meta-gradients only call its
methods. The protocol (:class:`Backend`):

* ``task_losses(u, phi, x, y) -> [tasks]``: differentiable losses, ``u`` the adapted and ``phi``
  the other parameters (both stacked);
* ``grad(u, phi, x, y) -> (losses, grads)``: values only, no graph kept;
* ``linearize(u, phi, x, y) -> (pull, losses)``: ``pull(v, last=False) -> (H v, (d_phi grad_u L)^T v)``
  per task, the support-loss Hessian at ``u`` and the mixed second derivative, reusable until
  ``last``.

Three implementations, from the most general to the fastest:

* ``"generic"`` (:class:`Backend`): any ``nn.Module``: ``vmap`` over tasks of
  ``torch.func.functional_call``, autograd derivatives.
* ``"mlp"`` (:class:`MLPBackend`): a plain MLP (:func:`plain_layers`: an ``nn.Sequential`` of
  ``nn.Linear`` and parameter-free elementwise activations, no hooks or buffers): batched matrix
  products instead of the ``vmap`` (on the 2x32 tanh MLP of ``amaml-regression``, 5 tasks, 100
  points, a support-loss gradient takes about 0.45 ms instead of 1.2 ms on a CPU), autograd
  derivatives. On such models a meta-batch of elementwise update rules also runs stacked in the
  unrolled, first-order and Reptile meta-gradients (:attr:`metagrad.InnerProblem.stacked`).
* ``"mlp-analytic"``: the same forward; where the activations are tanh, sigmoid, (leaky) ReLU or
  identity and the loss a mean square (``metagrad.metrics.mse``, ``half_mse``, ``F.mse_loss``),
  the gradient is the textbook backward pass and ``H v`` its directional derivative
  (Pearlmutter's R-operator, 1994), with no autograd graph: about half the time of autograd's
  gradient and a third of its product. Used when every parameter adapts and the targets have the
  prediction's shape, autograd otherwise. The results equal autograd's to rounding.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .metrics import half_mse, mse

LossFn = Callable[[Tensor, Tensor], Tensor]

#: the mean-square losses the batched forms and the hand-written derivatives know, with their scale:
#: ``loss(pred, y) = scale * mean((pred - y)^2)`` per task
MEAN_SQUARE_LOSSES: dict[Callable, float] = {mse: 1.0, F.mse_loss: 1.0, half_mse: 0.5}

#: parameter-free modules applied entry by entry, so they act on a ``[tasks, ...]`` batch unchanged
_ELEMENTWISE = (nn.Identity, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
                nn.Softplus, nn.Mish, nn.Hardtanh, nn.Tanhshrink)


def bcast(per_task: Tensor, like: Tensor) -> Tensor:
    """``[tasks]`` -> ``[tasks, 1, ..., 1]`` to broadcast against ``like``."""
    return per_task.reshape(-1, *([1] * (like.dim() - 1)))


def stack(tensors: Mapping[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """``{name: [tasks, *shape]}``: each (detached) tensor repeated for every task."""
    return {n: v.detach().expand(tasks, *v.shape).contiguous() for n, v in tensors.items()}


# ---------------------------------------------------------------------------- generic
class Backend:
    """The generic backend: any ``nn.Module`` through ``vmap`` of ``functional_call`` (see the module
    docstring for the protocol)."""

    name = "generic"

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        self.model, self.loss_fn = model, loss_fn

    def _loss_at(self, u, ph, x, y):
        return self.loss_fn(functional_call(self.model, {**ph, **u}, (x,)), y)  # buffers: the model's own

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def task_losses(self, u: Mapping[str, Tensor], phi: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Every task's loss ``[tasks]`` (differentiable)."""
        return vmap(self._loss_at)(u, phi, x, y)

    def _autograd_grad(self, u, phi, x, y, create_graph: bool):
        names = list(u)
        with torch.enable_grad():
            loss = self.task_losses(u, phi, x, y)
            return loss, dict(zip(names, torch.autograd.grad(loss.sum(), [u[n] for n in names],
                                                             create_graph=create_graph)))

    def differentiable_grad(self, u, phi, x, y, *, create_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """``(losses [tasks], grads)`` at ``u`` (tensors in an autograd graph, e.g. inner-loop
        iterates); ``create_graph`` keeps the gradient differentiable (second order)."""
        return self._autograd_grad(u, phi, x, y, create_graph)

    def grad(self, u, phi, x, y) -> tuple[Tensor, dict[str, Tensor]]:
        """``(losses [tasks], grads)`` at ``u``: values, no graph kept."""
        leaves = {n: t.detach().requires_grad_() for n, t in u.items()}
        loss, g = self._autograd_grad(leaves, phi, x, y, False)
        return loss.detach(), g

    def linearize(self, u, phi, x, y):
        """``(pull, losses [tasks])`` at ``u``: ``pull(v, last=False) -> (H v, (d_phi grad_u L)^T v)``
        per task, from one autograd graph of the stacked gradient that every pull reuses
        (``last`` frees it)."""
        names, phi_names = list(u), list(phi)
        leaves = [u[n].detach().requires_grad_() for n in names] + [phi[n].detach().requires_grad_() for n in phi]
        with torch.enable_grad():
            loss = self.task_losses(dict(zip(names, leaves)), dict(zip(phi_names, leaves[len(names):])), x, y)
            g = torch.autograd.grad(loss.sum(), leaves[:len(names)], create_graph=True)

        def pull(v: dict, last: bool = False):
            out = torch.autograd.grad(g, leaves, grad_outputs=[v[n] for n in names], retain_graph=not last,
                                      allow_unused=True)
            out = [torch.zeros_like(t) if o is None else o for o, t in zip(out, leaves)]
            return dict(zip(names, out)), dict(zip(phi_names, out[len(names):]))

        return pull, loss.detach()


# ---------------------------------------------------------------------------- plain MLPs
def _plain(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._buffers)


def plain_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The ``(name, module)`` children of ``model`` if it is a plain MLP (an ``nn.Sequential``, its
    own ``forward``, no hooks or buffers, of ``nn.Linear`` layers and parameter-free elementwise
    activations), else ``None``."""
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential) or not _plain(model):
        return None
    layers: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if not _plain(child):
            return None
        if type(child) is nn.Linear:
            if not {n for n, _ in child.named_parameters()} <= {"weight", "bias"}:
                return None
        elif type(child) not in _ELEMENTWISE or any(True for _ in child.parameters()):
            return None
        layers.append((name, child))
    return layers or None


def linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``h [tasks, n, in] @ w[tasks, out, in]^T + b [tasks, out]`` by batched products."""
    wt = w.transpose(1, 2)
    return torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(1), h, wt)


def stacked_forward(model: nn.Module) -> Callable[[Mapping[str, Tensor], Tensor], Tensor] | None:
    """``f(params, x)``: ``model`` applied per task, or ``None`` where that is not known to be exact.

    ``params`` maps every parameter name of ``model`` to the task-stacked tensor ``[tasks, *shape]``
    and ``x`` is ``[tasks, *batch, in]``; the result is ``[tasks, *batch, out]``, equal to
    ``vmap(lambda p, x: functional_call(model, p, (x,)))(params, x)`` (up to floating-point
    rounding of the batched products).
    """
    layers = plain_layers(model)
    if layers is None:
        return None

    def forward(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for name, child in layers:
            if type(child) is nn.Linear:
                shape = h.shape
                flat = linear(h.reshape(shape[0], -1, shape[-1]), params[f"{name}.weight"], params.get(f"{name}.bias"))
                h = flat.reshape(*shape[:-1], flat.shape[-1])
            else:
                h = child(h)
        return h

    return forward


def per_task_loss(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(pred, y) -> [tasks]``: ``loss_fn`` of every task of a stacked prediction; a mean-square
    loss of equal shapes without the ``vmap``'s per-call overhead (the same values)."""
    per_task = vmap(loss_fn)
    scale = MEAN_SQUARE_LOSSES.get(loss_fn)
    if scale is None:
        return per_task

    def loss(pred: Tensor, y: Tensor) -> Tensor:
        if pred.shape != y.shape:
            return per_task(pred, y)
        out = (pred - y).square().flatten(1).mean(1)
        return out if scale == 1.0 else scale * out

    return loss


class MLPBackend(Backend):
    """Plain MLPs: the stacked forward by batched matrix products (:func:`stacked_forward`);
    with ``analytic``, the hand-written gradients and Hessian-vector products of :class:`_Analytic`."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, analytic: bool = True):
        super().__init__(model, loss_fn)
        self._forward = stacked_forward(model)
        if self._forward is None:
            raise ValueError(f"the 'mlp' backends need a plain MLP (nn.Sequential of nn.Linear and elementwise "
                             f"activations, no hooks or buffers), got {type(model).__name__}")
        self._loss = per_task_loss(loss_fn)
        self._analytic = _Analytic.build(model, loss_fn) if analytic else None
        if analytic and self._analytic is None:
            raise ValueError("the 'mlp-analytic' backend needs tanh, sigmoid, (leaky) ReLU or identity activations "
                             f"and a mean-square loss ({', '.join(f.__name__ for f in MEAN_SQUARE_LOSSES)}), "
                             f"got {loss_fn!r}")
        self.name = "mlp-analytic" if analytic else "mlp"

    def task_losses(self, u, phi, x, y):
        return self._loss(self._forward({**phi, **u}, x), y)

    def _hand_written(self, u, phi, x, y):
        a = self._analytic
        return a if a is not None and not phi and a.applies(u, x, y) else None

    def grad(self, u, phi, x, y):
        a = self._hand_written(u, phi, x, y)
        return a.grad(u, x, y) if a is not None else super().grad(u, phi, x, y)

    def linearize(self, u, phi, x, y):
        a = self._hand_written(u, phi, x, y)
        if a is None:
            return super().linearize(u, phi, x, y)
        hvp, loss = a.linearize(u, x, y)
        return (lambda v, last=False: (hvp(v), {})), loss


BACKENDS = ("generic", "mlp", "mlp-analytic")


def make_backend(model: nn.Module, loss_fn: LossFn, name: str = "auto") -> Backend:
    """The backend ``name`` for ``model`` and ``loss_fn``; ``"auto"`` takes the fastest that
    applies: ``"mlp-analytic"``, then ``"mlp"``, then ``"generic"``. A named backend that does not
    apply raises ``ValueError`` saying why."""
    if name == "auto":
        if stacked_forward(model) is None:
            return Backend(model, loss_fn)
        analytic = _Analytic.build(model, loss_fn) is not None
        return MLPBackend(model, loss_fn, analytic=analytic)
    if name == "generic":
        return Backend(model, loss_fn)
    if name in ("mlp", "mlp-analytic"):
        return MLPBackend(model, loss_fn, analytic=name == "mlp-analytic")
    raise ValueError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------- hand-written derivatives
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


class _Analytic:
    """Per-task losses, gradients and Hessian-vector products of ``scale * mean((mlp(x) - y)^2)``
    for stacked parameters ``{name: [tasks, *shape]}`` (every parameter of the model) and data
    ``x [tasks, *batch, in]``, ``y`` of the prediction's shape. Build with :meth:`build`."""

    def __init__(self, layers: list[tuple[str, nn.Module]], scale: float):
        self.layers = layers
        self.scale = scale
        self.names = frozenset(f"{name}.{p}" for name, m in layers if type(m) is nn.Linear
                               for p, _ in m.named_parameters())
        self.first = next(i for i, (_, m) in enumerate(layers) if type(m) is nn.Linear)
        self.out_features = next(m.out_features for _, m in reversed(layers) if type(m) is nn.Linear)

    @classmethod
    def build(cls, model: nn.Module, loss_fn: Callable) -> "_Analytic | None":
        """The hand-written derivatives of ``loss_fn(model(x), y)`` where they are known to be exact
        (a plain MLP with the activations of :data:`_ACTIVATIONS` and a mean-square loss), else ``None``."""
        layers = plain_layers(model)
        scale = MEAN_SQUARE_LOSSES.get(loss_fn)
        if layers is None or scale is None:
            return None
        if any(type(m) is not nn.Linear and type(m) not in _ACTIVATIONS for _, m in layers):
            return None
        if not any(type(m) is nn.Linear for _, m in layers):
            return None
        return cls(layers, scale)

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
