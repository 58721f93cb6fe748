"""The method matrix over every registered update rule: a rule added to ``RULES`` is checked here
with every meta-gradient that accepts it, against a hand-unrolled loop that calls the rule's own
``init_inner`` / ``step`` (so this checks the engine; each rule's math is checked in its own tests)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad import MetaLearner, Schedule, TaskBatch
from metagrad.metrics import mse
from metagrad.rules import RULES, make_rule

DT = torch.float64
STEPS = 2
ADAPT = {"all": None, "head": ("2.weight", "2.bias")}
METHODS = ("unrolled", "first-order", "checkpointed", "reptile", "implicit", "adjoint")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)


def _batch():
    g = torch.Generator().manual_seed(1)
    return TaskBatch(*(torch.randn(3, 5, k, generator=g, dtype=DT) for k in (2, 1, 2, 1)))


def _meta_gradient(name):
    return {"checkpointed": mg.Checkpointed(segments=2), "implicit": mg.Implicit(lam=2.0, cg_steps=3),
            "adjoint": mg.Adjoint(T=0.1, h=0.05, forward="euler", backward="discrete")}.get(name, name)


def _learner(rule_name, method, adapt):
    return MetaLearner(_model(), mse, adapt="all" if adapt == "all" else list(ADAPT[adapt]),
                       rule=make_rule(rule_name, lr=0.05), meta_gradient=_meta_gradient(method),
                       schedule=Schedule(STEPS))


def _hand_reference(learner, batch, *, first_order):
    """Mean over tasks of the query loss after STEPS steps of ``learner.rule``, differentiated by
    autograd with respect to the initialization and the rule's meta-learned state; plus the final
    adapted tensors of each task."""
    rule, model = learner.rule, learner.model
    names = [n for n, _ in model.named_parameters()]
    adapted = learner.adapted_names
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    state = {k: v.detach().clone().requires_grad_() for k, v in learner.meta_parameters()["rule"].items()}
    total, finals = 0.0, []
    for i in range(batch.num_tasks):
        p = dict(theta)
        st = dict(state)
        inner = rule.init_inner({n: p[n] for n in adapted})
        prev = None
        for _ in range(STEPS):
            loss = mse(torch.func.functional_call(model, p, (batch.support_x[i],)), batch.support_y[i])
            wrt = [p[n] for n in adapted]
            g = torch.autograd.grad(loss, wrt, create_graph=True)
            if first_order:
                g = [t.detach() for t in g]
            if rule.adapts_state and prev is not None:  # Algorithm 1: d loss / d state through the last step
                sg = torch.autograd.grad(loss, list(st.values()), create_graph=True, allow_unused=True)
                sg = {k: torch.zeros_like(v) if s is None else s for (k, v), s in zip(st.items(), sg)}
                if first_order:
                    sg = {k: v.detach() for k, v in sg.items()}
                st = rule.state_step(st, sg)
            new, inner = rule.step({n: p[n] for n in adapted}, dict(zip(adapted, g)), st, inner)
            p = {**p, **new}
            prev = new
        finals.append({n: p[n].detach() for n in adapted})
        total = total + mse(torch.func.functional_call(model, p, (batch.query_x[i],)), batch.query_y[i])
    leaves = [theta[n] for n in names] + list(state.values())
    found = torch.autograd.grad(total / batch.num_tasks, leaves, allow_unused=True)
    found = [torch.zeros_like(v) if f is None else f for v, f in zip(leaves, found)]
    return {"model": dict(zip(names, found)), "rule": dict(zip(state, found[len(names):]))}, finals


def _close(a, b, tol=1e-10):
    for group in b:
        for n in b[group]:
            torch.testing.assert_close(a[group][n], b[group][n], rtol=tol, atol=tol)


def _nonzero(grads):
    return max(g.abs().max() for g in grads["model"].values()) > 1e-4


@pytest.mark.parametrize("adapt", list(ADAPT))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rule_name", RULES.names())
def test_every_registered_rule_with_every_method(rule_name, method, adapt):
    if method == "adjoint" and make_rule(rule_name, lr=0.05).gradient_descent_rate is None:
        pytest.skip(f"the adjoint integrates plain gradient flow; {rule_name} is not plain gradient descent")
    if method == "implicit" and make_rule(rule_name, lr=0.05).adapts_state:
        pytest.skip("implicit refuses rules that adapt their state")
    learner, batch = _learner(rule_name, method, adapt), _batch()
    gv, sv = learner.meta_gradient_of(batch, vectorize=True)
    gl, sl = learner.meta_gradient_of(batch, vectorize=False)
    _close(gv, gl)
    torch.testing.assert_close(sv["inner_loss"], sl["inner_loss"], rtol=1e-12, atol=1e-12)
    assert _nonzero(gl)
    if method in ("unrolled", "first-order", "checkpointed"):
        ref, _ = _hand_reference(learner, batch, first_order=method == "first-order")
        _close(gl, ref)
    elif method == "reptile":
        _, finals = _hand_reference(learner, batch, first_order=True)
        theta = dict(learner.model.named_parameters())
        for n in learner.adapted_names:
            expected = torch.stack([theta[n].detach() - f[n] for f in finals]).mean(0)
            torch.testing.assert_close(gl["model"][n], expected, rtol=1e-10, atol=1e-12)
    elif method == "adjoint":  # Euler forward + discrete adjoint is unrolled MAML with SGD(h)
        ref = MetaLearner(_model(), mse, adapt=learner.adapted_names, rule=mg.SGD(0.05), schedule=Schedule(2))
        _close(gl, ref.meta_gradient_of(batch)[0])


def test_the_matrix_reaches_every_registered_rule():
    assert {"sgd", "meta-sgd", "meta-curvature", "meta-kfo", "adam", "momentum"} <= set(RULES.names())
    # the matrix is parametrized by the registry itself, so a newly registered rule joins it
    marks = test_every_registered_rule_with_every_method.pytestmark
    rule_param = next(m for m in marks if m.args[0] == "rule_name")
    assert list(rule_param.args[1]) == RULES.names()


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _unflat(vec, like, names):
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = vec[i:i + k].reshape(like[n].shape)
        i += k
    return out


@pytest.mark.parametrize("adapt", list(ADAPT))
@pytest.mark.parametrize("rule_name", RULES.names())
def test_implicit_equals_a_dense_solve_after_the_rules_own_proximal_steps(rule_name, adapt):
    """iMAML with every rule that it accepts, against ``(I + H/lam)^{-1} grad L_val(u_K)`` (and the
    mixed term for the non-adapted parameters) solved densely, ``u_K`` from STEPS steps of the rule's
    own ``init_inner`` / ``step`` on the proximal gradient: checks that the implicit inner solve
    carries the rule's inner state (Adam's moments and step count, the momentum buffer)."""
    if make_rule(rule_name, lr=0.05).adapts_state:
        pytest.skip("implicit refuses rules that adapt their state")
    lam = 2.0
    probe = _learner(rule_name, "unrolled", adapt)
    n_adapted = sum(p.numel() for n, p in probe.model.named_parameters() if n in probe.adapted_names)
    learner = MetaLearner(_model(), mse, adapt=probe.adapted_names, rule=make_rule(rule_name, lr=0.05),
                          meta_gradient=mg.Implicit(lam=lam, cg_steps=n_adapted), schedule=Schedule(STEPS))
    rule, model, batch = learner.rule, learner.model, _batch()
    names, adapted = [n for n, _ in model.named_parameters()], list(learner.adapted_names)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    state = {k: v.detach() for k, v in learner.meta_parameters()["rule"].items()}
    phi_names = [n for n in names if n not in adapted]
    total = {n: torch.zeros_like(theta[n]) for n in names}
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = (t[i] for t in batch)

        def loss(u, phi, x, y):
            return mse(torch.func.functional_call(model, {**theta, **phi, **u}, (x,)), y)

        u = {n: theta[n] for n in adapted}
        inner = rule.init_inner(u)
        for _ in range(STEPS):
            leaves = {n: t.clone().requires_grad_() for n, t in u.items()}
            g = torch.autograd.grad(loss(leaves, {}, sx, sy), list(leaves.values()))
            g = {n: gn + lam * (u[n] - theta[n]) for n, gn in zip(adapted, g)}
            u, inner = rule.step(u, g, state, inner)
            u = {n: t.detach() for n, t in u.items()}
        phi = {n: theta[n].clone().requires_grad_() for n in phi_names}
        uq = {n: t.clone().requires_grad_() for n, t in u.items()}
        found = torch.autograd.grad(loss(uq, phi, qx, qy), list(uq.values()) + list(phi.values()))
        g_u, g_phi = _flat(dict(zip(adapted, found)), adapted), dict(zip(phi_names, found[len(adapted):]))
        hess = torch.autograd.functional.hessian(lambda vec: loss(_unflat(vec, u, adapted), {}, sx, sy),
                                                 _flat(u, adapted))
        v = torch.linalg.solve(torch.eye(len(g_u), dtype=DT) + hess / lam, g_u)
        for n, t in _unflat(v, u, adapted).items():
            total[n] += t
        if phi_names:  # dJ/dphi = d_phi L_val - (1/lam) (d_phi grad_u L_tr)^T v
            gu_tr = torch.autograd.grad(loss(uq, phi, sx, sy), list(uq.values()), create_graph=True)
            mixed = torch.autograd.grad(torch.dot(torch.cat([t.reshape(-1) for t in gu_tr]), v), list(phi.values()))
            for n, m in zip(phi_names, mixed):
                total[n] += g_phi[n] - m / lam
    ref = {"model": {n: t / batch.num_tasks for n, t in total.items()},
           "rule": {k: torch.zeros_like(v) for k, v in state.items()}}
    for vectorize in (True, False):
        grads, _ = learner.meta_gradient_of(batch, vectorize=vectorize)
        _close(grads, ref, tol=1e-8)
    assert _nonzero(ref)
