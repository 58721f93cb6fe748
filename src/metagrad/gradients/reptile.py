"""Reptile (Nichol et al., 2018)."""
from __future__ import annotations

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
