"""Synthetic task families: sinusoid regression, 1-D linear regression, 2-D logistic regression.

Every family draws from a caller-supplied ``torch.Generator`` with whole-tensor operations (no
per-sample Python loops), so a seed fixes the tasks exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TaskBatch, _check_counts


def _uniform(shape, low, high, generator, dtype):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=dtype)


@dataclass(frozen=True)
class Sinusoid:
    """Sinusoid regression of Finn et al. (2017): ``y = A sin(x - phase)``.

    ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``. Inputs and targets are ``[.., 1]``.
    """

    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries)

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        _check_counts(num_tasks=num_tasks)
        amp = _uniform((num_tasks, 1, 1), *self.amplitude, generator, self.dtype)  # [T, 1, 1]
        phase = _uniform((num_tasks, 1, 1), *self.phase, generator, self.dtype)
        x = _uniform((num_tasks, self.shots + self.queries, 1), *self.x_range, generator, self.dtype)
        y = amp * torch.sin(x - phase)  # [T, S+Q, 1]
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


@dataclass(frozen=True)
class LinearRegression1D:
    """1-D linear regression of Arnold et al. (2021), section 4.1.

    Per task ``theta ~ N(0, 1)``; ``x ~ N(0, 1)``; ``y ~ N(theta x, noise^2)`` with ``noise = 1``.
    Inputs and targets are ``[.., 1]``; the task parameters of the last draw are not returned.
    """

    shots: int = 10
    queries: int = 10
    noise: float = 1.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries)

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        return self.sample_with_theta(num_tasks, generator=generator)[0]

    def sample_with_theta(self, num_tasks: int, *, generator: torch.Generator):
        """Like :meth:`sample`, also returning the task parameters ``theta [tasks]``."""
        _check_counts(num_tasks=num_tasks)
        n = self.shots + self.queries
        theta = torch.randn((num_tasks, 1, 1), generator=generator, dtype=self.dtype)
        x = torch.randn((num_tasks, n, 1), generator=generator, dtype=self.dtype)
        y = theta * x + self.noise * torch.randn((num_tasks, n, 1), generator=generator, dtype=self.dtype)
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:]), theta.view(-1)


@dataclass(frozen=True)
class LogisticRegression2D:
    """Binary classification with a random linear boundary, Arnold et al. (2021) suppl. B.1.

    Per task ``theta ~ N(0, I_2)``; ``x ~ N(0, I_2)``. Labels (float 0/1, shape ``[.., 1]``) are
    ``1[theta.x > 0]`` when ``labels="separable"`` (the linearly separable data of Fig. B.1), or
    ``y ~ Bernoulli(sigmoid(theta.x))`` when ``labels="bernoulli"``.
    """

    shots: int = 10
    queries: int = 10
    dim: int = 2
    labels: str = "separable"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries, dim=self.dim)
        if self.labels not in ("separable", "bernoulli"):
            raise ValueError(f"labels must be 'separable' or 'bernoulli', got {self.labels!r}")

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        _check_counts(num_tasks=num_tasks)
        n = self.shots + self.queries
        theta = torch.randn((num_tasks, self.dim, 1), generator=generator, dtype=self.dtype)
        x = torch.randn((num_tasks, n, self.dim), generator=generator, dtype=self.dtype)
        logits = x @ theta  # [T, n, 1]
        if self.labels == "separable":
            y = (logits > 0).to(self.dtype)
        else:
            u = torch.rand(logits.shape, generator=generator, dtype=self.dtype)
            y = (u < torch.sigmoid(logits)).to(self.dtype)
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])
