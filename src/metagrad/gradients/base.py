"""The meta-gradient protocol.

A meta-gradient turns one task into a scalar *surrogate objective* of the meta-parameters whose
gradient is the meta-gradient direction for that task. For unrolled MAML the surrogate is the
query loss after adaptation itself; first-order MAML stops the inner gradients; Reptile's
surrogate ``1/2 ||theta - stopgrad(u_K)||^2`` has gradient ``theta - u_K``. Because every method is
"the gradient of a per-task function", ``torch.func.grad`` and ``torch.func.vmap`` compose with all
of them, and the engine (``metagrad.MetaLearner``) averages over tasks.

Methods whose gradient is not the derivative of a cheap surrogate (implicit, adjoint) can
override :meth:`MetaGradient.batch_gradient` instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..core import MetaLearner


class MetaGradient:
    """Base class: ``task_objective(learner, meta_params, sx, sy, qx, qy) -> (surrogate, aux)``.

    ``aux`` must hold ``"query_loss"`` (the post-adaptation query loss, detached) and
    ``"inner_loss"`` (the support loss before each inner step, shape ``[steps]``).
    """

    #: whether the inner-loop gradients are treated as constants
    first_order: bool = False

    def task_objective(self, learner: "MetaLearner", meta_params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
