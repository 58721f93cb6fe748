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
from torch.func import grad_and_value

if TYPE_CHECKING:  # pragma: no cover
    from ..core import MetaLearner


class MetaGradient:
    """Base class: ``task_objective(learner, meta_params, sx, sy, qx, qy) -> (surrogate, aux)``.

    ``aux`` must hold ``"query_loss"`` (the post-adaptation query loss, detached) and
    ``"inner_loss"`` (the support loss before each inner step, shape ``[steps]``).
    """

    #: whether the inner-loop gradients are treated as constants
    first_order: bool = False
    #: whether it runs a phased schedule (:class:`~metagrad.Phase`, e.g. Wormhole's C steps)
    supports_phases: bool = False

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
        grads, (objective, aux) = learner._map_tasks(partial(self.task_gradient, learner), meta_params, batch, vectorize)
        grads = torch.utils._pytree.tree_map(lambda g: g.mean(0), grads)
        return grads, objective.mean(), aux

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
