"""The update-rule protocol: how an inner-loop gradient becomes a parameter step.

An update rule is a pair of pure functions in the style of optax:

* ``init(params) -> state``: the rule's *learnable* state (a flat dict of tensors, possibly empty),
  created once from the adapted parameters. The state is meta-trained: the meta-gradient reaches it.
* ``step(params, grads, state) -> (new_params, new_state)``: one out-of-place inner-loop update.
  The returned state is ``state`` for every built-in rule.

Rules whose state also adapts in the inner loop (Meta-KFO with ``adapt_state=True``, suppl. C
Algorithm 1) set ``adapts_state = True``: before each step ``t >= 1`` the engine computes the
gradient of the support loss at ``theta_t`` with respect to the state ``xi_t`` that produced
``theta_t = step(theta_{t-1}, g_{t-1}, xi_t)`` and calls ``state_step(state, state_grads)``, whose
result the step then uses (the state that ``step`` returns is not used for such rules).

``params``, ``grads`` and the returned dict share keys: the names of the adapted parameters.
"""
from __future__ import annotations

import math
from typing import Mapping

from torch import Tensor

Params = Mapping[str, Tensor]


class UpdateRule:
    """Base class of inner-loop update rules (see the module docstring)."""

    #: whether the engine adapts the rule's state in the inner loop (calls :meth:`state_step`)
    adapts_state: bool = False

    def init(self, params: Params) -> dict[str, Tensor]:
        return {}

    def step(self, params: Params, grads: Params, state: Params) -> tuple[dict[str, Tensor], Params]:
        raise NotImplementedError

    def state_step(self, state: Params, state_grads: Params) -> Params:
        """One inner-loop update of the state from ``d support-loss / d state`` (default: none)."""
        return state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_rate(lr: float, name: str = "lr") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(lr).__name__} {lr!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {lr!r}")
    return float(lr)
