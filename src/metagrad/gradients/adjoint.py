"""A-MAML (adjoint-maml.txt): the inner loop as gradient flow, the meta-gradient from its adjoint ODE."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..backend import bcast as _bcast
from ..backend import stack
from .base import MetaGradient, zero_rule_grads

_tree_map = torch.utils._pytree.tree_map

FORWARDS = ("ode", "euler")
BACKWARDS = ("heun", "heun-pec", "discrete")


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
    the hand-written backward pass and its R-operator (:mod:`metagrad.gradients._analytic`) with
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
        forward: ``"ode"`` (torchdiffeq) or ``"euler"`` (fixed steps of ``h``).
        backward: ``"heun"`` (modified Euler, the paper's), ``"heun-pec"`` (the same predictor and
            corrector with one Hessian-vector product per step, see above) or ``"discrete"``
            (exact adjoint of Euler).
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
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        self.forward, self.backward = forward, backward
        if forward == "ode":
            from torchdiffeq._impl.odeint import SOLVERS

            if solver not in SOLVERS:
                raise ValueError(f"unknown torchdiffeq solver {solver!r}; valid: {', '.join(sorted(SOLVERS))}")
        self.solver = solver
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.max_steps = max_steps
        if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
            raise ValueError(f"segments must be a positive integer or None, got {segments!r}")
        self.segments = segments
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
                one = type(batch)(*(t[i:i + 1] for t in batch))
                outs.append(self._solve(problem, meta_params, one, T[i:i + 1], K, [i]))
            n = batch.num_tasks
            grads = _tree_map(lambda *gs: sum(gs) / n, *(o[0] for o in outs))
            objective = sum(o[1] for o in outs) / n
            aux = {k: torch.cat([o[2][k] for o in outs]) for k in ("query_loss", "inner_loss")}
        return grads, objective, aux

    # ------------------------------------------------------------------ one stacked solve
    def _solve(self, problem, meta_params, batch, T: Tensor, K: int, task_ids: list[int]):
        names = problem.adapted_names
        model_p = meta_params["model"]
        theta = {n: model_p[n].detach() for n in names}
        phi = {n: v.detach() for n, v in model_p.items() if n not in theta}
        buffers = {n: v for n, v in problem.model.named_buffers() if n not in phi}
        sx, sy, qx, qy = batch
        n_tasks = sx.shape[0]
        ref = next(iter(theta.values()))
        T = T.to(dtype=ref.dtype, device=ref.device)
        t_max = float(T.max())
        steps = T / K  # [tasks] per-task grid step (h when T is a multiple of h)
        scale = T / t_max  # [tasks] time rescaling of the stacked ODE (1 for a shared T)
        shared = bool((T == T[0]).all())  # one horizon: one grid step, no rescaling
        h_shared = float(steps[0])

        def axpy(a: dict, b: dict, c: float) -> dict:
            """``a + c * step * b`` per task (one fused op per tensor list for a shared horizon)."""
            if shared:
                keys = list(a)
                return dict(zip(keys, torch._foreach_add([a[k] for k in keys], [b[k] for k in keys],
                                                         alpha=c * h_shared)))
            return {k: a[k] + c * _bcast(steps, a[k]) * b[k] for k in a}

        def plus(a: dict, b: dict) -> dict:
            keys = list(a)
            return dict(zip(keys, torch._foreach_add([a[k] for k in keys], [b[k] for k in keys])))

        def loss_at(u, ph, x, y):
            return problem.loss(u, {**buffers, **ph}, x, y)

        backend = problem.backend
        phi_tasks = stack(phi, n_tasks)

        def linearized(u):
            return backend.linearize(u, phi_tasks, sx, sy)

        def step_back(u, v):
            pull, loss = linearized(u)
            hv, mv = pull(v, last=True)
            return hv, mv, loss

        def heun(u, lam_next, hlam_next):
            # predict, evaluate, correct; then evaluate at the corrected lambda (PECE, the paper's)
            # or keep the evaluation at the predicted one for the next step (PEC, one HVP a step)
            pull, loss = linearized(u)
            pece = self.backward == "heun"
            lam_tilde = axpy(lam_next, hlam_next, -1.0)
            hl_tilde, ml_tilde = pull(lam_tilde, last=not pece)
            lam_j = axpy(lam_next, plus(hlam_next, hl_tilde), -0.5)
            if not pece:
                return lam_j, hl_tilde, ml_tilde, loss
            hl_j, ml_j = pull(lam_j, last=True)
            return lam_j, hl_j, ml_j, loss

        # -------- forward: gradient flow; keep the states at the segment boundaries only
        u0 = {n: theta[n].expand(n_tasks, *theta[n].shape).clone() for n in names}
        grid = torch.linspace(0.0, t_max, K + 1, dtype=ref.dtype, device=ref.device)

        def grad_tasks(u: dict) -> dict:
            """The per-task support-loss gradients at the stacked state ``u`` (no graph kept)."""
            return backend.grad(u, phi_tasks, sx, sy)[1]

        def rhs_tasks(u: dict) -> dict:
            g = grad_tasks(u)
            if shared:
                return dict(zip(names, torch._foreach_neg([g[n] for n in names])))
            return {n: -_bcast(scale, g[n]) * g[n] for n in names}

        def integrate(start: dict, lo: int, keep: list[int]) -> dict[int, dict]:
            """States at the grid indices ``keep`` (increasing, ``keep[0] == lo``) from ``start`` at ``lo``."""
            if self.forward == "euler":
                out, u = {lo: start}, start
                for k in range(lo, keep[-1]):
                    g = grad_tasks(u)
                    _check_tasks(g, float(grid[k]), "gradient")
                    u = {n: u[n] - _bcast(steps, u[n]) * g[n] for n in names}
                    _check_tasks(u, float(grid[k + 1]), "state")
                    if k + 1 in keep:
                        out[k + 1] = u
                return out
            states = self._ode(rhs_tasks, start, names, grid[keep])
            return dict(zip(keep, states))

        segments = self.segments
        if segments is None:
            state_bytes = sum(v.numel() * v.element_size() for v in u0.values())
            segments = 1 if (K + 1) * state_bytes <= self.record_mb * 2**20 else None
        bounds = _segment_bounds(K, segments)
        try:
            marks = [lo for lo, _ in bounds] + [K]
            checkpoints = integrate(u0, 0, marks) if len(bounds) > 1 else None

            # -------- the query loss at u(T) and lambda(T)
            segment_states = None
            if checkpoints is None:  # one segment: the forward solve records every grid state
                segment_states = integrate(u0, 0, list(range(K + 1)))
                final = segment_states[K]
            else:
                final = checkpoints[K]
            (lam, g_phi), query = vmap(grad_and_value(loss_at, argnums=(0, 1)), in_dims=(0, None, 0, 0))(
                final, phi, qx, qy
            )

            # -------- backward: the adjoint over the states, one recomputed segment at a time
            # one preallocated buffer: K small tensors kept alive through the backward pass would
            # pin the heap between the large temporaries and keep it from shrinking (peak RSS)
            inner = ref.new_empty(n_tasks, K)
            if self.backward != "discrete":
                hlam, mlam, _ = step_back(final, lam)
            for lo, hi in reversed(bounds):
                if checkpoints is not None:
                    segment_states = integrate(checkpoints[lo], lo, list(range(lo, hi + 1)))
                    segment_states[hi] = checkpoints[hi]  # continuity with the later segment
                for j in range(hi - 1, lo - 1, -1):
                    u_j = segment_states.pop(j)
                    if self.backward != "discrete":
                        lam, hlam, mlam_j, inner[:, j] = heun(u_j, lam, hlam)
                        if phi:
                            g_phi = axpy(g_phi, plus(mlam, mlam_j), -0.5)
                        mlam = mlam_j
                    else:
                        hl, ml, inner[:, j] = step_back(u_j, lam)
                        lam = axpy(lam, hl, -1.0)
                        if phi:
                            g_phi = axpy(g_phi, ml, -1.0)
                segment_states = None
        except _Failure as f:
            task = task_ids[f.task]
            time = f.time * float(scale[f.task])
            raise AdjointSolverError(
                f"adjoint forward solve failed for task {task} at t = {time:.6g} (horizon T = {float(T[f.task]):.6g}): "
                f"{f.what} (try a smaller T, a smaller inner step h, or check the task's data)",
                task=task, time=time,
            ) from None
        except _SolverAssert as e:
            if n_tasks > 1:  # find a task that fails on its own
                for i in range(n_tasks):
                    one = type(batch)(*(t[i:i + 1] for t in batch))
                    self._solve(problem, meta_params, one, T[i:i + 1], K, [task_ids[i]])
            time = e.time * float(scale[0])
            raise AdjointSolverError(
                f"adjoint forward solve failed for task{'s' if n_tasks > 1 else ''} "
                f"{task_ids if n_tasks > 1 else task_ids[0]} at t = {time:.6g} (horizon T = {float(T.max()):.6g}): "
                f"torchdiffeq: {e.message} (try a smaller T, a looser tolerance, or check the task's data)",
                task=task_ids[0], time=time,
            ) from None

        bad = ~torch.stack([torch.isfinite(v.reshape(n_tasks, -1)).all(1) for v in lam.values()]).all(0)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AdjointSolverError(f"adjoint backward solve gave a non-finite meta-gradient for task {task_ids[i]} "
                                     f"(integrating from t = {float(T[i]):.6g} back to 0)", task=task_ids[i], time=0.0)

        per_task = {**lam, **g_phi}
        grads = {"model": {n: per_task[n].mean(0) for n in model_p}, "rule": zero_rule_grads(meta_params)}
        aux = {"query_loss": query.detach(), "inner_loss": inner}
        return grads, query.mean().detach(), aux

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` of the forward solve for a state of ``dtype`` (``None`` -> by dtype)."""
        rtol, atol = DEFAULT_TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
        return (rtol if self.rtol is None else self.rtol), (atol if self.atol is None else self.atol)

    def _ode(self, rhs_tasks, u_start, names, times: Tensor) -> list[dict]:
        """torchdiffeq solve of the stacked flow from ``u_start`` at ``times[0]``; the states at ``times``."""
        from torchdiffeq import odeint

        reached = [float(times[0])]

        def rhs(t, state):
            u = dict(zip(names, state))
            time = float(t)
            f = rhs_tasks(u)
            if not bool(torch.isfinite(torch.stack([v.sum() for v in f.values()])).all()):
                # a non-finite state gives a non-finite gradient: one cheap test, then find the task
                _check_tasks(u, time, "state")
                _check_tasks(f, time, "gradient")
            reached[0] = max(reached[0], time)
            return tuple(f[n] for n in names)

        rtol, atol = self.tolerances(u_start[names[0]].dtype)
        options = {**self.options}
        if self.solver in _ADAPTIVE:
            options.setdefault("max_num_steps", self.max_steps)
        try:
            out = odeint(rhs, tuple(u_start[n] for n in names), times, rtol=rtol, atol=atol,
                         method=self.solver, options=options)
        except AssertionError as e:  # torchdiffeq asserts on dt underflow and max_num_steps
            raise _SolverAssert(str(e), reached[0]) from None
        out = [o.detach() for o in out]
        states = [{n: o[j] for n, o in zip(names, out)} for j in range(len(times))]
        _check_tasks(states[-1], float(times[-1]), "state")
        return states


#: Default ``(rtol, atol)`` of the adaptive forward solve by state dtype (float64; float32 and below).
DEFAULT_TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-5, 1e-7)}

_ADAPTIVE = {"dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"}


def _segment_bounds(steps: int, segments: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` grid-index ranges of ``segments`` (default ``round(sqrt(steps))``) near-equal segments."""
    n = segments if segments is not None else max(1, round(math.sqrt(steps)))
    n = min(max(n, 1), steps)
    m = math.ceil(steps / n)
    return [(lo, min(lo + m, steps)) for lo in range(0, steps, m)]


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
