"""iMAML: the implicit meta-gradient (work in progress)."""
from __future__ import annotations

from .base import MetaGradient


class Implicit(MetaGradient):
    """Implicit meta-gradient (iMAML). Work in progress: not implemented yet."""

    def __init__(self, **kwargs):
        self.options = kwargs

    def task_gradient(self, learner, meta_params, sx, sy, qx, qy):
        raise NotImplementedError("Implicit meta-gradient is work in progress")
