"""The Deep model's MAML loss surface (Arnold et al. 2021, suppl. A.2, eqs. 40-57) and the
``linreg-landscape`` experiment.

``deep_maml_loss`` is eq. (53) under the half-MSE scaling of eq. (30), plus ``noise^2 / 2``. It is
checked against the engine (:class:`~metagrad.MetaLearner`, autograd through one inner step) with
exact population moments: support/query sets ``x = (1, -1)``, ``y = theta x + sigma (1, 1)`` have
``mean x^2 = 1``, ``mean x y = theta`` and query loss ``1/2 ((theta - f)^2 + sigma^2)``; the
expectation over ``theta ~ N(0, 1)`` of that degree-4 polynomial is exact under 5-node
Gauss-Hermite quadrature, so no Monte Carlo or finite-shot bias enters.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metagrad import MetaLearner, TaskBatch
from metagrad.experiments import get_experiment, run
from metagrad.experiments.linreg_landscape import deep_maml_loss, deep_model, stationary_points
from metagrad.metrics import half_mse

DT = torch.float64


def gauss_hermite(n=5):
    """Nodes and weights with ``sum w g(theta) = E g(theta)``, ``theta ~ N(0, 1)`` (exact to degree 2n-1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(nodes, dtype=DT), torch.tensor(weights / math.sqrt(2 * math.pi), dtype=DT)


def population_batch(thetas, noise):
    x = torch.tensor([[1.0], [-1.0]], dtype=DT).expand(len(thetas), 2, 1)
    y = thetas[:, None, None] * x + noise
    return TaskBatch(x, y, x, y)


def engine_expectation(a, b, alpha, noise):
    """E_theta of the engine's per-task MAML loss and meta-gradient (d/da, d/db), by quadrature."""
    thetas, w = gauss_hermite()
    learner = MetaLearner(deep_model(a, b), half_mse, lr=alpha)
    loss, ga, gb = 0.0, 0.0, 0.0
    for i in range(len(thetas)):  # one task per call: meta_gradient_of averages, quadrature weights differ
        grads, stats = learner.meta_gradient_of(population_batch(thetas[i:i + 1], noise))
        loss += w[i] * stats["meta_objective"]
        ga += w[i] * grads["model"]["1.weight"].squeeze()
        gb += w[i] * grads["model"]["0.weight"].squeeze()
    return loss, ga, gb


def closed_form_grad(a, b, alpha, noise=0.0):
    p = torch.tensor([a, b], dtype=DT, requires_grad=True)
    g, = torch.autograd.grad(deep_maml_loss(p[0], p[1], alpha, noise), p)
    return g


@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("a,b,alpha", [(0.7, -0.4, 0.1), (2.5, 1.2, 0.1), (-1.3, 0.9, 0.25), (0.0, 3.0, 0.3)])
def test_closed_form_equals_engine_maml_loss_quadrature(a, b, alpha, noise):
    loss, ga, gb = engine_expectation(a, b, alpha, noise)
    torch.testing.assert_close(loss, torch.tensor(deep_maml_loss(a, b, alpha, noise), dtype=DT), rtol=1e-12, atol=1e-12)
    g = closed_form_grad(a, b, alpha, noise)
    torch.testing.assert_close(torch.stack([ga, gb]), g, rtol=1e-11, atol=1e-11)


def test_closed_form_monte_carlo_meta_objective():
    """``meta_objective`` over 20000 random tasks (population-moment data) vs eq. (53): within 5 SE."""
    a, b, alpha, noise = 1.8, 0.6, 0.1, 1.0
    thetas = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=DT)
    learner = MetaLearner(deep_model(a, b), half_mse, lr=alpha)
    _, stats = learner.meta_gradient_of(population_batch(thetas, noise))
    se = stats["query_loss"].std().item() / math.sqrt(len(thetas))
    assert abs(stats["meta_objective"].item() - deep_maml_loss(a, b, alpha, noise)) < 5 * se


@pytest.mark.parametrize("alpha", [0.1, 0.25])
def test_gradient_vanishes_at_the_five_stationary_points(alpha):
    for name, (a, b) in stationary_points(alpha).items():
        assert closed_form_grad(a, b, alpha).abs().max() < 1e-12, name
    # eq. (54) for the half-MSE scaling: dL/da at b = 0 is 2 alpha a (alpha a^2 - 1) (paper: 4 alpha a (...))
    for a in (-2.0, 0.5, 1.7):
        g = closed_form_grad(a, 0.0, alpha)
        assert g[0].item() == pytest.approx(2 * alpha * a * (alpha * a * a - 1), abs=1e-13)
        assert g[1].item() == 0.0
    # the engine's meta-gradient (quadrature over tasks) vanishes at a minimum too
    r = 1 / math.sqrt(alpha)
    _, ga, gb = engine_expectation(r, 0.0, alpha, 1.0)
    assert abs(ga.item()) < 1e-12 and abs(gb.item()) < 1e-12


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_hessians_eqs_55_57(alpha):
    """Half-MSE Hessians: origin ``-2 alpha I``; ``(+-1/sqrt(alpha), 0)``: ``diag(4 alpha, 3 alpha^3)``;
    ``(0, +-1/sqrt(alpha))``: ``diag(3 alpha^3, 4 alpha)``.

    The paper's eqs. (55)-(57) state ``-4 alpha I`` and ``diag(8 alpha, 6 alpha^3)``: exactly twice
    these, because its Matlab code (and eq. 54) differentiate ``2 L`` (eq. 53 without the 1/2). The
    derived constant is 2; the stationary points and their nature (max / minima) are unchanged.
    """
    def hessian(a, b):
        return torch.autograd.functional.hessian(lambda p: deep_maml_loss(p[0], p[1], alpha),
                                                 torch.tensor([a, b], dtype=DT))

    r = 1 / math.sqrt(alpha)
    want = {
        (0.0, 0.0): torch.diag(torch.tensor([-2 * alpha, -2 * alpha], dtype=DT)),
        (r, 0.0): torch.diag(torch.tensor([4 * alpha, 3 * alpha ** 3], dtype=DT)),
        (-r, 0.0): torch.diag(torch.tensor([4 * alpha, 3 * alpha ** 3], dtype=DT)),
        (0.0, r): torch.diag(torch.tensor([3 * alpha ** 3, 4 * alpha], dtype=DT)),
        (0.0, -r): torch.diag(torch.tensor([3 * alpha ** 3, 4 * alpha], dtype=DT)),
    }
    paper = {(0.0, 0.0): [-4 * alpha, -4 * alpha], (r, 0.0): [8 * alpha, 6 * alpha ** 3], (0.0, r): [6 * alpha ** 3, 8 * alpha]}
    for point, h in want.items():
        torch.testing.assert_close(hessian(*point), h, rtol=1e-10, atol=1e-12)
    for point, diag in paper.items():
        torch.testing.assert_close(2 * hessian(*point), torch.diag(torch.tensor(diag, dtype=DT)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b", [-2.0, 0.0, 0.37, 5.0])
@pytest.mark.parametrize("alpha,theta", [(0.1, 1.3), (0.4, -0.7)])
def test_anil_one_step_lands_on_theta_eq_20(alpha, b, theta):
    """a = 1/sqrt(alpha), adapt only b, one SGD step on a noisy support set whose sample moments are
    exactly Sxx = 1, Sxy = theta (noise made orthogonal to x): a b' = theta for any starting b."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 1, generator=g, dtype=DT)
    x = x / x.square().mean().sqrt()  # mean x^2 = 1
    eps = torch.randn(7, 1, generator=g, dtype=DT)
    eps = eps - (eps * x).mean() * x  # mean x eps = 0
    y = theta * x + eps
    assert (x * y).mean().item() == pytest.approx(theta, abs=1e-14)
    a = 1 / math.sqrt(alpha)
    learner = MetaLearner(deep_model(a, b), half_mse, adapt="0", lr=alpha)
    adapted = learner.adapt(x, y, steps=1)
    assert adapted["1.weight"].item() == a
    assert a * adapted["0.weight"].item() == pytest.approx(theta, abs=1e-13)
    assert adapted["0.weight"].item() == pytest.approx(math.sqrt(alpha) * theta, abs=1e-13)


def test_linreg_landscape_quick_reaches_four_minima(tmp_path):
    s = run(get_experiment("linreg-landscape"), tmp_path,
            ["quick=true", "shots=500", "queries=500", "meta_batch_size=5", "iterations=250"], progress=False)
    assert s["distinct_minima_reached"] == 4
    assert [t["nearest_minimum"] for t in s["trajectories"]] == ["a+", "b+", "a-", "b-"]
    # finite shots move the empirical minima slightly; the trajectories end near the analytic ones
    assert s["max_distance_to_minimum"] < 0.15
    for t in s["trajectories"]:
        assert t["closed_form_loss_end"] - s["closed_form_loss_minimum"] < 5e-3
    assert s["closed_form_loss_minimum"] == pytest.approx(0.5) and s["closed_form_loss_origin"] == pytest.approx(1.0)
    assert (tmp_path / "linreg_landscape.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "trajectories.json").exists()
