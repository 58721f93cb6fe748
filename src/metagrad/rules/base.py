"""The update-rule protocol: how an inner-loop gradient becomes a parameter step.

An update rule keeps its state in two parts, as optax keeps hyperparameters apart from optimizer
state:

* ``init(params) -> state``: the **meta-learned** state (Meta-SGD's rates, Meta-Curvature's and
  Meta-KFO's factors, a learnable SGD rate): a flat dict of tensors, possibly empty, created once
  from the adapted parameters and registered with the learner, so the meta-gradient trains it.
* ``init_inner(params) -> inner``: the **inner** state (momentum buffers, moment estimates, step
  counts): made afresh for every task from the adapted parameters at the start of its inner loop,
  carried from step to step and never meta-trained. Empty for every rule without one.
* ``step(params, grads, state, inner) -> (new_params, new_inner)``: one out-of-place inner step.

Rules whose meta-learned state also adapts in the inner loop (Meta-KFO with ``adapt_state=True``,
suppl. C Algorithm 1) set ``adapts_state = True``: before each step ``t >= 1`` the engine computes
the gradient of the support loss at ``theta_t`` with respect to the state ``xi_t`` that produced
``theta_t = step(theta_{t-1}, g_{t-1}, xi_t)`` and calls ``state_step(state, state_grads)``, whose
result the step then uses.

``params``, ``grads`` and the returned dict share keys: the names of the adapted parameters.
A rule whose step acts entry by entry (each output entry depends on the same entry of ``params``,
``grads`` and the inner state, with the meta-learned state broadcasting) sets
``elementwise = True``; it then also runs on task-stacked tensors ``[tasks, *shape]``, which lets
plain MLPs run a meta-batch as one stacked computation (:mod:`metagrad.backend`).

A new rule is one module here plus one ``RULES.register`` line in ``rules/__init__.py``.
"""
from __future__ import annotations

import math
from typing import Mapping

from torch import Tensor

Params = Mapping[str, Tensor]


class UpdateRule:
    """Base class of inner-loop update rules (see the module docstring)."""

    #: whether the engine adapts the meta-learned state in the inner loop (calls :meth:`state_step`)
    adapts_state: bool = False
    #: whether :meth:`step` acts entry by entry (so it also runs on task-stacked tensors)
    elementwise: bool = False

    def init(self, params: Params) -> dict[str, Tensor]:
        """The meta-learned state for the adapted ``params`` (default: none)."""
        return {}

    def init_inner(self, params: Params) -> dict[str, Tensor]:
        """The inner state a task's inner loop starts from (default: none). Never meta-trained."""
        return {}

    def step(self, params: Params, grads: Params, state: Params, inner: Params) -> tuple[dict[str, Tensor], Params]:
        """One inner step: ``(new_params, new_inner)`` from the gradients, the meta-learned state
        and the inner state."""
        raise NotImplementedError

    def state_step(self, state: Params, state_grads: Params) -> Params:
        """One inner-loop update of the meta-learned state from ``d support-loss / d state`` (default: none)."""
        return state

    @property
    def gradient_descent_rate(self) -> float | None:
        """The rate ``lr`` if every step is plain gradient descent ``p - lr * g`` with a fixed
        ``lr`` and no state of either kind (what gradient flow integrates), else ``None``."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_rate(lr: float, name: str = "lr") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(lr).__name__} {lr!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {lr!r}")
    return float(lr)
