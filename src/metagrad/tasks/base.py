"""Task batches and the task-family protocol."""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """A meta-batch of tasks, each with a support and a query set.

    Shapes: ``support_x [tasks, shots, *features]``, ``support_y [tasks, shots, *targets]``,
    and the same for the query set with its own number of points.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> "TaskBatch":
        """The ``i``-th task, keeping a leading task dimension of one."""
        return TaskBatch(*(t[i : i + 1] for t in self))

    def to(self, *args, **kwargs) -> "TaskBatch":
        return TaskBatch(*(t.to(*args, **kwargs) for t in self))

    def validate(self) -> "TaskBatch":
        """Check shapes; raise ``TypeError``/``ValueError`` naming what is wrong."""
        for name, t in zip(self._fields, self):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"{name} must have shape [tasks, points, ...], got {tuple(t.shape)}")
        sx, sy, qx, qy = self
        if sx.shape[:2] != sy.shape[:2]:
            raise ValueError(
                f"support x and y disagree: support_x {tuple(sx.shape)} vs support_y {tuple(sy.shape)}"
            )
        if qx.shape[:2] != qy.shape[:2]:
            raise ValueError(f"query x and y disagree: query_x {tuple(qx.shape)} vs query_y {tuple(qy.shape)}")
        if sx.shape[0] != qx.shape[0]:
            raise ValueError(f"support has {sx.shape[0]} tasks but query has {qx.shape[0]}")
        if sx.shape[0] == 0:
            raise ValueError("the task batch is empty (0 tasks)")
        if sx.shape[1] == 0:
            raise ValueError(f"empty support set: support_x has shape {tuple(sx.shape)}")
        if qx.shape[1] == 0:
            raise ValueError(f"empty query set: query_x has shape {tuple(qx.shape)}")
        return self


class TaskFamily(Protocol):
    """Anything that samples meta-batches of tasks from a seeded generator."""

    def sample(self, num_tasks: int, *, generator: torch.Generator) -> TaskBatch: ...


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
