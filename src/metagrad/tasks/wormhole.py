"""Task families of Wormhole MAML: Avg-Threshold (section 4.1) and Mexican-hat wavelets (section 4.2).

Like the other synthetic families, each draws from a caller-supplied ``torch.Generator`` with
whole-tensor operations, so a seed fixes the tasks exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TaskBatch, _check_counts


THRESHOLDS = ("uniform", "balanced")


def median_threshold(values: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` ``[..., n]``: the middle value, or halfway between the two middle ones
    for an even ``n``, so that half of the row lies above it (Avg-Threshold's balanced tau)."""
    s = values.sort(-1).values
    n = s.shape[-1]
    return (s[..., (n - 1) // 2] + s[..., n // 2]) / 2


@dataclass(frozen=True)
class AvgThreshold:
    """The Avg-Threshold task family: ``y = 1[s mean(x) > s tau]``, ``x ~ U[0,1]^dim``.

    ``threshold="uniform"`` (the paper's reading): ``tau ~ U[0, 1]``, so most tasks' support sets
    hold one class only (the mean of 5 uniforms rarely strays far from 0.5). ``"balanced"``: tau
    is the median of the task's support means (halfway between the two middle ones for an even
    count), so every support set is half positive, half negative.
    """

    shots: int = 10
    queries: int = 10
    dim: int = 5
    dtype: torch.dtype = torch.float32
    threshold: str = "uniform"

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries, dim=self.dim)
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        n = self.shots + self.queries
        tau = torch.rand((num_tasks, 1, 1), generator=generator, dtype=self.dtype)
        s = torch.randint(0, 2, (num_tasks, 1, 1), generator=generator).to(self.dtype) * 2 - 1
        x = torch.rand((num_tasks, n, self.dim), generator=generator, dtype=self.dtype)
        k = self.shots
        if self.threshold == "balanced":
            tau = median_threshold(x[:, :k].mean(-1)).reshape(-1, 1, 1)  # the support means' median
        y = (s * x.mean(-1, keepdim=True) > s * tau).to(self.dtype)  # [T, n, 1]
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def ricker(t, a: float = 1.0):
    """The Mexican-hat (Ricker) wavelet ``A (1 - t^2/a^2) exp(-t^2 / (2 a^2))``,
    ``A = 2 / (sqrt(3a) pi^(1/4))`` (unit L2 norm: ``int psi^2 dt = 1``). ``t``: a tensor."""
    if not a > 0:
        raise ValueError(f"the wavelet width a must be positive, got {a!r}")
    amp = 2.0 / (math.sqrt(3.0 * a) * math.pi ** 0.25)
    u = t / a
    return amp * (1 - u ** 2) * torch.exp(-0.5 * u ** 2)


@dataclass(frozen=True)
class WaveletTasks:
    """Section 4.2's task family: ``y = x . f``, ``f = s * m``, ``m_j = psi(t_j - b)``.

    ``t_j``: ``points`` equally spaced points on ``[-half_width, half_width]``; per task a sign
    ``s ~ {-1, +1}`` and a translation ``b ~ U[-max_shift, max_shift]``; inputs ``x ~ U(0, 1)^points``.
    """

    points: int = 20
    a: float = 1.0
    half_width: float = 5.0
    max_shift: float = 2.0
    shots: int = 10
    queries: int = 10
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        _check_counts(points=self.points, shots=self.shots, queries=self.queries)
        if not self.a > 0 or not self.half_width > 0 or not self.max_shift >= 0:
            raise ValueError("a and half_width must be positive and max_shift non-negative")

    def grid(self) -> torch.Tensor:
        return torch.linspace(-self.half_width, self.half_width, self.points, dtype=torch.float64)

    def sample_tasks(self, num_tasks: int, *, generator: torch.Generator):
        """``(batch, sign [T], shift [T], filters [T, points])``."""
        s = torch.randint(0, 2, (num_tasks,), generator=generator).to(torch.float64) * 2 - 1
        b = (torch.rand(num_tasks, generator=generator, dtype=torch.float64) * 2 - 1) * self.max_shift
        f = (s[:, None] * ricker(self.grid()[None, :] - b[:, None], self.a)).to(self.dtype)  # [T, n]
        x = torch.rand((num_tasks, self.shots + self.queries, self.points), generator=generator, dtype=self.dtype)
        y = x @ f[:, :, None]  # [T, K+Q, 1]
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:]), s, b, f

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        return self.sample_tasks(num_tasks, generator=generator)[0]
