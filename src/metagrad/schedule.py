"""The schedule: how many inner steps run at meta-train and at meta-test time, and which losses count."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Inner-loop schedule.

    Args:
        train_steps: inner steps during meta-training.
        test_steps: inner steps at evaluation (default: ``train_steps``).
        per_step_loss: if true the meta-objective averages the query loss after every inner step
            (1..train_steps) instead of using only the last one (the multi-step loss of MAML++).
    """

    train_steps: int = 1
    test_steps: int | None = None
    per_step_loss: bool = False

    def __post_init__(self):
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"train_steps must be a non-negative integer, got {self.train_steps!r}")
        if self.test_steps is not None and (
            isinstance(self.test_steps, bool) or not isinstance(self.test_steps, int) or self.test_steps < 0
        ):
            raise ValueError(f"test_steps must be a non-negative integer or None, got {self.test_steps!r}")
        if self.per_step_loss and self.train_steps == 0:
            raise ValueError("per_step_loss needs train_steps >= 1")

    @property
    def eval_steps(self) -> int:
        return self.train_steps if self.test_steps is None else self.test_steps
