"""Plain gradient descent and Meta-SGD (Li et al., 2017)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Params, UpdateRule, _check_rate


class SGD(UpdateRule):
    """``p <- p - lr * g`` with one scalar rate.

    Args:
        lr: the inner-loop learning rate (alpha).
        learnable: if true the rate is a meta-parameter (state ``{"lr": scalar}``) trained by the
            meta-gradient; otherwise it is a fixed number.
    """

    elementwise = True

    def __init__(self, lr: float = 0.1, *, learnable: bool = False):
        self.lr = _check_rate(lr)
        self.learnable = bool(learnable)

    @property
    def gradient_descent_rate(self) -> float | None:
        return None if self.learnable else self.lr

    def init(self, params: Params) -> dict[str, Tensor]:
        if not self.learnable:
            return {}
        ref = next(iter(params.values()))
        return {"lr": torch.tensor(self.lr, dtype=ref.dtype, device=ref.device)}

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        lr = state["lr"] if self.learnable else self.lr
        return {n: p - lr * grads[n] for n, p in params.items()}, inner


class MetaSGD(UpdateRule):
    """Meta-SGD: a learned rate per parameter entry, ``p <- p - lr_p * g`` (elementwise).

    The state holds one rate tensor per adapted parameter (same shape), initialised to ``lr``.
    """

    elementwise = True

    def __init__(self, lr: float = 0.1):
        self.lr = _check_rate(lr)

    def init(self, params: Params) -> dict[str, Tensor]:
        return {n: torch.full_like(p, self.lr) for n, p in params.items()}

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        return {n: p - state[n] * grads[n] for n, p in params.items()}, inner
