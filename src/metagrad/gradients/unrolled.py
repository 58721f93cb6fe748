"""Unrolled meta-gradients: second-order MAML and first-order MAML (FOMAML)."""
from __future__ import annotations

import torch

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


class FirstOrder(Unrolled):
    """First-order MAML: the inner gradients are constants, so ``d u_K / d theta = I``.

    Learnable update-rule state (e.g. Meta-SGD rates) still receives its gradient through the
    steps ``u_{k+1} = u_k - lr * stopgrad(g_k)``.
    """

    first_order = True
