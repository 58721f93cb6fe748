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

import inspect
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed
from ._errors import first_line
from .backend import Backend, make_backend
from .gradients import MetaGradient, make_meta_gradient
from .gradients.base import map_tasks
from .inner import InnerProblem, InnerState, inner_loop
from .learners import select_adapted
from .learners.select import AdaptSpec, frozen_names
from .rules import UpdateRule, make_rule
from .schedule import Schedule
from .tasks import TaskBatch

LossFn = Callable[[Tensor, Tensor], Tensor]


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
        backend: how a stacked meta-batch is evaluated (:func:`metagrad.backend.make_backend`):
            ``"auto"`` (default: the fastest that applies), ``"generic"``, ``"mlp"`` or
            ``"mlp-analytic"``; the one picked is ``learner.backend`` (``.name``).
        allow_nograd: learn2learn's flag for the object API (:meth:`clone`): whether
            ``TaskModel.adapt`` accepts a model with frozen parameters (``requires_grad=False``),
            leaving them unadapted; ``False`` (default, as learn2learn) raises ``ValueError`` naming
            them. Frozen parameters are never adapted (``adapt=`` leaves them out) nor meta-trained
            (:meth:`meta_step` gives them no ``.grad``) whatever this flag says.
        allow_unused: learn2learn's flag for the object API: whether ``TaskModel.adapt`` accepts
            adapted parameters the loss does not use (they get no update); otherwise it raises
            ``ValueError`` naming them. ``None`` (default): ``allow_nograd``, as learn2learn.

    Frozen parameters stay in :meth:`meta_parameters` as constants (the model is evaluated with
    them); freeze before building the learner, since ``adapt=`` is resolved then.

    :attr:`problem` is the inner problem (:class:`~metagrad.InnerProblem`) that every method,
    :meth:`evaluate`, :meth:`adapt` and :meth:`clone` run. The learnable state of the rule is registered as parameters under ``rule_state``, so
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
        backend: str = "auto",
        allow_nograd: bool = False,
        allow_unused: bool | None = None,
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
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.backend: Backend = make_backend(model, loss_fn, backend)
        params = dict(model.named_parameters())
        init = self.rule.init({n: params[n].detach() for n in self.adapted_names})
        self.rule_state = _StateTree(init)
        self.meta_gradient.check(self.problem)

    @property
    def problem(self) -> InnerProblem:
        """The inner problem (:class:`~metagrad.InnerProblem`): the model, loss, adapted names, rule,
        schedule and backend. Built once, and again if one of them is replaced (e.g. a new schedule)."""
        parts = (self.model, self.loss_fn, self.adapted_names, self.rule, self.schedule, self.backend)
        key = tuple(id(p) for p in parts)
        cached = self.__dict__.get("_problem")
        if cached is None or cached[0] != key:
            cached = (key, InnerProblem(*parts))
            self.__dict__["_problem"] = cached
        return cached[1]

    # ------------------------------------------------------------------ parameters
    def meta_parameters(self) -> dict[str, dict[str, Tensor]]:
        """The meta-parameters as a nested dict ``{"model": {...}, "rule": {...}}`` (live tensors)."""
        return {
            "model": dict(self.model.named_parameters()),
            "rule": dict(self.rule_state.named_parameters()),
        }

    def _detached_meta_parameters(self):
        return {g: {k: v.detach() for k, v in d.items()} for g, d in self.meta_parameters().items()}

    def forward(self, *args, **kwargs):
        """``learner(x)`` is ``model(x)`` with the meta-parameters (any signature), as learn2learn's ``MAML``."""
        return self.model(*args, **kwargs)

    def functional_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``model(x)`` evaluated with ``params`` (any subset; the rest come from the model)."""
        return self.problem.forward(params, x)

    # ------------------------------------------------------------------ public API
    def adapt(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to one task's support set; returns the full adapted parameter dict.

        Differentiable with respect to the meta-parameters (second order). ``steps`` defaults
        to the schedule's test steps.
        """
        self.problem.check_functional()
        batch = self._checked(TaskBatch(support_x[None], support_y[None], support_x[None], support_y[None]))
        steps = _check_steps(self.schedule.eval_steps if steps is None else steps)
        result = inner_loop(self.problem, self.meta_parameters(), batch.support_x[0], batch.support_y[0], steps=steps,
                            training=False)
        _check_finite(result.losses[None], "inner")
        return {**dict(self.model.named_buffers()), **result.params()}

    def meta_gradient_of(self, batch: TaskBatch, *, vectorize: bool | None = None, group=distributed.AUTO):
        """The meta-gradient averaged over the tasks of ``batch``.

        Returns ``(grads, stats)``: ``grads`` mirrors :meth:`meta_parameters`; ``stats`` holds
        ``meta_objective`` (scalar), ``query_loss`` ``[tasks]`` and ``inner_loss``
        ``[tasks, steps]``. Raises ``ValueError`` naming the step and task of a non-finite inner
        loss.

        ``group``: a ``torch.distributed`` process group (default: the default group when
        ``torchrun`` started this process and it is initialized, see :mod:`metagrad.distributed`;
        ``None``: this process alone). With two or more processes, ``batch`` is this rank's share
        of the meta-batch (e.g. :func:`metagrad.distributed.shard`) and everything returned is
        global: the gradients and ``meta_objective`` are averaged over every rank's tasks
        (``all_reduce``, weighted by each rank's task count), and ``query_loss`` / ``inner_loss``
        hold every rank's tasks in rank order, so they equal the values of one process given the
        whole meta-batch, up to the order of floating-point sums. Every rank of the group must
        call it.
        """
        vectorize = self.vectorize if vectorize is None else vectorize
        self.problem.check_functional()
        meta_params = self._detached_meta_parameters()

        def compute():
            tasks = self._checked(batch)
            grads, objective, aux = self.meta_gradient.gradient(self.problem, meta_params, tasks, vectorize)
            return tasks.num_tasks, (grads, objective.detach()), aux

        (grads, objective), aux = distributed.task_mean(compute, distributed.resolve(group))
        _check_finite(aux["inner_loss"], "inner")
        bad = ~torch.isfinite(aux["query_loss"])
        if bad.any():
            task = int(bad.nonzero()[0])
            raise DivergedError(f"non-finite query loss {aux['query_loss'][task].item()} after adaptation of task "
                                f"{task}")
        return grads, {"meta_objective": objective, **aux}

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer, *, vectorize: bool | None = None,
                  group=distributed.AUTO):
        """One outer update: set ``.grad`` of every meta-parameter from :meth:`meta_gradient_of`
        and call ``optimizer.step()``. Returns the stats of :meth:`meta_gradient_of`.

        With a process group of two or more (``group``, as for :meth:`meta_gradient_of`), ``batch``
        is this rank's share of the meta-batch; every rank sets the same averaged gradient and
        steps its own copy of the same optimizer, so the meta-parameters stay equal on all ranks
        (they must start equal: :func:`metagrad.train.fit` sends rank 0's to the others).
        """
        grads, stats = self.meta_gradient_of(batch, vectorize=vectorize, group=group)
        live = self.meta_parameters()
        for group_name, tensors in live.items():
            for name, p in tensors.items():
                if p.requires_grad:  # a frozen parameter gets no .grad, so the optimizer leaves it
                    p.grad = grads[group_name][name].detach().clone()
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
        batch = self._checked(batch)
        steps = _check_steps(self.schedule.eval_steps if steps is None else steps)
        vectorize = self.vectorize if vectorize is None else vectorize

        problem = self.problem
        problem.check_functional()

        def task_eval(meta_params, sx, sy, qx, qy):
            result = inner_loop(problem, meta_params, sx, sy, steps=steps, first_order=True, keep_trajectory=True,
                                training=False)
            preds = [problem.forward(result.params(k), qx) for k in range(len(result.trajectory))]
            out = {"loss": torch.stack([self.loss_fn(p, qy) for p in preds]), "inner_loss": result.losses[:1]}
            if self.metric_fn is not None:
                out["metric"] = torch.stack([self.metric_fn(p, qy) for p in preds])
            return out

        out = map_tasks(task_eval, self._detached_meta_parameters(), batch, vectorize)
        _check_finite(out.pop("inner_loss"), "inner")
        return out

    def _checked(self, batch) -> TaskBatch:
        """``batch`` as a validated :class:`TaskBatch` that fits the model: raises ``ValueError``
        naming the tensor, its shape and dtype and what the model expects (instead of a torch error
        deep inside ``vmap``). Checked once per batch signature (shapes, dtypes, devices)."""
        batch = _as_batch(batch)
        key = (tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in batch),
               tuple((p.dtype, p.device) for p in self.model.parameters()))
        seen = self.__dict__.setdefault("_fits", set())
        if key not in seen:
            _check_fits(self, batch)
            seen.add(key)
        return batch

    def clone(self, *, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "TaskModel":
        """A learn2learn-style task copy whose parameters stay connected to the meta-parameters.

        ``task = learner.clone(); task.adapt(loss_fn(task(sx), sy)); loss_fn(task(qx), qy).backward()``
        accumulates the meta-gradient (second order, or first order when the learner's
        meta-gradient is first-order) into ``.grad`` of this learner's parameters.

        ``first_order``, ``allow_unused``, ``allow_nograd``: the copy's defaults for
        :meth:`TaskModel.adapt` (learn2learn's ``MAML.clone`` flags); ``None`` takes the learner's
        (``first_order``: whether its meta-gradient is first-order).
        """
        return TaskModel(self, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd)


class _MethodCall(nn.Module):
    """Runs a method of ``m`` by name, so ``functional_call`` can swap parameters in for any method."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, name: str, *args, **kwargs):
        return getattr(self.m, name)(*args, **kwargs)


def _task_attr(task: "TaskModel", module: nn.Module, prefix: str, name: str):
    """Attribute ``name`` of ``module`` (the submodule at ``prefix`` of the task's model) as seen
    from ``task``: a method runs with the task's current tensors, a child module is a
    :class:`_SubmoduleView`, anything else is the module's own."""
    try:
        attr = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"neither TaskModel nor its {type(module).__name__} has an attribute {name!r}") from None
    if isinstance(attr, nn.Module) and module._modules.get(name) is attr:
        return _SubmoduleView(task, attr, f"{prefix}{name}.")
    if not (inspect.ismethod(attr) and attr.__self__ is module):
        return attr

    def method(*args, **kwargs):
        tensors = {f"m.{k[len(prefix):]}": v for k, v in task.params.items() if k.startswith(prefix)}
        with task._in_mode():
            return functional_call(_MethodCall(module), tensors, (name, *args), kwargs)

    method.__name__ = name
    method.__doc__ = attr.__doc__
    return method


class _SubmoduleView:
    """A child module of a :class:`TaskModel`'s model, called (and its methods run) with the task's
    current tensors: ``task.features(x)`` is the adapted feature extractor."""

    def __init__(self, task: "TaskModel", module: nn.Module, prefix: str):
        self._task, self._module, self._prefix = task, module, prefix

    def __call__(self, *args, **kwargs):
        task, prefix = self._task, self._prefix
        tensors = {k[len(prefix):]: v for k, v in task.params.items() if k.startswith(prefix)}
        with task._in_mode():
            return functional_call(self._module, tensors, args, kwargs)  # the module's hooks run too

    def __getattr__(self, name: str):
        if name.startswith("__") or "_module" not in self.__dict__:
            raise AttributeError(name)
        return _task_attr(self._task, self._module, self._prefix, name)

    def __repr__(self) -> str:
        return f"<TaskModel view of {self._prefix[:-1]!r}: {self._module!r}>"


class TaskModel:
    """A task-specific copy made by :meth:`MetaLearner.clone` (learn2learn-shaped object API).

    Each :meth:`adapt` takes the gradient of the given loss with autograd and makes the step with
    :meth:`InnerProblem.update`, the engine's step.

    It behaves like the wrapped module with the copy's current parameters: ``task(*args, **kwargs)``
    calls the model with any signature; any other method of the model is forwarded and runs with
    them too (``task.log_prob(x)``), a child module runs with them (``task.features(x)``), other
    attributes are the model's own;
    :meth:`parameters` / :meth:`named_parameters` give the current parameters (no buffers);
    :meth:`train` / :meth:`eval` set the mode used for this copy's calls only; :meth:`clone`
    copies an adapted copy, still differentiable to the meta-parameters.
    """

    def __init__(self, learner: MetaLearner, *, first_order: bool | None = None, allow_unused: bool | None = None,
                 allow_nograd: bool | None = None):
        self._learner = learner
        self._problem = learner.problem
        meta_params = learner.meta_parameters()
        self.params = dict(meta_params["model"])
        self.params.update(learner.model.named_buffers())
        self.state = meta_params["rule"]
        self._inner: dict[int | None, dict] = {}  # the rule's inner state per phase (None: the main steps)
        self.steps_taken = 0
        self.first_order = learner.meta_gradient.first_order if first_order is None else bool(first_order)
        self.allow_unused = learner.allow_unused if allow_unused is None else bool(allow_unused)
        self.allow_nograd = learner.allow_nograd if allow_nograd is None else bool(allow_nograd)
        self._mode: bool | None = None  # None: the model's own mode

    # ------------------------------------------------------------------ module-like
    @contextmanager
    def _in_mode(self):
        model = self._problem.model
        modes = [(m, m.training) for m in model.modules()] if self._mode is not None else []
        if all(t == self._mode for _, t in modes):
            yield
            return
        model.train(self._mode)
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t

    def __call__(self, *args, **kwargs):
        with self._in_mode():
            return functional_call(self._problem.model, self.params, args, kwargs)

    def __getattr__(self, name: str):
        # only reached for names this object lacks: forward to the wrapped model
        learner = self.__dict__.get("_learner")
        if learner is None or name.startswith("__"):
            raise AttributeError(name)
        return _task_attr(self, learner.model, "", name)

    @property
    def training(self) -> bool:
        return self._problem.model.training if self._mode is None else self._mode

    def train(self, mode: bool = True) -> "TaskModel":
        """The mode of this copy's calls (the learner's model keeps its own)."""
        self._mode = bool(mode)
        return self

    def eval(self) -> "TaskModel":
        return self.train(False)

    def named_parameters(self):
        """``(name, tensor)`` of the model's parameters as this copy holds them now (no buffers)."""
        for n, _ in self._problem.model.named_parameters():
            yield n, self.params[n]

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def clone(self, *, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "TaskModel":
        """A copy of this (possibly adapted) copy: later steps of either do not change the other, and
        both stay differentiable to the meta-parameters through the steps taken so far. The flags
        default to this copy's."""
        new = TaskModel.__new__(TaskModel)
        new.__dict__.update(self.__dict__)
        new.params = dict(self.params)
        new.state = dict(self.state)
        new._inner = {k: dict(v) for k, v in self._inner.items()}
        if first_order is not None:
            new.first_order = bool(first_order)
        if allow_unused is not None:
            new.allow_unused = bool(allow_unused)
        if allow_nograd is not None:
            new.allow_nograd = bool(allow_nograd)
        return new

    # ------------------------------------------------------------------ the step
    def adapt(self, loss: Tensor, *, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None, phase: int | None = None) -> "TaskModel":
        """One inner step on ``loss`` (in place on this copy).

        Without ``phase``: a step of the learner's update rule on its adapted parameters. With
        ``phase=i``: a step of the schedule's i-th :class:`~metagrad.Phase` on the tensors it
        matches (plain SGD at the phase's lr, or the update rule when it has none); e.g. for
        Wormhole, ``c_steps`` calls with ``phase=0`` and then ``train_steps`` plain calls are
        Algorithm 1, with the same meta-gradient as the functional engine.

        ``first_order``, ``allow_unused``, ``allow_nograd`` (learn2learn's meaning; ``None``: this
        copy's): treat the step's gradient as a constant (first-order meta-gradient); accept
        adapted parameters the loss does not use (left unchanged; else ``ValueError`` naming them);
        accept a model with frozen parameters (left unchanged; else ``ValueError`` naming them).
        """
        problem = self._problem
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"non-finite inner loss {loss.item()} at step {self.steps_taken}")
        frozen = frozen_names(problem.model)
        if frozen and not allow_nograd:
            raise ValueError(f"the model has frozen parameters (requires_grad=False): {', '.join(frozen)}; as "
                             f"learn2learn's allow_nograd=False, adapt() refuses them: pass allow_nograd=True "
                             f"(to MetaLearner, clone() or adapt()) to adapt the others and leave these unchanged")
        if phase is None:
            names, rule = problem.adapted_names, problem.rule
        else:
            phases = problem.schedule.phases
            if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < len(phases):
                raise ValueError(f"phase must be an index into the schedule's {len(phases)} phase(s), got {phase!r}")
            names, rule = problem.phase_names[phase], problem.phase_rules[phase]
            for n in names:  # a buffer (task state, e.g. Wormhole's C) enters the graph as a fresh leaf
                if not self.params[n].requires_grad and n not in frozen:
                    self.params[n] = self.params[n].detach().clone().requires_grad_()
        current = {n: self.params[n] for n in names}
        live = [n for n in names if n not in frozen]  # frozen after the learner was built: left unchanged
        if phase not in self._inner:
            self._inner[phase] = rule.init_inner(current)
        keys = list(self.state) if rule.adapts_state else []
        # Algorithm 1 (rules that adapt their state): the state xi_t reaches the loss only through the
        # last step, which this copy recorded, so d loss / d xi_t is autograd's (None, i.e. zero, before
        # any step); retain_graph: that path runs through the last step, which the query loss still needs
        inputs = [current[n] for n in live] + [self.state[k] for k in keys]
        wanted = [i for i, t in enumerate(inputs) if i < len(live) or t.requires_grad]
        found = torch.autograd.grad(loss, [inputs[i] for i in wanted], create_graph=not first_order,
                                    retain_graph=True if rule.adapts_state else None, allow_unused=True)
        full: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, found):
            full[i] = g
        unused = [n for n, g in zip(live, full) if g is None]
        if unused and not allow_unused:
            raise ValueError(f"the loss does not use adapted parameter(s) {', '.join(unused)} (no gradient); pass "
                             f"allow_unused=True (to MetaLearner, clone() or adapt(), as in learn2learn) to leave "
                             f"them unchanged")
        full = [torch.zeros_like(t) if g is None else (g.detach() if first_order else g) for g, t in zip(full, inputs)]
        grads = {n: torch.zeros_like(t) for n, t in current.items()}
        grads.update(zip(live, full[: len(live)]))
        state_grads = dict(zip(keys, full[len(live):])) if rule.adapts_state else None
        s = InnerState(current, {}, self.state, self._inner[phase])
        s = problem.update(s, grads, state_grads=state_grads, rule=rule)
        self.params.update(s.adapted)
        for n in names:
            if n not in live or n in unused:  # no gradient: no step (learn2learn's None gradient)
                self.params[n] = current[n]
        self._inner[phase] = s.inner
        if phase is None:
            self.state = s.rule
        else:
            # the next steps take partial gradients (the engine's): the other tensors get fresh autograd
            # nodes, so a gradient for them does not also count their path through this phase's result
            for n, p in self.params.items():
                if n not in names and p.requires_grad:
                    self.params[n] = p.view_as(p)
        self.steps_taken += 1
        return self


def _as_batch(batch) -> TaskBatch:
    if not isinstance(batch, TaskBatch):
        if isinstance(batch, (tuple, list)) and len(batch) == 4:
            batch = TaskBatch(*batch)
        else:
            raise TypeError(f"expected a TaskBatch (support_x, support_y, query_x, query_y), got {type(batch).__name__}")
    return batch.validate()


def _check_steps(steps) -> int:
    """``steps`` if it is a non-negative integer, else ``ValueError`` naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return steps


def _first_layer(model: nn.Module) -> str:
    """What the model's first layer with a weight takes, in words (for error messages)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f"its first layer {name!r} takes {m.in_features} input features (inputs [..., {m.in_features}])"
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"its first layer {name!r} takes {m.in_channels} input channels"
    return f"the model is {type(model).__name__}"


def _describe(name: str, t: Tensor) -> str:
    return f"{name} of shape {list(t.shape)} ({t.dtype}, {t.device})"


def _check_fits(learner: "MetaLearner", batch: TaskBatch) -> None:
    """Raise ``ValueError`` where ``batch`` does not fit ``learner``'s model: a tensor on another
    device, or floating point of another dtype, than the parameters; inputs the model cannot take;
    targets the loss cannot use (integers shaped like a floating-point output, or shapes that would
    broadcast to something larger than both)."""
    params = list(learner.model.parameters())
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    for name, t in zip(batch._fields, batch):
        if t.device != device:
            raise ValueError(f"{_describe(name, t)} is not on the model's device {device}; move the batch "
                             f"(batch.to({str(device)!r})) or the learner")
        if t.is_floating_point() and t.dtype != dtype:
            raise ValueError(f"{_describe(name, t)} does not match the model's {dtype} parameters; convert the "
                             f"batch (TaskBatch(*(t.to({dtype}) for t in batch))) or the learner (learner.to({dtype}))")
    for xname, yname, x, y in (("support_x", "support_y", batch.support_x, batch.support_y),
                               ("query_x", "query_y", batch.query_x, batch.query_y)):
        try:
            with torch.no_grad():
                pred = learner.problem.forward({}, x[0])
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"{_describe(xname, x)} does not fit the model: {_first_layer(learner.model)} "
                             f"(torch: {first_line(err)})") from None
        if not isinstance(pred, Tensor):
            return
        if pred.is_floating_point() and not (y.is_floating_point() or y.is_complex()) and y[0].shape == pred.shape:
            raise ValueError(f"{_describe(yname, y)} holds integers but the model's output per task is "
                             f"{list(pred.shape)} {pred.dtype}: regression targets must be floating point "
                             f"(convert with .to({pred.dtype})); class labels have no output dimension")
        if y.is_floating_point():
            try:
                shape = torch.broadcast_shapes(pred.shape, y[0].shape)
            except RuntimeError:
                shape = None
            if shape is None or (shape != pred.shape and shape != y[0].shape):
                raise ValueError(f"{_describe(yname, y)} does not match the model's output per task "
                                 f"{list(pred.shape)}: each task's targets should have shape {list(pred.shape)}"
                                 + ("" if shape is None else f" (they would broadcast to {list(shape)})"))
        try:
            with torch.no_grad():
                learner.loss_fn(pred, y[0])
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"{_describe(yname, y)} does not fit the loss on the model's output "
                             f"{list(pred.shape)} {pred.dtype} (torch: {first_line(err)})") from None


class DivergedError(ValueError):
    """Meta-training met a non-finite inner or query loss (e.g. an inner learning rate too large):
    the outcome of these settings, where other ``ValueError`` s are bad input. A sweep records
    such a trial as diverged and goes on."""


def _check_finite(losses: Tensor, which: str) -> None:
    """Raise :class:`DivergedError` naming the first (task, step) whose loss is not finite."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        task, step = (int(i) for i in bad.nonzero()[0])
        raise DivergedError(
            f"non-finite {which} loss {losses[task, step].item()} at step {step} of task {task} "
            f"(try a smaller inner learning rate)"
        )
