"""Users as tasks: A-MAML's collaborative filtering protocol (Li et al., section 5.3).

A task is one user: input the one-hot encoding of an item, target the user's rating of it.

:func:`user_matrix` keeps the ``top_items`` most-rated items (the paper: 100 for MovieLens; Jester
has exactly 100 jokes) and the users who rated at least ``min_ratings`` of them (the paper: 20).
Counting, for MovieLens: an item's count is its number of ratings in the whole file; ties at the
100th place are broken by the smaller item index (increasing id), and "at least 20" is ``>= 20``.
The paper reports 489 (MovieLens-100K) and 4,985 (MovieLens-1M) users; metagrad cannot count the
real files here (MovieLens is not redistributable, so none is on this machine), and a different
tie rule or ``> 20`` instead of ``>= 20`` would change the count. Jester-1: every one of its
24,983 users rated at least 36 of the 100 jokes, so all are kept, as in the paper.

:func:`split_users` holds out ``test_tasks`` (100) users; :class:`UserTasks` samples tasks from a
set of users: ``shots`` support ratings and ``queries`` query ratings drawn without replacement
from the user's ratings. A user with fewer than ``shots + queries`` ratings is re-drawn (the
paper's rule), which is the same as drawing uniformly among the users with enough ratings, as
:meth:`UserTasks.sample` does. :meth:`UserTasks.evaluation_tasks` is the paper's test protocol:
each test user's ratings in a fixed random order, the first ``shots`` the support set and *every*
remaining rating evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import TaskBatch, _check_counts

__all__ = ["user_matrix", "split_users", "UserTasks"]


def user_matrix(index: Tensor, ratings: Tensor, num_users: int, num_items: int, *, top_items: int | None = 100,
                min_ratings: int = 20) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's rating matrix: ``(matrix [users, items] float32 with NaN = not rated, user
    indices kept, item indices kept in order of decreasing count)``.

    ``index [N, 2]`` (user, item) and ``ratings [N]`` as the readers of
    :mod:`metagrad.data.ratings` hold them; ``top_items=None`` keeps every item.
    """
    _check_counts(min_ratings=min_ratings)
    if top_items is not None:
        _check_counts(top_items=top_items)
    counts = torch.bincount(index[:, 1], minlength=num_items)
    # decreasing count, ties by the smaller item index (a stable sort of the negated counts)
    order = torch.sort(-counts, stable=True).indices
    items = order if top_items is None else order[:top_items]
    column = torch.full((num_items,), -1, dtype=torch.int64)
    column[items] = torch.arange(items.numel())
    keep = column[index[:, 1]] >= 0
    full = torch.full((num_users, items.numel()), float("nan"))
    full[index[keep, 0], column[index[keep, 1]]] = ratings[keep].float()
    users = torch.nonzero((~full.isnan()).sum(1) >= min_ratings).reshape(-1)
    return full[users], users, items


def split_users(matrix: Tensor, test_tasks: int, *, min_ratings: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(train rows, test rows)`` of ``matrix``: ``test_tasks`` users drawn (from ``seed``)
    among those with at least ``min_ratings`` ratings whose ratings are not all equal (a user
    with one value has no nRMSE); every other user is a meta-training user."""
    _check_counts(test_tasks=test_tasks, min_ratings=min_ratings)
    rated = ~matrix.isnan()
    spread = torch.nan_to_num(matrix, nan=-torch.inf).amax(1) > torch.nan_to_num(matrix, nan=torch.inf).amin(1)
    candidates = torch.nonzero((rated.sum(1) >= min_ratings) & spread).reshape(-1)
    if candidates.numel() < test_tasks:
        raise ValueError(f"only {candidates.numel()} users have at least {min_ratings} ratings (not all equal); "
                         f"cannot hold out test_tasks={test_tasks}")
    g = torch.Generator().manual_seed(seed)
    test = candidates[torch.randperm(candidates.numel(), generator=g)[:test_tasks]].sort().values
    is_test = torch.zeros(matrix.shape[0], dtype=torch.bool)
    is_test[test] = True
    return torch.nonzero(~is_test).reshape(-1), test


@dataclass(frozen=True)
class UserTasks:
    """Tasks of the users in ``matrix`` (float ``[users, items]``, NaN = not rated).

    ``sample(n, generator=g)``: ``n`` users drawn uniformly, with replacement, among those with at
    least ``shots + queries`` ratings; for each, ``shots + queries`` of its rated items in random
    order, the first ``shots`` the support set. Inputs are one-hot ``[tasks, points, items]``,
    targets ``[tasks, points, 1]``, both ``dtype``. ``mean`` / ``std``: targets are
    ``(rating - mean) / std`` (default 0 and 1: raw ratings).
    """

    matrix: Tensor
    shots: int = 15
    queries: int = 20
    mean: float = 0.0
    std: float = 1.0
    dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_counts(shots=self.shots, queries=self.queries)
        if not isinstance(self.matrix, Tensor) or self.matrix.dim() != 2:
            raise ValueError(f"matrix must be a [users, items] tensor, got {type(self.matrix).__name__}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.eligible.numel() == 0:
            raise ValueError(f"no user has shots + queries = {self.shots + self.queries} ratings")

    @property
    def num_items(self) -> int:
        return self.matrix.shape[1]

    @property
    def counts(self) -> Tensor:
        """Number of ratings of each user."""
        if "counts" not in self._cache:
            self._cache["counts"] = (~self.matrix.isnan()).sum(1)
        return self._cache["counts"]

    @property
    def eligible(self) -> Tensor:
        """Rows of the users with at least ``shots + queries`` ratings."""
        if "eligible" not in self._cache:
            self._cache["eligible"] = torch.nonzero(self.counts >= self.shots + self.queries).reshape(-1)
        return self._cache["eligible"]

    def _random_order(self, users: Tensor, generator: torch.Generator) -> Tensor:
        """Each user's items in random order, its rated ones first: ``[len(users), items]``."""
        keys = torch.rand(len(users), self.num_items, generator=generator)
        keys[self.matrix[users].isnan()] = 2.0  # random keys are < 1: unrated items sort last
        return keys.argsort(1)

    def _points(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """One-hot inputs and targets of ``items [tasks, points]`` of ``users [tasks]``."""
        x = torch.nn.functional.one_hot(items, self.num_items).to(self.dtype)
        y = (self.matrix[users[:, None], items] - self.mean) / self.std
        return x, y.unsqueeze(-1).to(self.dtype)

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` tasks (see the class docstring)."""
        _check_counts(num_tasks=num_tasks)
        pick = torch.randint(self.eligible.numel(), (num_tasks,), generator=generator)
        users = self.eligible[pick]
        items = self._random_order(users, generator)[:, : self.shots + self.queries]
        x, y = self._points(users, items)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def evaluation_tasks(self, seed: int) -> tuple[list[TaskBatch], Tensor]:
        """The test protocol: every user of ``matrix`` with more than ``shots`` ratings, its
        ratings in a random order drawn from ``seed``, the first ``shots`` the support set and all
        the others the query set. Returns ``(batches, users)``: users with the same number of
        ratings share a batch; ``users[j]`` is the row of the ``j``-th task, counting through
        the batches in order."""
        counts = self.counts
        order = self._random_order(torch.arange(self.matrix.shape[0]), torch.Generator().manual_seed(seed))
        batches, rows = [], []
        for n in sorted(set(counts.tolist())):
            if n <= self.shots:
                continue
            users = torch.nonzero(counts == n).reshape(-1)
            x, y = self._points(users, order[users, :n])
            batches.append(TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :]))
            rows.append(users)
        if not batches:
            raise ValueError(f"no user has more than shots = {self.shots} ratings")
        return batches, torch.cat(rows)
