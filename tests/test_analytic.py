"""Hand-written gradients and Hessian-vector products of plain MLPs against autograd (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MetaLearner, Schedule
from metagrad.gradients import Adjoint, Implicit
from metagrad.backend import MLPBackend, _Analytic, make_backend

analytic_mlp = _Analytic.build
from metagrad.metrics import half_mse, mse
from metagrad.tasks import TaskBatch

TASKS = 3


def _mlp(act, bias=True, sizes=(2, 7, 5, 2)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _stacked_params(model, gen):
    return {n: p.detach().expand(TASKS, *p.shape) + 0.3 * torch.randn(TASKS, *p.shape, generator=gen, dtype=p.dtype)
            for n, p in model.named_parameters()}


def _autograd(model, loss_fn, u, x, y, v):
    """Reference: every task's loss, gradient and H v by double backward through the module itself."""
    out = []
    for i in range(TASKS):
        names = list(u)
        p = [u[n][i].clone().requires_grad_() for n in names]
        loss = loss_fn(torch.func.functional_call(model, dict(zip(names, p)), (x[i],)), y[i])
        g = torch.autograd.grad(loss, p, create_graph=True)
        hv = torch.autograd.grad(g, p, grad_outputs=[v[n][i] for n in names])
        out.append((loss.detach(), dict(zip(names, g)), dict(zip(names, hv))))
    return out


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU, lambda: nn.LeakyReLU(0.2), nn.Identity])
@pytest.mark.parametrize("loss_fn", [mse, half_mse, F.mse_loss])
@pytest.mark.parametrize("bias", [True, False])
def test_gradient_and_hvp_match_autograd(act, loss_fn, bias):
    gen = torch.Generator().manual_seed(0)
    model = _mlp(act, bias)
    u = _stacked_params(model, gen)
    v = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in u.items()}
    x = torch.randn(TASKS, 4, 6, 2, generator=gen, dtype=torch.float64)  # extra batch dims
    y = torch.randn(TASKS, 4, 6, 2, generator=gen, dtype=torch.float64)
    analytic = analytic_mlp(model, loss_fn)
    assert analytic is not None and analytic.applies(u, x, y)
    loss, g = analytic.grad(u, x, y)
    hvp, loss2 = analytic.linearize(u, x, y)
    hv = hvp(v)
    assert torch.equal(loss, loss2)
    for i, (ref_loss, ref_g, ref_hv) in enumerate(_autograd(model, loss_fn, u, x, y, v)):
        torch.testing.assert_close(loss[i], ref_loss, rtol=1e-12, atol=1e-14)
        for n in u:
            torch.testing.assert_close(g[n][i], ref_g[n], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(hv[n][i], ref_hv[n], rtol=1e-10, atol=1e-12)
    # and the stacked helpers the meta-gradients call take this path and agree with their autograd one
    names = list(u)
    backend = make_backend(model, loss_fn)
    assert backend.name == "mlp-analytic"
    pull, _ = backend.linearize(u, {}, x, y)
    pull_ref, _ = MLPBackend(model, loss_fn, analytic=False).linearize(u, {}, x, y)
    for n in names:
        torch.testing.assert_close(pull(v)[0][n], pull_ref(v)[0][n], rtol=1e-10, atol=1e-12)


def test_where_the_hand_written_derivatives_do_not_apply():
    assert analytic_mlp(_mlp(nn.GELU), mse) is None  # no second derivative written for it
    assert analytic_mlp(_mlp(nn.Tanh), F.cross_entropy) is None
    assert analytic_mlp(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), mse) is None
    assert analytic_mlp(nn.Sequential(nn.Tanh()), mse) is None  # nothing to differentiate
    model = _mlp(nn.Tanh)
    analytic = analytic_mlp(model, mse)
    u = _stacked_params(model, torch.Generator().manual_seed(0))
    x = torch.zeros(TASKS, 4, 2, dtype=torch.float64)
    assert not analytic.applies(u, x, torch.zeros(TASKS, 4, 1, dtype=torch.float64))  # y: not the output's shape
    assert not analytic.applies({k: v for k, v in u.items() if k != "0.bias"}, x, torch.zeros(TASKS, 4, 2))


@pytest.mark.parametrize("meta_gradient", [Adjoint(T=0.3, h=0.01), Adjoint(T=0.3, h=0.01, backward="heun-pec"),
                                           Implicit(lam=1.0, cg_steps=5)])
def test_meta_gradients_agree_with_and_without_the_hand_written_path(meta_gradient, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(4, 12, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(3 * x[..., :1]) + x[..., 1:]
    batch = TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])

    def meta_grad(backend):
        learner = MetaLearner(model, mse, lr=0.01, meta_gradient=meta_gradient, schedule=Schedule(20), vectorize=True,
                              backend=backend)
        grads, stats = learner.meta_gradient_of(batch)
        return grads, stats["inner_loss"]

    fast, fast_inner = meta_grad("mlp-analytic")
    ref, ref_inner = meta_grad("mlp")
    torch.testing.assert_close(fast_inner, ref_inner, rtol=1e-12, atol=1e-14)
    for n in ref["model"]:
        torch.testing.assert_close(fast["model"][n], ref["model"][n], rtol=1e-9, atol=1e-12)
