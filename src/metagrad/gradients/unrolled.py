"""Unrolled meta-gradients: second-order MAML and first-order MAML (FOMAML)."""
from __future__ import annotations

import torch

from . import _stacked
from .base import MetaGradient


class Unrolled(MetaGradient):
    """Exact MAML meta-gradient: backpropagate through every inner step (second order)."""

    first_order = False
    phases = "inline"

    def task_objective(self, learner, meta_params, sx, sy, qx, qy):
        schedule = learner.schedule
        traj, inner = learner._inner_loop(
            meta_params, sx, sy, schedule.train_steps, first_order=self.first_order,
            keep_trajectory=schedule.per_step_loss,
        )
        if schedule.per_step_loss:
            losses = torch.stack([learner._query_loss(meta_params, u, qx, qy) for u in traj[1:]])
            objective, final = losses.mean(), losses[-1]
        else:
            objective = final = learner._query_loss(meta_params, traj[-1], qx, qy)
        return objective, {"query_loss": final.detach(), "inner_loss": inner}

    def batch_gradient(self, learner, meta_params, batch, vectorize: bool):
        """Plain SGD steps on a plain MLP, vectorized: the whole meta-batch stacked, one autograd
        graph through every task's steps (``gradients._stacked``); the same steps and products
        as the per-task path (which every other case takes), so equal to rounding."""
        if not _stacked.plain_sgd_applies(learner, vectorize):
            return super().batch_gradient(learner, meta_params, batch, vectorize)
        with torch.enable_grad():
            leaves = {n: v.detach().requires_grad_() for n, v in meta_params["model"].items()}
            per_step = learner.schedule.per_step_loss
            traj, phi, inner, loss_tasks = _stacked.sgd_inner_loop(
                learner, leaves, batch, first_order=self.first_order, keep_trajectory=per_step)
            if per_step:
                losses = torch.stack([loss_tasks(u, phi, batch.query_x, batch.query_y) for u in traj[1:]])
                objective, final = losses.mean(0), losses[-1]
            else:
                objective = final = loss_tasks(traj[-1], phi, batch.query_x, batch.query_y)
            grads = torch.autograd.grad(objective.mean(), list(leaves.values()), allow_unused=True)
        model = {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads)}
        grads = {"model": model, "rule": {k: torch.zeros_like(v) for k, v in meta_params["rule"].items()}}
        return grads, objective.detach().mean(), {"query_loss": final.detach(), "inner_loss": inner}


class FirstOrder(Unrolled):
    """First-order MAML: the inner gradients are constants, so ``d u_K / d theta = I``.

    Learnable update-rule state (e.g. Meta-SGD rates) still receives its gradient through the
    steps ``u_{k+1} = u_k - lr * stopgrad(g_k)``.
    """

    first_order = True
