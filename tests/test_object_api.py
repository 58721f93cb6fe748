"""The learn2learn-shaped object API (``learner.clone()`` / ``TaskModel.adapt``), ``MetaLearner.adapt``
and ``meta_step``, checked against the functional engine (``meta_gradient_of``) in float64."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from metagrad import MetaLearner, MetaSGD, Schedule, SGD, TaskBatch
from metagrad.metrics import mse

DT = torch.float64
STEPS = 2
TASKS = 3


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def make_batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(TASKS, 4, 2, generator=g, dtype=DT), torch.randn(TASKS, 4, 1, generator=g, dtype=DT),
        torch.randn(TASKS, 6, 2, generator=g, dtype=DT), torch.randn(TASKS, 6, 1, generator=g, dtype=DT),
    )


RULES = {"sgd": lambda: SGD(0.2), "sgd-learnable": lambda: SGD(0.2, learnable=True), "meta-sgd": lambda: MetaSGD(0.2)}
CASES = list(itertools.product(["unrolled", "first-order"], list(RULES), ["all", "head"]))


def learner_for(mgrad, rule, adapt):
    return MetaLearner(make_model(), mse, adapt=adapt, rule=RULES[rule](), meta_gradient=mgrad,
                       schedule=Schedule(STEPS))


def named_params(learner):
    return dict(learner.named_parameters())


def engine_grads_by_name(learner, grads):
    """Map ``meta_gradient_of``'s nested dict onto ``learner.named_parameters()`` names via identity."""
    by_id = {}
    for group, tensors in learner.meta_parameters().items():
        for n, p in tensors.items():
            by_id[id(p)] = grads[group][n]
    return {n: by_id[id(p)] for n, p in learner.named_parameters()}


@pytest.mark.parametrize("mgrad,rule,adapt", CASES)
def test_clone_adapt_backward_matches_meta_gradient(mgrad, rule, adapt):
    learner = learner_for(mgrad, rule, adapt)
    batch = make_batch()
    grads, _ = learner.meta_gradient_of(batch)
    want = engine_grads_by_name(learner, grads)

    learner.zero_grad(set_to_none=True)
    for t in range(TASKS):
        sx, sy, qx, qy = (z[t] for z in batch)
        task = learner.clone()
        for _ in range(STEPS):
            task.adapt(mse(task(sx), sy))
        assert task.steps_taken == STEPS
        (mse(task(qx), qy) / TASKS).backward()
    got = {n: p.grad for n, p in learner.named_parameters()}
    assert set(got) == set(want)
    for n in want:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-10, msg=n)
    # the learnable rule state is among the learner's parameters and got a gradient
    if rule != "sgd":
        assert any(n.startswith("rule_state") and got[n].abs().max() > 1e-6 for n in got)


def test_clone_first_order_flag_overrides_learner():
    """``task.adapt(loss, first_order=True)`` on a second-order learner gives the first-order gradient."""
    batch = make_batch()
    fo = learner_for("first-order", "meta-sgd", "all")
    want = engine_grads_by_name(fo, fo.meta_gradient_of(batch)[0])
    learner = learner_for("unrolled", "meta-sgd", "all")
    learner.zero_grad(set_to_none=True)
    for t in range(TASKS):
        sx, sy, qx, qy = (z[t] for z in batch)
        task = learner.clone()
        for _ in range(STEPS):
            task.adapt(mse(task(sx), sy), first_order=True)
        (mse(task(qx), qy) / TASKS).backward()
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-10, msg=n)


def test_clone_does_not_modify_the_learner_and_rejects_non_finite_loss():
    learner = learner_for("unrolled", "sgd", "all")
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    batch = make_batch()
    task = learner.clone()
    task.adapt(mse(task(batch.support_x[0]), batch.support_y[0]))
    for n, p in learner.named_parameters():
        assert torch.equal(p, before[n])
    assert not torch.allclose(task(batch.query_x[0]), learner.model(batch.query_x[0]))
    with pytest.raises(ValueError, match="step 1"):
        task.adapt(mse(task(batch.support_x[0]), torch.full_like(batch.support_y[0], float("nan"))))


@pytest.mark.parametrize("rule", list(RULES))
def test_adapt_is_differentiable_second_order(rule):
    """``learner.adapt`` is differentiable: backward through one task's query loss equals the unrolled
    meta-gradient of that single task."""
    learner = learner_for("unrolled", rule, "all")
    batch = make_batch()
    one = batch.task(1)
    want = engine_grads_by_name(learner, learner.meta_gradient_of(one)[0])
    learner.zero_grad(set_to_none=True)
    adapted = learner.adapt(one.support_x[0], one.support_y[0], steps=STEPS)
    mse(learner.functional_forward(adapted, one.query_x[0]), one.query_y[0]).backward()
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("mgrad", ["unrolled", "first-order", "reptile"])
@pytest.mark.parametrize("rule", list(RULES))
def test_meta_step_with_sgd_optimizer_moves_by_minus_eta_grad(mgrad, rule):
    learner = MetaLearner(make_model(), mse, adapt="all", rule=RULES[rule](), meta_gradient=mgrad,
                          schedule=Schedule(STEPS))
    batch = make_batch()
    grads, stats0 = learner.meta_gradient_of(batch)
    want = engine_grads_by_name(learner, grads)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    eta = 0.05
    opt = torch.optim.SGD(learner.parameters(), lr=eta)
    stats = learner.meta_step(batch, opt)
    torch.testing.assert_close(stats["meta_objective"], stats0["meta_objective"], rtol=0, atol=0)
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - eta * want[n], rtol=0, atol=1e-14, msg=n)
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=0, msg=n)
    # the live meta-parameters actually moved
    assert any(not torch.equal(p, before[n]) for n, p in learner.named_parameters())


def test_reptile_meta_step_is_reptile_interpolation():
    """With outer SGD at rate eps, Reptile's step is ``theta <- theta + eps * mean_t (u_K^t - theta)``."""
    learner = MetaLearner(make_model(), mse, lr=0.2, meta_gradient="reptile", schedule=Schedule(STEPS))
    batch = make_batch()
    theta = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    ends = [learner.adapt(batch.support_x[t], batch.support_y[t], steps=STEPS) for t in range(TASKS)]
    eps = 0.5
    learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=eps))
    for n, p in learner.model.named_parameters():
        mean_end = sum(e[n].detach() for e in ends) / TASKS
        torch.testing.assert_close(p.detach(), theta[n] + eps * (mean_end - theta[n]), rtol=0, atol=1e-14)
