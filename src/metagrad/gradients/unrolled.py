"""Unrolled meta-gradients: second-order MAML and first-order MAML (FOMAML)."""
from __future__ import annotations

import torch

from ..inner import inner_loop
from .base import MetaGradient


class Unrolled(MetaGradient):
    """Exact MAML meta-gradient: backpropagate through every inner step (second order).

    Per task under ``vmap`` (or a loop) with ``torch.func``; where the problem runs stacked
    (:attr:`~metagrad.InnerProblem.stacked`: a plain MLP, an elementwise rule) a vectorized
    meta-batch is one autograd graph through every task's steps instead: the same steps and
    products, so equal to rounding.
    """

    first_order = False
    phases = "inline"

    def task_objective(self, problem, meta_params, sx, sy, qx, qy, *, stacked: bool = False):
        schedule = problem.schedule
        result = inner_loop(problem, meta_params, sx, sy, steps=schedule.train_steps, first_order=self.first_order,
                            keep_trajectory=schedule.per_step_loss, stacked=stacked)
        if schedule.per_step_loss:
            losses = torch.stack([problem.loss(u, result.fixed, qx, qy, stacked=stacked)
                                  for u in result.trajectory[1:]])
            objective, final = losses.mean(0), losses[-1]
        else:
            objective = final = problem.loss(result.trajectory[-1], result.fixed, qx, qy, stacked=stacked)
        return objective, {"query_loss": final.detach(), "inner_loss": result.losses}

    def batch_gradient(self, problem, meta_params, batch, vectorize: bool):
        if not (vectorize and problem.stacked):
            return super().batch_gradient(problem, meta_params, batch, vectorize)
        return _stacked_gradient(self, problem, meta_params, batch)


class FirstOrder(Unrolled):
    """First-order MAML: the inner gradients are constants, so ``d u_K / d theta = I``.

    Learnable update-rule state (e.g. Meta-SGD rates) still receives its gradient through the
    steps ``u_{k+1} = u_k - lr * stopgrad(g_k)``.
    """

    first_order = True


def _stacked_gradient(method: MetaGradient, problem, meta_params, batch):
    """``(grads, objective, aux)`` of a meta-batch from ``method.task_objective(..., stacked=True)``
    (objectives ``[tasks]``) by plain autograd."""
    with torch.enable_grad():
        leaves = {g: {n: v.detach().requires_grad_() for n, v in d.items()} for g, d in meta_params.items()}
        objective, aux = method.task_objective(problem, leaves, *batch, stacked=True)
        flat = [v for d in leaves.values() for v in d.values()]
        found = torch.autograd.grad(objective.mean(), flat, allow_unused=True)
    found = iter(torch.zeros_like(v) if g is None else g for v, g in zip(flat, found))
    grads = {g: {n: next(found) for n in d} for g, d in leaves.items()}
    return grads, objective.detach().mean(), aux
