"""The public inner problem: ``InnerProblem``, ``inner_loop`` and the backend a learner picks.

References are computed another way: a hand-written loop of ``torch.autograd.grad`` steps, a
``vmap`` of the per-task loop, the unrolled meta-gradient.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap

import metagrad as mg
import metagrad.models  # noqa: F401  (mg.models below)
from metagrad import MetaLearner, Schedule, TaskBatch, inner_loop
from metagrad.backend import make_backend
from metagrad.metrics import mse

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def _batch(tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(*(torch.randn(tasks, 4, k, generator=g, dtype=DT) for k in (2, 1, 2, 1)))


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_inner_loop_equals_a_hand_written_loop(adapt):
    learner = MetaLearner(_mlp(), mse, adapt=adapt, rule=mg.SGD(0.3), schedule=Schedule(3))
    b = _batch()
    meta = learner.meta_parameters()
    result = inner_loop(learner.problem, meta, b.support_x[0], b.support_y[0], steps=3, keep_trajectory=True)
    # reference: explicit autograd steps on the module's own parameters
    names = learner.adapted_names
    params = {n: p for n, p in learner.model.named_parameters()}
    losses = []
    for k in range(3):
        out = torch.func.functional_call(learner.model, params, (b.support_x[0],))
        loss = mse(out, b.support_y[0])
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        params = {**params, **{n: params[n] - 0.3 * g for n, g in zip(names, grads)}}
        losses.append(loss.detach())
        for n in names:
            torch.testing.assert_close(result.trajectory[k + 1][n], params[n], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.losses, torch.stack(losses), rtol=1e-12, atol=1e-14)
    assert set(result.params()) == set(dict(learner.model.named_parameters()))
    # differentiable, second order
    q = mse(torch.func.functional_call(learner.model, result.params(), (b.query_x[0],)), b.query_y[0])
    ref_q = mse(torch.func.functional_call(learner.model, params, (b.query_x[0],)), b.query_y[0])
    theta = list(learner.model.parameters())
    for g, r in zip(torch.autograd.grad(q, theta), torch.autograd.grad(ref_q, theta)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", [mg.SGD(0.2), mg.MetaSGD(0.2), mg.SGD(0.2, learnable=True)])
def test_stacked_inner_loop_equals_vmap_of_the_per_task_loop(rule):
    learner = MetaLearner(_mlp(), mse, rule=rule, schedule=Schedule(4))
    problem, b = learner.problem, _batch(tasks=4)
    assert problem.stacked
    meta = learner.meta_parameters()
    with torch.enable_grad():
        stacked = inner_loop(problem, meta, b.support_x, b.support_y, steps=4, stacked=True)

    def one(sx, sy):
        r = inner_loop(problem, meta, sx, sy, steps=4)
        return r.trajectory[-1], r.losses

    final, losses = vmap(one)(b.support_x, b.support_y)
    assert stacked.losses.shape == (4, 4)
    torch.testing.assert_close(stacked.losses, losses, rtol=1e-12, atol=1e-14)
    for n in final:
        torch.testing.assert_close(stacked.trajectory[-1][n], final[n], rtol=1e-12, atol=1e-14)


def test_checkpointed_equals_unrolled_with_integer_buffers():
    # running-statistics BatchNorm (eval mode) has an integer buffer: the checkpointed method
    # differentiates inner states, which must not hold it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT).eval()
    b = _batch()
    ref = MetaLearner(model, mse, rule=mg.SGD(0.1), meta_gradient="unrolled", schedule=Schedule(3))
    ck = MetaLearner(model, mse, rule=mg.SGD(0.1), meta_gradient=mg.Checkpointed(2), schedule=Schedule(3))
    assert ref.backend.name == "generic"
    for vectorize in (True, False):
        g_ref, _ = ref.meta_gradient_of(b, vectorize=vectorize)
        g_ck, _ = ck.meta_gradient_of(b, vectorize=vectorize)
        for n in g_ref["model"]:
            torch.testing.assert_close(g_ck["model"][n], g_ref["model"][n], rtol=1e-10, atol=1e-12)
    assert "1.num_batches_tracked" in ck.adapt(b.support_x[0], b.support_y[0])


def test_the_backend_is_picked_once_and_named():
    assert MetaLearner(_mlp(), mse).backend.name == "mlp-analytic"
    assert MetaLearner(_mlp(), nn.functional.l1_loss).backend.name == "mlp"
    assert MetaLearner(nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)), mse).backend.name == "mlp"
    assert MetaLearner(mg.models.CNN(2, ways=5), nn.functional.cross_entropy).backend.name == "generic"
    assert MetaLearner(_mlp(), mse, backend="generic").backend.name == "generic"
    with pytest.raises(ValueError, match="unknown backend 'fast'; valid: auto, generic, mlp, mlp-analytic"):
        MetaLearner(_mlp(), mse, backend="fast")
    with pytest.raises(ValueError, match="plain MLP"):
        make_backend(mg.models.CNN(2, ways=5), mse, "mlp")
    with pytest.raises(ValueError, match="mean-square"):
        make_backend(_mlp(), nn.functional.l1_loss, "mlp-analytic")


def test_a_rule_that_is_not_elementwise_or_a_generic_model_does_not_run_stacked():
    assert not MetaLearner(_mlp(), mse, rule=mg.MetaCurvature(0.1)).problem.stacked
    assert not MetaLearner(_mlp(), mse, backend="generic").problem.stacked
    assert not MetaLearner(_mlp(), mse, rule=mg.MetaKFO(0.1, adapt_state=True)).problem.stacked
