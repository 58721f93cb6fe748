"""Reptile (Nichol et al., 2018)."""
from __future__ import annotations

from ..inner import inner_loop
from .base import MetaGradient
from .unrolled import _stacked_gradient


class Reptile(MetaGradient):
    """Reptile: the meta-gradient of the adapted parameters is ``theta - u_K``.

    Implemented as the gradient of ``1/2 ||theta - stopgrad(u_K)||^2`` over the adapted
    parameters, so an outer SGD step with rate ``eps`` is Reptile's ``theta += eps (u_K - theta)``.
    Parameters that do not adapt and learnable update-rule state get a zero meta-gradient.
    ``per_step_loss`` does not apply and is ignored. Runs stacked where the problem does
    (as :class:`~metagrad.gradients.Unrolled`).
    """

    first_order = True

    def task_objective(self, problem, meta_params, sx, sy, qx, qy, *, stacked: bool = False):
        result = inner_loop(problem, meta_params, sx, sy, steps=problem.schedule.train_steps, first_order=True,
                            stacked=stacked)
        final = {n: u.detach() for n, u in result.trajectory[-1].items()}
        theta = meta_params["model"]
        per_tensor = [0.5 * (theta[n] - final[n]).pow(2) for n in problem.adapted_names]
        surrogate = sum(d.reshape(d.shape[0], -1).sum(1) if stacked else d.sum() for d in per_tensor)
        fixed = {n: v.detach() for n, v in result.fixed.items()}
        query = problem.loss(final, fixed, qx, qy, stacked=stacked).detach()
        return surrogate, {"query_loss": query, "inner_loss": result.losses}

    def batch_gradient(self, problem, meta_params, batch, vectorize: bool):
        if not (vectorize and problem.stacked):
            return super().batch_gradient(problem, meta_params, batch, vectorize)
        return _stacked_gradient(self, problem, meta_params, batch)
