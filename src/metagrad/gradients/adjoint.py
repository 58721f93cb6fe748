"""A-MAML (adjoint-maml.txt): the inner loop as gradient flow, the meta-gradient from its adjoint ODE.

:class:`Adjoint` solves the flow forward with a scheme of :data:`FORWARD_SCHEMES` (``"ode"``,
``"euler"``) and the adjoint backward with one of :data:`BACKWARD_SCHEMES` (``"heun"``,
``"heun-pec"``, ``"discrete"``), as torchdiffeq keeps its solvers by name. Both act on the whole
stacked meta-batch through a :class:`_Stack` built once per solve (the problem's backend, the
per-task grid steps, the task ids); ``Adjoint._solve`` holds the checkpointing (segments), the loop
over the grid and the translation of failures into :class:`AdjointSolverError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..backend import bcast as _bcast
from ..backend import stack
from .base import MetaGradient, check_segments, zero_rule_grads
from .base import segment_bounds as _segment_bounds

_tree_map = torch.utils._pytree.tree_map


class AdjointSolverError(RuntimeError):
    """The forward gradient flow (or the backward adjoint) of one task failed: non-finite values,
    step-size underflow or too many solver steps. The message names the task and the time reached."""

    def __init__(self, message: str, *, task: int, time: float):
        super().__init__(message)
        self.task = task
        self.time = time


class _Failure(Exception):
    def __init__(self, task: int, time: float, what: str):
        self.task, self.time, self.what = task, time, what


class _SolverAssert(Exception):
    def __init__(self, message: str, time: float):
        self.message, self.time = message, time


class Adjoint(MetaGradient):
    """A-MAML: the meta-gradient of gradient flow by the adjoint method (Algorithm 2, eqs 9-11).

    Per task, the adapted parameters follow the gradient flow of the support loss,

        du/dt = -grad_u L_tr(u, phi),   u(0) = theta,   0 <= t <= T,

    solved forward by torchdiffeq (``solver``, adaptive ``dopri5`` by default, tolerances
    ``rtol`` / ``atol``) and recorded on the grid ``t_j = j T / K``, ``K = round(T / h)`` (so the
    grid step is ``h`` when ``T`` is a multiple of it, as ``torch.arange(0, T + h/2, h)``).
    The adjoint ``dlambda/dt = H(u) lambda``, ``lambda(T) = grad_u L_val(u(T))``, with ``H`` the
    support-loss Hessian, is then solved backward over the recorded states by modified Euler
    (Heun; global error ``O(h^2)``) with Hessian-vector products, the reverse-mode derivative
    of the gradient (``H`` is never formed). The meta-gradient of ``theta`` is ``lambda(0)``.
    The gradients and Hessian-vector products use plain autograd through a ``vmap`` over tasks of
    the support loss (one graph per grid state, pulled back once or twice); on the 2x32 MLP this
    costs about 30% less than ``vmap`` of ``torch.func`` transforms. For a plain MLP (an
    ``nn.Sequential`` of ``nn.Linear`` and elementwise activations) the stacked support loss runs
    as batched matrix products over the tasks instead of a ``vmap`` of ``functional_call``: the
    same function, with less per-operator overhead. Where that MLP's activations are tanh,
    sigmoid, (leaky) ReLU or identity and the loss a mean square, the gradients and products are
    the hand-written backward pass and its R-operator (:mod:`metagrad.backend`, "mlp-analytic") with
    no autograd graph at all, equal to autograd's to rounding and about twice as fast.

    Parameters that do not adapt (``phi``: the ANIL body, ``adapt="head"``) get
    ``dJ/dphi = d_phi L_val(u(T)) - int_0^T (d_phi grad_u L_tr(u))^T lambda dt``, the mixed
    second derivative as a vjp, integrated by the trapezoid rule on the grid (``O(h^2)`` too).

    ``backward="heun-pec"`` runs Heun in PEC mode: a step evaluates ``H(u_j)`` at the predicted
    ``lambda~_j`` only and the next step's predictor reuses that product instead of evaluating
    ``H(u_j) lambda_j`` at the corrected value (PECE, the paper's), which costs a second product.
    The difference ``H(u_j)(lambda_j - lambda~_j)`` is ``O(h^2)``, so the global error stays
    ``O(h^2)``: on the ``amaml-regression`` MLP (T = 2, h = 0.01) the relative error against a
    float64 reference is 8.8e-5 against 6.8e-5 for PECE. At T = 5 (K = 500, 100 shots, one CPU
    thread, with the hand-written MLP derivatives) the meta-gradient took 0.69-0.76 s against
    0.88-0.95 s for PECE, where unrolled MAML over the same 500 SGD steps took 1.05-1.18 s
    (``benchmarks/README.md``, a loaded machine).

    ``forward="euler"`` replaces the ODE solver by ``K`` explicit Euler steps
    ``u_{k+1} = u_k - h grad L_tr(u_k)``, i.e. MAML's inner loop with SGD at rate ``h``.
    ``backward="discrete"`` uses the exact adjoint of those steps,
    ``lambda_k = (I - h H(u_k)) lambda_{k+1}`` (and ``-h (d_phi grad_u L_tr(u_k))^T lambda_{k+1}``
    for ``phi``): with both, the result equals :class:`~metagrad.gradients.Unrolled` with
    ``SGD(h)`` and ``K`` steps to float precision, in ``O(K)`` recorded states and no graph.

    Conventions:

    * The learner's rule must be plain :class:`~metagrad.rules.SGD` (not learnable): gradient flow
      has no update rule, so the rule's rate is ignored (``h`` and ``T`` set the inner loop);
      any other rule raises ``ValueError`` naming it. ``learner.schedule.train_steps`` is ignored
      (``K`` comes from ``T / h``); ``Schedule(per_step_loss=True)`` raises ``ValueError``.
    * Per-task horizons (early stopping): ``T`` may be a tensor ``[tasks]`` or a callable
      ``T(batch) -> float | Tensor[tasks]``. A stacked meta-batch then shares
      ``K = round(max(T) / h)`` steps and task ``i`` uses the finer grid step ``T_i / K``
      (its ODE is solved in the rescaled time ``t T_i / max(T)``), also with ``vectorize=False``
      so that both modes use the same grids.
    * ``vectorize=True`` integrates the whole meta-batch as ONE stacked ODE state (torchdiffeq's
      solvers do not run under ``vmap``) whose right-hand side is ``vmap`` over tasks; the
      adaptive step size is then shared, so stacked and per-task (``vectorize=False``) results
      agree to the solver tolerance (exactly with ``forward="euler"``).
    * A phased schedule (e.g. Wormhole's C steps) runs first, differentiably, per task; the flow
      starts from its result with the phase-only tensors (C) held fixed, and their adjoint
      gradient is pulled back through the phases (:meth:`MetaGradient.gradient`). The phase
      steps' support losses then lead ``aux["inner_loss"]``.
    * ``aux["inner_loss"]`` is ``[tasks, K]``: the support loss at the grid states
      ``t_0 .. t_{K-1}`` (the analogue of "before each step").
    * Failure of the forward solve (non-finite state or gradient, step-size underflow, more than
      ``max_steps`` solver steps) or a non-finite adjoint raises :class:`AdjointSolverError`
      naming the task and the time reached.
    * Memory: the forward solve keeps the states at the ``segments + 1`` segment boundaries only;
      the backward pass re-solves the forward flow over one segment at a time from its first
      state (the grid states of that segment, then the adjoint steps through them), so with
      ``segments = round(sqrt(K))`` at most ``O(sqrt K)`` parameter-sized states per task are
      alive, for one extra forward solve. ``segments=1`` records all ``K + 1`` grid states in
      one solve (the paper's ``O(T/h d)``, no recomputation). The default (``segments=None``)
      records all of them when they fit in ``record_mb`` MiB (the adapted parameters of the
      whole meta-batch, ``K + 1`` times) and uses ``round(sqrt(K))`` segments otherwise: small
      models skip the recomputation (about a third of the time of a 2x32 MLP meta-gradient),
      large ones keep memory flat in ``K``. With ``forward="euler"`` the recomputed states are
      bitwise the first ones; with an adaptive solver they agree to its tolerance.

    Args:
        T: horizon of the gradient flow (float > 0, tensor ``[tasks]`` or callable, see above).
        h: step of the recorded grid (and of the Euler / Heun steps).
        solver: a torchdiffeq method name for ``forward="ode"`` (``"dopri5"``, ``"rk4"``, ...).
        rtol, atol: tolerances of an adaptive solver. ``None`` (default) picks them by the
            parameters' dtype (:data:`DEFAULT_TOLERANCES`): torchdiffeq's 1e-7 / 1e-9 for float64,
            1e-5 / 1e-7 for float32 and below, whose rounding (eps 1.2e-7) sits at 1e-7, so a
            tighter control only chases rounding noise. On the ``amaml-regression`` MLP (5 tasks,
            T = 2, h = 0.01, float32) 1e-5 / 1e-7 takes 128 right-hand sides per solve against
            290 and the meta-gradient 0.51 s against 0.71 s, while its relative error against a
            float64 reference (h = 0.0025, rtol 1e-12) stays 6.5e-5, the Heun backward's own
            ``O(h^2)`` error. On ReLU / max-pool nets (a piecewise smooth flow) dopri5 still takes
            many small steps at these: use 1e-4 / 1e-6 or looser there
            (``benchmarks/long_horizon.py`` gives timings).
        forward: ``"ode"`` (torchdiffeq) or ``"euler"`` (fixed steps of ``h``): a name in
            :data:`FORWARD_SCHEMES` (:class:`OdeForward`, :class:`EulerForward`).
        backward: ``"heun"`` (modified Euler, the paper's), ``"heun-pec"`` (the same predictor and
            corrector with one Hessian-vector product per step, see above) or ``"discrete"``
            (exact adjoint of Euler): a name in :data:`BACKWARD_SCHEMES` (:class:`Heun`,
            :class:`HeunPEC`, :class:`DiscreteAdjoint`).
        segments: number of recomputed segments of the grid (``1``: record every grid state, no
            recomputation; ``None``: ``1`` if the states fit in ``record_mb``, else ``round(sqrt(K))``).
        record_mb: memory (MiB) that ``segments=None`` may spend on recording every grid state.
        max_steps: cap on the adaptive solver's steps per solve (``options["max_num_steps"]``).
        options: extra torchdiffeq ``options`` passed to ``odeint``.
    """

    first_order = False
    phases = "wrapped"
    per_task = False

    def __init__(self, T: float | Tensor | Callable = 1.0, h: float = 0.01, *, solver: str = "dopri5",
                 rtol: float | None = None, atol: float | None = None, forward: str = "ode", backward: str = "heun",
                 segments: int | None = None, record_mb: float = 64.0, max_steps: int = 100_000,
                 options: dict | None = None):
        if callable(T):
            self.T = T
        else:
            self.T = self._check_T(T)
        self.h = _positive(h, "h")
        self.rtol = None if rtol is None else _positive(rtol, "rtol")
        self.atol = None if atol is None else _positive(atol, "atol")
        if forward not in FORWARD_SCHEMES:
            raise ValueError(f"forward must be one of {tuple(FORWARD_SCHEMES)}, got {forward!r}")
        if backward not in BACKWARD_SCHEMES:
            raise ValueError(f"backward must be one of {tuple(BACKWARD_SCHEMES)}, got {backward!r}")
        self.forward, self.backward = forward, backward
        self.solver = solver
        FORWARD_SCHEMES[forward].check(self)  # "ode": a torchdiffeq solver name
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.max_steps = max_steps
        self.segments = check_segments(segments)
        if isinstance(record_mb, bool) or not isinstance(record_mb, (int, float)) or not 0 <= record_mb < math.inf:
            raise ValueError(f"record_mb must be a finite number >= 0, got {record_mb!r}")
        self.record_mb = float(record_mb)
        self.options = dict(options or {})

    def __repr__(self) -> str:
        return (f"Adjoint(T={self.T!r}, h={self.h!r}, solver={self.solver!r}, rtol={self.rtol!r}, "
                f"atol={self.atol!r}, forward={self.forward!r}, backward={self.backward!r}, "
                f"segments={self.segments!r}, record_mb={self.record_mb!r})")

    @staticmethod
    def _check_T(T):
        if isinstance(T, Tensor):
            if T.dim() > 1 or not torch.isfinite(T).all() or not (T > 0).all():
                raise ValueError(f"T must be positive and finite (a number or a tensor [tasks]), got {T!r}")
            return T.detach()
        return _positive(T, "T")

    def horizons(self, batch, dtype=torch.float64) -> Tensor:
        """The horizon of every task of ``batch`` as a tensor ``[tasks]``."""
        T = self._check_T(self.T(batch)) if callable(self.T) else self.T
        n = batch.num_tasks
        if isinstance(T, Tensor):
            T = T.to(dtype=dtype, device="cpu")
            if T.dim() == 0:
                T = T.expand(n)
            if T.shape != (n,):
                raise ValueError(f"T must hold one horizon per task ({n}), got shape {tuple(T.shape)}")
            return T.clone()
        return torch.full((n,), T, dtype=dtype)

    # ------------------------------------------------------------------ engine hook
    def _require(self, problem) -> None:
        """Raise ``ValueError`` for what this method cannot run (checked at every meta-gradient)."""
        if problem.rule.gradient_descent_rate is None:
            raise ValueError(f"Adjoint integrates plain gradient flow and needs a plain gradient-descent rule "
                             f"(SGD, not learnable); got {problem.rule!r}")
        if problem.schedule.per_step_loss:
            raise ValueError("Adjoint does not support Schedule(per_step_loss=True)")

    def batch_gradient(self, problem, meta_params, batch, vectorize: bool):
        self._require(problem)
        T = self.horizons(batch)
        K = max(1, round(float(T.max()) / self.h))
        if vectorize:
            grads, objective, aux = self._solve(problem, meta_params, batch, T, K, list(range(batch.num_tasks)))
        else:
            outs = []
            for i in range(batch.num_tasks):
                outs.append(self._solve(problem, meta_params, _task(batch, i), T[i:i + 1], K, [i]))
            n = batch.num_tasks
            grads = _tree_map(lambda *gs: sum(gs) / n, *(o[0] for o in outs))
            objective = sum(o[1] for o in outs) / n
            aux = {k: torch.cat([o[2][k] for o in outs]) for k in ("query_loss", "inner_loss")}
        return grads, objective, aux

    # ------------------------------------------------------------------ one stacked solve
    def _segment_count(self, K: int, u0: dict) -> int | None:
        """``segments``, or for ``None``: ``1`` if the ``K + 1`` stacked states fit in ``record_mb``, else ``None``
        (``round(sqrt(K))`` segments)."""
        if self.segments is not None:
            return self.segments
        state_bytes = sum(v.numel() * v.element_size() for v in u0.values())
        return 1 if (K + 1) * state_bytes <= self.record_mb * 2**20 else None

    def _solve(self, problem, meta_params, batch, T: Tensor, K: int, task_ids: list[int]):
        ctx = _Stack.build(problem, meta_params, batch, T, K, task_ids)
        forward = FORWARD_SCHEMES[self.forward](self)
        u0 = ctx.initial_state()
        bounds = _segment_bounds(K, self._segment_count(K, u0))
        try:
            # -------- forward: gradient flow; keep the states at the segment boundaries only
            marks = [lo for lo, _ in bounds] + [K]
            checkpoints = forward.integrate(ctx, u0, 0, marks) if len(bounds) > 1 else None

            # -------- the query loss at u(T) and lambda(T)
            segment_states = None
            if checkpoints is None:  # one segment: the forward solve records every grid state
                segment_states = forward.integrate(ctx, u0, 0, list(range(K + 1)))
                final = segment_states[K]
            else:
                final = checkpoints[K]
            (lam, g_phi), query = ctx.query_grad(final, batch[2], batch[3])

            # -------- backward: the adjoint over the states, one recomputed segment at a time
            # one preallocated buffer: K small tensors kept alive through the backward pass would
            # pin the heap between the large temporaries and keep it from shrinking (peak RSS)
            inner = ctx.ref.new_empty(ctx.n_tasks, K)
            backward = BACKWARD_SCHEMES[self.backward](ctx)
            backward.start(final, lam)
            for lo, hi in reversed(bounds):
                if checkpoints is not None:
                    segment_states = forward.integrate(ctx, checkpoints[lo], lo, list(range(lo, hi + 1)))
                    segment_states[hi] = checkpoints[hi]  # continuity with the later segment
                for j in range(hi - 1, lo - 1, -1):
                    u_j = segment_states.pop(j)
                    lam, g_phi, inner[:, j] = backward.step(u_j, lam, g_phi)
                segment_states = None
        except _Failure as f:
            raise ctx.forward_error(f) from None
        except _SolverAssert as e:
            if ctx.n_tasks > 1:  # find a task that fails on its own
                for i in range(ctx.n_tasks):
                    self._solve(problem, meta_params, _task(batch, i), ctx.T[i:i + 1], K, [task_ids[i]])
            raise ctx.solver_error(e) from None
        ctx.check_meta_gradient(lam)

        per_task = {**lam, **g_phi}
        grads = {"model": {n: per_task[n].mean(0) for n in meta_params["model"]},
                 "rule": zero_rule_grads(meta_params)}
        aux = {"query_loss": query.detach(), "inner_loss": inner}
        return grads, query.mean().detach(), aux

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` of the forward solve for a state of ``dtype`` (``None`` -> by dtype)."""
        rtol, atol = DEFAULT_TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
        return (rtol if self.rtol is None else self.rtol), (atol if self.atol is None else self.atol)


# ---------------------------------------------------------------------------- the stacked meta-batch
@dataclass(eq=False)
class _Stack:
    """What the schemes of one stacked solve share, built once per solve: the meta-batch's tasks
    stacked on dim 0, the problem's backend, the per-task grid steps and the task ids (for errors)."""

    problem: object  # the InnerProblem (its ``loss`` for the query, its ``backend``)
    names: list[str]  # the adapted parameters (the ODE state)
    theta: dict  # their initial values (unstacked, detached)
    phi: dict  # the fixed parameters (unstacked, detached; empty when every parameter adapts)
    phi_tasks: dict  # ``phi`` stacked over tasks
    sx: Tensor
    sy: Tensor
    n_tasks: int
    ref: Tensor  # a parameter: dtype and device
    T: Tensor  # [tasks] horizons
    steps: Tensor  # [tasks] per-task grid step (h when T is a multiple of h)
    scale: Tensor  # [tasks] time rescaling of the stacked ODE (1 for a shared T)
    shared: bool  # one horizon: one grid step, no rescaling
    h_shared: float
    grid: Tensor  # [K + 1] the grid times (of the longest horizon)
    task_ids: list[int]

    @classmethod
    def build(cls, problem, meta_params, batch, T: Tensor, K: int, task_ids: list[int]) -> "_Stack":
        names = problem.adapted_names
        model_p = meta_params["model"]
        theta = {n: model_p[n].detach() for n in names}
        phi = {n: v.detach() for n, v in model_p.items() if n not in theta}
        sx, sy, _, _ = batch
        n_tasks = sx.shape[0]
        ref = next(iter(theta.values()))
        T = T.to(dtype=ref.dtype, device=ref.device)
        t_max = float(T.max())
        steps = T / K
        return cls(problem=problem, names=names, theta=theta, phi=phi, phi_tasks=stack(phi, n_tasks),
                   sx=sx, sy=sy, n_tasks=n_tasks, ref=ref, T=T, steps=steps, scale=T / t_max,
                   shared=bool((T == T[0]).all()), h_shared=float(steps[0]),
                   grid=torch.linspace(0.0, t_max, K + 1, dtype=ref.dtype, device=ref.device), task_ids=task_ids)

    # -------- arithmetic on parameter dicts
    def axpy(self, a: dict, b: dict, c: float) -> dict:
        """``a + c * step * b`` per task (one fused op per tensor list for a shared horizon)."""
        if self.shared:
            keys = list(a)
            return dict(zip(keys, torch._foreach_add([a[k] for k in keys], [b[k] for k in keys],
                                                     alpha=c * self.h_shared)))
        return {k: a[k] + c * _bcast(self.steps, a[k]) * b[k] for k in a}

    @staticmethod
    def plus(a: dict, b: dict) -> dict:
        keys = list(a)
        return dict(zip(keys, torch._foreach_add([a[k] for k in keys], [b[k] for k in keys])))

    # -------- the support loss and its derivatives at a stacked state ``u`` (the backend's)
    def initial_state(self) -> dict:
        return {n: self.theta[n].expand(self.n_tasks, *self.theta[n].shape).clone() for n in self.names}

    def grad(self, u: dict) -> dict:
        """The per-task support-loss gradients at ``u`` (no graph kept)."""
        return self.problem.backend.grad(u, self.phi_tasks, self.sx, self.sy)[1]

    def rhs(self, u: dict) -> dict:
        """The right-hand side of the stacked (rescaled) flow at ``u``."""
        g = self.grad(u)
        if self.shared:
            return dict(zip(self.names, torch._foreach_neg([g[n] for n in self.names])))
        return {n: -_bcast(self.scale, g[n]) * g[n] for n in self.names}

    def linearize(self, u: dict):
        """``(pull, losses)``: ``pull(v, last=False) -> (H v, (d_phi grad_u L)^T v)`` at ``u``."""
        return self.problem.backend.linearize(u, self.phi_tasks, self.sx, self.sy)

    def pull_once(self, u: dict, v: dict):
        """``(H v, (d_phi grad_u L)^T v, losses)`` at ``u``, one product."""
        pull, loss = self.linearize(u)
        hv, mv = pull(v, last=True)
        return hv, mv, loss

    def query_grad(self, u: dict, qx: Tensor, qy: Tensor):
        """``((grad_u, grad_phi), losses)`` of every task's query loss at ``u`` (the model's own buffers,
        those in ``phi`` replaced)."""
        return vmap(grad_and_value(self.problem.loss, argnums=(0, 1)), in_dims=(0, None, 0, 0))(u, self.phi, qx, qy)

    # -------- errors naming the task and the time
    def forward_error(self, f: _Failure) -> AdjointSolverError:
        task = self.task_ids[f.task]
        time = f.time * float(self.scale[f.task])
        return AdjointSolverError(
            f"adjoint forward solve failed for task {task} at t = {time:.6g} (horizon T = {float(self.T[f.task]):.6g}): "
            f"{f.what} (try a smaller T, a smaller inner step h, or check the task's data)",
            task=task, time=time,
        )

    def solver_error(self, e: _SolverAssert) -> AdjointSolverError:
        many = self.n_tasks > 1
        time = e.time * float(self.scale[0])
        return AdjointSolverError(
            f"adjoint forward solve failed for task{'s' if many else ''} "
            f"{self.task_ids if many else self.task_ids[0]} at t = {time:.6g} (horizon T = {float(self.T.max()):.6g}): "
            f"torchdiffeq: {e.message} (try a smaller T, a looser tolerance, or check the task's data)",
            task=self.task_ids[0], time=time,
        )

    def check_meta_gradient(self, lam: dict) -> None:
        n = self.n_tasks
        bad = ~torch.stack([torch.isfinite(v.reshape(n, -1)).all(1) for v in lam.values()]).all(0)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AdjointSolverError(f"adjoint backward solve gave a non-finite meta-gradient for task "
                                     f"{self.task_ids[i]} (integrating from t = {float(self.T[i]):.6g} back to 0)",
                                     task=self.task_ids[i], time=0.0)


# ---------------------------------------------------------------------------- forward schemes
class ForwardScheme:
    """A forward scheme of the gradient flow, built per solve from the :class:`Adjoint` (its solver
    settings): ``integrate(ctx, start, lo, keep) -> {grid index: stacked state}``, the states at the
    grid indices ``keep`` (increasing, ``keep[0] == lo``) from ``start`` at index ``lo``; it raises
    ``_Failure`` (non-finite values) or ``_SolverAssert`` (a solver's own failure)."""

    def __init__(self, method: Adjoint):
        self.method = method

    @staticmethod
    def check(method: Adjoint) -> None:
        """Raise ``ValueError`` for settings of ``method`` this scheme cannot run (at construction)."""

    def integrate(self, ctx: _Stack, start: dict, lo: int, keep: list[int]) -> dict[int, dict]:
        raise NotImplementedError


class EulerForward(ForwardScheme):
    """``K`` explicit Euler steps ``u_{k+1} = u_k - step * grad L_tr(u_k)`` (MAML's inner loop with SGD)."""

    def integrate(self, ctx: _Stack, start: dict, lo: int, keep: list[int]) -> dict[int, dict]:
        out, u, wanted = {lo: start}, start, set(keep)
        for k in range(lo, keep[-1]):
            g = ctx.grad(u)
            _check_tasks(g, float(ctx.grid[k]), "gradient")
            u = {n: u[n] - _bcast(ctx.steps, u[n]) * g[n] for n in ctx.names}
            _check_tasks(u, float(ctx.grid[k + 1]), "state")
            if k + 1 in wanted:
                out[k + 1] = u
        return out


class OdeForward(ForwardScheme):
    """A torchdiffeq solve (``solver``, ``rtol`` / ``atol``, ``max_steps``, ``options``) of the stacked
    flow, recorded at the grid times of ``keep``."""

    @staticmethod
    def check(method: Adjoint) -> None:
        from torchdiffeq._impl.odeint import SOLVERS

        if method.solver not in SOLVERS:
            raise ValueError(f"unknown torchdiffeq solver {method.solver!r}; valid: {', '.join(sorted(SOLVERS))}")

    def integrate(self, ctx: _Stack, start: dict, lo: int, keep: list[int]) -> dict[int, dict]:
        return dict(zip(keep, self._odeint(ctx, start, ctx.grid[keep])))

    def _odeint(self, ctx: _Stack, u_start: dict, times: Tensor) -> list[dict]:
        """The states at ``times`` from ``u_start`` at ``times[0]``."""
        from torchdiffeq import odeint

        names, method = ctx.names, self.method
        reached = [float(times[0])]

        def rhs(t, state):
            u = dict(zip(names, state))
            time = float(t)
            f = ctx.rhs(u)
            if not bool(torch.isfinite(torch.stack([v.sum() for v in f.values()])).all()):
                # a non-finite state gives a non-finite gradient: one cheap test, then find the task
                _check_tasks(u, time, "state")
                _check_tasks(f, time, "gradient")
            reached[0] = max(reached[0], time)
            return tuple(f[n] for n in names)

        rtol, atol = method.tolerances(u_start[names[0]].dtype)
        options = {**method.options}
        if method.solver in _ADAPTIVE:
            options.setdefault("max_num_steps", method.max_steps)
        try:
            out = odeint(rhs, tuple(u_start[n] for n in names), times, rtol=rtol, atol=atol,
                         method=method.solver, options=options)
        except AssertionError as e:  # torchdiffeq asserts on dt underflow and max_num_steps
            raise _SolverAssert(str(e), reached[0]) from None
        out = [o.detach() for o in out]
        states = [{n: o[j] for n, o in zip(names, out)} for j in range(len(times))]
        _check_tasks(states[-1], float(times[-1]), "state")
        return states


# ---------------------------------------------------------------------------- backward schemes
class BackwardScheme:
    """A backward scheme of the adjoint ODE, built per solve from the :class:`_Stack`:
    ``start(u_T, lam_T)`` sees the final state and ``lambda(T)``, then ``step(u_j, lam, g_phi) ->
    (lam_j, g_phi, support losses [tasks] at u_j)`` walks the grid from ``K - 1`` down to ``0``,
    ``lam`` being ``lambda_{j+1}`` and ``g_phi`` the gradient of the fixed parameters so far."""

    def __init__(self, ctx: _Stack):
        self.ctx = ctx

    def start(self, u_T: dict, lam_T: dict) -> None:
        pass

    def step(self, u_j: dict, lam: dict, g_phi: dict) -> tuple[dict, dict, Tensor]:
        raise NotImplementedError


class DiscreteAdjoint(BackwardScheme):
    """The exact adjoint of Euler steps: ``lambda_j = lambda_{j+1} - step H(u_j) lambda_{j+1}`` and
    ``g_phi -= step (d_phi grad_u L_tr(u_j))^T lambda_{j+1}`` (one Hessian-vector product a step)."""

    def step(self, u_j: dict, lam: dict, g_phi: dict):
        ctx = self.ctx
        hl, ml, loss = ctx.pull_once(u_j, lam)
        lam = ctx.axpy(lam, hl, -1.0)
        if ctx.phi:
            g_phi = ctx.axpy(g_phi, ml, -1.0)
        return lam, g_phi, loss


class Heun(BackwardScheme):
    """Modified Euler in PECE mode (the paper's): predict ``lambda~_j = lambda_{j+1} - step H_{j+1} lambda_{j+1}``,
    evaluate ``H(u_j) lambda~_j``, correct with the mean of both products, then evaluate ``H(u_j) lambda_j`` at
    the corrected value for the next step (two Hessian-vector products a step). ``g_phi`` by the trapezoid rule."""

    pece = True

    def start(self, u_T: dict, lam_T: dict) -> None:
        self.hlam, self.mlam, _ = self.ctx.pull_once(u_T, lam_T)  # H(u_{j+1}) lambda_{j+1}, its phi part

    def step(self, u_j: dict, lam: dict, g_phi: dict):
        ctx = self.ctx
        pull, loss = ctx.linearize(u_j)
        lam_tilde = ctx.axpy(lam, self.hlam, -1.0)
        hl_tilde, ml_tilde = pull(lam_tilde, last=not self.pece)
        lam_j = ctx.axpy(lam, ctx.plus(self.hlam, hl_tilde), -0.5)
        if self.pece:
            hl_j, ml_j = pull(lam_j, last=True)
        else:
            hl_j, ml_j = hl_tilde, ml_tilde
        self.hlam = hl_j
        if ctx.phi:
            g_phi = ctx.axpy(g_phi, ctx.plus(self.mlam, ml_j), -0.5)
        self.mlam = ml_j
        return lam_j, g_phi, loss


class HeunPEC(Heun):
    """Heun in PEC mode: the next step's predictor reuses ``H(u_j) lambda~_j``, the product at the
    predicted value (one Hessian-vector product a step, global error still ``O(h^2)``)."""

    pece = False


#: The forward schemes by name (``Adjoint(forward=...)``).
FORWARD_SCHEMES: dict[str, type[ForwardScheme]] = {"ode": OdeForward, "euler": EulerForward}
#: The backward schemes by name (``Adjoint(backward=...)``).
BACKWARD_SCHEMES: dict[str, type[BackwardScheme]] = {"heun": Heun, "heun-pec": HeunPEC, "discrete": DiscreteAdjoint}
FORWARDS = tuple(FORWARD_SCHEMES)
BACKWARDS = tuple(BACKWARD_SCHEMES)


def _task(batch, i: int):
    """Task ``i`` of ``batch`` as a batch of one."""
    return type(batch)(*(t[i:i + 1] for t in batch))


#: Default ``(rtol, atol)`` of the adaptive forward solve by state dtype (float64; float32 and below).
DEFAULT_TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-5, 1e-7)}

_ADAPTIVE = {"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"}


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_tasks(tree: dict, time: float, what: str) -> None:
    """Raise ``_Failure`` for the first task with a non-finite entry in ``tree`` (leading dim = tasks)."""
    ok = None
    for v in tree.values():
        fin = torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        ok = fin if ok is None else ok & fin
    if ok is not None and not bool(ok.all()):
        task = int((~ok).nonzero()[0])
        raise _Failure(task, time, f"non-finite {what}")
