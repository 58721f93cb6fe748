"""The inner problem and the one inner loop every method runs.

:class:`InnerProblem` is the inner problem of a learner as a value: the model and loss (the support
and query loss as pure functions of a parameter dict), which tensors adapt and which stay fixed,
the update rule, the schedule (phases included) and the :mod:`~metagrad.backend` that evaluates a
meta-batch at once. :meth:`InnerProblem.step` is the single place where an inner step is written:
the support gradient, Algorithm 1's state step for rules that adapt their meta-learned state
(Meta-KFO's ``adapt_state``), and the rule's update. :func:`inner_loop` runs a whole inner loop
from the meta-parameters (the schedule's phases, then the main steps) for one task (``torch.func``,
so it maps over a meta-batch with ``vmap``) or for a task-stacked meta-batch (``stacked=True``,
plain autograd through the backend). Every meta-gradient, :meth:`MetaLearner.evaluate`,
:meth:`MetaLearner.adapt` and the object API (:meth:`MetaLearner.clone`) run on them.

The state of an inner loop is an :class:`InnerState`, a pytree of tensor dicts, so it passes
through ``vmap``, ``vjp`` and checkpointing unchanged.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp

from .backend import Backend
from .learners.select import match_names
from .rules import SGD, UpdateRule
from .schedule import Schedule

Params = Mapping[str, Tensor]


class InnerState(NamedTuple):
    """Where an inner loop stands (a pytree of tensor dicts).

    Attributes:
        adapted: the tensors the steps adapt (``[tasks, *shape]`` each in a stacked loop).
        fixed: the other tensors the loss reads: the parameters that do not adapt and the tensors
            only a phase adapted (e.g. Wormhole's C after its phase); the model's own buffers
            otherwise.
        rule: the update rule's meta-learned state (it changes only for rules that adapt it).
        inner: the update rule's inner state (momentum, moments, step count).
        last: ``(adapted, grads, inner)`` before the previous step, kept only for rules that adapt
            their meta-learned state (Algorithm 1 differentiates that step); else ``()``.
    """

    adapted: dict
    fixed: dict
    rule: dict
    inner: dict
    last: tuple = ()

    def params(self) -> dict[str, Tensor]:
        """The full parameter dict the model is evaluated with."""
        return {**self.fixed, **self.adapted}


class InnerResult(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        trajectory: the adapted tensors after ``0, 1, ..., K`` main steps with ``keep_trajectory``,
            else only after ``0`` and ``K`` (one dict when ``K = 0``). Step ``0`` is after the phases.
        fixed: the other tensors (see :class:`InnerState`); ``{**fixed, **trajectory[k]}`` is the
            model's parameter dict after ``k`` steps.
        losses: the support loss before each step, phase steps first: ``[steps]`` per task,
            ``[tasks, steps]`` stacked.
        state: the final :class:`InnerState`.
    """

    trajectory: list
    fixed: dict
    losses: Tensor
    state: InnerState

    def params(self, k: int = -1) -> dict[str, Tensor]:
        """The full parameter dict after the ``k``-th kept point of the trajectory (default: the last)."""
        return {**self.fixed, **self.trajectory[k]}


class _FixedRate(SGD):
    """A phase's plain gradient steps at its own rate (``Phase.lr``, any number)."""

    def __init__(self, lr: float):
        self.lr, self.learnable = float(lr), False


class InnerProblem:
    """The inner problem of a learner: what adapts, how, and on which loss.

    Args:
        model: the ``nn.Module`` evaluated with ``torch.func.functional_call``.
        loss_fn: ``loss_fn(predictions, targets) -> scalar``, the support and the query loss.
        adapted_names: the parameters the main steps adapt.
        rule: the :class:`~metagrad.rules.UpdateRule` of the main steps.
        schedule: the :class:`~metagrad.Schedule` (steps, per-step loss, phases).
        backend: the :class:`~metagrad.backend.Backend` of stacked meta-batches.

    ``phase_names[i]`` are the tensors phase ``i`` adapts and ``phase_rules[i]`` its rule (plain
    gradient descent at ``Phase.lr``, or ``rule``). ``stacked`` says whether a vectorized
    meta-batch of the unrolled methods runs as one stacked computation (a backend with a batched
    forward, an elementwise rule that does not adapt its state, no phases).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, adapted_names, rule: UpdateRule, schedule: Schedule,
                 backend: Backend):
        self.model, self.loss_fn = model, loss_fn
        self.adapted_names = tuple(adapted_names)
        self.rule, self.schedule, self.backend = rule, schedule, backend
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        self.phase_names = tuple(match_names(names, ph.adapt, what="phase pattern") for ph in schedule.phases)
        self.phase_rules = tuple(rule if ph.lr is None else _FixedRate(ph.lr) for ph in schedule.phases)
        for ph, names in zip(schedule.phases, self.phase_names):
            if ph.lr is None:
                if rule.adapts_state:
                    raise ValueError(f"a Phase without lr uses the learner's rule, and {type(rule).__name__} "
                                     f"adapts its own state, which phases do not support; give the phase an lr")
                outside = [n for n in names if n not in self.adapted_names]
                if outside:
                    raise ValueError(f"a Phase without lr uses the learner's rule, which has state only for the "
                                     f"adapted parameters; {outside} are not adapted: give the phase an lr")
        self.stacked = (backend.name != "generic" and rule.elementwise and not rule.adapts_state
                        and not schedule.phases)

    def check_functional(self) -> None:
        """Raise ``ValueError`` if the model cannot run in the functional inner loop as it is now.

        A normalization layer that updates running statistics (``nn.BatchNorm*`` with
        ``track_running_stats=True`` in training mode) writes its buffers in place on every forward,
        which ``torch.func.grad`` and ``vmap`` refuse (with ``vectorize=False`` too). The message
        names the layer and the ways out.
        """
        for name, m in self.model.named_modules():
            if (isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
                    and m.running_mean is not None):
                raise ValueError(
                    f"{type(m).__name__} {name or '(the model)'!r} updates running statistics in training mode, "
                    f"which the functional inner loop (meta_step, evaluate, adapt; vectorize=False too) cannot "
                    f"do: build it with track_running_stats=False (per-batch statistics, as MAML uses them), "
                    f"or call model.eval() to normalize with its fixed running statistics, or use the object "
                    f"API (learner.clone()), which updates them in place as learn2learn does")

    # ------------------------------------------------------------------ losses
    def forward(self, params: Params, x: Tensor) -> Tensor:
        """``model(x)`` with the parameter dict ``params`` (one task)."""
        return functional_call(self.model, dict(params), (x,))

    def loss(self, adapted: Params, fixed: Params, x: Tensor, y: Tensor, *, stacked: bool = False) -> Tensor:
        """``loss_fn(model(x), y)`` with the parameters ``{**fixed, **adapted}``: a scalar for one
        task, ``[tasks]`` with ``stacked`` (task-stacked tensors and data, no buffers in ``fixed``)."""
        if stacked:
            return self.backend.task_losses(adapted, fixed, x, y)
        return self.loss_fn(self.forward({**fixed, **adapted}, x), y)

    def split(self, model_params: Params) -> tuple[dict, dict]:
        """``(adapted, fixed)`` parts of ``model_params``. The model's buffers are read from the model
        itself (``functional_call`` takes them for the names a dict leaves out), so no integer
        buffer enters an inner state that is differentiated; a buffer that a phase adapts
        (Wormhole's C) joins ``fixed`` with its adapted value."""
        adapted = {n: model_params[n] for n in self.adapted_names}
        return adapted, {n: v for n, v in model_params.items() if n not in adapted}

    # ------------------------------------------------------------------ one step
    def state(self, adapted: Params, fixed: Params, rule_state: Params, rule: UpdateRule | None = None) -> InnerState:
        """A fresh :class:`InnerState` (the rule's inner state made from ``adapted``)."""
        rule = self.rule if rule is None else rule
        return InnerState(dict(adapted), dict(fixed), dict(rule_state), rule.init_inner(adapted))

    def support_grad(self, s: InnerState, x: Tensor, y: Tensor, *, first_order: bool = False,
                     stacked: bool = False) -> tuple[dict, Tensor]:
        """``(grads, loss)`` of the support loss with respect to ``s.adapted``; ``first_order``
        detaches the gradients. Stacked: through the backend, keeping the graph of ``s.adapted``
        where it has one (a meta-gradient's iterates), values only otherwise."""
        if stacked:
            if torch.is_grad_enabled() and any(t.requires_grad for t in s.adapted.values()):
                loss, g = self.backend.differentiable_grad(s.adapted, s.fixed, x, y, create_graph=not first_order)
            else:
                loss, g = self.backend.grad(s.adapted, s.fixed, x, y)
            return g, loss
        g, loss = grad_and_value(lambda ad: self.loss(ad, s.fixed, x, y))(s.adapted)
        if first_order:
            g = {n: t.detach() for n, t in g.items()}
        return g, loss

    def update(self, s: InnerState, grads: Params, *, state_grads: Params | None = None,
               rule: UpdateRule | None = None) -> InnerState:
        """The step from given gradients: Algorithm 1's state step (``state_grads``: the support-loss
        gradient with respect to the meta-learned state, rules that adapt it), then the rule's update."""
        rule = self.rule if rule is None else rule
        state = s.rule if state_grads is None else rule.state_step(s.rule, state_grads)
        new, inner = rule.step(s.adapted, grads, state, s.inner)
        return InnerState(new, s.fixed, state, inner, (s.adapted, grads, s.inner) if rule.adapts_state else ())

    def step(self, s: InnerState, x: Tensor, y: Tensor, *, first_order: bool = False, stacked: bool = False,
             rule: UpdateRule | None = None,
             grad_transform: Callable[[dict, dict], dict] | None = None) -> tuple[InnerState, Tensor]:
        """One inner step on the support set ``(x, y)``: ``(next state, support loss before it)``.

        ``grad_transform(grads, adapted)`` changes the gradient before the update (iMAML adds its
        proximal term). For a rule that adapts its meta-learned state (Algorithm 1, suppl. C),
        ``xi_{t+1} = xi_t - a d l(theta_t) / d xi_t`` first, where ``theta_t`` depends on ``xi_t``
        only through the previous step, so the state gradient is that step's vjp with the
        support gradient (zero at ``t = 0``).
        """
        rule = self.rule if rule is None else rule
        grads, loss = self.support_grad(s, x, y, first_order=first_order, stacked=stacked)
        if grad_transform is not None:
            grads = grad_transform(grads, s.adapted)
        state_grads = None
        if rule.adapts_state and s.last:
            prev, prev_grads, prev_inner = s.last
            _, pull = vjp(lambda st: rule.step(prev, prev_grads, st, prev_inner)[0], s.rule)
            (state_grads,) = pull(grads)
            if first_order:
                state_grads = {k: v.detach() for k, v in state_grads.items()}
        return self.update(s, grads, state_grads=state_grads, rule=rule), loss

    # ------------------------------------------------------------------ the loop's start
    def start(self, meta_params, x: Tensor, y: Tensor, *, first_order: bool = False, training: bool = True,
              stacked: bool = False) -> tuple[InnerState, list[Tensor]]:
        """The state the main steps start from, after the schedule's phases (their train or test
        step counts per ``training``), and the phase steps' support losses.

        ``meta_params`` is ``{"model": {...}, "rule": {...}}``; with ``stacked`` the model's
        tensors are expanded to ``[tasks, *shape]`` (``x.shape[0]`` tasks; no buffers).
        """
        model_p, rule_state = meta_params["model"], meta_params["rule"]
        if stacked:
            model_p = {n: v.expand(x.shape[0], *v.shape) for n, v in model_p.items()}
        adapted, fixed = self.split(model_p)
        losses: list[Tensor] = []
        buffers = dict(self.model.named_buffers()) if self.schedule.phases else {}
        for phase, names, rule in zip(self.schedule.phases, self.phase_names, self.phase_rules):
            full = {**buffers, **fixed, **adapted}
            s = self.state({n: full[n] for n in names}, {n: v for n, v in full.items() if n not in names},
                           rule_state, rule)
            for _ in range(phase.steps if training else phase.eval_steps):
                s, loss = self.step(s, x, y, first_order=first_order, stacked=stacked, rule=rule)
                losses.append(loss.detach())
            full = s.params()
            adapted = {n: full[n] for n in self.adapted_names}
            buffers = {n: v for n, v in buffers.items() if n not in names}
            fixed = {n: v for n, v in full.items() if n not in adapted and n not in buffers}
        return self.state(adapted, fixed, rule_state), losses


def inner_loop(problem: InnerProblem, meta_params, x: Tensor, y: Tensor, *, steps: int, first_order: bool = False,
               keep_trajectory: bool = False, training: bool = True, stacked: bool = False) -> InnerResult:
    """Run ``problem``'s inner loop on the support set ``(x, y)`` from ``meta_params``.

    The schedule's phases run first, then ``steps`` steps of the rule on the adapted parameters
    (:meth:`InnerProblem.step`). Differentiable with respect to ``meta_params`` (second order
    unless ``first_order``, which treats the inner gradients as constants). One task by default
    (``x [shots, ...]``; map it over a meta-batch with ``torch.func.vmap``); with ``stacked`` a
    whole meta-batch (``x [tasks, shots, ...]``) through the problem's backend with plain autograd,
    the model's tensors of ``meta_params`` unstacked.

    Returns an :class:`InnerResult`.
    """
    s, losses = problem.start(meta_params, x, y, first_order=first_order, training=training, stacked=stacked)
    trajectory = [s.adapted]
    for _ in range(steps):
        s, loss = problem.step(s, x, y, first_order=first_order, stacked=stacked)
        losses.append(loss.detach())
        if keep_trajectory:
            trajectory.append(s.adapted)
    if steps and not keep_trajectory:
        trajectory.append(s.adapted)
    return InnerResult(trajectory, s.fixed, stack_losses(losses, x, stacked=stacked), s)


def stack_losses(losses: list[Tensor], x: Tensor, *, stacked: bool = False) -> Tensor:
    """The support losses of the steps as one tensor, steps last: ``[steps]`` per task,
    ``[tasks, steps]`` stacked (``x`` gives dtype, device and the task count when there are none)."""
    if losses:
        return torch.stack(losses, -1)
    return x.new_zeros(x.shape[0], 0) if stacked else x.new_zeros(0)
