"""The schedule: how many inner steps run at meta-train and at meta-test time, and which losses count."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union


def _check_steps(value, what: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        extra = " or None" if optional else ""
        raise ValueError(f"{what} must be a non-negative integer{extra}, got {value!r}")


@dataclass(frozen=True)
class Phase:
    """One phase of a phased inner loop: ``steps`` steps on the tensors matched by ``adapt``.

    Args:
        adapt: glob pattern(s) over the model's parameter *and buffer* names (as in
            :func:`~metagrad.select_adapted`: ``"wormhole.*"``; a module prefix matches what is
            under it). Buffers may adapt here: a buffer is task-specific state re-initialized from
            its stored value for every task and never meta-learned (e.g. Wormhole's C).
        steps: inner steps of this phase during meta-training.
        test_steps: steps at evaluation (default: ``steps``).
        lr: if given, this phase takes plain SGD steps at this rate (e.g. Wormhole's gamma);
            otherwise it uses the learner's update rule (its tensors must then be among the
            learner's adapted parameters, so the rule has state for them).
    """

    adapt: Union[str, Sequence[str]]
    steps: int = 1
    test_steps: int | None = None
    lr: float | None = None

    def __post_init__(self):
        patterns = (self.adapt,) if isinstance(self.adapt, str) else tuple(self.adapt)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"Phase.adapt must be one or more non-empty name patterns, got {self.adapt!r}")
        object.__setattr__(self, "adapt", patterns)
        _check_steps(self.steps, "Phase.steps")
        _check_steps(self.test_steps, "Phase.test_steps", optional=True)
        if self.lr is not None:
            if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr == self.lr:
                raise ValueError(f"Phase.lr must be a number or None, got {self.lr!r}")
            object.__setattr__(self, "lr", float(self.lr))

    @property
    def eval_steps(self) -> int:
        return self.steps if self.test_steps is None else self.test_steps


@dataclass(frozen=True)
class Schedule:
    """Inner-loop schedule.

    Args:
        train_steps: inner steps during meta-training.
        test_steps: inner steps at evaluation (default: ``train_steps``).
        per_step_loss: if true the meta-objective averages the query loss after every inner step
            (1..train_steps) instead of using only the last one (the multi-step loss of MAML++).
        phases: optional :class:`Phase` es run *before* the main steps, in order, for every task
            (e.g. Wormhole MAML's Algorithm 1: ``phases=(Phase("wormhole.*", n_c, lr=gamma),)``
            then ``train_steps = n`` steps on the learner's adapted parameters with its rule).
            Meta-gradients flow through every phase. ``unrolled``, ``first-order`` and
            ``checkpointed`` run the phases in their inner loop; ``implicit`` and ``adjoint`` get
            the phase-adapted tensors as their starting point and their gradient is pulled back
            through the phases (:meth:`MetaGradient.gradient`, a per-task loop for the adjoint);
            ``reptile`` refuses phases (``ValueError``). With no phases (the default) the inner loop
            is exactly the plain one. ``train_steps``/``test_steps``/``per_step_loss`` and the
            columns of :meth:`MetaLearner.evaluate` count the main steps only.
    """

    train_steps: int = 1
    test_steps: int | None = None
    per_step_loss: bool = False
    phases: tuple = ()

    def __post_init__(self):
        phases = () if self.phases is None else self.phases
        if isinstance(phases, Phase):
            phases = (phases,)
        phases = tuple(phases)
        if not all(isinstance(p, Phase) for p in phases):
            raise TypeError(f"phases must be Phase objects, got {self.phases!r}")
        object.__setattr__(self, "phases", phases)
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
