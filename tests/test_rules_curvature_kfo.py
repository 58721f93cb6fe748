"""Meta-Curvature and Meta-KFO against references computed another way, in float64.

The references never call the rules' code: the model's forward pass is written out
(``F.conv2d`` + ``tanh`` + ``x @ W.T + b``), the inner loop is an explicit Python loop over
``torch.autograd.grad``, and every update is a *dense* matrix (``torch.kron`` of the factors)
applied to the column-major ``vec`` of the gradient. Algorithm 1 (adaptive rule state) is written
out with ``autograd.grad`` with respect to the state tensors of each step.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad import MetaCurvature, MetaKFO, MetaLearner, Schedule, SGD, TaskBatch
from metagrad.metrics import mse

DT = torch.float64
LR = 0.3
STEPS = 2
TASKS = 2
NAMES = ("conv.weight", "conv.bias", "fc.weight", "fc.bias")

VARIANTS = {
    "mc": lambda: MetaCurvature(LR),
    "kfo": lambda: MetaKFO(LR),
    "kfo-deep-linear": lambda: MetaKFO(LR, hidden_layers=2),
    "kfo-relu": lambda: MetaKFO(LR, hidden_layers=1, nonlinearity="relu"),
    "kfo-adapt": lambda: MetaKFO(LR, adapt_state=True, state_lr=0.5),
    "kfo-tanh-adapt": lambda: MetaKFO(LR, hidden_layers=1, nonlinearity="tanh", adapt_state=True),
}
REFERENCE_VARIANTS = ("mc", "kfo-relu", "kfo-tanh-adapt")


# ---------------------------------------------------------------- fixtures
class Net(nn.Module):
    """Conv2d(2 -> 2, kernel 2, stride 2) on [2, 2, 2] inputs, tanh, Linear(2 -> 1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 2, stride=2)
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().to(DT)


def make_batch(seed=1, tasks=TASKS):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(tasks, 3, 2, 2, 2, generator=g, dtype=DT), torch.randn(tasks, 3, 1, generator=g, dtype=DT),
        torch.randn(tasks, 4, 2, 2, 2, generator=g, dtype=DT), torch.randn(tasks, 4, 1, generator=g, dtype=DT),
    )


def make_learner(variant, mgrad="unrolled", *, steps=STEPS, perturb=0.0, seed=0):
    learner = MetaLearner(make_net(seed), mse, rule=VARIANTS[variant](), meta_gradient=mgrad,
                          schedule=Schedule(steps))
    if perturb:  # move every factor away from its (identity / zero) initialization
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in learner.rule_state.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g, dtype=DT))
    return learner


def hand_forward(p, x):
    h = torch.tanh(F.conv2d(x, p["conv.weight"], p["conv.bias"], stride=2)).flatten(1)
    return h @ p["fc.weight"].T + p["fc.bias"]


def hand_mse(pred, y):
    return ((pred - y) ** 2).mean()


# ---------------------------------------------------------------- dense references of the rules
def vec(t):
    """Column-major vectorization (first index fastest)."""
    return t.permute(*reversed(range(t.dim()))).reshape(-1)


def unvec(v, shape):
    return v.reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape))))


def kron(a, b):
    # .contiguous(): torch 2.13's torch.kron raises a view error on a transposed (non-contiguous) input
    return torch.kron(a.contiguous(), b.contiguous())


def dense_mc(name, shape, s):
    """The dense Meta-Curvature preconditioner of parameter ``name`` on column-major vec."""
    if len(shape) <= 1:
        return torch.diag(s[f"{name}.m"].reshape(-1))
    m_out, m_in = s[f"{name}.m_out"], s[f"{name}.m_in"]
    if len(shape) == 2:
        return kron(m_in.T, m_out)
    return kron(kron(s[f"{name}.m_f"].T, m_in.T), m_out)


def hand_mc_update(rule, name, g, s):
    g3 = g.reshape(g.shape[0], g.shape[1], -1) if g.dim() > 2 else g  # conv: [out, in, kernel positions]
    return rule.lr * unvec(dense_mc(name, g3.shape, s) @ vec(g3), g3.shape).reshape(g.shape)


def hand_kfo_update(rule, name, g, s):
    """``lr * f(G)`` with each layer the dense ``R^T ⊗ L`` acting on column-major vec of G [m, n]."""
    m = g.shape[0] if g.dim() else 1
    mat = g.reshape(m, -1)
    W = lambda j: kron(s[f"{name}.R{j}"].T, s[f"{name}.L{j}"])  # noqa: E731
    v, last = vec(mat), rule.hidden_layers + 1
    if rule.nonlinearity == "none":
        out = v
        for j in range(1, last + 1):
            out = W(j) @ out
    else:
        act = {"relu": torch.relu, "tanh": torch.tanh}[rule.nonlinearity]
        h = v
        for j in range(1, last):
            h = act(W(j) @ h)
        out = W(0) @ v + W(last) @ h
    return rule.lr * unvec(out, mat.shape).reshape(g.shape)


def hand_update(rule, name, g, s):
    return (hand_mc_update if isinstance(rule, MetaCurvature) else hand_kfo_update)(rule, name, g, s)


def hand_inner(rule, params, state, sx, sy, steps, *, mode):
    """Explicit inner loop (Algorithm 1 when ``rule.adapts_state``). ``mode``: "second" (create_graph)
    or "first" (inner gradients, of the model and of the state, are constants)."""
    u, s = {n: params[n] for n in NAMES}, dict(state)
    for t in range(steps):
        loss = hand_mse(hand_forward(u, sx), sy)
        keys = list(s)
        wrt = [u[n] for n in NAMES] + ([s[k] for k in keys] if rule.adapts_state and t > 0 else [])
        gs = torch.autograd.grad(loss, wrt, create_graph=(mode == "second"), retain_graph=True)
        if mode == "first":
            gs = [g.detach() for g in gs]
        if rule.adapts_state and t > 0:  # xi_{t+1} = xi_t - a d l(theta_t) / d xi_t
            s = {k: s[k] - rule.state_lr * g for k, g in zip(keys, gs[len(NAMES):])}
        u = {n: u[n] - hand_update(rule, n, g, s) for n, g in zip(NAMES, gs)}
    return u


def leaf_copies(learner):
    mp = learner.meta_parameters()
    return ({n: v.detach().clone().requires_grad_(True) for n, v in mp["model"].items()},
            {n: v.detach().clone().requires_grad_(True) for n, v in mp["rule"].items()})


def hand_meta_loss(rule, params, state, batch, *, mode, steps=STEPS):
    total = 0.0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = (z[t] for z in batch)
        u = hand_inner(rule, params, state, sx, sy, steps, mode=mode)
        total = total + hand_mse(hand_forward(u, qx), qy)
    return total / batch.num_tasks


def assert_tree_close(got, want, atol):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=atol, msg=n)


# ---------------------------------------------------------------- identity initialization == SGD
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_initialization_reproduces_sgd(variant):
    batch = make_batch()
    learner = make_learner(variant)
    sgd = MetaLearner(make_net(), mse, rule=SGD(LR), schedule=Schedule(STEPS))
    # Algorithm 1 changes the state from the second step on, so only its first step is plain SGD
    steps = 1 if learner.rule.adapts_state else 3
    sx, sy = batch.support_x[0], batch.support_y[0]
    got, want = learner.adapt(sx, sy, steps=steps), sgd.adapt(sx, sy, steps=steps)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    if not learner.rule.adapts_state:  # and so does the model part of the meta-gradient
        assert_tree_close(learner.meta_gradient_of(batch)[0]["model"], sgd.meta_gradient_of(batch)[0]["model"],
                          atol=1e-13)
    state = learner.rule.init(dict(learner.model.named_parameters()))
    for k, v in state.items():  # every factor is the identity / ones, except Meta-KFO's zero output factor
        assert torch.equal(v, torch.eye(len(v), dtype=DT)) or torch.equal(v, torch.ones_like(v)) \
            or (torch.count_nonzero(v) == 0 and k.endswith(f"L{learner.rule.hidden_layers + 1}")), k


# ---------------------------------------------------------------- Kronecker structure == dense matrices
def random_factors(rule, params, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g, dtype=DT) for k, v in rule.init(params).items()}


def test_meta_curvature_equals_dense_kronecker_preconditioner():
    g = torch.Generator().manual_seed(2)
    params = {"lin.weight": torch.randn(4, 3, generator=g, dtype=DT), "conv.weight": torch.randn(3, 2, 2, 3, generator=g, dtype=DT),
              "lin.bias": torch.randn(4, generator=g, dtype=DT), "conv1d.weight": torch.randn(2, 3, 4, generator=g, dtype=DT)}
    grads = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    rule = MetaCurvature(0.7)
    s = random_factors(rule, params)
    assert s["conv.weight.m_f"].shape == (6, 6) and s["conv1d.weight.m_f"].shape == (4, 4)
    new, _ = rule.step(params, grads, s, {})
    for n, p in params.items():
        torch.testing.assert_close(p - new[n], hand_mc_update(rule, n, grads[n], s), rtol=0, atol=1e-12)
    # the documented 2-D convention, spelled out: update = lr * M_out @ G @ M_in
    G = grads["lin.weight"]
    torch.testing.assert_close(params["lin.weight"] - new["lin.weight"],
                               0.7 * s["lin.weight.m_out"] @ G @ s["lin.weight.m_in"], rtol=0, atol=1e-12)
    # and the conv one entry by entry: U[o,i,k] = sum M_out[o,o'] G[o',i',k'] M_in[i',i] M_f[k',k]
    G = grads["conv.weight"].reshape(3, 2, 6)
    mo, mi, mf = (s[f"conv.weight.{f}"] for f in ("m_out", "m_in", "m_f"))
    U = torch.zeros_like(G)
    for o, i, k in itertools.product(range(3), range(2), range(6)):
        for o2, i2, k2 in itertools.product(range(3), range(2), range(6)):
            U[o, i, k] += mo[o, o2] * G[o2, i2, k2] * mi[i2, i] * mf[k2, k]
    torch.testing.assert_close(params["conv.weight"] - new["conv.weight"], 0.7 * U.reshape(3, 2, 2, 3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["kfo", "kfo-deep-linear", "kfo-relu", "kfo-tanh-adapt"])
def test_meta_kfo_equals_dense_kronecker_network(variant):
    g = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(3, 4, generator=g, dtype=DT), "conv": torch.randn(2, 3, 2, 2, generator=g, dtype=DT),
              "b": torch.randn(3, generator=g, dtype=DT), "scalar": torch.randn((), generator=g, dtype=DT)}
    grads = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    rule = VARIANTS[variant]()
    s = random_factors(rule, params)
    assert s["conv.L1"].shape == (2, 2) and s["conv.R1"].shape == (12, 12) and s["b.R1"].shape == (1, 1)
    new, _ = rule.step(params, grads, s, {})
    for n, p in params.items():
        torch.testing.assert_close(p - new[n], hand_kfo_update(rule, n, grads[n], s), rtol=0, atol=1e-12)
    # one layer is W = R^T ⊗ L on vec(G), i.e. L @ G @ R
    one = MetaKFO(1.0)
    s1 = random_factors(one, {"w": params["w"]})
    G = grads["w"]
    torch.testing.assert_close(one.transform("w", G, s1), s1["w.L1"] @ G @ s1["w.R1"], rtol=0, atol=1e-12)
    torch.testing.assert_close(vec(one.transform("w", G, s1)), kron(s1["w.R1"].T, s1["w.L1"]) @ vec(G), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- meta-gradients against hand loops
@pytest.mark.parametrize("variant", REFERENCE_VARIANTS)
def test_unrolled_and_first_order_match_hand_loop_and_gradcheck(variant):
    batch = make_batch()
    learner = make_learner(variant, perturb=0.3)
    rule = learner.rule
    params, state = leaf_copies(learner)
    pn, sn = list(params), list(state)
    inputs = tuple(params.values()) + tuple(state.values())

    def f(*flat, mode="second"):
        return hand_meta_loss(rule, dict(zip(pn, flat[: len(pn)])), dict(zip(sn, flat[len(pn):])), batch, mode=mode)

    # the hand-unrolled reference itself agrees with finite differences in every meta-parameter
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    for mgrad, mode in (("unrolled", "second"), ("first-order", "first")):
        lib = make_learner(variant, mgrad, perturb=0.3)
        ref = torch.autograd.grad(f(*inputs, mode=mode), inputs)
        grads, stats = lib.meta_gradient_of(batch)
        assert_tree_close(grads["model"], dict(zip(pn, ref[: len(pn)])), atol=1e-10)
        assert_tree_close(grads["rule"], dict(zip(sn, ref[len(pn):])), atol=1e-10)
        torch.testing.assert_close(stats["meta_objective"], f(*inputs, mode=mode).detach(), rtol=0, atol=1e-12)
        assert all(g.abs().max() > 1e-8 for g in grads["rule"].values())  # every factor is meta-learned
    # second order differs from first order (non-vacuous)
    fo, _ = make_learner(variant, "first-order", perturb=0.3).meta_gradient_of(batch)
    so, _ = make_learner(variant, "unrolled", perturb=0.3).meta_gradient_of(batch)
    assert max((fo["model"][n] - so["model"][n]).abs().max().item() for n in NAMES) > 1e-6


@pytest.mark.parametrize("variant", REFERENCE_VARIANTS)
def test_reptile_is_theta_minus_hand_adapted(variant):
    batch = make_batch()
    learner = make_learner(variant, "reptile", perturb=0.3)
    params, state = leaf_copies(learner)
    want = {n: torch.zeros_like(v) for n, v in params.items()}
    for t in range(TASKS):
        u = hand_inner(learner.rule, params, state, batch.support_x[t], batch.support_y[t], STEPS, mode="first")
        for n in NAMES:
            want[n] = want[n] + (params[n] - u[n]).detach() / TASKS
    grads, _ = learner.meta_gradient_of(batch)
    assert_tree_close(grads["model"], want, atol=1e-12)
    assert all(torch.count_nonzero(g) == 0 for g in grads["rule"].values())


# ---------------------------------------------------------------- Algorithm 1 (adaptive state)
@pytest.mark.parametrize("variant", ["kfo-adapt", "kfo-tanh-adapt"])
def test_adapt_state_matches_hand_algorithm_1(variant):
    batch = make_batch()
    learner = make_learner(variant, perturb=0.3)
    params, state = leaf_copies(learner)
    sx, sy, qx, qy = (z[0] for z in batch)
    want = hand_inner(learner.rule, params, state, sx, sy, 3, mode="second")
    got = learner.adapt(sx, sy, steps=3)
    assert_tree_close({n: got[n] for n in NAMES}, {n: v.detach() for n, v in want.items()}, atol=1e-12)
    # non-vacuous: the same factors without state adaptation adapt differently
    frozen = MetaLearner(make_net(), mse, rule=MetaKFO(LR, hidden_layers=learner.rule.hidden_layers,
                                                       nonlinearity=learner.rule.nonlinearity), schedule=Schedule(3))
    frozen.rule_state.load_state_dict(learner.rule_state.state_dict())
    other = frozen.adapt(sx, sy, steps=3)
    assert max((other[n] - got[n]).abs().max().item() for n in NAMES) > 1e-6
    # evaluate (no_grad, first-order path) scores the same trajectory
    ev = learner.evaluate(batch, steps=3)
    torch.testing.assert_close(ev["loss"][0, -1], hand_mse(hand_forward(want, qx), qy).detach(), rtol=0, atol=1e-12)
    # the object API (clone / adapt / backward) gives the engine's meta-gradient, second or first order
    for mgrad, first_order in (("unrolled", False), ("first-order", True)):
        want_g = make_learner(variant, mgrad, perturb=0.3).meta_gradient_of(batch)[0]
        learner.zero_grad(set_to_none=True)
        for t in range(TASKS):
            task = learner.clone()
            for _ in range(STEPS):
                task.adapt(mse(task(batch.support_x[t]), batch.support_y[t]), first_order=first_order)
            (mse(task(batch.query_x[t]), batch.query_y[t]) / TASKS).backward()
        assert_tree_close({n: p.grad for n, p in learner.model.named_parameters()}, want_g["model"], atol=1e-10)
        assert_tree_close({n: p.grad for n, p in learner.rule_state.named_parameters()}, want_g["rule"], atol=1e-10)


# ---------------------------------------------------------------- vmap == loop, every meta-gradient
@pytest.mark.parametrize("mgrad,variant", list(itertools.product(["unrolled", "first-order", "reptile"], VARIANTS)))
def test_vmap_and_loop_agree(mgrad, variant):
    learner = make_learner(variant, mgrad, perturb=0.2)
    batch = make_batch(tasks=3)
    gv, sv = learner.meta_gradient_of(batch, vectorize=True)
    gl, sl = learner.meta_gradient_of(batch, vectorize=False)
    for group in ("model", "rule"):
        assert_tree_close(gv[group], gl[group], atol=1e-10)
    for k in ("meta_objective", "query_loss", "inner_loss"):
        torch.testing.assert_close(sv[k], sl[k], rtol=0, atol=1e-10)
    torch.testing.assert_close(learner.evaluate(batch, vectorize=True, steps=2)["loss"],
                               learner.evaluate(batch, vectorize=False, steps=2)["loss"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- adapted model == base model class
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapted_model_has_the_base_models_parameters(variant):
    learner = make_learner(variant, perturb=0.1)
    batch = make_batch()
    adapted = learner.adapt(batch.support_x[0], batch.support_y[0], steps=2)
    base = make_net(5)
    assert set(adapted) == set(base.state_dict())
    assert sum(v.numel() for v in adapted.values()) == sum(p.numel() for p in base.parameters())
    base.load_state_dict({k: v.detach() for k, v in adapted.items()}, strict=True)
    torch.testing.assert_close(base(batch.query_x[0]), learner.functional_forward(adapted, batch.query_x[0]).detach())
    # the rule's state is meta-learned but is not part of the adapted model
    assert all(n.startswith("rule_state.") for n, _ in learner.named_parameters() if not n.startswith("model."))


# ---------------------------------------------------------------- registry and validation
def test_registry_and_exports():
    rule = mg.make_rule("meta-curvature", lr=0.2)
    assert isinstance(rule, MetaCurvature) and rule.lr == 0.2
    kfo = mg.make_rule("meta-kfo", lr=0.2, hidden_layers=1, nonlinearity="tanh", adapt_state=True)
    assert isinstance(kfo, MetaKFO) and kfo.adapts_state and kfo.state_lr == 0.2
    assert MetaLearner(make_net(), mse, rule="meta-kfo", lr=0.2).rule.lr == 0.2
    assert not MetaCurvature().adapts_state and not SGD().adapts_state
    with pytest.raises(ValueError, match="meta-curvature.*meta-kfo"):
        mg.make_rule("meta-kfc")
    assert "MetaCurvature" in mg.__all__ and "MetaKFO" in mg.__all__


@pytest.mark.parametrize("kwargs,exc", [
    (dict(nonlinearity="sigmoid", hidden_layers=1), ValueError),
    (dict(nonlinearity="relu"), ValueError),  # a nonlinearity needs a hidden layer
    (dict(hidden_layers=-1), ValueError),
    (dict(hidden_layers=1.0), TypeError),
    (dict(adapt_state=1), TypeError),
    (dict(state_lr=0.0), ValueError),
    (dict(lr="0.1"), TypeError),
])
def test_meta_kfo_validation(kwargs, exc):
    with pytest.raises(exc):
        MetaKFO(**kwargs)
