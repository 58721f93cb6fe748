"""A learn2learn user's habits (issue 21): frozen parameters and ``allow_nograd``, ``allow_unused``,
BatchNorm running statistics in the functional path, a module-like ``TaskModel`` and ``first_order``.
Every gradient is checked against a hand-unrolled loop (autograd through explicit SGD steps with
``torch.func.functional_call``), in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metagrad import MetaLearner, Schedule, SGD, TaskBatch
from metagrad.metrics import mse

DT = torch.float64
LR = 0.2
STEPS = 2
TASKS = 3


def make_batch(seed=7, d_in=2):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(TASKS, 4, d_in, generator=g, dtype=DT), torch.randn(TASKS, 4, 1, generator=g, dtype=DT),
        torch.randn(TASKS, 6, d_in, generator=g, dtype=DT), torch.randn(TASKS, 6, 1, generator=g, dtype=DT),
    )


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def hand_unrolled(model, batch, *, steps=STEPS, lr=LR, first_order=False, call=None):
    """``(mean query loss, {name: meta-gradient})`` by explicit SGD steps on every parameter that
    requires grad (frozen ones are constants; a parameter without a gradient is not stepped)."""
    call = call or (lambda p, x: functional_call(model, p, (x,)))
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    const = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    total = 0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = (z[t] for z in batch)
        u = dict(theta)
        for _ in range(steps):
            loss = mse(call({**const, **u}, sx), sy)
            gs = torch.autograd.grad(loss, list(u.values()), create_graph=not first_order, allow_unused=True)
            u = {n: v if g is None else v - lr * (g.detach() if first_order else g) for (n, v), g in zip(u.items(), gs)}
        total = total + mse(call({**const, **u}, qx), qy)
    total = total / batch.num_tasks
    grads = torch.autograd.grad(total, list(theta.values()), allow_unused=True)
    return total.detach(), {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(theta, grads)}


def learner_for(model, **kw):
    kw.setdefault("meta_gradient", "unrolled")
    return MetaLearner(model, mse, rule=SGD(LR), schedule=Schedule(STEPS), **kw)


def object_api_grads(learner, batch, **clone_kw):
    learner.zero_grad(set_to_none=True)
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = (z[t] for z in batch)
        task = learner.clone(**clone_kw)
        for _ in range(STEPS):
            task.adapt(mse(task(sx), sy))
        (mse(task(qx), qy) / batch.num_tasks).backward()
    return {n: p.grad for n, p in learner.model.named_parameters()}


# ---------------------------------------------------------------------------- 1. frozen parameters
@pytest.mark.parametrize("vectorize", [True, False])
def test_frozen_parameters_neither_adapt_nor_move(vectorize):
    model = mlp()
    model[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    learner = learner_for(model, vectorize=vectorize)
    assert learner.adapted_names == ("2.weight", "2.bias")
    batch = make_batch()
    loss, want = hand_unrolled(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eta = 0.05
    stats = learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=eta))
    torch.testing.assert_close(stats["meta_objective"], loss, rtol=0, atol=1e-12)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p.detach(), frozen[n]), n
        else:
            torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-12, msg=n)
            torch.testing.assert_close(p.detach(), before[n] - eta * want[n], rtol=0, atol=1e-12, msg=n)
    # Adam (what learn2learn users pass) leaves them too
    learner.meta_step(batch, torch.optim.Adam(learner.parameters(), lr=eta))
    for n in frozen:
        assert torch.equal(dict(model.named_parameters())[n].detach(), frozen[n])


def test_frozen_parameters_object_api_allow_nograd():
    model = mlp()
    model[0].requires_grad_(False)
    learner = learner_for(model)
    batch = make_batch()
    sx, sy = batch.support_x[0], batch.support_y[0]
    task = learner.clone()
    with pytest.raises(ValueError, match=r"0\.weight, 0\.bias.*allow_nograd=True"):
        task.adapt(mse(task(sx), sy))
    # allowed on the learner, the copy or the step, as in learn2learn; the frozen layer stays put
    _, want = hand_unrolled(model, batch)
    for got in (object_api_grads(learner_for(model, allow_nograd=True), batch),
                object_api_grads(learner, batch, allow_nograd=True)):
        assert got["0.weight"] is None and got["0.bias"] is None
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12, msg=n)
    task = learner.clone()
    task.adapt(mse(task(sx), sy), allow_nograd=True)
    assert task.params["0.weight"] is model[0].weight


def test_adapt_pattern_of_only_frozen_parameters_is_an_error():
    model = mlp()
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match=r"only frozen.*2\.weight"):
        learner_for(model, adapt="head")


# ---------------------------------------------------------------------------- 2. allow_unused
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        self.aux = nn.Linear(2, 1)  # e.g. an auxiliary head this loss never calls

    def forward(self, x):
        return self.body(x)


def test_unused_submodule_clear_error_by_default():
    model = WithUnused().to(DT)
    learner = learner_for(model)
    batch = make_batch()
    task = learner.clone()
    with pytest.raises(ValueError, match=r"aux\.weight, aux\.bias.*allow_unused=True"):
        task.adapt(mse(task(batch.support_x[0]), batch.support_y[0]))


@pytest.mark.parametrize("where", ["learner", "clone", "adapt"])
def test_unused_submodule_allowed_gets_no_update(where):
    model = WithUnused().to(DT)
    learner = learner_for(model, allow_unused=True) if where == "learner" else learner_for(model)
    batch = make_batch()
    _, want = hand_unrolled(model, batch)
    learner.zero_grad(set_to_none=True)
    for t in range(TASKS):
        sx, sy, qx, qy = (z[t] for z in batch)
        task = learner.clone(allow_unused=True) if where == "clone" else learner.clone()
        for _ in range(STEPS):
            task.adapt(mse(task(sx), sy), **({"allow_unused": True} if where == "adapt" else {}))
        assert task.params["aux.weight"] is model.aux.weight  # no update
        (mse(task(qx), qy) / TASKS).backward()
    for n, p in model.named_parameters():
        if n.startswith("aux"):
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-12, msg=n)
    # the functional path already treats it as a zero gradient
    grads, _ = learner.meta_gradient_of(batch)
    for n in want:
        torch.testing.assert_close(grads["model"][n], want[n], rtol=0, atol=1e-12, msg=n)


# ---------------------------------------------------------------------------- 3. BatchNorm running statistics
def bn_model(track=True):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6, track_running_stats=track), nn.ReLU(),
                         nn.Linear(6, 1)).to(DT)


@pytest.mark.parametrize("vectorize", [True, False])
def test_batchnorm_running_stats_fail_early_with_what_to_do(vectorize):
    learner = learner_for(bn_model(), vectorize=vectorize)
    batch = make_batch()
    for call in (lambda: learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.1)),
                 lambda: learner.evaluate(batch), lambda: learner.adapt(batch.support_x[0], batch.support_y[0])):
        with pytest.raises(ValueError, match=r"BatchNorm1d '1'.*track_running_stats=False.*model\.eval\(\)"):
            call()


@pytest.mark.parametrize("vectorize", [True, False])
def test_batchnorm_ways_out_match_hand_unrolled(vectorize):
    batch = make_batch()
    for model in (bn_model(track=False), bn_model(track=True).eval()):
        learner = learner_for(model, vectorize=vectorize)
        loss, want = hand_unrolled(model, batch)
        grads, stats = learner.meta_gradient_of(batch)
        torch.testing.assert_close(stats["meta_objective"], loss, rtol=0, atol=1e-12)
        for n in want:
            torch.testing.assert_close(grads["model"][n], want[n], rtol=0, atol=1e-12, msg=n)


def test_batchnorm_running_stats_object_api_updates_them_as_learn2learn():
    """learn2learn's clones share the non-differentiable buffers, so every training-mode forward
    moves the running statistics; the object API does the same, with the right meta-gradient."""
    model = bn_model()
    ref = copy.deepcopy(model)
    learner = learner_for(model)
    batch = make_batch()
    _, want = hand_unrolled(ref, batch)  # calls ref in training mode: its running stats move too
    got = object_api_grads(learner, batch)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12, msg=n)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0, atol=1e-14)
    assert int(model[1].num_batches_tracked) == int(ref[1].num_batches_tracked) > 0


# ---------------------------------------------------------------------------- 4. a module-like TaskModel
class Masked(nn.Module):
    """``forward(x, mask=None)`` and a ``log_prob`` method that uses the parameters, plus a buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(2, 5), nn.Linear(5, 1)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x, mask=None):
        h = self.drop(torch.tanh(self.fc1(x)))
        if mask is not None:
            h = h * mask
        return self.scale * self.fc2(h)

    def log_prob(self, x, y, *, sigma=1.0):
        return torch.distributions.Normal(self.forward(x), sigma).log_prob(y).sum()


def test_task_model_any_signature_method_forwarding_parameters_and_mode():
    model = Masked().to(DT).eval()
    learner = learner_for(model)
    batch = make_batch()
    sx, sy, qx, qy = (z[0] for z in batch)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=DT)
    task = learner.clone()
    task.adapt(mse(task(sx, mask), sy))
    ref = copy.deepcopy(model)  # learn2learn-free reference: a copy stepped by hand
    mse(ref(sx, mask), sy).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    torch.testing.assert_close(task(qx, mask), ref(qx, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(task(qx, mask=mask), ref(qx, mask=mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(task.log_prob(qx, qy, sigma=0.5), ref.log_prob(qx, qy, sigma=0.5), rtol=0, atol=1e-12)
    assert task.fc1.out_features == 5 and task.scale is model.scale  # plain attributes: the model's own
    torch.testing.assert_close(task.fc1(qx), ref.fc1(qx), rtol=0, atol=1e-12)  # a child: adapted too
    assert not torch.allclose(task.fc1(qx), model.fc1(qx))
    names = [n for n, _ in task.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()] and "scale" not in names
    for (n, p), (_, q) in zip(task.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=n)
    assert len(list(task.parameters())) == 4
    # log_prob is differentiable to the meta-parameters (second order, as the query loss)
    learner.zero_grad(set_to_none=True)
    (-task.log_prob(qx, qy)).backward()
    assert all(p.grad is not None for p in model.parameters())
    # train()/eval() switch this copy only: dropout on in training mode, the learner's model untouched
    assert task.training is False
    task.train()
    assert task.training is True and model.training is False
    torch.manual_seed(0)
    a = task(qx)
    torch.manual_seed(0)
    ref.train()
    torch.testing.assert_close(a, ref(qx), rtol=0, atol=1e-12)
    assert not any(m.training for m in model.modules())
    task.eval()
    torch.testing.assert_close(task(qx), ref.eval()(qx), rtol=0, atol=1e-12)
    with pytest.raises(AttributeError, match="no_such"):
        task.no_such


def test_meta_learner_forward_is_the_model():
    model = Masked().to(DT).eval()
    learner = learner_for(model)
    x = make_batch().query_x[0]
    mask = torch.ones(5, dtype=DT)
    torch.testing.assert_close(learner(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(learner(x, mask=mask), model(x, mask=mask), rtol=0, atol=0)


def test_clone_of_adapted_clone_stays_differentiable():
    model = mlp()
    learner = learner_for(model)
    batch = make_batch()
    _, want = hand_unrolled(model, batch)
    learner.zero_grad(set_to_none=True)
    for t in range(TASKS):
        sx, sy, qx, qy = (z[t] for z in batch)
        parent = learner.clone()
        parent.adapt(mse(parent(sx), sy))
        one_step = {n: p.detach().clone() for n, p in parent.named_parameters()}
        child = parent.clone()
        child.adapt(mse(child(sx), sy))
        for n, p in parent.named_parameters():  # the child's step does not move the parent
            assert torch.equal(p.detach(), one_step[n])
        (mse(child(qx), qy) / TASKS).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("where", ["clone", "clone-of-clone"])
def test_first_order_on_clone_is_first_order_maml(where):
    model = mlp()
    learner = learner_for(model)  # a second-order learner
    batch = make_batch()
    _, want = hand_unrolled(model, batch, first_order=True)
    _, second = hand_unrolled(model, batch)
    learner.zero_grad(set_to_none=True)
    for t in range(TASKS):
        sx, sy, qx, qy = (z[t] for z in batch)
        task = learner.clone(first_order=True) if where == "clone" else learner.clone().clone(first_order=True)
        for _ in range(STEPS):
            task.adapt(mse(task(sx), sy))
        (mse(task(qx), qy) / TASKS).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-12, msg=n)
    assert any((want[n] - second[n]).abs().max() > 1e-6 for n in want)


# ---------------------------------------------------------------------------- 5. the README's translation claims
def _random_state(rule, params, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in rule.init(params).items()}


def test_meta_kfo_psd_uses_gram_factors_like_learn2learn():
    """``MetaKFO(psd=True)``: each layer maps ``G -> (L^T L) G (R^T R)`` (learn2learn's
    ``KroneckerLinear(psd=True)`` on metagrad's matrix view), identity at init."""
    from metagrad import MetaKFO

    g = torch.Generator().manual_seed(0)
    params = {"fc.weight": torch.randn(3, 4, generator=g, dtype=DT), "fc.bias": torch.randn(3, generator=g, dtype=DT),
              "conv.weight": torch.randn(2, 3, 2, 2, generator=g, dtype=DT)}
    grads = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    for hidden in (0, 1):
        rule = MetaKFO(LR, hidden_layers=hidden, psd=True)
        new, _ = rule.step(params, grads, rule.init(params), {})
        for n in params:  # identity at init: plain gradient descent
            torch.testing.assert_close(new[n], params[n] - LR * grads[n], rtol=0, atol=1e-14)
        state = _random_state(rule, params)
        new, _ = rule.step(params, grads, state, {})
        for n, p in params.items():
            x = grads[n].reshape(p.shape[0], -1)  # conv: [out, in*kh*kw]; bias: a column
            for j in range(1, hidden + 2):
                left, right = state[f"{n}.L{j}"], state[f"{n}.R{j}"]
                x = (left.T @ left) @ x @ (right.T @ right)
            torch.testing.assert_close(new[n], p - LR * x.reshape(p.shape), rtol=0, atol=1e-12, msg=n)
        plain, _ = MetaKFO(LR, hidden_layers=hidden).step(params, grads, state, {})
        assert not torch.allclose(plain["fc.weight"], new["fc.weight"])
    with pytest.raises(ValueError, match="psd=True needs nonlinearity='none'"):
        MetaKFO(LR, hidden_layers=1, nonlinearity="relu", psd=True)


def test_meta_curvature_conv_is_learn2learns_with_the_kernel_factor_transposed():
    """learn2learn's ``MetaCurvatureTransform`` on a 4-D weight (TensorFlow layout, written out here
    step by step) equals metagrad's ``MetaCurvature`` with ``mc_in = m_out``, ``mc_out = m_in`` and
    ``mc_f = m_f^T``; on a 2-D weight ``mc_in = m_out``, ``mc_out = m_in``."""
    from metagrad import MetaCurvature

    g = torch.Generator().manual_seed(1)
    o, i, kh, kw = 3, 2, 2, 3
    f = kh * kw
    params = {"c.weight": torch.zeros(o, i, kh, kw, dtype=DT), "l.weight": torch.zeros(4, 5, dtype=DT)}
    rule = MetaCurvature(1.0)
    state = _random_state(rule, params)
    grad = torch.randn(o, i, kh, kw, generator=g, dtype=DT)
    mc_in, mc_out, mc_f = state["c.weight.m_out"], state["c.weight.m_in"], state["c.weight.m_f"].T
    u = grad.permute(2, 3, 0, 1).contiguous()  # [kh, kw, out, in]
    shape = u.shape
    u = u.reshape(-1, i) @ mc_out
    u = mc_f @ u.reshape(f, -1)
    u = u.reshape(f, o, i).permute(1, 0, 2).reshape(o, -1)
    u = mc_in @ u
    u = u.reshape(o, f, i).permute(1, 0, 2).reshape(shape).permute(2, 3, 0, 1)
    torch.testing.assert_close(rule.precondition("c.weight", grad, state), u, rtol=0, atol=1e-12)
    g2 = torch.randn(4, 5, generator=g, dtype=DT)
    torch.testing.assert_close(rule.precondition("l.weight", g2, state),
                               state["l.weight.m_out"] @ g2 @ state["l.weight.m_in"], rtol=0, atol=1e-12)
