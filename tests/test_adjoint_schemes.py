"""Adjoint (A-MAML): the registries of forward and backward schemes, and every pairing on a tiny problem."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import metagrad as mg
from metagrad import MetaLearner, Schedule, TaskBatch
from metagrad.gradients import adjoint as adjoint_module
from metagrad.metrics import mse

DT = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def batch() -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    return TaskBatch(*(torch.randn(3, 5, 1, generator=g, dtype=DT) for _ in range(4)))


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in grads["model"].values()])


def test_registries_hold_exactly_the_valid_names():
    assert list(adjoint_module.FORWARD_SCHEMES) == ["ode", "euler"]
    assert list(adjoint_module.BACKWARD_SCHEMES) == ["heun", "heun-pec", "discrete"]
    assert adjoint_module.FORWARDS == ("ode", "euler")
    assert adjoint_module.BACKWARDS == ("heun", "heun-pec", "discrete")
    for forward, backward in itertools.product(adjoint_module.FORWARD_SCHEMES, adjoint_module.BACKWARD_SCHEMES):
        m = mg.Adjoint(forward=forward, backward=backward)
        assert (m.forward, m.backward) == (forward, backward)


def test_unknown_scheme_names_raise_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"forward must be one of \('ode', 'euler'\), got 'rk'"):
        mg.Adjoint(forward="rk")
    with pytest.raises(ValueError, match=r"backward must be one of \('heun', 'heun-pec', 'discrete'\), got 'exact'"):
        mg.Adjoint(backward="exact")
    with pytest.raises(ValueError, match="'rk45'"):  # the ode scheme's own check
        mg.Adjoint(solver="rk45")
    mg.Adjoint(forward="euler", solver="rk45")  # Euler has no solver: not checked


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("forward,backward", list(itertools.product(("ode", "euler"), ("heun", "heun-pec", "discrete"))))
def test_every_pairing_agrees_with_unrolled_maml(forward, backward, adapt, segments):
    # euler + discrete is unrolled MAML with SGD(h) to rounding; every other pairing differs from it by O(h)
    # (the flow against Euler steps, Heun against the exact discrete adjoint), here at h = 0.02 (a few per cent)
    h, K = 0.02, 20
    b = batch()
    ref = MetaLearner(mlp(), mse, adapt=adapt, rule=mg.SGD(h), meta_gradient="unrolled", schedule=Schedule(K))
    adj = MetaLearner(mlp(), mse, adapt=adapt, meta_gradient=mg.Adjoint(
        T=K * h, h=h, forward=forward, backward=backward, segments=segments, rtol=1e-10, atol=1e-12))
    g_ref, s_ref = ref.meta_gradient_of(b)
    g_adj, s_adj = adj.meta_gradient_of(b)
    err = ((flat(g_adj) - flat(g_ref)).norm() / flat(g_ref).norm()).item()
    assert s_adj["inner_loss"].shape == (3, K)
    if (forward, backward) == ("euler", "discrete"):
        assert err < 1e-12
        assert torch.allclose(s_adj["inner_loss"], s_ref["inner_loss"], rtol=0, atol=1e-12)
    else:
        assert err < 5e-2
        assert torch.allclose(s_adj["query_loss"], s_ref["query_loss"], rtol=5e-2)
    if forward == "euler":  # same states as the unrolled inner loop
        assert torch.allclose(s_adj["inner_loss"], s_ref["inner_loss"], rtol=0, atol=1e-12)
