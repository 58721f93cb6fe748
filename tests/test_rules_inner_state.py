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


def _dead_relu_model():
    """Linear(2, 6) -> ReLU -> Linear(6, 1) whose first two hidden units never fire (bias -100): the
    gradients of their weights are exactly zero on every input, so Adam's second moment is 0 there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).to(DT)
    with torch.no_grad():
        model[0].bias[:2] = -100.0
    return model


MODELS = {"tanh": _model, "dead-relu": _dead_relu_model}


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("kind", list(OPTIMS))
def test_gradcheck_through_learner_adapt(kind, arch):
    """The query loss after K = 3 inner steps of ``learner.adapt`` (differentiable, second order) as a
    function of the initialization, under gradcheck; with dead ReLU units too (exactly zero
    gradient entries, where Adam's ``sqrt(v)`` has no derivative), and the engine's meta-gradient
    is finite and equals autograd of the same function."""
    model, b = MODELS[arch](), _batch(1)
    learner = MetaLearner(model, mse, rule=OPTIMS[kind][0](), schedule=Schedule(3))
    sx, sy, qx, qy = (t[0] for t in b)

    def query_loss(*theta):  # theta are the model's own parameters, which gradcheck perturbs in place
        adapted = learner.adapt(sx, sy, steps=3)
        return mse(learner.functional_forward(adapted, qx), qy)

    theta = tuple(model.parameters())
    assert torch.autograd.gradcheck(query_loss, theta, eps=1e-6, atol=1e-6, rtol=1e-5)
    ref = torch.autograd.grad(query_loss(*theta), theta)
    for vectorize in (True, False):
        for method in (mg.Unrolled(), mg.Checkpointed(segments=2)):
            learner.meta_gradient = method
            grads, _ = learner.meta_gradient_of(b, vectorize=vectorize)
            for (n, _), r in zip(model.named_parameters(), ref):
                assert torch.isfinite(grads["model"][n]).all(), (n, method, vectorize)
                torch.testing.assert_close(grads["model"][n], r, rtol=1e-10, atol=1e-12)
    if arch == "dead-relu":  # the dead units' weights get no meta-gradient (the loss is flat in them)
        assert (ref[0][:2] == 0).all() and (ref[1][:2] == 0).all()


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_evaluate_and_the_object_api_step_as_torch_optim(kind):
    """``evaluate`` (column k: the query loss after k steps) and ``clone().adapt`` against
    ``torch.optim`` run on a copy of the model, task by task: each task starts from a fresh
    inner state and carries it from step to step."""
    make_rule, make_optim = OPTIMS[kind]
    model, b, steps = _model(), _batch(3), 4
    learner = MetaLearner(model, mse, rule=make_rule(), schedule=Schedule(steps))
    expected = []
    for i in range(b.num_tasks):
        copy = _model()
        copy.load_state_dict(model.state_dict())
        opt = make_optim(list(copy.parameters()))
        row = []
        for k in range(steps + 1):
            with torch.no_grad():
                row.append(mse(copy(b.query_x[i]), b.query_y[i]))
            if k < steps:
                opt.zero_grad()
                mse(copy(b.support_x[i]), b.support_y[i]).backward()
                opt.step()
        expected.append(torch.stack(row))
    expected = torch.stack(expected)
    for vectorize in (True, False):
        got = learner.evaluate(b, steps=steps, vectorize=vectorize)["loss"]
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-13)
    for i in range(b.num_tasks):
        task = learner.clone()
        for _ in range(steps):
            task.adapt(mse(task(b.support_x[i]), b.support_y[i]))
        torch.testing.assert_close(mse(task(b.query_x[i]), b.query_y[i]).detach(), expected[i, -1],
                                   rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("kind", list(OPTIMS))
def test_object_api_meta_gradient_equals_the_functional_one(kind):
    model, b = _model(), _batch(2)
    learner = MetaLearner(model, mse, rule=OPTIMS[kind][0](), schedule=Schedule(3))
    for i in range(b.num_tasks):
        task = learner.clone()
        for _ in range(3):
            task.adapt(mse(task(b.support_x[i]), b.support_y[i]))
        (mse(task(b.query_x[i]), b.query_y[i]) / b.num_tasks).backward()
    grads, _ = learner.meta_gradient_of(b)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads["model"][n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("build, error", [
    (lambda: Adam(0), ValueError), (lambda: Adam(-0.1), ValueError), (lambda: Adam("0.1"), TypeError),
    (lambda: Adam(0.1, betas=(1.0, 0.999)), ValueError), (lambda: Adam(0.1, betas=(0.9,)), ValueError),
    (lambda: Adam(0.1, betas=(0.9, -0.1)), ValueError), (lambda: Adam(0.1, eps=0), ValueError),
    (lambda: Momentum(float("nan")), ValueError), (lambda: Momentum(0.1, momentum=1.0), ValueError),
    (lambda: Momentum(0.1, momentum=-0.5), ValueError), (lambda: Momentum(0.1, nesterov=1), TypeError),
])
def test_bad_arguments_are_refused(build, error):
    with pytest.raises(error):
        build()


def test_registered_and_built_by_name():
    adam, momentum = mg.make_rule("adam", lr=0.01), mg.make_rule("momentum", lr=0.01)
    assert isinstance(adam, Adam) and adam.lr == 0.01 and adam.betas == (0.9, 0.999) and adam.eps == 1e-8
    assert isinstance(momentum, Momentum) and momentum.momentum == 0.9 and not momentum.nesterov
    assert adam.elementwise and momentum.elementwise
    assert adam.gradient_descent_rate is None and momentum.gradient_descent_rate is None
    learner = MetaLearner(_model(), mse, rule="adam", lr=0.02)
    assert isinstance(learner.rule, Adam) and learner.rule.lr == 0.02
