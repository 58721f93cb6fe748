"""A-MAML: the adjoint-ODE meta-gradient (work in progress)."""
from __future__ import annotations

from .base import MetaGradient


class Adjoint(MetaGradient):
    """Adjoint meta-gradient of gradient flow (A-MAML). Work in progress: not implemented yet."""

    def __init__(self, **kwargs):
        self.options = kwargs

    def batch_gradient(self, learner, meta_params, batch, vectorize):
        raise NotImplementedError("Adjoint meta-gradient is work in progress")
