"""Support losses, gradients and Hessian-vector products of a whole meta-batch at once.

The stacked paths of the meta-gradients (adjoint and implicit always; unrolled, first-order and
Reptile for plain SGD on plain MLPs, :func:`plain_sgd_applies`) keep the adapted parameters of all
tasks stacked, ``{name: [tasks, *shape]}``, and differentiate the sum of the
per-task losses with plain autograd: task ``i``'s loss depends only on slice ``i``, so the
gradient of the sum holds every task's own gradient, and a pullback of that gradient is every
task's Hessian-vector product. One autograd graph per state is cheaper than ``vmap`` of
``torch.func`` transforms on small nets; plain MLPs skip the ``vmap`` of the forward as well
(:func:`metagrad.models._stacked.stacked_forward`), and those with a mean-square loss and the
activations of :mod:`._analytic` skip autograd: :func:`grad_tasks` and :func:`linearized` run the
hand-written backward pass and R-operator there.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from ..metrics import half_mse, mse
from ..models._stacked import stacked_forward
from ._analytic import analytic_mlp


def _mean_square(pred: Tensor, y: Tensor) -> Tensor:
    return (pred - y).square().flatten(1).mean(1)


def _half_mean_square(pred: Tensor, y: Tensor) -> Tensor:
    return 0.5 * _mean_square(pred, y)


#: batched forms of per-task losses: ``f(pred [tasks, ...], y [tasks, ...]) -> [tasks]``, the same
#: values as ``vmap(loss)`` for equal shapes, without the ``vmap``'s per-call overhead
_BATCHED_LOSSES = {mse: _mean_square, half_mse: _half_mean_square, F.mse_loss: _mean_square}


def _per_task_loss(loss_fn: Callable) -> Callable:
    """``f(pred, y) -> [tasks]``: ``loss_fn`` of every task of a stacked prediction."""
    per_task = vmap(loss_fn)
    batched = _BATCHED_LOSSES.get(loss_fn)
    if batched is None:
        return per_task

    def loss(pred: Tensor, y: Tensor) -> Tensor:
        return batched(pred, y) if pred.shape == y.shape else per_task(pred, y)

    return loss


def task_losses(learner, buffers: dict) -> Callable:
    """``loss_tasks(u, ph, x, y) -> [tasks]``: every task's loss, with ``u``, ``ph`` (adapted and
    other parameters), ``x`` and ``y`` stacked on dim 0."""
    stacked = None if buffers else stacked_forward(learner.model)
    if stacked is not None:  # a plain MLP: batched products, the same function as the vmap below
        per_task = _per_task_loss(learner.loss_fn)

        def loss_tasks(u, ph, x, y):
            return per_task(stacked({**ph, **u}, x), y)

        loss_tasks.analytic = analytic_mlp(learner.model, learner.loss_fn)
        return loss_tasks

    def loss_at(u, ph, x, y):
        return learner.loss_fn(learner.functional_forward({**buffers, **ph, **u}, x), y)

    return vmap(loss_at)


def support_grad(loss_tasks: Callable, names: list[str], u_leaves: list[Tensor], ph: dict, x: Tensor, y: Tensor,
                 create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The per-task losses ``[tasks]`` and their gradients with respect to ``u_leaves`` (the stacked
    adapted tensors, in ``names`` order, leaves that require grad)."""
    with torch.enable_grad():
        loss = loss_tasks(dict(zip(names, u_leaves)), ph, x, y)
        return loss, torch.autograd.grad(loss.sum(), u_leaves, create_graph=create_graph)


def _analytic(loss_tasks: Callable, u: dict, ph: dict, x: Tensor, y: Tensor):
    """The hand-written derivatives of ``loss_tasks`` (:mod:`._analytic`) where they apply to
    these arguments (every parameter adapted), else ``None``."""
    analytic = getattr(loss_tasks, "analytic", None)
    if analytic is None or ph:
        return None
    return analytic if analytic.applies(u, x, y) else None


def grad_tasks(loss_tasks: Callable, names: list[str], u: dict, ph: dict, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
    """``(losses [tasks], {name: gradient [tasks, *shape]})`` at the stacked state ``u`` (no graph kept)."""
    analytic = _analytic(loss_tasks, u, ph, x, y)
    if analytic is not None:
        return analytic.grad(u, x, y)
    loss, g = support_grad(loss_tasks, names, [u[n].detach().requires_grad_() for n in names], ph, x, y, False)
    return loss.detach(), dict(zip(names, g))


def linearized(loss_tasks: Callable, names: list[str], u: dict, phi_tasks: dict, x: Tensor, y: Tensor):
    """``(pull, losses)`` at the stacked state ``u``: ``pull(v, last=False) -> (H v, (d_phi grad_u L)^T v)``
    per task, from one autograd graph of the stacked gradient that every pull reuses (``last``
    frees it)."""
    analytic = _analytic(loss_tasks, u, phi_tasks, x, y)
    if analytic is not None:
        hvp, loss = analytic.linearize(u, x, y)
        return (lambda v, last=False: (hvp(v), {})), loss
    leaves = [u[n].detach().requires_grad_() for n in names] + \
             [phi_tasks[n].detach().requires_grad_() for n in phi_tasks]
    loss, g = support_grad(loss_tasks, names, leaves[:len(names)], dict(zip(phi_tasks, leaves[len(names):])), x, y,
                           True)

    def pull(v: dict, last: bool = False):
        out = torch.autograd.grad(g, leaves, grad_outputs=[v[n] for n in names], retain_graph=not last,
                                  allow_unused=True)
        out = [torch.zeros_like(t) if o is None else o for o, t in zip(out, leaves)]
        return dict(zip(names, out)), dict(zip(phi_tasks, out[len(names):]))

    return pull, loss.detach()


def stack(tensors: dict, tasks: int) -> dict:
    """``{name: [tasks, *shape]}``: each (detached) tensor repeated for every task."""
    return {n: v.detach().expand(tasks, *v.shape).contiguous() for n, v in tensors.items()}


def bcast(per_task: Tensor, like: Tensor) -> Tensor:
    """``[tasks]`` -> ``[tasks, 1, ..., 1]`` to broadcast against ``like``."""
    return per_task.reshape(-1, *([1] * (like.dim() - 1)))


def plain_sgd_applies(learner, vectorize: bool) -> bool:
    """Whether a meta-batch of plain SGD inner steps can run stacked (unrolled, first-order,
    Reptile): vectorized, the rule a fixed-rate :class:`~metagrad.rules.SGD`, no phases, and a
    model with a batched forward (:func:`~metagrad.models._stacked.stacked_forward`)."""
    from ..rules import SGD

    rule = learner.rule
    return (vectorize and type(rule) is SGD and not rule.learnable and not learner.schedule.phases
            and not any(True for _ in learner.model.buffers()) and stacked_forward(learner.model) is not None)


def sgd_inner_loop(learner, leaves: dict, batch, *, first_order: bool, keep_trajectory: bool = False):
    """``K = schedule.train_steps`` SGD steps of every task from the meta-parameters ``leaves``
    (``{name: tensor}``, unstacked; their autograd graph is kept, second order unless
    ``first_order``). Returns ``(trajectory, phi, inner losses [tasks, K], loss_tasks)``: the
    trajectory holds the stacked adapted dicts after each step (or only the last one), ``phi``
    the stacked other parameters."""
    names = learner.adapted_names
    sx, sy = batch.support_x, batch.support_y
    tasks = sx.shape[0]
    loss_tasks = task_losses(learner, {})
    u = {n: leaves[n].expand(tasks, *leaves[n].shape) for n in names}
    phi = {n: v.expand(tasks, *v.shape) for n, v in leaves.items() if n not in u}
    lr = learner.rule.lr
    losses, trajectory = [], [u]
    for _ in range(learner.schedule.train_steps):
        loss = loss_tasks(u, phi, sx, sy)
        g = torch.autograd.grad(loss.sum(), [u[n] for n in names], create_graph=not first_order)
        u = {n: u[n] - lr * gn for n, gn in zip(names, g)}
        losses.append(loss.detach())
        trajectory.append(u)
    if not keep_trajectory:
        trajectory = trajectory[-1:]
    inner = torch.stack(losses, 1) if losses else sx.new_zeros(tasks, 0)
    return trajectory, phi, inner, loss_tasks
