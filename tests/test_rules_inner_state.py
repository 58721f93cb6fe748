"""Inner rules with inner state (Adam, SGD with momentum): against torch.optim step by step, their
state kept out of the meta-parameters, and under gradcheck through the unrolled meta-gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad import Adam, MetaLearner, Momentum, Schedule, TaskBatch
from metagrad.metrics import mse

DT = torch.float64
OPTIMS = {
    "adam": (lambda: Adam(0.05, betas=(0.8, 0.95), eps=1e-6),
             lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), eps=1e-6)),
    "momentum": (lambda: Momentum(0.05, momentum=0.7),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.7)),
    "nesterov": (lambda: Momentum(0.05, momentum=0.7, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.7, nesterov=True)),
}


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_steps_match_torch_optim(kind):
    make_rule, make_optim = OPTIMS[kind]
    rule = make_rule()
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}
    leaves = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    opt = make_optim(list(leaves.values()))
    state, inner = rule.init(params), rule.init_inner(params)
    assert state == {}
    for _ in range(10):
        grads = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
        params, inner = rule.step(params, grads, state, inner)
        for n, p in leaves.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, p in leaves.items():
            torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-14)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)


def _batch(tasks=2):
    g = torch.Generator().manual_seed(1)
    return TaskBatch(*(torch.randn(tasks, 5, k, generator=g, dtype=DT) for k in (2, 1, 2, 1)))


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_inner_state_is_not_meta_learned(kind):
    learner = MetaLearner(_model(), mse, rule=OPTIMS[kind][0](), schedule=Schedule(2))
    assert learner.meta_parameters()["rule"] == {}
    assert all(k.startswith("model.") for k in learner.state_dict())
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    b = _batch()
    for _ in range(3):
        learner.meta_step(b, opt)
    # every task's inner loop starts from a fresh inner state: the first Adam step is
    # lr * g / (|g| + eps) (m_hat = g, v_hat = g^2), whatever meta-steps came before
    if kind == "adam":
        theta = dict(learner.model.named_parameters())
        g = torch.autograd.grad(mse(learner.model(b.support_x[0]), b.support_y[0]), list(theta.values()))
        adapted = learner.adapt(b.support_x[0], b.support_y[0], steps=1)
        for (n, p), gn in zip(theta.items(), g):
            torch.testing.assert_close(adapted[n] - p, -0.05 * gn / (gn.abs() + 1e-6), rtol=1e-10, atol=1e-14)


def _hand_meta_gradient(kind, model, batch, steps):
    """The unrolled meta-gradient written out: autograd steps with the rule's formulas inline."""
    lr, mu, b1, b2, eps = 0.05, 0.7, 0.8, 0.95, 1e-6
    theta = list(model.parameters())
    total = 0.0
    for i in range(batch.num_tasks):
        p = list(theta)
        m = [torch.zeros_like(t) for t in p]
        v = [torch.zeros_like(t) for t in p]
        for t in range(1, steps + 1):
            out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], p)),
                                             (batch.support_x[i],))
            grads = torch.autograd.grad(mse(out, batch.support_y[i]), p, create_graph=True)
            if kind == "adam":
                m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
                v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grads)]
                p = [w - lr * (a / (1 - b1 ** t)) / ((c / (1 - b2 ** t)).sqrt() + eps) for w, a, c in zip(p, m, v)]
            else:
                m = [mu * a + g for a, g in zip(m, grads)]
                step = [g + mu * a for g, a in zip(grads, m)] if kind == "nesterov" else m
                p = [w - lr * s for w, s in zip(p, step)]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], p)),
                                         (batch.query_x[i],))
        total = total + mse(out, batch.query_y[i])
    return torch.autograd.grad(total / batch.num_tasks, theta)


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_unrolled_meta_gradient_equals_a_hand_unrolled_loop(kind):
    model, b = _model(), _batch(3)
    learner = MetaLearner(model, mse, rule=OPTIMS[kind][0](), meta_gradient="unrolled", schedule=Schedule(3))
    ref = _hand_meta_gradient(kind, model, b, 3)
    for vectorize in (True, False):
        grads, _ = learner.meta_gradient_of(b, vectorize=vectorize)
        for (n, _), r in zip(model.named_parameters(), ref):
            torch.testing.assert_close(grads["model"][n], r, rtol=1e-10, atol=1e-12)
    assert max(r.abs().max() for r in ref) > 1e-3


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_gradcheck_through_the_inner_loop(kind):
    model, b = _model(), _batch(1)
    learner = MetaLearner(model, mse, rule=OPTIMS[kind][0](), schedule=Schedule(3))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    problem = learner.problem

    def query_loss(*theta):
        meta = {"model": dict(zip(names, theta)), "rule": {}}
        result = mg.inner_loop(problem, meta, b.support_x[0], b.support_y[0], steps=3)
        return problem.loss(result.trajectory[-1], result.fixed, b.query_x[0], b.query_y[0])

    theta = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert [t.shape for t in theta] == shapes
    assert torch.autograd.gradcheck(query_loss, theta, eps=1e-6, atol=1e-6, rtol=1e-5)
