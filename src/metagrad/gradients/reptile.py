"""Reptile (Nichol et al., 2018)."""
from __future__ import annotations

import torch

from . import _stacked
from .base import MetaGradient


class Reptile(MetaGradient):
    """Reptile: the meta-gradient of the adapted parameters is ``theta - u_K``.

    Implemented as the gradient of ``1/2 ||theta - stopgrad(u_K)||^2`` over the adapted
    parameters, so an outer SGD step with rate ``eps`` is Reptile's ``theta += eps (u_K - theta)``.
    Parameters that do not adapt and learnable update-rule state get a zero meta-gradient.
    ``per_step_loss`` does not apply and is ignored.
    """

    first_order = True

    def task_objective(self, learner, meta_params, sx, sy, qx, qy):
        traj, inner = learner._inner_loop(meta_params, sx, sy, learner.schedule.train_steps, first_order=True)
        final = traj[-1]
        theta = meta_params["model"]
        surrogate = sum(0.5 * (theta[n] - final[n].detach()).pow(2).sum() for n in learner.adapted_names)
        query = learner._query_loss(meta_params, final, qx, qy).detach()
        return surrogate, {"query_loss": query, "inner_loss": inner}

    def batch_gradient(self, learner, meta_params, batch, vectorize: bool):
        """Plain SGD steps on a plain MLP, vectorized: every task's steps stacked
        (``gradients._stacked``); otherwise the per-task path. Equal to rounding."""
        if not _stacked.plain_sgd_applies(learner, vectorize):
            return super().batch_gradient(learner, meta_params, batch, vectorize)
        theta = meta_params["model"]
        with torch.enable_grad():
            leaves = {n: v.detach().requires_grad_() for n, v in theta.items()}
            traj, phi, inner, loss_tasks = _stacked.sgd_inner_loop(learner, leaves, batch, first_order=True)
        final = {n: u.detach() for n, u in traj[-1].items()}
        query = loss_tasks(final, {n: v.detach() for n, v in phi.items()}, batch.query_x, batch.query_y).detach()
        diff = {n: theta[n].detach() - final[n] for n in learner.adapted_names}  # [tasks, *shape]
        surrogate = sum(0.5 * d.pow(2).reshape(d.shape[0], -1).sum(1) for d in diff.values())
        model = {n: diff[n].mean(0) if n in diff else torch.zeros_like(v) for n, v in theta.items()}
        grads = {"model": model, "rule": {k: torch.zeros_like(v) for k, v in meta_params["rule"].items()}}
        return grads, surrogate.mean(), {"query_loss": query, "inner_loss": inner}
