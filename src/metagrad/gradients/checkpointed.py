"""Checkpointed unrolled MAML: the exact second-order meta-gradient in O(sqrt K) memory."""
from __future__ import annotations

import math

import torch
from torch.func import grad_and_value, vjp

from .base import MetaGradient

_tree_map = torch.utils._pytree.tree_map


class Checkpointed(MetaGradient):
    """Exact MAML meta-gradient (as :class:`~metagrad.gradients.Unrolled`) with recomputation.

    The K inner steps are cut into ``segments`` runs of ``m = ceil(K / segments)`` steps. A forward
    pass without any autograd graph keeps only the carry (adapted parameters, and the rule state
    where the rule adapts it) at the start of every segment. The backward pass then walks the
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
        if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
            raise ValueError(f"segments must be a positive integer or None, got {segments!r}")
        self.segments = segments

    def __repr__(self) -> str:
        return f"Checkpointed(segments={self.segments!r})"

    def bounds(self, steps: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` step ranges of the segments for ``steps`` inner steps."""
        if steps == 0:
            return []
        n = self.segments if self.segments is not None else max(1, round(math.sqrt(steps)))
        n = min(max(n, 1), steps)
        m = math.ceil(steps / n)
        return [(lo, min(lo + m, steps)) for lo in range(0, steps, m)]

    def task_gradient(self, learner, meta_params, sx, sy, qx, qy):
        schedule = learner.schedule
        steps, per_step = schedule.train_steps, schedule.per_step_loss
        rule = learner.rule
        adapts_state = rule.adapts_state

        def support_loss(mp, u, carried):
            _, fixed = learner._split(mp)
            return learner.loss_fn(learner.functional_forward({**fixed, **carried, **u}, sx), sy)

        def init_carry(mp):
            # (u, rule state, previous u, previous gradient, phase-adapted tensors the steps do not
            # adapt); previous u and gradient only for adapts_state rules. Aux: the phases' losses.
            adapted, fixed = learner._split(mp)
            carried, losses = {}, []
            if schedule.phases:
                adapted, carried, losses = learner._run_phases(adapted, fixed, mp["rule"], sx, sy,
                                                               first_order=False, training=True)
            return (adapted, mp["rule"], {}, {}, carried), losses

        def step(mp, carry, k):
            # one inner step, the same arithmetic as MetaLearner._inner_loop
            u, state, prev, prev_g, carried = carry
            g, loss = grad_and_value(lambda ad: support_loss(mp, ad, carried))(u)
            if not adapts_state:
                new_u, state = rule.step(u, g, state)
                return (new_u, state, {}, {}, carried), loss
            if k > 0:  # Algorithm 1: the state gradient is the vjp of the last step with g
                _, pull = vjp(lambda st: rule.step(prev, prev_g, st)[0], state)
                (state_grads,) = pull(g)
                state = rule.state_step(state, state_grads)
            new_u = rule.step(u, g, state)[0]
            return (new_u, state, u, g, carried), loss

        def segment(lo, hi, mp, carry):
            qsum = sx.new_zeros(())
            losses = []
            for k in range(lo, hi):
                carry, loss = step(mp, carry, k)
                losses.append(loss)
                if per_step:
                    qsum = qsum + learner._query_loss(mp, {**carry[4], **carry[0]}, qx, qy)
            return (carry, qsum), torch.stack(losses)

        detach = lambda tree: _tree_map(lambda t: t.detach(), tree)  # noqa: E731
        bounds = self.bounds(steps)

        # forward: keep the carry at the start of each segment only
        with torch.no_grad():
            carry, phase_losses = init_carry(meta_params)
        carry = detach(carry)
        starts, inner, qtotal = [], [torch.stack(phase_losses)] if phase_losses else [], sx.new_zeros(())
        with torch.no_grad():
            for lo, hi in bounds:
                starts.append(carry)
                (carry, qsum), losses = segment(lo, hi, meta_params, carry)
                carry = detach(carry)
                inner.append(losses)
                qtotal = qtotal + qsum

        # the objective and its cotangent at the end of the trajectory
        if per_step:
            objective = qtotal / steps
            final_query = learner._query_loss(meta_params, {**carry[4], **carry[0]}, qx, qy)
            grads = _tree_map(torch.zeros_like, meta_params)
            carry_cot = _tree_map(torch.zeros_like, carry)
            q_cot = sx.new_ones(()) / steps
        else:
            final_query, pull = vjp(lambda mp, c: learner._query_loss(mp, {**c[4], **c[0]}, qx, qy), meta_params, carry)
            objective = final_query
            grads, carry_cot = pull(torch.ones_like(final_query))
            q_cot = sx.new_zeros(())

        # backward: recompute each segment under vjp, last to first
        for (lo, hi), start in zip(reversed(bounds), reversed(starts)):
            _, pull, _ = vjp(lambda mp, c: segment(lo, hi, mp, c), meta_params, start, has_aux=True)
            seg_grads, carry_cot = pull((carry_cot, q_cot))
            grads = _tree_map(torch.add, grads, seg_grads)

        _, pull, _ = vjp(init_carry, meta_params, has_aux=True)
        (init_grads,) = pull(carry_cot)
        grads = _tree_map(torch.add, grads, init_grads)

        inner_loss = torch.cat(inner) if inner else sx.new_zeros(0)
        aux = {"query_loss": final_query.detach(), "inner_loss": inner_loss.detach()}
        return grads, (objective.detach(), aux)
