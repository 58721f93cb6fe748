"""Adam (Kingma & Ba, 2015) as an inner-loop rule, with torch.optim.Adam's semantics."""
from __future__ import annotations


import torch
from torch import Tensor

from .base import Params, UpdateRule, _check_rate


def _safe_sqrt(v: Tensor) -> Tensor:
    """``v.sqrt()`` (the same values, ``v >= 0``) with derivative 0 instead of ``inf`` at ``v = 0``.

    The double ``torch.where`` keeps the unused branch finite, so its derivative is not
    ``0 * inf = NaN``; no data-dependent Python branch, so it runs under ``vmap``.
    """
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class Adam(UpdateRule):
    """``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``, as ``torch.optim.Adam`` (no weight decay, no amsgrad).

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``m_hat = m / (1 - b1^t)``,
    ``v_hat = v / (1 - b2^t)`` at step ``t = 1, 2, ...``. The moments and the step count are the
    rule's **inner** state (:meth:`init_inner`): they start at zero for every task and are never
    meta-trained; the rule has no meta-learned state. Differentiable to second order (the
    meta-gradient backpropagates through the steps). Where every gradient of an entry so far was
    exactly zero (a dead ReLU unit, a parameter the loss does not read) ``v = 0`` and
    ``sqrt(v) = sqrt(1 - b2) |g|`` has no derivative; the rule uses 0 there (:func:`_safe_sqrt`,
    the symmetric subgradient) rather than autograd's ``inf * 0 = NaN``, which would spread to
    the whole second-order meta-gradient.

    Args:
        lr: the inner-loop learning rate.
        betas: ``(b1, b2)`` in ``[0, 1)``.
        eps: added to ``sqrt(v_hat)``, ``> 0``.
    """

    elementwise = True

    def __init__(self, lr: float = 0.1, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr = _check_rate(lr)
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _check_rate(eps, "eps")

    def init_inner(self, params: Params) -> dict[str, Tensor]:
        inner: dict[str, Tensor] = {}
        for n, p in params.items():
            inner[f"m.{n}"] = torch.zeros_like(p)
            inner[f"v.{n}"] = torch.zeros_like(p)
        ref = next(iter(params.values()))
        inner["t"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return inner

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        b1, b2 = self.betas
        t = inner["t"] + 1
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new, out = {}, {"t": t}
        for n, p in params.items():
            g = grads[n]
            m = b1 * inner[f"m.{n}"] + (1 - b1) * g
            v = b2 * inner[f"v.{n}"] + (1 - b2) * g * g
            new[n] = p - self.lr * (m / c1) / (_safe_sqrt(v / c2) + self.eps)
            out[f"m.{n}"], out[f"v.{n}"] = m, v
        return new, out

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r})"


