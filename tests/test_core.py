"""Core engine tests: every meta-gradient x update rule x adapted subset against hand-written references.

The references never call the engine: the model's forward pass is written out by hand
(``W2 tanh(W1 x + b1) + b2``), the inner loop is an explicit Python loop over
``torch.autograd.grad`` and the update rules are written inline. Everything runs in float64.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad import MetaLearner, MetaSGD, Schedule, SGD, TaskBatch
from metagrad.learners import select_adapted
from metagrad.models import MLP, linear_chain
from metagrad.metrics import mse

DT = torch.float64
ALPHA = 0.3
STEPS = 2
TASKS = 2

# names of the parameters of nn.Sequential(Linear(1, 4), Tanh(), Linear(4, 1))
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")
ADAPT = {"all": NAMES, "head": ("2.weight", "2.bias")}
RULES = ("sgd", "sgd-learnable", "meta-sgd")
METAGRADS = ("unrolled", "first-order", "reptile")
COMBOS = list(itertools.product(METAGRADS, RULES, ADAPT))


# ---------------------------------------------------------------- fixtures / helpers
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def make_batch(seed: int = 1, tasks: int = TASKS, shots: int = 3, queries: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(tasks, shots, 1, generator=g, dtype=DT),
        torch.randn(tasks, shots, 1, generator=g, dtype=DT),
        torch.randn(tasks, queries, 1, generator=g, dtype=DT),
        torch.randn(tasks, queries, 1, generator=g, dtype=DT),
    )


def make_rule(kind: str, lr: float = ALPHA):
    if kind == "sgd":
        return SGD(lr)
    if kind == "sgd-learnable":
        return SGD(lr, learnable=True)
    if kind == "meta-sgd":
        return MetaSGD(lr)
    raise AssertionError(kind)


def make_learner(mgrad: str, rule: str, adapt: str, *, steps: int = STEPS, per_step: bool = False, seed: int = 0,
                 **kw) -> MetaLearner:
    return MetaLearner(make_model(seed), mse, adapt=adapt, rule=make_rule(rule), meta_gradient=mgrad,
                       schedule=Schedule(steps, per_step_loss=per_step), **kw)


def hand_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The MLP written out: ``W2 tanh(W1 x + b1) + b2``."""
    h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
    return h @ p["2.weight"].T + p["2.bias"]


def hand_mse(pred, y):
    return ((pred - y) ** 2).mean()


def rule_state_names(rule: str, adapted) -> tuple[str, ...]:
    return {"sgd": (), "sgd-learnable": ("lr",), "meta-sgd": tuple(adapted)}[rule]


def rate(rule: str, state: dict, name: str):
    if rule == "sgd":
        return ALPHA
    if rule == "sgd-learnable":
        return state["lr"]
    return state[name]


def hand_inner(rule, adapted_names, params, state, sx, sy, steps, *, mode):
    """Explicit inner loop. ``mode``: "second" (create_graph), "first" (detached grads), "plain" (no graph).

    Returns the trajectory [u_0, ..., u_K] of adapted dicts.
    """
    u = {n: params[n] for n in adapted_names}
    traj = [u]
    for _ in range(steps):
        full = {**params, **u}
        loss = hand_mse(hand_forward(full, sx), sy)
        gs = torch.autograd.grad(loss, [u[n] for n in adapted_names], create_graph=(mode == "second"))
        if mode != "second":
            gs = [g.detach() for g in gs]
        u = {n: u[n] - rate(rule, state, n) * g for n, g in zip(adapted_names, gs)}
        traj.append(u)
    return traj


def hand_meta_loss(rule, adapted_names, params, state, batch, steps, *, mode="second", per_step=False):
    """Mean over tasks of the post-adaptation query loss (or the mean of the per-step query losses)."""
    total = 0.0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = (z[t] for z in batch)
        traj = hand_inner(rule, adapted_names, params, state, sx, sy, steps, mode=mode)
        qloss = lambda u: hand_mse(hand_forward({**params, **u}, qx), qy)  # noqa: E731
        if per_step:
            total = total + sum(qloss(u) for u in traj[1:]) / steps
        else:
            total = total + qloss(traj[-1])
    return total / batch.num_tasks


def leaf_copies(learner: MetaLearner):
    """Fresh float64 leaf copies of the learner's meta-parameters (requires_grad)."""
    mp = learner.meta_parameters()
    params = {n: v.detach().clone().requires_grad_(True) for n, v in mp["model"].items()}
    state = {n: v.detach().clone().requires_grad_(True) for n, v in mp["rule"].items()}
    return params, state


def assert_grads_close(lib: dict, ref_model: dict, ref_rule: dict, atol: float):
    assert set(lib["model"]) == set(ref_model)
    assert set(lib["rule"]) == set(ref_rule)
    for group, ref in (("model", ref_model), ("rule", ref_rule)):
        for n, r in ref.items():
            got = lib[group][n]
            assert got.shape == r.shape, (group, n)
            assert got.dtype == DT
            torch.testing.assert_close(got, r, rtol=0, atol=atol, msg=f"{group}/{n}")


def reference_grads(learner, rule, adapt, batch, *, mode, per_step=False, steps=STEPS):
    params, state = leaf_copies(learner)
    adapted = ADAPT[adapt]
    loss = hand_meta_loss(rule, adapted, params, state, batch, steps, mode=mode, per_step=per_step)
    leaves = list(params.values()) + list(state.values())
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    gs = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, gs)]
    k = len(params)
    return dict(zip(params, gs[:k])), dict(zip(state, gs[k:])), loss.detach()


# ---------------------------------------------------------------- unrolled (second order)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_unrolled_matches_hand_unrolled_loop_and_gradcheck(rule, adapt):
    learner = make_learner("unrolled", rule, adapt)
    batch = make_batch()
    assert learner.adapted_names == ADAPT[adapt]
    assert set(learner.meta_parameters()["rule"]) == set(rule_state_names(rule, ADAPT[adapt]))

    # 1) gradcheck: the hand-unrolled meta-loss, as a function of ALL meta-parameters, has the
    #    autograd gradient of its finite differences (validates the reference itself).
    params, state = leaf_copies(learner)
    pnames, snames = list(params), list(state)

    def f(*flat):
        p = dict(zip(pnames, flat[: len(pnames)]))
        s = dict(zip(snames, flat[len(pnames):]))
        return hand_meta_loss(rule, ADAPT[adapt], p, s, batch, STEPS, mode="second")

    assert torch.autograd.gradcheck(f, tuple(params.values()) + tuple(state.values()), eps=1e-6, atol=1e-7, rtol=1e-5)

    # 2) the library's meta-gradient equals autograd of the hand-unrolled loss
    ref_model, ref_rule, ref_loss = reference_grads(learner, rule, adapt, batch, mode="second")
    grads, stats = learner.meta_gradient_of(batch)
    assert_grads_close(grads, ref_model, ref_rule, atol=1e-10)
    torch.testing.assert_close(stats["meta_objective"], ref_loss, rtol=0, atol=1e-12)
    assert stats["query_loss"].shape == (TASKS,)
    assert stats["inner_loss"].shape == (TASKS, STEPS)
    # the non-zero-ness of the second-order terms: a hand FO reference must differ (non-vacuous)
    fo_model, _, _ = reference_grads(learner, rule, adapt, batch, mode="first")
    diff = max((fo_model[n] - ref_model[n]).abs().max().item() for n in ADAPT[adapt])
    assert diff > 1e-6


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_unrolled_per_step_loss_matches_hand_loop(rule, adapt):
    learner = make_learner("unrolled", rule, adapt, per_step=True, steps=3)
    batch = make_batch()
    ref_model, ref_rule, ref_loss = reference_grads(learner, rule, adapt, batch, mode="second", per_step=True, steps=3)
    grads, stats = learner.meta_gradient_of(batch)
    assert_grads_close(grads, ref_model, ref_rule, atol=1e-10)
    torch.testing.assert_close(stats["meta_objective"], ref_loss, rtol=0, atol=1e-12)
    # ... and it is not the last-step objective
    last_model, _, last_loss = reference_grads(learner, rule, adapt, batch, mode="second", steps=3)
    assert abs(last_loss - ref_loss) > 1e-6
    # query_loss reports the post-adaptation (last step) loss, not the average
    params, state = leaf_copies(learner)
    for t in range(TASKS):
        traj = hand_inner(rule, ADAPT[adapt], params, state, batch.support_x[t], batch.support_y[t], 3, mode="plain")
        q = hand_mse(hand_forward({**params, **traj[-1]}, batch.query_x[t]), batch.query_y[t])
        torch.testing.assert_close(stats["query_loss"][t], q.detach(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- first order
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_first_order_matches_hand_loop_with_detached_inner_grads(rule, adapt):
    learner = make_learner("first-order", rule, adapt)
    batch = make_batch()
    ref_model, ref_rule, ref_loss = reference_grads(learner, rule, adapt, batch, mode="first")
    grads, stats = learner.meta_gradient_of(batch)
    assert_grads_close(grads, ref_model, ref_rule, atol=1e-10)
    torch.testing.assert_close(stats["meta_objective"], ref_loss, rtol=0, atol=1e-12)
    if rule != "sgd":  # the learnable rate receives a (non-zero) gradient through u_{k+1} = u_k - lr stopgrad(g_k)
        assert all(g.abs().max() > 1e-6 for g in grads["rule"].values())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_first_order_one_step_is_gradient_of_frozen_step_function(rule, adapt):
    """FO-MAML with one inner step is the exact gradient of f(theta, lr) = L_q(theta - lr * g0), g0 frozen."""
    learner = make_learner("first-order", rule, adapt, steps=1)
    batch = make_batch()
    params, state = leaf_copies(learner)
    adapted = ADAPT[adapt]
    # the inner gradients g0 of every task at the base point, frozen as constants
    g0 = []
    for t in range(TASKS):
        loss = hand_mse(hand_forward(params, batch.support_x[t]), batch.support_y[t])
        g0.append({n: g.detach() for n, g in zip(adapted, torch.autograd.grad(loss, [params[n] for n in adapted]))})
    pnames, snames = list(params), list(state)

    def f(*flat):
        p = dict(zip(pnames, flat[: len(pnames)]))
        s = dict(zip(snames, flat[len(pnames):]))
        total = 0.0
        for t in range(TASKS):
            u = {n: p[n] - rate(rule, s, n) * g0[t][n] for n in adapted}
            total = total + hand_mse(hand_forward({**p, **u}, batch.query_x[t]), batch.query_y[t])
        return total / TASKS

    inputs = tuple(params.values()) + tuple(state.values())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    ref = torch.autograd.grad(f(*inputs), inputs)
    grads, _ = learner.meta_gradient_of(batch)
    k = len(pnames)
    assert_grads_close(grads, dict(zip(pnames, ref[:k])), dict(zip(snames, ref[k:])), atol=1e-10)


# ---------------------------------------------------------------- reptile
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_reptile_is_theta_minus_adapted(rule, adapt):
    learner = make_learner("reptile", rule, adapt)
    batch = make_batch()
    params, state = leaf_copies(learner)
    adapted = ADAPT[adapt]
    ref_model = {n: torch.zeros_like(v) for n, v in params.items()}
    qlosses = []
    for t in range(TASKS):
        traj = hand_inner(rule, adapted, params, state, batch.support_x[t], batch.support_y[t], STEPS, mode="plain")
        for n in adapted:
            ref_model[n] = ref_model[n] + (params[n] - traj[-1][n]).detach() / TASKS
        qlosses.append(hand_mse(hand_forward({**params, **traj[-1]}, batch.query_x[t]), batch.query_y[t]).detach())
    ref_rule = {n: torch.zeros_like(v) for n, v in state.items()}
    grads, stats = learner.meta_gradient_of(batch)
    assert_grads_close(grads, ref_model, ref_rule, atol=1e-12)
    for n in NAMES:
        if n not in adapted:
            assert torch.count_nonzero(grads["model"][n]) == 0
        else:
            assert grads["model"][n].abs().max() > 1e-6
    for g in grads["rule"].values():
        assert torch.count_nonzero(g) == 0
    torch.testing.assert_close(stats["query_loss"], torch.stack(qlosses), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- vmap == per-task loop
@pytest.mark.parametrize("mgrad,rule,adapt", COMBOS)
def test_vmap_and_loop_agree(mgrad, rule, adapt):
    learner = make_learner(mgrad, rule, adapt, metric_fn=lambda p, y: (p - y).abs().mean())
    batch = make_batch(tasks=3)
    gv, sv = learner.meta_gradient_of(batch, vectorize=True)
    gl, sl = learner.meta_gradient_of(batch, vectorize=False)
    for group in ("model", "rule"):
        assert set(gv[group]) == set(gl[group])
        for n in gv[group]:
            torch.testing.assert_close(gv[group][n], gl[group][n], rtol=0, atol=1e-6)
    for k in ("meta_objective", "query_loss", "inner_loss"):
        torch.testing.assert_close(sv[k], sl[k], rtol=0, atol=1e-6)
    ev = learner.evaluate(batch, steps=3, vectorize=True)
    el = learner.evaluate(batch, steps=3, vectorize=False)
    assert set(ev) == set(el) == {"loss", "metric"}
    for k in ev:
        assert ev[k].shape == (3, 4)
        torch.testing.assert_close(ev[k], el[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_evaluate_columns_match_hand_loop(rule, adapt):
    learner = make_learner("unrolled", rule, adapt, metric_fn=lambda p, y: (p - y).abs().mean())
    batch = make_batch(tasks=3)
    out = learner.evaluate(batch, steps=3)
    params, state = leaf_copies(learner)
    for t in range(3):
        traj = hand_inner(rule, ADAPT[adapt], params, state, batch.support_x[t], batch.support_y[t], 3, mode="plain")
        for k, u in enumerate(traj):
            pred = hand_forward({**params, **u}, batch.query_x[t]).detach()
            torch.testing.assert_close(out["loss"][t, k], hand_mse(pred, batch.query_y[t]), rtol=0, atol=1e-12)
            torch.testing.assert_close(out["metric"][t, k], (pred - batch.query_y[t]).abs().mean(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- ANIL / adapted subset
def test_anil_adapt_changes_only_the_head():
    learner = make_learner("unrolled", "sgd", "head")
    batch = make_batch()
    before = {n: v.detach().clone() for n, v in learner.model.named_parameters()}
    full = learner.adapt(batch.support_x[0], batch.support_y[0], steps=2)
    assert set(full) == set(NAMES)
    live = dict(learner.model.named_parameters())
    for n in ("0.weight", "0.bias"):
        assert full[n] is live[n]
        assert torch.equal(full[n], before[n])
    for n in ("2.weight", "2.bias"):
        assert not torch.allclose(full[n], before[n])
    # equal to a hand-written 2-step head-only inner loop
    params, state = leaf_copies(learner)
    traj = hand_inner("sgd", ADAPT["head"], params, state, batch.support_x[0], batch.support_y[0], 2, mode="plain")
    for n in ("2.weight", "2.bias"):
        torch.testing.assert_close(full[n].detach(), traj[-1][n], rtol=0, atol=1e-12)
    # the model itself was not modified
    for n, v in learner.model.named_parameters():
        assert torch.equal(v, before[n])


def test_select_adapted_patterns():
    model = MLP(2, [3, 3], 1)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "head.weight", "head.bias"]
    assert select_adapted(model, "all") == tuple(names)
    assert select_adapted(model, "head") == ("head.weight", "head.bias")
    assert select_adapted(model, "fc1") == ("fc1.weight", "fc1.bias")  # module prefix
    assert select_adapted(model, "*.bias") == ("fc0.bias", "fc1.bias", "head.bias")
    # model order, not pattern order; duplicates collapse
    assert select_adapted(model, ["head.weight", "fc0.*", "fc0.weight"]) == ("fc0.weight", "fc0.bias", "head.weight")
    # a bare prefix does not match a longer module name
    with pytest.raises(ValueError, match="'fc'"):
        select_adapted(model, "fc")
    with pytest.raises(ValueError, match="'nothing.here'") as info:
        select_adapted(model, ["head", "nothing.here"])
    assert "head.weight" in str(info.value)  # lists the available parameters
    with pytest.raises(ValueError, match="'conv.*'"):
        MetaLearner(model, mse, adapt="conv.*")
    with pytest.raises(ValueError):
        select_adapted(model, [])
    # a learner adapting a pattern subset: only those get a reptile gradient
    learner = MetaLearner(model.to(DT), mse, adapt="fc1", meta_gradient="reptile")
    g = torch.Generator().manual_seed(5)
    batch = TaskBatch(*(torch.randn(2, 3, k, generator=g, dtype=DT) for k in (2, 1, 2, 1)))
    grads, _ = learner.meta_gradient_of(batch)
    for n in names:
        nz = torch.count_nonzero(grads["model"][n]).item()
        assert (nz > 0) == n.startswith("fc1"), n


# ---------------------------------------------------------------- update rules
def test_sgd_rule_matches_torch_optim_sgd():
    torch.manual_seed(3)
    params = {"a": torch.randn(3, 2, dtype=DT), "b": torch.randn(4, dtype=DT)}
    grads = {"a": torch.randn(3, 2, dtype=DT), "b": torch.randn(4, dtype=DT)}
    rule = SGD(0.37)
    new, state = rule.step(params, grads, rule.init(params), rule.init_inner(params))
    assert state == {}
    leaves = [nn.Parameter(params[n].clone()) for n in ("a", "b")]
    opt = torch.optim.SGD(leaves, lr=0.37)
    for p, n in zip(leaves, ("a", "b")):
        p.grad = grads[n].clone()
    opt.step()
    for p, n in zip(leaves, ("a", "b")):
        torch.testing.assert_close(new[n], p.detach(), rtol=0, atol=1e-15)
    # out of place
    assert not torch.equal(new["a"], params["a"])


def test_rule_states_at_initialization():
    params = {"w": torch.randn(2, 3, dtype=DT), "b": torch.randn(3, dtype=DT)}
    st = SGD(0.2, learnable=True).init(params)
    assert set(st) == {"lr"} and st["lr"].shape == () and st["lr"].dtype == DT and st["lr"].item() == 0.2
    st = MetaSGD(0.2).init(params)
    assert set(st) == {"w", "b"}
    for n in params:
        assert st[n].shape == params[n].shape and st[n].dtype == DT
        assert torch.all(st[n] == 0.2)


@pytest.mark.parametrize("adapt", list(ADAPT))
def test_learnable_rules_at_init_adapt_like_fixed_sgd(adapt):
    batch = make_batch()
    outs = {}
    for rule in RULES:
        learner = make_learner("unrolled", rule, adapt)
        outs[rule] = learner.adapt(batch.support_x[1], batch.support_y[1], steps=3)
    for rule in ("sgd-learnable", "meta-sgd"):
        for n in NAMES:
            torch.testing.assert_close(outs[rule][n], outs["sgd"][n], rtol=0, atol=1e-14)
    init = dict(make_model().named_parameters())
    changed = [n for n in NAMES if not torch.equal(outs["sgd"][n], init[n])]
    assert tuple(changed) == ADAPT[adapt]


def test_rule_state_is_registered_as_learner_parameters():
    learner = make_learner("unrolled", "meta-sgd", "head")
    n_model = sum(1 for _ in learner.model.parameters())
    assert len(list(learner.parameters())) == n_model + 2
    rule = learner.meta_parameters()["rule"]
    assert set(rule) == {"2.weight", "2.bias"}
    assert all(isinstance(v, nn.Parameter) for v in rule.values())


# ---------------------------------------------------------------- bad input
def test_support_shape_mismatch_raises():
    learner = make_learner("unrolled", "sgd", "all")
    b = make_batch()
    bad = TaskBatch(b.support_x, b.support_y[:, :2], b.query_x, b.query_y)
    with pytest.raises(ValueError, match=r"support_x \(2, 3, 1\).*support_y \(2, 2, 1\)"):
        learner.meta_gradient_of(bad)
    with pytest.raises(ValueError, match=r"support_x \(1, 3, 1\).*support_y \(1, 2, 1\)"):
        learner.adapt(b.support_x[0], b.support_y[0, :2])
    bad = TaskBatch(b.support_x, b.support_y, b.query_x[:, :3], b.query_y)
    with pytest.raises(ValueError, match="query"):
        learner.evaluate(bad)
    bad = TaskBatch(b.support_x, b.support_y, b.query_x[:1], b.query_y[:1])
    with pytest.raises(ValueError, match="tasks"):
        learner.meta_gradient_of(bad)


def test_empty_support_set_raises():
    learner = make_learner("unrolled", "sgd", "all")
    b = make_batch()
    empty = TaskBatch(b.support_x[:, :0], b.support_y[:, :0], b.query_x, b.query_y)
    with pytest.raises(ValueError, match="empty support"):
        learner.meta_gradient_of(empty)
    with pytest.raises(ValueError, match="empty support"):
        learner.adapt(b.support_x[0, :0], b.support_y[0, :0])
    with pytest.raises(ValueError, match="empty query"):
        learner.evaluate(TaskBatch(b.support_x, b.support_y, b.query_x[:, :0], b.query_y[:, :0]))
    with pytest.raises(ValueError, match="0 tasks"):
        learner.meta_gradient_of(TaskBatch(*(t[:0] for t in b)))


def test_unknown_rule_and_meta_gradient_names_list_valid_names():
    with pytest.raises(ValueError) as info:
        MetaLearner(make_model(), mse, rule="no-such-rule")
    msg = str(info.value)
    assert "'no-such-rule'" in msg and "sgd" in msg and "meta-sgd" in msg
    with pytest.raises(ValueError) as info:
        MetaLearner(make_model(), mse, meta_gradient="maml")
    msg = str(info.value)
    assert "'maml'" in msg and all(k in msg for k in ("unrolled", "first-order", "reptile"))
    assert mg.make_rule("meta-sgd", lr=0.5).lr == 0.5
    assert isinstance(mg.make_meta_gradient("reptile"), mg.Reptile)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("mgrad", METAGRADS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_inner_loss_names_step_and_task(mgrad, vectorize, value):
    learner = make_learner(mgrad, "sgd", "all")
    b = make_batch(tasks=3)
    sy = b.support_y.clone()
    sy[1, 2, 0] = value
    bad = TaskBatch(b.support_x, sy, b.query_x, b.query_y)
    with pytest.raises(ValueError, match="step 0 of task 1"):
        learner.meta_gradient_of(bad, vectorize=vectorize)
    with pytest.raises(ValueError, match="step 0 of task 1"):
        learner.evaluate(bad, vectorize=vectorize)


def test_non_finite_loss_at_a_later_step_is_located():
    # a huge inner rate makes a finite first loss blow up at step 1 in task 2 only
    torch.manual_seed(0)
    model = linear_chain([1, 1]).to(DT)
    learner = MetaLearner(model, mse, lr=1e200, schedule=Schedule(3))
    b = make_batch(tasks=3)
    sx = torch.zeros_like(b.support_x)
    sx[2] = 1.0  # tasks 0 and 1 have zero inputs: zero gradient, they never move
    bad = TaskBatch(sx, b.support_y, b.query_x, b.query_y)
    with pytest.raises(ValueError, match="step 1 of task 2"):
        learner.meta_gradient_of(bad)
    with pytest.raises(ValueError, match="step 0"):
        learner.adapt(b.support_x[0], torch.full_like(b.support_y[0], float("nan")))


def test_wrong_types_raise_type_error():
    model = make_model()
    with pytest.raises(TypeError, match="nn.Module"):
        MetaLearner(lambda x: x, mse)
    with pytest.raises(TypeError, match="callable"):
        MetaLearner(model, "mse")
    with pytest.raises(TypeError, match="UpdateRule"):
        MetaLearner(model, mse, rule=torch.optim.SGD)
    with pytest.raises(TypeError, match="MetaGradient"):
        MetaLearner(model, mse, meta_gradient=3)
    with pytest.raises(TypeError, match="Schedule"):
        MetaLearner(model, mse, schedule=2)
    learner = MetaLearner(model, mse)
    b = make_batch()
    with pytest.raises(TypeError, match="TaskBatch"):
        learner.meta_gradient_of(b.support_x)
    with pytest.raises(TypeError, match="support_y"):
        learner.meta_gradient_of(TaskBatch(b.support_x, b.support_y.numpy(), b.query_x, b.query_y))
    # a plain 4-tuple is accepted and equals the TaskBatch result
    g1, _ = learner.meta_gradient_of(tuple(b))
    g2, _ = learner.meta_gradient_of(b)
    for n in g1["model"]:
        assert torch.equal(g1["model"][n], g2["model"][n])


def test_non_numeric_lr_raises_type_error():
    with pytest.raises(TypeError):
        SGD("0.1")


@pytest.mark.parametrize("lr", [-0.1, 0.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_lr_raises(lr):
    with pytest.raises(ValueError, match="lr"):
        MetaLearner(make_model(), mse, lr=lr)
    with pytest.raises(ValueError, match="lr"):
        MetaLearner(make_model(), mse, rule="meta-sgd", lr=lr)
    with pytest.raises(ValueError, match="lr"):
        SGD(lr, learnable=True)
    with pytest.raises(ValueError, match="lr"):
        MetaSGD(lr)


def test_schedule_validation():
    with pytest.raises(ValueError):
        Schedule(-1)
    with pytest.raises(ValueError):
        Schedule(0, per_step_loss=True)
    with pytest.raises(ValueError):
        Schedule(1, test_steps=-2)
    assert Schedule(2).eval_steps == 2 and Schedule(2, test_steps=5).eval_steps == 5


def test_zero_train_steps_is_plain_query_loss_gradient():
    learner = make_learner("unrolled", "sgd", "all", steps=0)
    batch = make_batch()
    params, _ = leaf_copies(learner)
    loss = sum(hand_mse(hand_forward(params, batch.query_x[t]), batch.query_y[t]) for t in range(TASKS)) / TASKS
    ref = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for vec in (True, False):
        grads, stats = learner.meta_gradient_of(batch, vectorize=vec)
        assert_grads_close(grads, ref, {}, atol=1e-12)
        assert stats["inner_loss"].shape == (TASKS, 0)


def test_schedule_steps_used_by_evaluate_adapt_and_meta_gradient():
    learner = MetaLearner(make_model(), mse, rule=SGD(ALPHA), schedule=Schedule(1, test_steps=3))
    batch = make_batch()
    assert learner.evaluate(batch)["loss"].shape == (TASKS, 4)
    assert learner.evaluate(batch, steps=0)["loss"].shape == (TASKS, 1)
    assert learner.meta_gradient_of(batch)[1]["inner_loss"].shape == (TASKS, 1)
    params, state = leaf_copies(learner)
    traj = hand_inner("sgd", NAMES, params, state, batch.support_x[0], batch.support_y[0], 3, mode="plain")
    full = learner.adapt(batch.support_x[0], batch.support_y[0])  # default: the schedule's test steps
    for n in NAMES:
        torch.testing.assert_close(full[n].detach(), traj[3][n], rtol=0, atol=1e-12)


def test_reptile_ignores_per_step_loss():
    batch = make_batch()
    g1, _ = make_learner("reptile", "meta-sgd", "all", steps=3).meta_gradient_of(batch)
    g2, _ = make_learner("reptile", "meta-sgd", "all", steps=3, per_step=True).meta_gradient_of(batch)
    for n in NAMES:
        assert torch.equal(g1["model"][n], g2["model"][n])


def test_non_finite_query_loss_names_task():
    learner = make_learner("unrolled", "sgd", "all")
    b = make_batch(tasks=3)
    qy = b.query_y.clone()
    qy[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite query loss.*task 2"):
        learner.meta_gradient_of(TaskBatch(b.support_x, b.support_y, b.query_x, qy))


@pytest.mark.parametrize("module_name", ["fc_", "enc__1"])
def test_meta_sgd_with_underscored_module_names(module_name):
    model = nn.Sequential()
    model.add_module(module_name, nn.Linear(1, 1).to(DT))
    learner = MetaLearner(model, mse, rule="meta-sgd")
    grads, _ = learner.meta_gradient_of(make_batch())  # KeyError: 'fc_.weight' / 'enc__1.weight'
    assert set(learner.meta_parameters()["rule"]) == {f"{module_name}.weight", f"{module_name}.bias"}
    assert set(grads["rule"]) == {f"{module_name}.weight", f"{module_name}.bias"}


def test_vmap_matches_loop_through_batchnorm_second_order():
    """Regression: grad(vmap(grad(batch_norm))) is wrong in torch 2.13; the engine must not use it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)
    learner = MetaLearner(model, torch.nn.functional.cross_entropy, lr=0.4, schedule=Schedule(2))
    sx, qx = torch.randn(3, 4, 1, 4, 4, dtype=DT), torch.randn(3, 6, 1, 4, 4, dtype=DT)
    sy, qy = torch.randint(0, 2, (3, 4)), torch.randint(0, 2, (3, 6))
    batch = TaskBatch(sx, sy, qx, qy)
    gv, _ = learner.meta_gradient_of(batch, vectorize=True)
    gl, _ = learner.meta_gradient_of(batch, vectorize=False)
    # reference: torch.autograd over a hand-written per-task loop
    params = list(model.parameters())
    total = 0
    for i in range(3):
        ps = dict(model.named_parameters())
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, ps, (sx[i],)), sy[i])
            g = torch.autograd.grad(loss, list(ps.values()), create_graph=True)
            ps = {n: p - 0.4 * gi for (n, p), gi in zip(ps.items(), g)}
        total = total + torch.nn.functional.cross_entropy(torch.func.functional_call(model, ps, (qx[i],)), qy[i]) / 3
    ref = dict(zip(dict(model.named_parameters()), torch.autograd.grad(total, params)))
    for n, r in ref.items():
        torch.testing.assert_close(gv["model"][n], r, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gl["model"][n], r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("mgrad", METAGRADS)
@pytest.mark.parametrize("adapt", list(ADAPT))
def test_stacked_plain_sgd_path_is_taken_and_equals_the_per_task_loop(monkeypatch, mgrad, adapt, per_step):
    # an elementwise rule on a plain MLP, vectorized: the meta-batch runs stacked (InnerProblem.stacked)
    import metagrad.gradients.reptile as reptile_module
    import metagrad.gradients.unrolled as unrolled_module

    calls = []
    real = unrolled_module._stacked_gradient
    spy = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(unrolled_module, "_stacked_gradient", spy)
    monkeypatch.setattr(reptile_module, "_stacked_gradient", spy)
    learner = make_learner(mgrad, "sgd", adapt, per_step=per_step)
    assert learner.backend.name == "mlp-analytic" and learner.problem.stacked
    batch = make_batch(tasks=3)
    gv, sv = learner.meta_gradient_of(batch, vectorize=True)
    assert calls == [1]
    gl, sl = learner.meta_gradient_of(batch, vectorize=False)
    assert calls == [1]  # the loop is the reference path
    for n in gl["model"]:
        torch.testing.assert_close(gv["model"][n], gl["model"][n], rtol=0, atol=1e-12)
    assert max(g.abs().max() for g in gl["model"].values()) > 1e-3
    for k in ("meta_objective", "query_loss", "inner_loss"):
        torch.testing.assert_close(sv[k], sl[k], rtol=0, atol=1e-12)
    # a learnable rate is elementwise too: stacked, and equal to the loop, its own gradient included
    learnable = make_learner(mgrad, "sgd-learnable", adapt, per_step=per_step)
    gv, _ = learnable.meta_gradient_of(batch, vectorize=True)
    assert calls == [1, 1]
    gl, _ = learnable.meta_gradient_of(batch, vectorize=False)
    for group in gl:
        for n in gl[group]:
            torch.testing.assert_close(gv[group][n], gl[group][n], rtol=0, atol=1e-12)
    # a rule that is not elementwise keeps the per-task path
    curv = MetaLearner(make_model(), mse, adapt=adapt, rule=mg.MetaCurvature(ALPHA), meta_gradient=mgrad,
                       schedule=Schedule(STEPS))
    assert not curv.problem.stacked
    curv.meta_gradient_of(batch, vectorize=True)
    assert calls == [1, 1]
