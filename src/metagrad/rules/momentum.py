"""SGD with momentum as an inner-loop rule, with torch.optim.SGD's semantics."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Params, UpdateRule, _check_rate


class Momentum(UpdateRule):
    """``b <- mu b + g``, ``p <- p - lr b`` (or ``p - lr (g + mu b)`` with ``nesterov``), as
    ``torch.optim.SGD(lr, momentum=mu, dampening=0, nesterov=...)``.

    The buffer ``b`` is the rule's **inner** state (:meth:`init_inner`): zero for every task (so
    the first step is ``b = g``, torch's first step) and never meta-trained.

    Args:
        lr: the inner-loop learning rate.
        momentum: ``mu`` in ``[0, 1)``.
        nesterov: Nesterov momentum.
    """

    elementwise = True

    def __init__(self, lr: float = 0.1, *, momentum: float = 0.9, nesterov: bool = False):
        self.lr = _check_rate(lr)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
        self.momentum, self.nesterov = float(momentum), nesterov

    def init_inner(self, params: Params) -> dict[str, Tensor]:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        mu = self.momentum
        buf = {n: mu * inner[n] + grads[n] for n in params}
        direction = {n: grads[n] + mu * buf[n] for n in params} if self.nesterov else buf
        return {n: p - self.lr * direction[n] for n, p in params.items()}, buf
