"""The meta-gradient protocol.

A meta-gradient turns one task into a scalar *surrogate objective* of the meta-parameters whose
gradient is the meta-gradient direction for that task. For unrolled MAML the surrogate is the
query loss after adaptation itself; first-order MAML stops the inner gradients; Reptile's
surrogate ``1/2 ||theta - stopgrad(u_K)||^2`` has gradient ``theta - u_K``. Because every method is
"the gradient of a per-task function", ``torch.func.grad`` and ``torch.func.vmap`` compose with all
of them, and the engine (``metagrad.MetaLearner``) averages over tasks.

Methods whose gradient is not the derivative of a cheap surrogate (implicit, adjoint) override
:meth:`MetaGradient.task_gradient` (one task, still mapped over the batch by vmap or a loop) or
:meth:`MetaGradient.batch_gradient` (the whole meta-batch at once, e.g. one stacked ODE state).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp

if TYPE_CHECKING:  # pragma: no cover
    from ..core import MetaLearner


class MetaGradient:
    """Base class: ``task_objective(learner, meta_params, sx, sy, qx, qy) -> (surrogate, aux)``.

    ``aux`` must hold ``"query_loss"`` (the post-adaptation query loss, detached) and
    ``"inner_loss"`` (the support loss before each inner step, shape ``[steps]``).
    """

    #: whether the inner-loop gradients are treated as constants
    first_order: bool = False
    #: how it meets a phased schedule (:class:`~metagrad.Phase`, e.g. Wormhole's C steps):
    #: ``"inline"``: its own inner loop runs the phases (unrolled, first-order, checkpointed);
    #: ``"wrapped"``: :meth:`gradient` runs them first, differentiably, and hands the method the
    #: phase-adapted tensors as its initialization (the tensors only the phases adapt become
    #: non-adapted parameters of that task), then pulls its gradient back through the phases
    #: (implicit, adjoint); ``None``: phases are refused (Reptile).
    phases: str | None = None

    def task_objective(self, learner: "MetaLearner", meta_params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        raise NotImplementedError

    def task_gradient(self, learner: "MetaLearner", meta_params, sx, sy, qx, qy):
        """``(grads, (objective, aux))`` for one task; default: the gradient of the surrogate."""
        return grad_and_value(partial(self.task_objective, learner), has_aux=True)(meta_params, sx, sy, qx, qy)

    def batch_gradient(self, learner: "MetaLearner", meta_params, batch, vectorize: bool):
        """``(grads, objective, aux)`` averaged over the tasks of ``batch``.

        Default: :meth:`task_gradient` per task (``vmap(grad(.))`` rather than
        ``grad(vmap(.))``, which in torch 2.13 returns a wrong second-order gradient through
        ``F.batch_norm(training=True)``), then the mean over tasks. ``aux`` values keep a
        leading task dimension.
        """
        grads, (objective, aux) = learner._mean_task_gradients(partial(self.task_gradient, learner), meta_params,
                                                               batch, vectorize)
        return grads, objective.mean(), aux

    def gradient(self, learner: "MetaLearner", meta_params, batch, vectorize: bool):
        """:meth:`batch_gradient`, with the schedule's phases run first when ``phases == "wrapped"``."""
        if not (learner.schedule.phases and self.phases == "wrapped"):
            return self.batch_gradient(learner, meta_params, batch, vectorize)

        def phase_init(mp, sx, sy):
            adapted, fixed = learner._split(mp)
            adapted, carried, losses = learner._run_phases(adapted, fixed, mp["rule"], sx, sy,
                                                           first_order=self.first_order, training=True)
            return {"model": {**mp["model"], **carried, **adapted}, "rule": mp["rule"]}, losses

        batch_type = type(batch)
        # a method with a per-task gradient runs it per task (vmap); a whole-batch-only method
        # (adjoint) gets batches of one task
        per_task = (type(self).batch_gradient is MetaGradient.batch_gradient
                    or type(self).task_gradient is not MetaGradient.task_gradient)

        def one_task(mp, sx, sy, qx, qy):
            start, pull, losses = vjp(lambda m: phase_init(m, sx, sy), mp, has_aux=True)
            start = torch.utils._pytree.tree_map(lambda t: t.detach(), start)
            if per_task:
                g, (objective, aux) = self.task_gradient(learner, start, sx, sy, qx, qy)
            else:  # a batch method, on a batch of this one task
                one = batch_type(sx[None], sy[None], qx[None], qy[None])
                g, objective, aux = self.batch_gradient(learner, start, one, False)
                aux = {k: v[0] for k, v in aux.items()}
            (grads,) = pull(g)
            inner = torch.cat([torch.stack(losses), aux["inner_loss"]]) if losses else aux["inner_loss"]
            return grads, (objective, {**aux, "inner_loss": inner})

        grads, (objective, aux) = learner._mean_task_gradients(one_task, meta_params, batch, vectorize and per_task)
        return grads, objective.mean(), aux

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
