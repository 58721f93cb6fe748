"""Checkpointed unrolled MAML (work in progress)."""
from __future__ import annotations

from .base import MetaGradient


class Checkpointed(MetaGradient):
    """Unrolled meta-gradient with O(sqrt K) memory. Work in progress: not implemented yet."""

    def __init__(self, **kwargs):
        self.options = kwargs

    def batch_gradient(self, learner, meta_params, batch, vectorize):
        raise NotImplementedError("Checkpointed meta-gradient is work in progress")
