"""2-D regression task families of A-MAML (Li et al.), section 5.1: CosMixture and Alpine.

Each family is a **fixed pool** of tasks drawn once from ``seed``: ``2 * pool_size`` parameter
draws, the first ``pool_size`` being the meta-training tasks (``split="train"``) and the rest the
new test tasks (``split="test"``), so the two splits are disjoint and every split of every setting
(50shot-50val, 100shot-100val) built from the same seed holds the same functions.

Points. With ``points="fixed"`` (the default, as in the paper, where each task comes with its own
data set) every task of the pool owns ``shots + queries`` inputs drawn once, uniformly from the
domain, the first ``shots`` being its support set and the others its query set (disjoint:
continuous draws). ``sample(n, generator=g)`` then only picks *which* tasks form the batch. With
``points="fresh"`` every call draws new inputs for the chosen tasks from ``g``.

Which tasks. ``sample(n)`` takes the pool in a random order without replacement, starting a new
random order after every ``pool_size`` tasks; so ``sample(pool_size)`` returns every task exactly
once, and a meta-batch of 5 holds 5 distinct tasks. :meth:`pool` returns all tasks in pool order.

Standardization (``standardize=True``, the default). Inputs and targets are standardized per
family with statistics of the **training pool**: for every training task ``stats_points`` (1000)
inputs are drawn uniformly from the domain from a dedicated stream of ``seed``; ``x`` is shifted
and scaled per coordinate and ``y`` by one scalar mean and standard deviation over all those
points. The statistics (:attr:`stats`) do not depend on ``split``, ``shots``, ``queries`` or
``points``, so the train and test families of a setting use the same affine maps; standardized
training-pool data have mean about 0 and standard deviation about 1. A per-task normalized error
such as RMSE / std of the task's targets is unchanged by the map.

Shapes: inputs ``[tasks, points, 2]``, targets ``[tasks, points, 1]``. All sampling uses whole
tensor operations and caller-supplied ``torch.Generator`` objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import TaskBatch, _check_counts

SPLITS = ("train", "test")
POINT_MODES = ("fixed", "fresh")


# ------------------------------------------------------------------ the raw functions
def cos_mixture(x: Tensor, amplitude: Tensor, omega: Tensor, phase: Tensor) -> Tensor:
    """``f(x) = -0.1 sum_i A cos(omega x_i + phi) - sum_i x_i^2`` (paper eq. 12).

    ``x [tasks, points, d]``; ``amplitude``, ``omega``, ``phase`` of shape ``[tasks]``.
    Returns ``[tasks, points, 1]``.
    """
    a, w, p = (t.reshape(-1, 1, 1).to(x.dtype) for t in (amplitude, omega, phase))
    return (-0.1 * a * torch.cos(w * x + p) - x.pow(2)).sum(-1, keepdim=True)


def alpine(x: Tensor, phase: Tensor) -> Tensor:
    """``f(x) = sum_i |x_i sin(x_i + phi_i) + 0.1 x_i|`` (paper eq. 13).

    ``x [tasks, points, d]``; ``phase [tasks, d]``. Returns ``[tasks, points, 1]``.
    """
    p = phase.reshape(phase.shape[0], 1, -1).to(x.dtype)  # [T, 1, d]
    return (x * torch.sin(x + p) + 0.1 * x).abs().sum(-1, keepdim=True)


def _uniform(shape, low, high, generator, dtype=torch.float64):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=dtype)


# ------------------------------------------------------------------ the pooled families
@dataclass(frozen=True)
class _PooledFunctions:
    """Shared machinery; subclasses define the domain, the parameters and the function."""

    shots: int = 50
    queries: int = 50
    split: str = "train"
    points: str = "fixed"
    pool_size: int = 100
    seed: int = 0
    standardize: bool = True
    stats_points: int = 1000
    dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    #: input domain [low, high] of every coordinate
    x_range: tuple[float, float] = (-1.0, 1.0)
    dim: int = 2

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries, pool_size=self.pool_size,
                      stats_points=self.stats_points)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.points not in POINT_MODES:
            raise ValueError(f"points must be one of {POINT_MODES}, got {self.points!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    # -- subclass hooks
    def _draw_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def function(x: Tensor, **params: Tensor) -> Tensor:
        raise NotImplementedError

    # -- pool construction (deterministic from ``seed``; cached per instance)
    def _streams(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def _all_params(self) -> dict[str, Tensor]:
        """Parameters of the ``2 * pool_size`` tasks, float64: train pool first, then test."""
        if "params" not in self._cache:
            self._cache["params"] = self._draw_params(2 * self.pool_size, self._streams(0))
        return self._cache["params"]

    @property
    def task_params(self) -> dict[str, Tensor]:
        """Parameters of this split's tasks, each ``[pool_size, ...]`` (float64)."""
        lo = 0 if self.split == "train" else self.pool_size
        return {k: v[lo : lo + self.pool_size] for k, v in self._all_params().items()}

    def _params_of(self, index: Tensor) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.task_params.items()}

    def _draw_x(self, tasks: int, n: int, generator: torch.Generator) -> Tensor:
        return _uniform((tasks, n, self.dim), *self.x_range, generator)  # [T, n, d] float64

    @property
    def stats(self) -> dict[str, Tensor]:
        """Standardization statistics (float64) from the training pool: ``x_mean [d]``,
        ``x_std [d]``, ``y_mean []``, ``y_std []``."""
        if "stats" not in self._cache:
            train = {k: v[: self.pool_size] for k, v in self._all_params().items()}
            x = self._draw_x(self.pool_size, self.stats_points, self._streams(3))
            y = self.function(x, **train)
            # NumPy's reductions, not torch's: a torch sum over many elements is split among
            # the intra-op threads, so its last bits depend on how many there are, and two
            # families of one seed would standardize differently in one process.
            xs, ys = x.reshape(-1, self.dim).numpy(), y.numpy()
            self._cache["stats"] = {
                "x_mean": torch.from_numpy(xs.mean(0)), "x_std": torch.from_numpy(xs.std(0, ddof=1)),
                "y_mean": torch.tensor(ys.mean(), dtype=torch.float64),
                "y_std": torch.tensor(ys.std(ddof=1), dtype=torch.float64),
            }
        return self._cache["stats"]

    def _finish(self, x: Tensor, y: Tensor) -> TaskBatch:
        """Standardize (if asked), cast, and split into support and query."""
        if self.standardize:
            s = self.stats
            x = (x - s["x_mean"]) / s["x_std"]
            y = (y - s["y_mean"]) / s["y_std"]
        x, y = x.to(self.dtype), y.to(self.dtype)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def pool_raw(self) -> tuple[Tensor, Tensor]:
        """The fixed points of this split's pool before standardization (float64):
        ``x [pool_size, shots + queries, d]``, ``y [pool_size, shots + queries, 1]``."""
        key = ("pool", self.split, self.shots, self.queries)
        if key not in self._cache:
            x = self._draw_x(self.pool_size, self.shots + self.queries, self._streams(1 + SPLITS.index(self.split)))
            self._cache[key] = (x, self.function(x, **self.task_params))
        return self._cache[key]

    def pool(self) -> TaskBatch:
        """Every task of this split once, in pool order (the fixed points, whatever ``points``)."""
        return self._finish(*self.pool_raw())

    def _indices(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        rounds = -(-num_tasks // self.pool_size)
        order = torch.cat([torch.randperm(self.pool_size, generator=generator) for _ in range(rounds)])
        return order[:num_tasks]

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` tasks of this split's pool (see the module docstring for the order and
        for ``points``)."""
        _check_counts(num_tasks=num_tasks)
        index = self._indices(num_tasks, generator)
        if self.points == "fixed":
            x, y = self.pool_raw()
            return self._finish(x[index], y[index])
        x = self._draw_x(num_tasks, self.shots + self.queries, generator)
        return self._finish(x, self.function(x, **self._params_of(index)))


@dataclass(frozen=True)
class CosMixture(_PooledFunctions):
    """CosMixture tasks (paper eq. 12): ``x in [-1, 1]^2``; per task ``A ~ U[0.1, 1]``,
    ``omega ~ U[0.5 pi, 2 pi]``, ``phi ~ U[3, 6]`` (one phase shared by both coordinates).

    Options (keyword, all of the pooled families): ``shots``, ``queries``, ``split`` (``"train"``
    or ``"test"``), ``points`` (``"fixed"`` or ``"fresh"``), ``pool_size`` (100), ``seed``,
    ``standardize``, ``stats_points``, ``dtype``. See :mod:`metagrad.tasks.regression`.
    """

    x_range: tuple[float, float] = (-1.0, 1.0)
    amplitude: tuple[float, float] = (0.1, 1.0)
    omega: tuple[float, float] = (0.5 * math.pi, 2.0 * math.pi)
    phase: tuple[float, float] = (3.0, 6.0)

    def _draw_params(self, n, generator):
        return {
            "amplitude": _uniform((n,), *self.amplitude, generator),
            "omega": _uniform((n,), *self.omega, generator),
            "phase": _uniform((n,), *self.phase, generator),
        }

    @staticmethod
    def function(x, *, amplitude, omega, phase):
        return cos_mixture(x, amplitude, omega, phase)


@dataclass(frozen=True)
class Alpine(_PooledFunctions):
    """Alpine tasks (paper eq. 13): ``x in [-10, 10]^2``; per task and coordinate
    ``phi_i ~ U[-5 pi / 12, 5 pi / 12]``. Options as :class:`CosMixture`."""

    x_range: tuple[float, float] = (-10.0, 10.0)
    phase: tuple[float, float] = (-5.0 * math.pi / 12.0, 5.0 * math.pi / 12.0)

    def _draw_params(self, n, generator):
        return {"phase": _uniform((n, self.dim), *self.phase, generator)}

    @staticmethod
    def function(x, *, phase):
        return alpine(x, phase)


#: the families by the names the ``amaml-regression`` experiment uses
REGRESSION_FAMILIES = {"cosmixture": CosMixture, "alpine": Alpine}
