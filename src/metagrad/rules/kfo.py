"""Meta-KFO (Arnold, Iqbal & Sha 2021, eq. 26 and suppl. C): a small network over the gradient.

Each adapted tensor gets its own optimizer network ``f`` whose weight matrices are
Kronecker-factored, ``W = R^T ⊗ L``, so a layer maps the gradient, read as a matrix ``G [m, n]``,
to ``L @ G @ R`` (``vec(L G R) = (R^T ⊗ L) vec(G)`` in column-major ``vec``) with only
``m^2 + n^2`` parameters instead of ``(mn)^2``. The update is ``p <- p - lr * f(G)``; ``f`` starts as
the identity, so the rule starts as plain gradient descent. The network only transforms the
update: the adapted model has the base model's parameters and function class.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Params, UpdateRule, _check_rate

_NONLINEARITIES = {"none": None, "relu": torch.relu, "tanh": torch.tanh}


def as_matrix(t: Tensor) -> Tensor:
    """The matrix view Meta-KFO works on: ``[d0, prod(rest)]`` (conv ``[out, in*kh*kw]``), a
    1-D tensor as a column ``[m, 1]``, a scalar as ``[1, 1]``."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(t.shape[0], -1)


class MetaKFO(UpdateRule):
    """Meta-KFO: ``p <- p - lr * f_xi(G)``, ``f`` a Kronecker-factored network, identity at init.

    For each adapted parameter ``name`` with gradient matrix ``G [m, n]`` (see :func:`as_matrix`)
    and ``H = hidden_layers``, the state holds factors ``f"{name}.L{j}" [m, m]`` and
    ``f"{name}.R{j}" [n, n]``; layer ``j`` maps ``X -> L_j @ X @ R_j`` (dense weight
    ``R_j^T ⊗ L_j`` on the column-major ``vec(X)``; the paper's ``W = R^T ⊗ L``).

    * ``nonlinearity="none"`` (a deep *linear* network over the gradient):
      ``f(G) = L_{H+1} ... L_1 @ G @ R_1 ... R_{H+1}``, every factor the identity at init.
    * ``nonlinearity="relu"`` or ``"tanh"`` (needs ``H >= 1``): a residual form
      ``f(G) = L_0 G R_0 + L_{H+1} σ(L_H σ(... σ(L_1 G R_1) ...) R_H) R_{H+1}``. A plain stack
      ``σ(L_1 G R_1)`` cannot start at the identity (``relu(G) != G``, ``tanh(G) != G``), so the
      nonlinear branch is added to a learnable linear skip ``L_0 G R_0`` (identity at init) and
      its output factor ``L_{H+1}`` starts at **zero** (all other factors at the identity): ``f``
      is exactly the identity at init, and ``L_{H+1}`` receives a non-zero meta-gradient at once
      (only one factor is zeroed, so this is not a saddle point), after which the hidden factors do.

    Layers have no bias terms (a bias would make the update non-zero at a zero gradient).

    With ``psd=True`` (learn2learn's ``KroneckerLinear(psd=True)``, the default of its
    ``KroneckerTransform``) every layer uses the factors' Gram matrices, ``X -> (L^T L) X (R^T R)``,
    so each layer's dense weight ``(R^T R)^T ⊗ (L^T L)`` is positive semi-definite; the factors
    start at the identity, so ``f`` still starts as the identity. Only the linear form
    (``nonlinearity="none"``): the residual form's zero output factor would have a zero gradient.

    With ``adapt_state=True`` the factors ``xi`` also adapt in the inner loop (suppl. C,
    Algorithm 1): at step ``t``, ``xi_{t+1} = xi_t - state_lr * d l(theta_t) / d xi_t`` and then
    ``theta_{t+1} = theta_t - lr * f_{xi_{t+1}}(grad l(theta_t))``. ``theta_t`` depends on ``xi_t``
    only through the previous update ``theta_t = theta_{t-1} - lr * f_{xi_t}(g_{t-1})`` (``theta_{t-1}``
    and ``g_{t-1}`` are constants with respect to ``xi_t``), so the state gradient is the
    vector-Jacobian product of that update with ``grad l(theta_t)``, and zero at ``t = 0``. The
    engine computes it (:meth:`metagrad.InnerProblem.step`) and calls :meth:`state_step`. The
    meta-gradient reaches the initial ``xi``. Algorithm 1 uses one rate ``alpha`` for both; here
    ``U = lr * f``, so ``state_lr`` defaults to ``lr``.

    Args:
        lr: inner-loop learning rate (fixed scale of ``f``'s output).
        hidden_layers: number of hidden Kronecker layers ``H`` (``0``: one layer ``L G R``).
        nonlinearity: ``"none"``, ``"relu"`` or ``"tanh"``, applied after each hidden layer.
        adapt_state: adapt the factors in the inner loop too (Algorithm 1).
        state_lr: the inner-loop rate of the factors when ``adapt_state`` (default ``lr``).
        psd: use ``L^T L`` and ``R^T R`` for every factor (positive semi-definite layers).
    """

    def __init__(self, lr: float = 0.1, *, hidden_layers: int = 0, nonlinearity: str = "none",
                 adapt_state: bool = False, state_lr: float | None = None, psd: bool = False):
        self.lr = _check_rate(lr)
        if isinstance(hidden_layers, bool) or not isinstance(hidden_layers, int):
            raise TypeError(f"hidden_layers must be an int, got {type(hidden_layers).__name__} {hidden_layers!r}")
        if hidden_layers < 0:
            raise ValueError(f"hidden_layers must be >= 0, got {hidden_layers}")
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; valid: {', '.join(_NONLINEARITIES)}")
        if nonlinearity != "none" and hidden_layers == 0:
            raise ValueError(f"nonlinearity {nonlinearity!r} needs hidden_layers >= 1 (it acts on hidden layers)")
        if not isinstance(adapt_state, bool):
            raise TypeError(f"adapt_state must be a bool, got {type(adapt_state).__name__} {adapt_state!r}")
        if not isinstance(psd, bool):
            raise TypeError(f"psd must be a bool, got {type(psd).__name__} {psd!r}")
        if psd and nonlinearity != "none":
            raise ValueError(f"psd=True needs nonlinearity='none' (got {nonlinearity!r}): the residual form starts "
                             f"its output factor at zero, where L^T L has a zero gradient")
        self.psd = psd
        self.hidden_layers = hidden_layers
        self.nonlinearity = nonlinearity
        self.adapts_state = adapt_state
        self.state_lr = self.lr if state_lr is None else _check_rate(state_lr, "state_lr")

    def __repr__(self) -> str:
        return (f"MetaKFO(lr={self.lr!r}, hidden_layers={self.hidden_layers!r}, nonlinearity={self.nonlinearity!r}, "
                f"adapt_state={self.adapts_state!r}, state_lr={self.state_lr!r}, psd={self.psd!r})")

    @property
    def _residual(self) -> bool:
        return self.nonlinearity != "none"

    def init(self, params: Params) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        last = self.hidden_layers + 1
        first = 0 if self._residual else 1
        for name, p in params.items():
            m, n = as_matrix(p).shape
            kw = dict(dtype=p.dtype, device=p.device)
            for j in range(first, last + 1):
                zero = self._residual and j == last
                state[f"{name}.L{j}"] = torch.zeros(m, m, **kw) if zero else torch.eye(m, **kw)
                state[f"{name}.R{j}"] = torch.eye(n, **kw)
        return state

    def transform(self, name: str, g: Tensor, state: Params) -> Tensor:
        """``f_xi(G)`` of parameter ``name`` (same shape as ``g``; without the rate)."""
        x = as_matrix(g)
        last = self.hidden_layers + 1

        def layer(j, h):
            left, right = state[f"{name}.L{j}"], state[f"{name}.R{j}"]
            if self.psd:
                left, right = left.mT @ left, right.mT @ right
            return left @ h @ right

        if not self._residual:
            for j in range(1, last + 1):
                x = layer(j, x)
            return x.reshape(g.shape)
        act = _NONLINEARITIES[self.nonlinearity]
        h = x
        for j in range(1, last):
            h = act(layer(j, h))
        return (layer(0, x) + layer(last, h)).reshape(g.shape)

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        return {n: p - self.lr * self.transform(n, grads[n], state) for n, p in params.items()}, inner

    def state_step(self, state: Params, state_grads: Params) -> dict[str, Tensor]:
        return {k: s - self.state_lr * state_grads[k] for k, s in state.items()}
