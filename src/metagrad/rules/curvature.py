"""Meta-Curvature (Park & Oliva, 2019): a Kronecker-factored, meta-learned gradient preconditioner.

The update of each adapted tensor ``p`` with gradient ``G`` is ``p <- p - lr * MC(G)`` where
``MC`` is a linear map with one small learnable factor per tensor mode (Arnold et al. 2021, eq. 24,
``U(g) = M g`` with ``M`` block-diagonal over tensors and Kronecker-factored within a tensor).
With every factor at the identity the rule is plain gradient descent (MAML); with diagonal
factors it is a restricted Meta-SGD.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Params, UpdateRule, _check_rate


class MetaCurvature(UpdateRule):
    """Meta-Curvature: ``p <- p - lr * MC(G)`` with learnable Kronecker factors, identity at init.

    Conventions (``G`` the gradient of parameter ``name``; ``vec`` is the column-major vectorization,
    first index fastest, as in ``G.permute(reversed dims).reshape(-1)``):

    * **2-D weight** ``G [out, in]`` (``nn.Linear``): ``MC(G) = M_out @ G @ M_in`` with state
      ``f"{name}.m_out" [out, out]`` and ``f"{name}.m_in" [in, in]``. The dense preconditioner is
      ``vec(MC(G)) = (M_in^T ⊗ M_out) vec(G)``.
    * **weight with 3+ dims** ``G [out, in, *k]`` (``nn.Conv1d/2d/3d``; the kernel dims are
      flattened row-major into ``f = prod(k)``, i.e. ``G`` is read as ``G.reshape(out, in, f)``,
      ``f`` indexing kernel positions ``kh * kw_size + kw`` for Conv2d): three factors,
      ``f"{name}.m_out" [out, out]``, ``f"{name}.m_in" [in, in]``, ``f"{name}.m_f" [f, f]``, and
      ``MC(G)[o, i, k] = sum M_out[o, o'] G[o', i', k'] M_in[i', i] M_f[k', k]``: ``M_out``
      multiplies from the left and ``M_in``, ``M_f`` from the right, exactly as in the 2-D case
      (in tensor mode products, ``G x_1 M_out x_2 M_in^T x_3 M_f^T``). The dense preconditioner is
      ``vec(MC(G)) = (M_f^T ⊗ M_in^T ⊗ M_out) vec(G.reshape(out, in, f))``; with ``f = 1`` it is
      the 2-D case.
    * **1-D and 0-D tensors** (biases, norm scales): elementwise ``MC(G) = m * G`` with
      ``f"{name}.m"`` of the tensor's shape, initialised to ones.

    Only the update is transformed: the adapted model keeps the base model's parameters and
    function class, and the factors live in the rule's (meta-learned) state.

    Args:
        lr: the inner-loop learning rate (a fixed scale on the preconditioned gradient).
    """

    def __init__(self, lr: float = 0.1):
        self.lr = _check_rate(lr)

    def init(self, params: Params) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for name, p in params.items():
            kw = dict(dtype=p.dtype, device=p.device)
            if p.dim() <= 1:
                state[f"{name}.m"] = torch.ones_like(p)
                continue
            out, inp = p.shape[0], p.shape[1]
            state[f"{name}.m_out"] = torch.eye(out, **kw)
            state[f"{name}.m_in"] = torch.eye(inp, **kw)
            if p.dim() > 2:
                state[f"{name}.m_f"] = torch.eye(math.prod(p.shape[2:]), **kw)
        return state

    def precondition(self, name: str, g: Tensor, state: Params) -> Tensor:
        """``MC(G)`` of parameter ``name`` (without the rate)."""
        if g.dim() <= 1:
            return state[f"{name}.m"] * g
        m_out, m_in = state[f"{name}.m_out"], state[f"{name}.m_in"]
        if g.dim() == 2:
            return m_out @ g @ m_in
        g3 = g.reshape(g.shape[0], g.shape[1], -1)  # [out, in, f]
        u = torch.einsum("ab,bcd,ce,df->aef", m_out, g3, m_in, state[f"{name}.m_f"])
        return u.reshape(g.shape)

    def step(self, params: Params, grads: Params, state: Params, inner: Params):
        return {n: p - self.lr * self.precondition(n, grads[n], state) for n, p in params.items()}, inner
