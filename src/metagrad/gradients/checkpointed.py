"""Checkpointed unrolled MAML: the exact second-order meta-gradient in O(sqrt K) memory."""
from __future__ import annotations

import torch
from torch.func import vjp

from .base import MetaGradient, check_segments, segment_bounds

_tree_map = torch.utils._pytree.tree_map


class Checkpointed(MetaGradient):
    """Exact MAML meta-gradient (as :class:`~metagrad.gradients.Unrolled`) with recomputation.

    The K inner steps (:meth:`~metagrad.InnerProblem.step`) are cut into ``segments`` runs of
    ``m = ceil(K / segments)`` steps. A forward pass without any autograd graph keeps only the
    :class:`~metagrad.InnerState` at the start of every segment. The backward pass then walks the
    segments last to first: it re-runs one segment under ``torch.func.vjp``, pulls the cotangent of
    the segment's end back to its start, and accumulates the meta-parameters' share. Peak memory
    is ``segments`` carries plus one segment's graph: with the default ``segments = round(sqrt K)``
    it is ``O(sqrt K)`` parameter-sized tensors instead of ``O(K)``, for about one extra forward
    pass of compute.

    The result equals :class:`Unrolled` to float precision for every update rule (SGD, learnable
    SGD, Meta-SGD, Meta-Curvature, Meta-KFO, also with ``adapt_state=True``), adapted subset and
    ``Schedule(per_step_loss=...)`` and phased schedule (the phases, e.g. Wormhole's C steps, run
    first and are differentiated as one more segment). It is computed per task with ``torch.func``
    only, so it runs under ``vmap`` (``vectorize=True``) or in a per-task loop. The returned gradient is a value:
    the checkpoints are detached, so it is not itself differentiable (no third order).

    Args:
        segments: number of segments (checkpoints); ``None`` picks ``round(sqrt(K))``. Clipped to
            ``[1, K]``. ``segments=1`` recomputes nothing but keeps the whole graph (plain
            unrolling); ``segments=K`` keeps every state and re-linearizes one step at a time.
    """

    first_order = False
    phases = "inline"

    def __init__(self, segments: int | None = None):
        self.segments = check_segments(segments)

    def __repr__(self) -> str:
        return f"Checkpointed(segments={self.segments!r})"

    def bounds(self, steps: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` step ranges of the segments for ``steps`` inner steps."""
        return segment_bounds(steps, self.segments)

    def task_gradient(self, problem, meta_params, sx, sy, qx, qy):
        schedule = problem.schedule
        steps, per_step = schedule.train_steps, schedule.per_step_loss

        def query(s):
            return problem.loss(s.adapted, s.fixed, qx, qy)

        def segment(lo, hi, mp, s):
            # mp is unused: the state carries every tensor the steps read (fixed ones included)
            qsum = sx.new_zeros(())
            losses = []
            for _ in range(lo, hi):
                s, loss = problem.step(s, sx, sy)
                losses.append(loss)
                if per_step:
                    qsum = qsum + query(s)
            return (s, qsum), torch.stack(losses)

        detach = lambda tree: _tree_map(lambda t: t.detach(), tree)  # noqa: E731
        bounds = self.bounds(steps)

        # forward: keep the inner state at the start of each segment only
        with torch.no_grad():
            s, phase_losses = problem.start(meta_params, sx, sy)
        s = detach(s)
        starts, inner, qtotal = [], [torch.stack(phase_losses)] if phase_losses else [], sx.new_zeros(())
        with torch.no_grad():
            for lo, hi in bounds:
                starts.append(s)
                (s, qsum), losses = segment(lo, hi, meta_params, s)
                s = detach(s)
                inner.append(losses)
                qtotal = qtotal + qsum

        # the objective and its cotangent at the end of the trajectory
        if per_step:
            objective = qtotal / steps
            final_query = query(s)
            grads = _tree_map(torch.zeros_like, meta_params)
            state_cot = _tree_map(torch.zeros_like, s)
            q_cot = sx.new_ones(()) / steps
        else:
            final_query, pull = vjp(query, s)
            objective = final_query
            grads = _tree_map(torch.zeros_like, meta_params)
            (state_cot,) = pull(torch.ones_like(final_query))
            q_cot = sx.new_zeros(())

        # backward: recompute each segment under vjp, last to first
        for (lo, hi), start in zip(reversed(bounds), reversed(starts)):
            _, pull, _ = vjp(lambda c: segment(lo, hi, meta_params, c), start, has_aux=True)
            (state_cot,) = pull((state_cot, q_cot))

        _, pull, _ = vjp(lambda mp: problem.start(mp, sx, sy), meta_params, has_aux=True)
        (init_grads,) = pull(state_cot)
        grads = _tree_map(torch.add, grads, init_grads)

        inner_loss = torch.cat(inner) if inner else sx.new_zeros(0)
        aux = {"query_loss": final_query.detach(), "inner_loss": inner_loss.detach()}
        return grads, (objective.detach(), aux)
