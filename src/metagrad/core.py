"""The functional meta-learning engine.

:class:`MetaLearner` composes the four orthogonal choices:

* **learner**: a model (any ``nn.Module``) and which of its parameters adapt (``adapt=``);
* **update rule**: how an inner gradient becomes a step (``rule=``, :mod:`metagrad.rules`);
* **meta-gradient**: how the outer gradient is computed (``meta_gradient=``,
  :mod:`metagrad.gradients`);
* **schedule**: inner steps at train and test time, per-step losses (``schedule=``).

The unit of computation is a pure function of a parameter dict: adaptation maps
``(meta_params, support) -> adapted params`` through ``torch.func.functional_call`` and
``torch.func.grad``, so a meta-batch runs under ``torch.func.vmap`` (or a per-task loop, with the
same result). Meta-parameters are a nested dict ``{"model": {...}, "rule": {...}}``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp, vmap

from .gradients import MetaGradient, make_meta_gradient
from .learners import select_adapted
from .learners.select import AdaptSpec, match_names
from .rules import UpdateRule, make_rule
from .schedule import Schedule
from .tasks import TaskBatch

LossFn = Callable[[Tensor, Tensor], Tensor]

_TASK_DIMS = (None, 0, 0, 0, 0)  # meta_params shared, one task per slice of the batch


class _StateTree(nn.Module):
    """Holds an update rule's learnable state as parameters under their dotted names.

    A state entry ``"fc.weight"`` becomes parameter ``weight`` of submodule ``fc``, so
    ``named_parameters()`` gives back exactly the rule's keys, in order, and ``state_dict`` keys
    read ``rule_state.fc.weight``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        for name, value in tensors.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(value.detach().clone()))


class MetaLearner(nn.Module):
    """A meta-learning method: model + adapted subset + update rule + meta-gradient + schedule.

    Args:
        model: any ``nn.Module``; its parameters are the meta-learned initialization.
        loss_fn: ``loss_fn(predictions, targets) -> scalar`` used for both support and query sets.
        adapt: which parameters adapt: ``"all"`` (MAML), ``"head"`` (ANIL) or name patterns.
        rule: an :class:`~metagrad.rules.UpdateRule` or a registered name (``"sgd"``,
            ``"meta-sgd"``, ``"meta-curvature"``, ``"meta-kfo"``); a name is built with ``lr``.
        lr: inner learning rate used when ``rule`` is given by name.
        meta_gradient: a :class:`~metagrad.gradients.MetaGradient` or a registered name
            (``"unrolled"``, ``"first-order"``, ``"reptile"``).
        schedule: a :class:`~metagrad.Schedule` (default: one step at train and test time).
        metric_fn: optional ``metric_fn(predictions, targets) -> scalar`` reported by
            :meth:`evaluate` (e.g. :func:`metagrad.metrics.accuracy`).
        vectorize: run a meta-batch under ``torch.func.vmap`` (default) or a per-task loop.

    The learnable state of the rule is registered as parameters under ``rule_state``, so
    ``torch.optim.Adam(learner.parameters())`` meta-trains both the initialization and the rule.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        adapt: AdaptSpec = "all",
        rule: UpdateRule | str = "sgd",
        lr: float = 0.1,
        meta_gradient: MetaGradient | str = "unrolled",
        schedule: Schedule | None = None,
        metric_fn: LossFn | None = None,
        vectorize: bool = True,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.metric_fn = metric_fn
        self.adapted_names = select_adapted(model, adapt)
        self.rule = make_rule(rule, lr=lr) if isinstance(rule, str) else rule
        if not isinstance(self.rule, UpdateRule):
            raise TypeError(f"rule must be an UpdateRule or a rule name, got {type(rule).__name__}")
        self.meta_gradient = make_meta_gradient(meta_gradient) if isinstance(meta_gradient, str) else meta_gradient
        if not isinstance(self.meta_gradient, MetaGradient):
            raise TypeError(f"meta_gradient must be a MetaGradient or a name, got {type(meta_gradient).__name__}")
        self.schedule = Schedule() if schedule is None else schedule
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        self.vectorize = bool(vectorize)
        params = dict(model.named_parameters())
        init = self.rule.init({n: params[n].detach() for n in self.adapted_names})
        self.rule_state = _StateTree(init)
        self._check_phases()

    def _check_phases(self) -> None:
        """Resolve the schedule's phases to tensor names (``self.phase_names``); validate them."""
        phases = self.schedule.phases
        self.phase_names = tuple(_select_phase(self.model, ph.adapt) for ph in phases)
        if not phases:
            return
        if getattr(self.meta_gradient, "phases", None) not in ("inline", "wrapped"):
            raise ValueError(
                f"a phased schedule needs a meta-gradient that runs phases (unrolled, first-order, checkpointed, "
                f"implicit, adjoint); {type(self.meta_gradient).__name__} does not support phases"
            )
        for ph, names in zip(phases, self.phase_names):
            if ph.lr is None:
                if self.rule.adapts_state:
                    raise ValueError(f"a Phase without lr uses the learner's rule, and {type(self.rule).__name__} "
                                     f"adapts its own state, which phases do not support; give the phase an lr")
                outside = [n for n in names if n not in self.adapted_names]
                if outside:
                    raise ValueError(f"a Phase without lr uses the learner's rule, which has state only for the "
                                     f"adapted parameters; {outside} are not adapted: give the phase an lr")

    # ------------------------------------------------------------------ parameters
    def meta_parameters(self) -> dict[str, dict[str, Tensor]]:
        """The meta-parameters as a nested dict ``{"model": {...}, "rule": {...}}`` (live tensors)."""
        return {
            "model": dict(self.model.named_parameters()),
            "rule": dict(self.rule_state.named_parameters()),
        }

    def _detached_meta_parameters(self):
        return {g: {k: v.detach() for k, v in d.items()} for g, d in self.meta_parameters().items()}

    def _split(self, meta_params):
        """(adapted, fixed) parameter dicts; ``fixed`` includes the model's buffers."""
        model_p = meta_params["model"]
        adapted = {n: model_p[n] for n in self.adapted_names}
        fixed = {n: v for n, v in model_p.items() if n not in adapted}
        fixed.update(self.model.named_buffers())
        return adapted, fixed

    def functional_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``model(x)`` evaluated with ``params`` (any subset; the rest come from the model)."""
        return functional_call(self.model, dict(params), (x,))

    # ------------------------------------------------------------------ pure core
    def _run_phases(self, adapted, fixed, state, x, y, *, first_order: bool, training: bool):
        """The schedule's phases (before the main steps). Returns (adapted, carried, losses):
        ``carried`` holds the phase-adapted tensors that the main steps do not adapt."""
        full = {**fixed, **adapted}
        losses = []
        touched: set[str] = set()
        for phase, names in zip(self.schedule.phases, self.phase_names):
            steps = phase.steps if training else phase.eval_steps

            def phase_loss(ph):
                return self.loss_fn(functional_call(self.model, {**full, **ph}, (x,)), y)

            ph = {n: full[n] for n in names}
            for _ in range(steps):
                grads, loss = grad_and_value(phase_loss)(ph)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                if phase.lr is not None:
                    ph = {n: p - phase.lr * grads[n] for n, p in ph.items()}
                else:
                    ph, _ = self.rule.step(ph, grads, state)
                losses.append(loss.detach())
            full.update(ph)
            touched.update(names)
        adapted = {n: full[n] for n in adapted}
        carried = {n: full[n] for n in touched if n not in adapted}
        return adapted, carried, losses

    def _inner_loop(self, meta_params, x, y, steps: int, *, first_order: bool, keep_trajectory: bool = False,
                    training: bool = True):
        """Adapt one task. Returns (trajectory of adapted dicts, support loss before each step [steps]).

        Without ``keep_trajectory`` the trajectory holds only the initial and the final dict.
        With a phased schedule the phases run first (their step counts: train or test ones per
        ``training``); the support losses of their steps lead the returned losses, the trajectory
        starts after them, and its dicts also hold the phase-adapted tensors that the main steps
        do not adapt (e.g. Wormhole's C).
        """
        adapted, fixed = self._split(meta_params)
        state = meta_params["rule"]
        losses = []
        carried = {}
        if self.schedule.phases:
            adapted, carried, losses = self._run_phases(adapted, fixed, state, x, y, first_order=first_order,
                                                        training=training)
            fixed = {**fixed, **carried}

        def support_loss(ad):
            return self.loss_fn(functional_call(self.model, {**fixed, **ad}, (x,)), y)

        trajectory = [{**carried, **adapted}] if carried else [adapted]
        adapts_state = self.rule.adapts_state
        state_vjp = None  # pullback of the last step with respect to the state that made it
        for _ in range(steps):
            grads, loss = grad_and_value(support_loss)(adapted)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            if not adapts_state:
                adapted, state = self.rule.step(adapted, grads, state)
            else:
                # Algorithm 1 (suppl. C): xi_{t+1} = xi_t - a d l(theta_t)/d xi_t, where theta_t
                # depends on xi_t only through theta_t = step(theta_{t-1}, g_{t-1}, xi_t): the
                # state gradient is the vjp of that step with grad l(theta_t) (zero at t = 0).
                if state_vjp is not None:
                    (state_grads,) = state_vjp(grads)
                    if first_order:
                        state_grads = {k: v.detach() for k, v in state_grads.items()}
                    state = self.rule.state_step(state, state_grads)
                prev, prev_grads = adapted, grads
                adapted, state_vjp = vjp(lambda st: self.rule.step(prev, prev_grads, st)[0], state)
            losses.append(loss.detach())
            if keep_trajectory:
                trajectory.append({**carried, **adapted} if carried else adapted)
        if not keep_trajectory and steps:
            trajectory.append({**carried, **adapted} if carried else adapted)
        inner = torch.stack(losses) if losses else x.new_zeros(0)
        return trajectory, inner

    def _query_loss(self, meta_params, adapted, qx, qy) -> Tensor:
        _, fixed = self._split(meta_params)
        return self.loss_fn(functional_call(self.model, {**fixed, **adapted}, (qx,)), qy)

    def _map_tasks(self, fn, meta_params, batch: TaskBatch, vectorize: bool):
        """Apply ``fn(meta_params, sx, sy, qx, qy)`` to every task; outputs stacked on dim 0."""
        if vectorize:
            return vmap(fn, in_dims=_TASK_DIMS)(meta_params, *batch)
        outs = [fn(meta_params, *(t[i] for t in batch)) for i in range(batch.num_tasks)]
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    def _mean_task_gradients(self, fn, meta_params, batch: TaskBatch, vectorize: bool):
        """``fn(meta_params, sx, sy, qx, qy) -> (grads, rest)`` for every task; returns ``grads``
        averaged over the tasks and ``rest`` stacked on dim 0.

        The per-task loop sums the gradients as it goes rather than stacking them: a rule whose
        state is large (Meta-KFO's ``[n, n]`` factors of a wide head) would otherwise copy a
        ``[tasks, n, n]`` stack per factor only to average it.
        """
        tree_map = torch.utils._pytree.tree_map
        if vectorize:
            grads, rest = self._map_tasks(fn, meta_params, batch, True)
            return tree_map(lambda g: g.mean(0), grads), rest
        total, rests = None, []
        for i in range(batch.num_tasks):
            grads, rest = fn(meta_params, *(t[i] for t in batch))
            total = tree_map(torch.clone, grads) if total is None else tree_map(torch.Tensor.add_, total, grads)
            rests.append(rest)
        n = batch.num_tasks
        return tree_map(lambda g: g.div_(n), total), tree_map(lambda *xs: torch.stack(xs), *rests)

    # ------------------------------------------------------------------ public API
    def adapt(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to one task's support set; returns the full adapted parameter dict.

        Differentiable with respect to the meta-parameters (second order). ``steps`` defaults
        to the schedule's test steps.
        """
        batch = TaskBatch(support_x[None], support_y[None], support_x[None], support_y[None]).validate()
        steps = self.schedule.eval_steps if steps is None else steps
        meta_params = self.meta_parameters()
        traj, inner = self._inner_loop(meta_params, batch.support_x[0], batch.support_y[0], steps, first_order=False,
                                       training=False)
        _check_finite(inner[None], "inner")
        _, fixed = self._split(meta_params)
        return {**fixed, **traj[-1]}

    def meta_gradient_of(self, batch: TaskBatch, *, vectorize: bool | None = None):
        """The meta-gradient averaged over the tasks of ``batch``.

        Returns ``(grads, stats)``: ``grads`` mirrors :meth:`meta_parameters`; ``stats`` holds
        ``meta_objective`` (scalar), ``query_loss`` ``[tasks]`` and ``inner_loss``
        ``[tasks, steps]``. Raises ``ValueError`` naming the step and task of a non-finite inner
        loss.
        """
        batch = _as_batch(batch)
        vectorize = self.vectorize if vectorize is None else vectorize
        self._check_phases()  # the schedule or the meta-gradient may have been replaced
        meta_params = self._detached_meta_parameters()
        grads, objective, aux = self.meta_gradient.gradient(self, meta_params, batch, vectorize)
        _check_finite(aux["inner_loss"], "inner")
        bad = ~torch.isfinite(aux["query_loss"])
        if bad.any():
            task = int(bad.nonzero()[0])
            raise ValueError(f"non-finite query loss {aux['query_loss'][task].item()} after adaptation of task {task}")
        return grads, {"meta_objective": objective.detach(), **aux}

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer, *, vectorize: bool | None = None):
        """One outer update: set ``.grad`` of every meta-parameter from :meth:`meta_gradient_of`
        and call ``optimizer.step()``. Returns the stats of :meth:`meta_gradient_of`."""
        grads, stats = self.meta_gradient_of(batch, vectorize=vectorize)
        live = self.meta_parameters()
        for group, tensors in live.items():
            for name, p in tensors.items():
                p.grad = grads[group][name].detach().clone()
        optimizer.step()
        return stats

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch, *, steps: int | None = None, vectorize: bool | None = None) -> dict[str, Tensor]:
        """Adapt to each task's support set and score its query set after 0..steps inner steps.

        Returns ``{"loss": [tasks, steps + 1]}`` plus ``"metric"`` of the same shape when the
        learner has a ``metric_fn``. Column ``k`` is the value after ``k`` steps. A task whose
        adaptation diverges is not an error here: its later values become ``inf``/``nan``
        (training, by contrast, raises on any non-finite inner loss). A non-finite support loss
        before the first step means bad input and raises ``ValueError`` naming the task.
        """
        batch = _as_batch(batch)
        steps = self.schedule.eval_steps if steps is None else steps
        vectorize = self.vectorize if vectorize is None else vectorize

        def task_eval(meta_params, sx, sy, qx, qy):
            traj, inner = self._inner_loop(meta_params, sx, sy, steps, first_order=True, keep_trajectory=True,
                                           training=False)
            _, fixed = self._split(meta_params)
            preds = [functional_call(self.model, {**fixed, **u}, (qx,)) for u in traj]
            out = {"loss": torch.stack([self.loss_fn(p, qy) for p in preds]), "inner_loss": inner[:1]}
            if self.metric_fn is not None:
                out["metric"] = torch.stack([self.metric_fn(p, qy) for p in preds])
            return out

        out = self._map_tasks(task_eval, self._detached_meta_parameters(), batch, vectorize)
        _check_finite(out.pop("inner_loss"), "inner")
        return out

    def clone(self) -> "TaskModel":
        """A learn2learn-style task copy whose parameters stay connected to the meta-parameters.

        ``task = learner.clone(); task.adapt(loss_fn(task(sx), sy)); loss_fn(task(qx), qy).backward()``
        accumulates the meta-gradient (second order, or first order when the learner's
        meta-gradient is first-order) into ``.grad`` of this learner's parameters.
        """
        return TaskModel(self)


class TaskModel:
    """A task-specific copy made by :meth:`MetaLearner.clone` (learn2learn-shaped object API)."""

    def __init__(self, learner: MetaLearner):
        self._learner = learner
        meta_params = learner.meta_parameters()
        self.params = dict(meta_params["model"])
        self.params.update(learner.model.named_buffers())
        self.state = meta_params["rule"]
        self.steps_taken = 0

    def __call__(self, x: Tensor) -> Tensor:
        return functional_call(self._learner.model, self.params, (x,))

    def adapt(self, loss: Tensor, *, first_order: bool | None = None, phase: int | None = None) -> "TaskModel":
        """One inner step on ``loss`` (in place on this copy).

        Without ``phase``: a step of the learner's update rule on its adapted parameters. With
        ``phase=i``: a step of the schedule's i-th :class:`~metagrad.Phase` on the tensors it
        matches (plain SGD at the phase's lr, or the update rule when it has none); e.g. for
        Wormhole, ``c_steps`` calls with ``phase=0`` and then ``train_steps`` plain calls are
        Algorithm 1, with the same meta-gradient as the functional engine.
        """
        learner = self._learner
        if first_order is None:
            first_order = learner.meta_gradient.first_order
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"non-finite inner loss {loss.item()} at step {self.steps_taken}")
        if phase is not None:
            return self._phase_step(loss, phase, first_order)
        names = learner.adapted_names
        if not learner.rule.adapts_state:
            grads = torch.autograd.grad(loss, [self.params[n] for n in names], create_graph=not first_order)
            grads = {n: (g.detach() if first_order else g) for n, g in zip(names, grads)}
        else:
            # Algorithm 1: the state xi_t reaches the loss only through the last step, which this
            # copy recorded, so d loss / d xi_t is autograd's (None, i.e. zero, before any step).
            keys = list(self.state)
            inputs = [self.params[n] for n in names] + [self.state[k] for k in keys]
            differentiable = [i for i, t in enumerate(inputs) if i < len(names) or t.requires_grad]
            # retain_graph: the state's path runs through the last step, which the query loss
            # still needs (a first-order adapt would otherwise free it)
            found = torch.autograd.grad(loss, [inputs[i] for i in differentiable], create_graph=not first_order,
                                        retain_graph=True, allow_unused=True)
            full = [torch.zeros_like(t) for t in inputs]
            for i, g in zip(differentiable, found):
                if g is not None:
                    full[i] = g.detach() if first_order else g
            grads = dict(zip(names, full[: len(names)]))
            self.state = learner.rule.state_step(self.state, dict(zip(keys, full[len(names):])))
        new, self.state = learner.rule.step({n: self.params[n] for n in names}, grads, self.state)
        self.params.update(new)
        self.steps_taken += 1
        return self

    def _phase_step(self, loss: Tensor, phase: int, first_order: bool) -> "TaskModel":
        learner = self._learner
        phases = learner.schedule.phases
        if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < len(phases):
            raise ValueError(f"phase must be an index into the schedule's {len(phases)} phase(s), got {phase!r}")
        spec, names = phases[phase], learner.phase_names[phase]
        for n in names:  # a buffer (task state, e.g. Wormhole's C) enters the graph as a fresh leaf
            if not self.params[n].requires_grad:
                self.params[n] = self.params[n].detach().clone().requires_grad_()
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], create_graph=not first_order)
        grads = {n: (g.detach() if first_order else g) for n, g in zip(names, grads)}
        current = {n: self.params[n] for n in names}
        if spec.lr is not None:
            new = {n: p - spec.lr * grads[n] for n, p in current.items()}
        else:
            new, _ = learner.rule.step(current, grads, self.state)
        self.params.update(new)
        # the next steps take partial gradients (the engine's): the other tensors get fresh autograd
        # nodes, so a gradient for them does not also count their path through this phase's result
        for n, p in self.params.items():
            if n not in names and p.requires_grad:
                self.params[n] = p.view_as(p)
        self.steps_taken += 1
        return self

    def parameters(self):
        return iter(self.params.values())


def _as_batch(batch) -> TaskBatch:
    if not isinstance(batch, TaskBatch):
        if isinstance(batch, (tuple, list)) and len(batch) == 4:
            batch = TaskBatch(*batch)
        else:
            raise TypeError(f"expected a TaskBatch (support_x, support_y, query_x, query_y), got {type(batch).__name__}")
    return batch.validate()


def _check_finite(losses: Tensor, which: str) -> None:
    """Raise ``ValueError`` naming the first (task, step) whose loss is not finite."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        task, step = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"non-finite {which} loss {losses[task, step].item()} at step {step} of task {task} "
            f"(try a smaller inner learning rate)"
        )


def _select_phase(model: nn.Module, adapt) -> tuple[str, ...]:
    """Names of the parameters and buffers of ``model`` matched by a phase's patterns."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return match_names(names, adapt, what="phase pattern")
