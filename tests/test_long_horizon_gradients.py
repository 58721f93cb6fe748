"""Long-horizon meta-gradients: Adjoint (A-MAML), Implicit (iMAML), Checkpointed unrolling.

References, all float64 and computed without the method under test:

* linear regression (one ``nn.Linear`` layer, MSE): the support loss is quadratic with constant
  Hessian ``H``, so gradient flow is ``u(T) = u* + exp(-H T)(theta - u*)`` and the meta-gradient is
  ``exp(-H T) grad J(u(T))`` (``torch.linalg.matrix_exp``); the proximal optimum and iMAML's
  gradient ``(I + H/lam)^{-1} grad J(u*)`` are linear solves;
* a tiny tanh MLP: ``Unrolled`` (the engine's autograd through the inner loop) for the adjoint of
  Euler steps, the exact Hessian from ``torch.autograd.functional.hessian`` at a Newton-solved
  proximal optimum for iMAML, ``torch.autograd.gradcheck`` of the meta-loss for checkpointing.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import metagrad as mg
import metagrad.models  # noqa: F401  (mg.models below)
from metagrad import MetaLearner, Schedule, TaskBatch
from metagrad.metrics import mse

DT = torch.float64
D = 3  # input features of the linear-regression model (D + 1 parameters)


# ---------------------------------------------------------------- fixtures
def linreg_batch(tasks: int = 3, shots: int = 8, queries: int = 6, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(tasks, D, 1, generator=g, dtype=DT)
    sx = torch.randn(tasks, shots, D, generator=g, dtype=DT)
    qx = torch.randn(tasks, queries, D, generator=g, dtype=DT)
    sy = sx @ w + 0.3 * torch.randn(tasks, shots, 1, generator=g, dtype=DT)
    qy = qx @ w + 0.3 * torch.randn(tasks, queries, 1, generator=g, dtype=DT)
    return TaskBatch(sx, sy, qx, qy)


def linreg_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(D, 1).to(DT)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def mlp_batch(tasks: int = 3, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(*(torch.randn(tasks, 5, 1, generator=g, dtype=DT) for _ in range(4)))


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in grads["model"].values()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def augmented(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=DT)], -1)  # [n, D + 1]: u = (w, b)


def quadratic(x, y):
    """MSE of the linear model as ``1/2 u^T H u - c^T u + const``: returns (H, c)."""
    xa = augmented(x)
    n = x.shape[0]
    return 2.0 / n * xa.T @ xa, 2.0 / n * xa.T @ y[:, 0]


def grad_mse(x, y, u):
    xa = augmented(x)
    return 2.0 / x.shape[0] * xa.T @ (xa @ u - y[:, 0])


def theta_of(model) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def flow_meta_gradient(theta, batch, T) -> torch.Tensor:
    """Closed form: mean over tasks of ``exp(-H T) grad J(u(T))``."""
    T = torch.as_tensor(T, dtype=DT).expand(batch.num_tasks)
    total = 0
    for i in range(batch.num_tasks):
        H, c = quadratic(batch.support_x[i], batch.support_y[i])
        u_star = torch.linalg.solve(H, c)
        E = torch.linalg.matrix_exp(-H * T[i])
        u_T = u_star + E @ (theta - u_star)
        total = total + E @ grad_mse(batch.query_x[i], batch.query_y[i], u_T)
    return total / batch.num_tasks


def imaml_meta_gradient(theta, batch, lam) -> torch.Tensor:
    """Closed form: mean over tasks of ``(I + H/lam)^{-1} grad J(u*)``, ``u* = (H + lam I)^{-1}(c + lam theta)``."""
    eye = torch.eye(D + 1, dtype=DT)
    total = 0
    for i in range(batch.num_tasks):
        H, c = quadratic(batch.support_x[i], batch.support_y[i])
        u_star = torch.linalg.solve(H + lam * eye, c + lam * theta)
        total = total + torch.linalg.solve(eye + H / lam, grad_mse(batch.query_x[i], batch.query_y[i], u_star))
    return total / batch.num_tasks


def max_diff(g1, g2) -> float:
    return max((g1[a][k] - g2[a][k]).abs().max().item() for a in g1 for k in g1[a]) if any(g1.values()) else 0.0


# ---------------------------------------------------------------- registration / validation
def test_names_registered_and_exported():
    assert isinstance(mg.make_meta_gradient("adjoint", T=0.5, h=0.1), mg.Adjoint)
    assert isinstance(mg.make_meta_gradient("implicit", lam=2.0), mg.Implicit)
    assert isinstance(mg.make_meta_gradient("checkpointed", segments=3), mg.Checkpointed)
    with pytest.raises(ValueError, match="adjoint.*checkpointed|checkpointed.*implicit"):
        mg.make_meta_gradient("imaml")


def test_invalid_options_raise_with_the_value():
    with pytest.raises(ValueError, match="-1"):
        mg.Adjoint(T=-1.0)
    with pytest.raises(ValueError, match="'rk45'"):
        mg.Adjoint(solver="rk45")
    with pytest.raises(ValueError, match="'backprop'"):
        mg.Adjoint(backward="backprop")
    with pytest.raises(ValueError, match="0"):
        mg.Implicit(lam=0.0)
    with pytest.raises(ValueError, match="-2"):
        mg.Implicit(cg_steps=-2)
    with pytest.raises(ValueError, match="0"):
        mg.Checkpointed(segments=0)
    b = linreg_batch()
    learner = MetaLearner(linreg_model(), mse, meta_gradient=mg.Adjoint(T=torch.ones(2), h=0.5))
    with pytest.raises(ValueError, match="one horizon per task"):
        learner.meta_gradient_of(b)


@pytest.mark.parametrize("rule", [mg.MetaSGD(0.1), mg.SGD(0.1, learnable=True)])
def test_adjoint_needs_plain_sgd_and_names_the_rule(rule):
    learner = MetaLearner(linreg_model(), mse, rule=rule, meta_gradient=mg.Adjoint(T=0.2, h=0.1))
    with pytest.raises(ValueError, match=type(rule).__name__):
        learner.meta_gradient_of(linreg_batch())
    learner = MetaLearner(linreg_model(), mse, meta_gradient=mg.Adjoint(T=0.2, h=0.1),
                          schedule=Schedule(2, per_step_loss=True))
    with pytest.raises(ValueError, match="per_step_loss"):
        learner.meta_gradient_of(linreg_batch())


# ---------------------------------------------------------------- adjoint: closed form of gradient flow
@pytest.mark.parametrize("vectorize", [True, False])
def test_adjoint_matches_gradient_flow_closed_form(vectorize):
    b = linreg_batch()
    segments = None if vectorize else 1  # recomputed segments (stacked, record_mb=0) / every state recorded (loop)
    learner = MetaLearner(linreg_model(), mse,
                          meta_gradient=mg.Adjoint(T=1.0, h=0.01, rtol=1e-10, atol=1e-12, segments=segments,
                                                   record_mb=0))
    grads, stats = learner.meta_gradient_of(b, vectorize=vectorize)
    ref = flow_meta_gradient(theta_of(learner.model), b, 1.0)
    assert rel(flat(grads), ref) < 1e-4
    assert stats["inner_loss"].shape == (3, 100) and stats["query_loss"].shape == (3,)
    assert torch.isfinite(stats["inner_loss"]).all()
    assert (stats["inner_loss"][:, -1] < stats["inner_loss"][:, 0]).all()  # the flow descends


@pytest.mark.parametrize("backward", ["heun", "heun-pec"])
def test_adjoint_heun_error_is_second_order_in_h(backward):
    b = linreg_batch()
    model = linreg_model()
    ref = flow_meta_gradient(theta_of(model), b, 1.0)
    errors = []
    for h in (0.05, 0.025):
        learner = MetaLearner(copy.deepcopy(model), mse, meta_gradient=mg.Adjoint(
            T=1.0, h=h, rtol=1e-11, atol=1e-13, segments=1, backward=backward))
        errors.append(rel(flat(learner.meta_gradient_of(b)[0]), ref))
    assert errors[1] < errors[0]
    assert 3.6 < errors[0] / errors[1] < 4.4, errors


def test_adjoint_heun_pec_is_second_order_for_non_adapted_parameters():
    # ANIL-style: the body's gradient comes from the mixed term, which PEC takes at the predicted
    # lambda; reference: the paper's Heun (PECE) on a grid 8x finer
    b = mlp_batch()
    model = mlp()

    def gradient(h, backward):
        learner = MetaLearner(copy.deepcopy(model), mse, adapt="head", meta_gradient=mg.Adjoint(
            T=1.0, h=h, rtol=1e-11, atol=1e-13, segments=1, backward=backward))
        return learner.meta_gradient_of(b)[0]["model"]

    ref = gradient(0.0125 / 8, "heun")
    coarse, fine = gradient(0.05, "heun-pec"), gradient(0.025, "heun-pec")
    for name in ("0.weight", "2.weight"):  # body (mixed term) and head (lambda(0))
        e0, e1 = rel(coarse[name], ref[name]), rel(fine[name], ref[name])
        assert 3.3 < e0 / e1 < 4.7, (name, e0, e1)
        assert e1 < 1e-3


@pytest.mark.parametrize("dtype, expected", [(torch.float64, (1e-7, 1e-9)), (torch.float32, (1e-5, 1e-7))])
def test_adjoint_default_tolerances_follow_the_dtype(dtype, expected):
    assert mg.Adjoint().tolerances(dtype) == expected
    assert mg.Adjoint(rtol=1e-3).tolerances(dtype) == (1e-3, expected[1])
    b = TaskBatch(*(t.to(dtype) for t in mlp_batch()))
    grads = []
    for method in (mg.Adjoint(T=0.3, h=0.01), mg.Adjoint(T=0.3, h=0.01, rtol=expected[0], atol=expected[1])):
        learner = MetaLearner(mlp().to(dtype), mse, meta_gradient=method)
        grads.append(flat(learner.meta_gradient_of(b)[0]))
    assert torch.equal(grads[0], grads[1])


def test_adjoint_per_task_horizon_tensor_and_callable():
    b = linreg_batch()
    T = torch.tensor([0.5, 1.0, 0.25], dtype=DT)
    model = linreg_model()
    ref = flow_meta_gradient(theta_of(model), b, T)
    for spec, vectorize in ((T, True), (T, False), (lambda batch: T[: batch.num_tasks], True)):
        method = mg.Adjoint(T=spec, h=0.01, rtol=1e-10, atol=1e-12, segments=None if vectorize else 1, record_mb=0)
        learner = MetaLearner(copy.deepcopy(model), mse, meta_gradient=method)
        grads, stats = learner.meta_gradient_of(b, vectorize=vectorize)
        assert rel(flat(grads), ref) < 1e-4
        assert stats["inner_loss"].shape == (3, 100)  # K = round(max T / h) steps for every task


@pytest.mark.parametrize("backward", ["heun", "heun-pec"])
def test_adjoint_stacked_and_loop_agree(backward):
    # (Euler forward: exactly, see test_adjoint_euler_discrete_equals_unrolled)
    b = mlp_batch()
    learner = MetaLearner(mlp(), mse, adapt="head", meta_gradient=mg.Adjoint(T=0.5, h=0.05, rtol=1e-10, atol=1e-12,
                                                                             backward=backward))
    g_stack, s_stack = learner.meta_gradient_of(b, vectorize=True)
    g_loop, s_loop = learner.meta_gradient_of(b, vectorize=False)
    assert rel(flat(g_stack), flat(g_loop)) < 1e-7
    assert torch.allclose(s_stack["inner_loss"], s_loop["inner_loss"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backward", ["heun", "heun-pec"])
def test_adjoint_recomputed_segments_match_recording_every_state(backward):
    # segments=1 records all K + 1 grid states; more segments keep only the boundaries and
    # re-solve each segment in the backward pass: equal up to the solver tolerance
    # (segments=None with record_mb=0: round(sqrt(K)) segments; with the default: every state recorded)
    b = mlp_batch()
    out = {}
    for segments, record_mb in ((1, 64.0), (3, 64.0), (None, 0.0), (None, 64.0)):
        learner = MetaLearner(mlp(), mse, adapt="head",
                              meta_gradient=mg.Adjoint(T=0.6, h=0.05, rtol=1e-10, atol=1e-12, segments=segments,
                                                       record_mb=record_mb, backward=backward))
        out[segments, record_mb] = learner.meta_gradient_of(b)
    ref = out[1, 64.0]
    for key in ((3, 64.0), (None, 0.0), (None, 64.0)):
        assert rel(flat(out[key][0]), flat(ref[0])) < 1e-8
        assert torch.allclose(out[key][1]["inner_loss"], ref[1]["inner_loss"], rtol=1e-8, atol=1e-10)


def test_adjoint_default_segments_record_every_state_within_record_mb(monkeypatch):
    # segments=None: one segment (no recomputation) iff the K + 1 stacked states fit in record_mb MiB
    import metagrad.gradients.adjoint as adjoint_module

    seen = []
    real = adjoint_module._segment_bounds
    monkeypatch.setattr(adjoint_module, "_segment_bounds", lambda k, n: seen.append(n) or real(k, n))
    b = mlp_batch()
    model = mlp()
    K = 12
    state_bytes = b.num_tasks * sum(p.numel() * p.element_size() for p in model.parameters())
    exact = (K + 1) * state_bytes / 2**20
    for record_mb, expected in ((64.0, 1), (exact, 1), (exact * (1 - 1e-6), None), (0.0, None)):
        seen.clear()
        learner = MetaLearner(copy.deepcopy(model), mse,
                              meta_gradient=mg.Adjoint(T=K * 0.05, h=0.05, rtol=1e-8, atol=1e-10, record_mb=record_mb))
        learner.meta_gradient_of(b)
        assert seen == [expected], (record_mb, seen)
    assert real(K, None) == real(K, round(math.sqrt(K)))  # None there: round(sqrt(K)) segments
    for bad in (-1.0, math.inf, "64", True):
        with pytest.raises(ValueError, match="record_mb"):
            mg.Adjoint(record_mb=bad)


# ---------------------------------------------------------------- adjoint: discrete adjoint == unrolled
@pytest.mark.parametrize("segments,record_mb", [(None, 64.0), (None, 0.0), (1, 64.0), (4, 64.0)])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_adjoint_euler_discrete_equals_unrolled(adapt, vectorize, segments, record_mb):
    h, K = 0.1, 6
    b = mlp_batch()
    ref = MetaLearner(mlp(), mse, adapt=adapt, rule=mg.SGD(h), meta_gradient="unrolled", schedule=Schedule(K))
    adj = MetaLearner(mlp(), mse, adapt=adapt, rule=mg.SGD(0.7),  # the rule's rate is ignored
                      meta_gradient=mg.Adjoint(T=K * h, h=h, forward="euler", backward="discrete",
                                               segments=segments, record_mb=record_mb))
    g_ref, s_ref = ref.meta_gradient_of(b)
    g_adj, s_adj = adj.meta_gradient_of(b, vectorize=vectorize)
    assert max_diff(g_ref, g_adj) < 1e-10
    assert torch.allclose(s_ref["inner_loss"], s_adj["inner_loss"], rtol=0, atol=1e-12)
    assert torch.allclose(s_ref["query_loss"], s_adj["query_loss"], rtol=0, atol=1e-12)


def test_stacked_forward_equals_vmap_of_functional_call():
    from torch.func import functional_call, vmap

    from metagrad.backend import stacked_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.GELU(), nn.Identity(),
                          nn.Linear(4, 2), nn.LeakyReLU(0.3), nn.Linear(2, 1)).to(DT)
    tasks = 4
    params = {n: p.detach() + 0.1 * torch.randn(tasks, *p.shape, dtype=DT) for n, p in model.named_parameters()}
    f = stacked_forward(model)
    assert f is not None
    for x in (torch.randn(tasks, 7, 3, dtype=DT), torch.randn(tasks, 3, dtype=DT), torch.randn(tasks, 2, 6, 3, dtype=DT)):
        ref = vmap(lambda p, xx: functional_call(model, p, (xx,)))(params, x)
        assert ref.shape == f(params, x).shape
        assert torch.allclose(f(params, x), ref, rtol=0, atol=1e-13)
    assert stacked_forward(mg.models.MLP(2, [8, 8], 1)) is not None


def test_batched_task_losses_equal_vmap_of_the_loss():
    # the stacked paths compute mse-type losses per task without vmap; vmap of the loss is the reference
    import torch.nn.functional as F
    from torch.func import vmap

    from metagrad.backend import per_task_loss as _per_task_loss
    from metagrad.metrics import half_mse

    torch.manual_seed(0)
    for loss_fn in (mse, half_mse, F.mse_loss):
        f = _per_task_loss(loss_fn)
        for shape in ((4, 7, 1), (4, 3), (4, 2, 5, 3)):
            pred, y = torch.randn(shape, dtype=DT), torch.randn(shape, dtype=DT)
            assert torch.allclose(f(pred, y), vmap(loss_fn)(pred, y), rtol=1e-14, atol=0)
    # shapes that broadcast keep vmap's semantics; other losses keep vmap
    pred, y = torch.randn(4, 7, 1, dtype=DT), torch.randn(4, 7, dtype=DT)
    with pytest.warns(UserWarning):
        assert torch.allclose(_per_task_loss(mse)(pred, y), vmap(mse)(pred, y), rtol=1e-14, atol=0)
    l1 = _per_task_loss(F.l1_loss)
    pred, y = torch.randn(4, 7, 1, dtype=DT), torch.randn(4, 7, 1, dtype=DT)
    assert torch.allclose(l1(pred, y), (pred - y).abs().mean((1, 2)), rtol=1e-14, atol=0)


def test_stacked_forward_refuses_what_it_cannot_reproduce():
    from metagrad.backend import stacked_forward

    class Twice(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    hooked[1].register_forward_hook(lambda m, i, o: o * 3)
    for model in (nn.Linear(2, 1), Twice(nn.Linear(2, 1)), hooked, nn.Sequential(),
                  nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5)),
                  nn.Sequential(nn.Linear(2, 3), nn.PReLU()), nn.Sequential(nn.Flatten(), nn.Linear(2, 1)),
                  mg.models.CNN(2, ways=5)):
        assert stacked_forward(model) is None, model


@pytest.mark.parametrize("backward", ["heun", "heun-pec", "discrete"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_adjoint_batched_mlp_path_equals_the_vmap_path(monkeypatch, adapt, backward):
    # plain MLPs take batched products (the "mlp" backends); the vmap path of any other model is the reference
    b = mlp_batch(tasks=4)

    def meta_grad(backend):
        learner = MetaLearner(mlp(), mse, adapt=adapt, meta_gradient=mg.Adjoint(T=0.8, h=0.05, backward=backward),
                              backend=backend)
        assert learner.backend.name == backend
        return learner.meta_gradient_of(b)

    fast, s_fast = meta_grad("mlp")
    ref, s_ref = meta_grad("generic")
    assert max_diff(fast, ref) < 1e-10 and flat(ref).abs().max() > 1e-3
    assert torch.allclose(s_fast["inner_loss"], s_ref["inner_loss"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_adjoint_euler_discrete_equals_unrolled_through_batchnorm(adapt, vectorize):
    # the adjoint's Hessian-vector products use autograd through a vmap over tasks; check them
    # through training-mode BatchNorm (batch statistics) against the engine's unrolled MAML
    h, K = 0.1, 4
    g = torch.Generator().manual_seed(3)
    b = TaskBatch(torch.randn(3, 4, 1, 5, 5, generator=g, dtype=DT), torch.randint(0, 2, (3, 4), generator=g),
                  torch.randn(3, 6, 1, 5, 5, generator=g, dtype=DT), torch.randint(0, 2, (3, 6), generator=g))

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                             nn.Flatten(), nn.Linear(18, 2)).to(DT)

    loss = nn.functional.cross_entropy
    ref = MetaLearner(net(), loss, adapt=adapt, rule=mg.SGD(h), meta_gradient="unrolled", schedule=Schedule(K))
    adj = MetaLearner(net(), loss, adapt=adapt, meta_gradient=mg.Adjoint(T=K * h, h=h, forward="euler",
                                                                         backward="discrete"))
    g_ref, _ = ref.meta_gradient_of(b)
    g_adj, _ = adj.meta_gradient_of(b, vectorize=vectorize)
    assert max_diff(g_ref, g_adj) < 1e-10
    assert flat(g_ref).abs().max() > 1e-3


def test_adjoint_euler_heun_approaches_discrete_adjoint_for_the_linear_model():
    # with Euler forward and a constant Hessian, Heun's backward differs from the exact discrete
    # adjoint (I - hH)^K only by O(h): check it against the matrix power directly
    h, K = 0.05, 10
    b = linreg_batch(tasks=1)
    learner = MetaLearner(linreg_model(), mse, meta_gradient=mg.Adjoint(T=K * h, h=h, forward="euler"))
    theta = theta_of(learner.model)
    H, c = quadratic(b.support_x[0], b.support_y[0])
    u = theta.clone()
    for _ in range(K):
        u = u - h * (H @ u - c)
    gJ = grad_mse(b.query_x[0], b.query_y[0], u)
    eye = torch.eye(D + 1, dtype=DT)
    heun = torch.linalg.matrix_power(eye - h * H + 0.5 * h * h * H @ H, K) @ gJ
    assert rel(flat(learner.meta_gradient_of(b)[0]), heun) < 1e-12


# ---------------------------------------------------------------- adjoint: failures
@pytest.mark.parametrize("forward", ["ode", "euler"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_adjoint_non_finite_support_target_names_task_and_time(forward, vectorize):
    b = linreg_batch()
    b.support_y[1, 2] = float("nan")
    learner = MetaLearner(linreg_model(), mse, meta_gradient=mg.Adjoint(T=1.0, h=0.1, forward=forward))
    with pytest.raises(mg.AdjointSolverError, match=r"task 1 at t = 0\b") as info:
        learner.meta_gradient_of(b, vectorize=vectorize)
    assert info.value.task == 1 and info.value.time == 0.0


def test_adjoint_blow_up_names_task_and_time_reached():
    # gradient ascent on a quartic blows up in finite time
    b = linreg_batch(tasks=2)
    blow = lambda p, y: -((p - y) ** 4).mean()  # noqa: E731
    learner = MetaLearner(linreg_model(), blow, meta_gradient=mg.Adjoint(T=5.0, h=0.1, forward="euler"))
    with pytest.raises(mg.AdjointSolverError, match=r"task \d at t = [0-9.]+ \(horizon T = 5\)") as info:
        learner.meta_gradient_of(b)
    assert 0 < info.value.time < 5
    learner = MetaLearner(linreg_model(), blow, meta_gradient=mg.Adjoint(T=5.0, h=0.1, max_steps=30))
    with pytest.raises(mg.AdjointSolverError, match=r"task 0 at t = [0-9.]+.*max_num_steps") as info:
        learner.meta_gradient_of(b, vectorize=False)
    assert 0 < info.value.time < 5


# ---------------------------------------------------------------- implicit
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("inner", ["gd", "rule"])
def test_implicit_matches_closed_form_on_linear_regression(inner, vectorize):
    lam = 1.5
    b = linreg_batch()
    if inner == "gd":
        method = mg.Implicit(lam, inner_steps=400, inner_lr=0.1, cg_steps=D + 1)
        learner = MetaLearner(linreg_model(), mse, meta_gradient=method)
    else:  # the learner's own rule on the proximal gradient; its state gets a zero meta-gradient
        learner = MetaLearner(linreg_model(), mse, rule=mg.MetaSGD(0.1), schedule=Schedule(400),
                              meta_gradient=mg.Implicit(lam, cg_steps=D + 1))
    grads, stats = learner.meta_gradient_of(b, vectorize=vectorize)
    ref = imaml_meta_gradient(theta_of(learner.model), b, lam)
    assert rel(flat(grads), ref) < 1e-9
    assert stats["inner_loss"].shape == (3, 400)
    assert all((g == 0).all() for g in grads["rule"].values())


@pytest.mark.parametrize("rule,inner_lr,damping", [("sgd", None, 0.0), ("sgd", 0.2, 0.1), ("meta-sgd", None, 0.0)])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_implicit_stacked_batch_equals_the_per_task_solve(adapt, rule, inner_lr, damping):
    # vectorize=True solves the whole meta-batch stacked (gradients._stacked) for plain GD steps;
    # the per-task loop (task_gradient) is the reference; Meta-SGD keeps the per-task path
    b = mlp_batch(tasks=4)

    def run(vectorize):
        learner = MetaLearner(mlp(), mse, adapt=adapt, rule=rule, lr=0.3, schedule=Schedule(7),
                              meta_gradient=mg.Implicit(lam=2.0, inner_lr=inner_lr, cg_steps=4, damping=damping))
        return learner.meta_gradient_of(b, vectorize=vectorize)

    (g_stacked, s_stacked), (g_loop, s_loop) = run(True), run(False)
    assert max_diff(g_stacked, g_loop) < 1e-10 and flat(g_loop).abs().max() > 1e-3
    for key in ("inner_loss", "query_loss"):
        assert s_stacked[key].shape == s_loop[key].shape
        assert torch.allclose(s_stacked[key], s_loop[key], rtol=0, atol=1e-12)


def test_implicit_cg_is_exact_at_dimension_steps_and_stays_finite_beyond():
    lam = 0.5
    b = linreg_batch()
    out = {}
    for steps in (D + 1, 3 * (D + 1)):
        learner = MetaLearner(linreg_model(), mse, meta_gradient=mg.Implicit(lam, inner_steps=600, inner_lr=0.1,
                                                                             cg_steps=steps))
        out[steps] = flat(learner.meta_gradient_of(b)[0])
    ref = imaml_meta_gradient(theta_of(linreg_model()), b, lam)
    assert rel(out[D + 1], ref) < 1e-8 and rel(out[3 * (D + 1)], ref) < 1e-8
    # damping solves the shifted system ((1 + d) I + H/lam) v = g
    d = 0.3
    learner = MetaLearner(linreg_model(), mse,
                          meta_gradient=mg.Implicit(lam, inner_steps=600, inner_lr=0.1, cg_steps=D + 1, damping=d))
    theta = theta_of(learner.model)
    total = 0
    for i in range(b.num_tasks):
        H, c = quadratic(b.support_x[i], b.support_y[i])
        eye = torch.eye(D + 1, dtype=DT)
        u_star = torch.linalg.solve(H + lam * eye, c + lam * theta)
        total = total + torch.linalg.solve((1 + d) * eye + H / lam, grad_mse(b.query_x[i], b.query_y[i], u_star))
    assert rel(flat(learner.meta_gradient_of(b)[0]), total / b.num_tasks) < 1e-8


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_implicit_matches_exact_hessian_reference_on_tanh_mlp(adapt):
    from torch.func import functional_call

    lam = 5.0
    b = mlp_batch(tasks=2)
    learner = MetaLearner(mlp(), mse, adapt=adapt,
                          meta_gradient=mg.Implicit(lam, inner_steps=150, inner_lr=0.1, cg_steps=40))
    grads, _ = learner.meta_gradient_of(b)
    names = [n for n, _ in learner.model.named_parameters()]
    p0 = {n: p.detach() for n, p in learner.model.named_parameters()}
    sizes = [p0[n].numel() for n in names]
    mask = torch.cat([torch.full((s,), n in learner.adapted_names) for n, s in zip(names, sizes)])
    theta = torch.cat([p0[n].reshape(-1) for n in names])

    def unflat(f):
        return {n: t.view_as(p0[n]) for n, t in zip(names, f.split(sizes))}

    ref = 0
    for i in range(b.num_tasks):
        sx, sy, qx, qy = (z[i] for z in b)
        train = lambda f: mse(functional_call(learner.model, unflat(f), (sx,)), sy)  # noqa: E731
        val = lambda f: mse(functional_call(learner.model, unflat(f), (qx,)), qy)  # noqa: E731
        f = theta.clone()
        for _ in range(12):  # Newton on the proximal objective over the adapted entries
            H = torch.autograd.functional.hessian(train, f)
            g = torch.autograd.functional.jacobian(train, f) + lam * (f - theta)
            f = f.clone()
            f[mask] -= torch.linalg.solve(H[mask][:, mask] + lam * torch.eye(int(mask.sum()), dtype=DT), g[mask])
        H = torch.autograd.functional.hessian(train, f)
        gJ = torch.autograd.functional.jacobian(val, f)
        huu, hpu = H[mask][:, mask], H[~mask][:, mask]
        v = torch.linalg.solve(torch.eye(len(huu), dtype=DT) + huu / lam, gJ[mask])
        full = torch.empty_like(theta)
        full[mask] = v
        full[~mask] = gJ[~mask] - hpu @ v / lam  # non-adapted body: mixed second derivative
        ref = ref + full / b.num_tasks
    assert rel(flat(grads), ref) < 1e-9


# ---------------------------------------------------------------- checkpointed
RULES = {"sgd": lambda: mg.SGD(0.3), "sgd-learnable": lambda: mg.SGD(0.3, learnable=True),
         "meta-sgd": lambda: mg.MetaSGD(0.3)}
CASES = [  # (rule, adapt, K, segments, per_step_loss)
    ("sgd", "all", 1, None, False), ("sgd", "all", 5, None, False), ("sgd", "all", 9, 2, False),
    ("sgd", "head", 9, 3, False), ("sgd", "all", 7, 7, True), ("sgd", "all", 4, 100, False),
    ("sgd-learnable", "all", 6, 4, False), ("sgd-learnable", "head", 5, None, True),
    ("meta-sgd", "all", 8, None, False), ("meta-sgd", "head", 8, 3, False), ("meta-sgd", "all", 5, 2, True),
    ("sgd", "all", 0, None, False),
]


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("rule,adapt,K,segments,per_step", CASES)
def test_checkpointed_equals_unrolled(rule, adapt, K, segments, per_step, vectorize):
    b = mlp_batch()
    ref = MetaLearner(mlp(), mse, adapt=adapt, rule=RULES[rule](), schedule=Schedule(K, per_step_loss=per_step))
    ck = MetaLearner(mlp(), mse, adapt=adapt, rule=RULES[rule](), schedule=Schedule(K, per_step_loss=per_step),
                     meta_gradient=mg.Checkpointed(segments))
    ck.load_state_dict(ref.state_dict())
    g_ref, s_ref = ref.meta_gradient_of(b, vectorize=vectorize)
    g_ck, s_ck = ck.meta_gradient_of(b, vectorize=vectorize)
    assert max_diff(g_ref, g_ck) < 1e-12
    for key in s_ref:
        assert torch.allclose(s_ref[key], s_ck[key], rtol=0, atol=1e-12), key


def test_checkpointed_equals_unrolled_for_a_rule_that_adapts_its_state():
    b = mlp_batch()
    kw = dict(rule=mg.MetaKFO(0.3, adapt_state=True), schedule=Schedule(5))
    ref = MetaLearner(mlp(), mse, **kw)
    ck = MetaLearner(mlp(), mse, meta_gradient=mg.Checkpointed(2), **kw)
    ck.load_state_dict(ref.state_dict())
    assert max_diff(ref.meta_gradient_of(b)[0], ck.meta_gradient_of(b)[0]) < 1e-12


def test_checkpointed_segments_are_about_sqrt_k():
    assert mg.Checkpointed().bounds(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert len(mg.Checkpointed().bounds(100)) == 10
    assert mg.Checkpointed(3).bounds(7) == [(0, 3), (3, 6), (6, 7)]
    assert mg.Checkpointed(50).bounds(4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert mg.Checkpointed().bounds(0) == []


class _MetaLoss(torch.autograd.Function):
    """The meta-loss as a function of the flat initialization, with the checkpointed gradient as backward."""

    @staticmethod
    def forward(ctx, flat_params, learner, batch):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat_params, learner.model.parameters())
        grads, stats = learner.meta_gradient_of(batch)
        ctx.save_for_backward(flat(grads))
        return stats["meta_objective"].clone()

    @staticmethod
    def backward(ctx, out_grad):
        (g,) = ctx.saved_tensors
        return out_grad * g, None, None


@pytest.mark.parametrize("rule,adapt", [("sgd", "all"), ("meta-sgd", "head")])
def test_checkpointed_gradcheck_of_the_meta_loss(rule, adapt):
    b = mlp_batch(tasks=2)
    learner = MetaLearner(mlp(), mse, adapt=adapt, rule=RULES[rule](), schedule=Schedule(6),
                          meta_gradient=mg.Checkpointed(2))
    x = torch.nn.utils.parameters_to_vector(learner.model.parameters()).detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: _MetaLoss.apply(p, learner, b), (x,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- all three train
@pytest.mark.parametrize("method", [mg.Adjoint(T=0.3, h=0.1), mg.Implicit(2.0, inner_steps=5, cg_steps=3),
                                   mg.Checkpointed()])
def test_meta_step_runs(method):
    b = mlp_batch()
    learner = MetaLearner(mlp(), mse, rule=mg.SGD(0.1), schedule=Schedule(4), meta_gradient=method)
    before = torch.nn.utils.parameters_to_vector(learner.parameters()).detach().clone()
    stats = learner.meta_step(b, torch.optim.SGD(learner.parameters(), lr=0.1))
    after = torch.nn.utils.parameters_to_vector(learner.parameters()).detach()
    assert torch.isfinite(stats["meta_objective"]) and not torch.equal(before, after)
