"""The meta-gradient protocol.

A meta-gradient turns one task into a scalar *surrogate objective* of the meta-parameters whose
gradient is the meta-gradient direction for that task. For unrolled MAML the surrogate is the
query loss after adaptation itself; first-order MAML stops the inner gradients; Reptile's
surrogate ``1/2 ||theta - stopgrad(u_K)||^2`` has gradient ``theta - u_K``. Because every method is
"the gradient of a per-task function", ``torch.func.grad`` and ``torch.func.vmap`` compose with all
of them, and the mean over the tasks is the meta-gradient of the batch.

A meta-gradient sees the learner only through its :class:`~metagrad.InnerProblem` (model, loss,
adapted tensors, rule, schedule, backend) and runs the inner loop with
:func:`~metagrad.inner_loop` or :meth:`~metagrad.InnerProblem.step`. Methods whose gradient is
not the derivative of a cheap surrogate (implicit, adjoint) override
:meth:`MetaGradient.task_gradient` (one task, still mapped over the batch by vmap or a loop) or
:meth:`MetaGradient.batch_gradient` (the whole meta-batch at once, e.g. one stacked ODE state).
"""
from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp, vmap

if TYPE_CHECKING:  # pragma: no cover
    from ..inner import InnerProblem

_tree_map = torch.utils._pytree.tree_map
_TASK_DIMS = (None, 0, 0, 0, 0)  # meta_params shared, one task per slice of the batch


def map_tasks(fn, meta_params, batch, vectorize: bool):
    """Apply ``fn(meta_params, sx, sy, qx, qy)`` to every task of ``batch`` (``vmap`` or a loop);
    outputs stacked on dim 0."""
    if vectorize:
        return vmap(fn, in_dims=_TASK_DIMS)(meta_params, *batch)
    outs = [fn(meta_params, *(t[i] for t in batch)) for i in range(batch.num_tasks)]
    return _tree_map(lambda *xs: torch.stack(xs), *outs)


def mean_task_gradients(fn, meta_params, batch, vectorize: bool):
    """``fn(meta_params, sx, sy, qx, qy) -> (grads, rest)`` for every task; returns ``grads``
    averaged over the tasks and ``rest`` stacked on dim 0.

    The per-task loop sums the gradients as it goes rather than stacking them: a rule whose
    state is large (Meta-KFO's ``[n, n]`` factors of a wide head) would otherwise copy a
    ``[tasks, n, n]`` stack per factor only to average it.
    """
    if vectorize:
        grads, rest = map_tasks(fn, meta_params, batch, True)
        return _tree_map(lambda g: g.mean(0), grads), rest
    total, rests = None, []
    for i in range(batch.num_tasks):
        grads, rest = fn(meta_params, *(t[i] for t in batch))
        total = _tree_map(torch.clone, grads) if total is None else _tree_map(torch.Tensor.add_, total, grads)
        rests.append(rest)
    n = batch.num_tasks
    return _tree_map(lambda g: g.div_(n), total), _tree_map(lambda *xs: torch.stack(xs), *rests)


def check_segments(segments) -> int | None:
    """``segments`` if it is a positive integer or ``None``, else ``ValueError``."""
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
        raise ValueError(f"segments must be a positive integer or None, got {segments!r}")
    return segments


def segment_bounds(steps: int, segments: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``segments`` (``None``: ``round(sqrt(steps))``) near-equal segments
    of ``steps`` steps, clipped to ``[1, steps]`` segments; ``[]`` for no steps. The recomputation
    schedule of the checkpointed and adjoint meta-gradients."""
    if steps == 0:
        return []
    n = segments if segments is not None else max(1, round(math.sqrt(steps)))
    n = min(max(n, 1), steps)
    m = math.ceil(steps / n)
    return [(lo, min(lo + m, steps)) for lo in range(0, steps, m)]


def zero_rule_grads(meta_params) -> dict:
    """A zero meta-gradient for every tensor of the rule's meta-learned state."""
    return {k: torch.zeros_like(v) for k, v in meta_params["rule"].items()}


class MetaGradient:
    """Base class: ``task_objective(problem, meta_params, sx, sy, qx, qy) -> (surrogate, aux)``.

    ``aux`` must hold ``"query_loss"`` (the post-adaptation query loss, detached) and
    ``"inner_loss"`` (the support loss before each inner step, shape ``[steps]``).
    """

    #: whether the inner-loop gradients are treated as constants
    first_order: bool = False
    #: how it meets a phased schedule (:class:`~metagrad.Phase`, e.g. Wormhole's C steps):
    #: ``"inline"``: its own inner loop runs the phases (unrolled, first-order, checkpointed);
    #: ``"wrapped"``: :meth:`gradient` runs them first, differentiably, and hands the method the
    #: phase-adapted tensors as its initialization (the tensors only the phases adapt become
    #: non-adapted parameters of that task), then pulls its gradient back through the phases
    #: (implicit, adjoint); ``None``: phases are refused (Reptile).
    phases: str | None = None
    #: whether :meth:`task_gradient` computes one task (and runs under ``vmap``); a method without
    #: one (the adjoint) computes whole meta-batches only (:meth:`batch_gradient`)
    per_task: bool = True

    def check(self, problem: "InnerProblem") -> None:
        """Raise ``ValueError`` if this method cannot run ``problem`` (default: phases need ``phases``)."""
        if problem.schedule.phases and self.phases not in ("inline", "wrapped"):
            raise ValueError(
                f"a phased schedule needs a meta-gradient that runs phases (unrolled, first-order, checkpointed, "
                f"implicit, adjoint); {type(self).__name__} does not support phases"
            )

    def task_objective(self, problem: "InnerProblem", meta_params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        raise NotImplementedError

    def task_gradient(self, problem: "InnerProblem", meta_params, sx, sy, qx, qy):
        """``(grads, (objective, aux))`` for one task; default: the gradient of the surrogate."""
        return grad_and_value(partial(self.task_objective, problem), has_aux=True)(meta_params, sx, sy, qx, qy)

    def batch_gradient(self, problem: "InnerProblem", meta_params, batch, vectorize: bool):
        """``(grads, objective, aux)`` averaged over the tasks of ``batch``.

        Default: :meth:`task_gradient` per task (``vmap(grad(.))`` rather than
        ``grad(vmap(.))``, which in torch 2.13 returns a wrong second-order gradient through
        ``F.batch_norm(training=True)``), then the mean over tasks. ``aux`` values keep a
        leading task dimension.
        """
        grads, (objective, aux) = mean_task_gradients(partial(self.task_gradient, problem), meta_params, batch,
                                                      vectorize)
        return grads, objective.mean(), aux

    def gradient(self, problem: "InnerProblem", meta_params, batch, vectorize: bool):
        """:meth:`batch_gradient`, with the schedule's phases run first when ``phases == "wrapped"``."""
        self.check(problem)
        if not (problem.schedule.phases and self.phases == "wrapped"):
            return self.batch_gradient(problem, meta_params, batch, vectorize)
        keep = set(meta_params["model"]).union(*problem.phase_names)

        def phase_init(mp, sx, sy):
            s, losses = problem.start(mp, sx, sy, first_order=self.first_order, training=True)
            model = {n: v for n, v in s.params().items() if n in keep}
            return {"model": model, "rule": mp["rule"]}, losses

        batch_type = type(batch)

        def one_task(mp, sx, sy, qx, qy):
            start, pull, losses = vjp(lambda m: phase_init(m, sx, sy), mp, has_aux=True)
            start = _tree_map(lambda t: t.detach(), start)
            if self.per_task:
                g, (objective, aux) = self.task_gradient(problem, start, sx, sy, qx, qy)
            else:  # a batch method, on a batch of this one task
                one = batch_type(sx[None], sy[None], qx[None], qy[None])
                g, objective, aux = self.batch_gradient(problem, start, one, False)
                aux = {k: v[0] for k, v in aux.items()}
            (grads,) = pull(g)
            inner = torch.cat([torch.stack(losses), aux["inner_loss"]]) if losses else aux["inner_loss"]
            return grads, (objective, {**aux, "inner_loss": inner})

        grads, (objective, aux) = mean_task_gradients(one_task, meta_params, batch, vectorize and self.per_task)
        return grads, objective.mean(), aux

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
