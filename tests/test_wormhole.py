"""Wormhole MAML (learners/wormhole.py) and phased schedules (schedule.Phase), in float64."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad.gradients as mgrad
from metagrad import MetaLearner, Phase, Schedule, TaskBatch, Wormhole
from metagrad.rules import SGD

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _batch(tasks=3, shots=5, d=3, out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return TaskBatch(r(tasks, shots, d), r(tasks, shots, out), r(tasks, shots, d), r(tasks, shots, out))


@pytest.mark.parametrize("form", ["scalar", "diag", "layer", "lowrank"])
@pytest.mark.parametrize("learn_init", [False, True])
def test_identity_without_c_steps_is_plain_maml(form, learn_init):
    base = _mlp()
    plain = MetaLearner(copy.deepcopy(base), F.mse_loss, lr=0.3, schedule=Schedule(2))
    wh = Wormhole(copy.deepcopy(base), form, learn_init=learn_init)
    worm = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), lr=0.3,
                       schedule=wh.schedule(train_steps=2, c_steps=0, c_lr=0.5))
    batch = _batch()
    g_plain, s_plain = plain.meta_gradient_of(batch)
    g_worm, s_worm = worm.meta_gradient_of(batch)
    for n, g in g_plain["model"].items():
        torch.testing.assert_close(g_worm["model"]["model." + n], g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_worm["query_loss"], s_plain["query_loss"], rtol=1e-12, atol=1e-12)


def test_parameter_counts_of_the_forms():
    base = _mlp()
    d_theta = sum(p.numel() for p in base.parameters())
    assert Wormhole(base, "scalar").num_c() == 1
    assert Wormhole(base, "tanh").num_c() == 1
    assert Wormhole(base, "diag").num_c() == d_theta
    assert Wormhole(base, "diag", layers="2").num_c() == 4 * 2 + 2
    assert Wormhole(base, "layer").num_c() == 4  # four parameter tensors
    assert Wormhole(base, "layer", layers=["0.weight", "2.weight"]).num_c() == 2
    assert Wormhole(base, "lowrank", rank=2).num_c() == 2 * 2 * 4 + 2 * 2 * 2  # 2 rank out per weight matrix
    # C's entries are buffers unless their init is meta-learned
    assert not any(n.startswith("wormhole") for n, _ in Wormhole(base, "diag").named_parameters())
    assert sum(p.numel() for n, p in Wormhole(base, "diag", learn_init=True).named_parameters()
               if n.startswith("wormhole")) == d_theta


def test_invalid_arguments():
    base = _mlp()
    with pytest.raises(ValueError, match="unknown wormhole form"):
        Wormhole(base, "cubic")
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        Wormhole(base, "tanh", init=1.0)
    with pytest.raises(ValueError, match="matches no parameter"):
        Wormhole(base, "diag", layers="nope.*")
    with pytest.raises(ValueError, match="non-negative"):
        Phase("wormhole.*", steps=-1)
    wh = Wormhole(base, "tanh")
    for mg in ("reptile",):
        with pytest.raises(ValueError, match="does not support phases"):
            MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), meta_gradient=mg, schedule=wh.schedule(1, 1))


def test_no_phases_is_the_plain_schedule():
    assert Schedule(3).phases == () and Schedule(3, phases=None) == Schedule(3)


def _hand_two_phase(W, b, t0, x, y, qx, qy, nc, n, gamma, alpha, first_order=False):
    """Algorithm 1 written out with torch.autograd.grad: C = tanh(t) on a linear model."""
    create = not first_order

    def loss(W, b, t, x, y):
        c = torch.tanh(t)
        return F.mse_loss(x @ (c * W).T + c * b, y)

    t = t0
    for _ in range(nc):
        (g,) = torch.autograd.grad(loss(W, b, t, x, y), t, create_graph=create)
        t = t - gamma * g
    for _ in range(n):
        # the partial gradient with C held: fresh nodes, so the path W -> t does not count
        W, b = W + 0, b + 0
        gW, gb = torch.autograd.grad(loss(W, b, t, x, y), (W, b), create_graph=create)
        W, b = W - alpha * gW, b - alpha * gb
    return loss(W, b, t, qx, qy)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [False, True])
def test_meta_gradient_through_both_phases_matches_hand_loop(first_order, vectorize):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(DT)
    wh = Wormhole(lin, "tanh", init=0.5, learn_init=True)
    nc, n, gamma, alpha = 2, 2, 0.7, 0.3
    learner = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), lr=alpha,
                          meta_gradient="first-order" if first_order else "unrolled",
                          schedule=wh.schedule(train_steps=n, c_steps=nc, c_lr=gamma))
    batch = _batch(tasks=2, d=3, out=2)
    grads, stats = learner.meta_gradient_of(batch, vectorize=vectorize)
    assert stats["inner_loss"].shape == (2, nc + n)
    W = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    t0 = wh.wormhole.t.detach().clone().requires_grad_()
    total = 0
    for i in range(2):
        total = total + _hand_two_phase(W, b, t0, *(f[i] for f in batch), nc, n, gamma, alpha, first_order) / 2
    gW, gb, gt = torch.autograd.grad(total, (W, b, t0))
    torch.testing.assert_close(grads["model"]["model.weight"], gW, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["model"]["model.bias"], gb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["model"]["wormhole.t"], gt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("segments", [None, 1, 3])
@pytest.mark.parametrize("per_step", [False, True])
def test_checkpointed_through_both_phases_equals_unrolled(segments, per_step):
    # the phases run as one more differentiated segment; the hand loop checks unrolled above
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(DT)
    wh = Wormhole(lin, "tanh", init=0.5, learn_init=True)
    batch = _batch(tasks=2, d=3, out=2)
    out = {}
    for mg in ("unrolled", mgrad.Checkpointed(segments=segments)):
        sched = wh.schedule(train_steps=5, c_steps=2, c_lr=0.7)
        sched = dataclasses.replace(sched, per_step_loss=per_step)
        learner = MetaLearner(copy.deepcopy(wh), F.mse_loss, adapt=wh.model_patterns(), lr=0.3, meta_gradient=mg,
                              schedule=sched)
        out[str(mg)] = learner.meta_gradient_of(batch)
    (g_ref, s_ref), (g_ck, s_ck) = out.values()
    for part in ("model", "rule"):
        for name in g_ref[part]:
            torch.testing.assert_close(g_ck[part][name], g_ref[part][name], rtol=1e-10, atol=1e-12)
    assert g_ref["model"]["wormhole.t"].abs().item() > 0  # C's learned init gets a gradient through the C phase
    torch.testing.assert_close(s_ck["inner_loss"], s_ref["inner_loss"], rtol=1e-12, atol=1e-12)
    assert s_ck["inner_loss"].shape == (2, 2 + 5)
    torch.testing.assert_close(s_ck["query_loss"], s_ref["query_loss"], rtol=1e-12, atol=1e-12)


def _tree_close(a, b, **tol):
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], **tol)


@pytest.mark.parametrize("learn_init", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_adjoint_through_both_phases_equals_unrolled(learn_init, vectorize):
    # the engine runs the C phase, the adjoint (Euler forward, discrete backward: exactly unrolled
    # SGD) the main steps; its gradient for C is pulled back through the C phase
    h, K = 0.2, 4
    wh = Wormhole(_mlp(), "tanh", init=0.6, learn_init=learn_init)
    batch = _batch()
    sched = wh.schedule(train_steps=K, c_steps=2, c_lr=0.7)
    ref = MetaLearner(copy.deepcopy(wh), F.mse_loss, adapt=wh.model_patterns(), rule=SGD(h), schedule=sched)
    adj = MetaLearner(copy.deepcopy(wh), F.mse_loss, adapt=wh.model_patterns(), rule=SGD(0.9), schedule=sched,
                      meta_gradient=mgrad.Adjoint(T=K * h, h=h, forward="euler", backward="discrete"))
    g_ref, s_ref = ref.meta_gradient_of(batch)
    g_adj, s_adj = adj.meta_gradient_of(batch, vectorize=vectorize)
    _tree_close(g_adj, g_ref, rtol=1e-10, atol=1e-12)
    if learn_init:
        assert g_ref["model"]["wormhole.t"].abs().item() > 1e-6
    assert s_adj["inner_loss"].shape == (3, 2 + K)
    torch.testing.assert_close(s_adj["inner_loss"], s_ref["inner_loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_adj["query_loss"], s_ref["query_loss"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_implicit_through_both_phases_matches_finite_differences(vectorize):
    # iMAML after the C phase: the meta-objective is the query loss at the proximal optimum
    # u*(theta) of the main steps, started from the phase-adapted tensors. With the inner
    # problem solved to convergence (quadratic here) and CG run to its dimension, the implicit
    # gradient is the exact derivative: compare with central differences of that objective.
    torch.manual_seed(0)
    wh = Wormhole(nn.Linear(3, 2).to(DT), "tanh", init=0.5, learn_init=True)
    batch = _batch(tasks=2)
    mg = mgrad.Implicit(lam=2.0, inner_steps=400, inner_lr=0.1, cg_steps=12)
    learner = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), meta_gradient=mg,
                          schedule=wh.schedule(train_steps=1, c_steps=2, c_lr=0.7))
    grads, stats = learner.meta_gradient_of(batch, vectorize=vectorize)
    assert stats["inner_loss"].shape == (2, 2 + 400)
    params = dict(wh.named_parameters())
    eps = 1e-6
    for name, p in params.items():
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            vals = []
            for sign in (1, -1):
                with torch.no_grad():
                    p.view(-1)[i] += sign * eps
                vals.append(learner.meta_gradient_of(batch, vectorize=vectorize)[1]["query_loss"].mean())
                with torch.no_grad():
                    p.view(-1)[i] -= sign * eps
            fd.view(-1)[i] = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close(grads["model"][name], fd, rtol=1e-6, atol=1e-8)
    assert grads["model"]["wormhole.t"].abs().item() > 1e-6


def test_gradcheck_of_the_two_phase_hand_loop():
    torch.manual_seed(0)
    W = torch.randn(2, 3, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)
    t0 = torch.tensor(0.4, dtype=DT, requires_grad=True)
    task = [f[0] for f in _batch(tasks=1, d=3, out=2)]
    assert torch.autograd.gradcheck(lambda W, b, t: _hand_two_phase(W, b, t, *task, 2, 2, 0.7, 0.3), (W, b, t0))


def test_tanh_form_stays_in_open_interval():
    """C = tanh(t) is in (-1, 1) whatever the C phase does (exactly +-1 only once float64 saturates)."""
    torch.manual_seed(0)
    wh = Wormhole(nn.Linear(3, 2).to(DT), "tanh")
    learner = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), lr=0.1,
                          schedule=wh.schedule(train_steps=1, c_steps=20, c_lr=2.0))
    batch = _batch(tasks=4, d=3, out=2)
    for i in range(4):
        t = learner.adapt(batch.support_x[i], batch.support_y[i])["wormhole.t"]
        assert torch.isfinite(t) and abs(t.item()) < 18
        wh.wormhole.t.copy_(t.detach())
        assert -1 < wh.c_value().item() < 1
        wh.wormhole.t.fill_(torch.atanh(torch.tensor(0.9)).item())
    for t in (-1e6, 1e6):
        wh.wormhole.t.fill_(t)
        assert -1 <= wh.c_value().item() <= 1


def test_tanh_c_is_a_sign_changer_on_conflicting_tasks():
    """Two linear regression tasks with optima +w and -w; theta = +w (Fig. 3b)."""
    torch.manual_seed(0)
    w = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    lin = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(w)
    wh = Wormhole(lin, "tanh")
    learner = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), lr=0.05,
                          schedule=wh.schedule(train_steps=1, c_steps=10, c_lr=0.5))
    x = torch.randn(20, 3, dtype=DT)
    c_plus = torch.tanh(learner.adapt(x, x @ w.T)["wormhole.t"])
    c_minus = torch.tanh(learner.adapt(x, -x @ w.T)["wormhole.t"])
    assert c_plus.item() > 0.9  # already right: C stays near +1
    assert c_minus.item() < -0.5  # flipped
    # after the C phase, the -w task is (nearly) solved without moving theta
    ev = learner.evaluate(TaskBatch(x[None], -x[None] @ w.T, x[None], -x[None] @ w.T), steps=0)
    assert ev["loss"][0, 0] < 0.1 * F.mse_loss(x @ w.T, -x @ w.T)


def test_phase_without_lr_uses_the_rule_and_evaluate_runs():
    base = _mlp()
    learner = MetaLearner(base, F.mse_loss, lr=0.2,
                          schedule=Schedule(1, phases=(Phase("2.*", steps=2), Phase("0", steps=1, lr=0.1))))
    batch = _batch()
    grads, stats = learner.meta_gradient_of(batch)
    assert stats["inner_loss"].shape == (3, 4)
    # the same thing written as plain steps
    params = {n: p.detach().clone().requires_grad_() for n, p in base.named_parameters()}
    total = 0
    for i in range(3):
        sx, sy, qx, qy = (f[i] for f in batch)
        p = dict(params)
        for names, lr in ((["2.weight", "2.bias"], 0.2), (["2.weight", "2.bias"], 0.2),
                          (["0.weight", "0.bias"], 0.1), (list(p), 0.2)):
            p = {k: v + 0 for k, v in p.items()}  # partial gradients: the other tensors held
            loss = F.mse_loss(torch.func.functional_call(base, p, (sx,)), sy)
            gs = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True)
            p.update({n: p[n] - lr * g for n, g in zip(names, gs)})
        total = total + F.mse_loss(torch.func.functional_call(base, p, (qx,)), qy) / 3
    ref = torch.autograd.grad(total, list(params.values()))
    for (n, _), r in zip(params.items(), ref):
        torch.testing.assert_close(grads["model"][n], r, rtol=1e-10, atol=1e-12)
    ev = learner.evaluate(batch, steps=2)
    assert ev["loss"].shape == (3, 3)


def test_avg_threshold_tasks_and_tiny_experiment_run(tmp_path):
    from metagrad.experiments import get_experiment, run
    from metagrad.tasks import AvgThreshold

    b = AvgThreshold().sample(50, generator=torch.Generator().manual_seed(0))
    assert b.support_x.shape == (50, 10, 5) and b.query_y.shape == (50, 10, 1)
    assert ((b.support_x >= 0) & (b.support_x <= 1)).all() and set(b.support_y.unique().tolist()) <= {0.0, 1.0}
    exp = get_experiment("wormhole-threshold")
    summary = run(exp, tmp_path / "r", ["quick=true", "epochs=1", "batches_per_epoch=5", "train.eval_every=5",
                                        "train.val_tasks=20", "train.eval_tasks=40", "steps=[1]"], progress=False)
    assert set(summary["variants"]) == {"vanilla-1step", "tanh-1step", "diag-1step"}
    assert summary["variants"]["tanh-1step"]["paper_ce"] == 1.56
    assert (tmp_path / "r" / "table.md").exists() and (tmp_path / "r" / "wormhole_threshold.png").exists()
    assert len(summary["eq13"]) == 12 and "Eq. 13" in (tmp_path / "r" / "table.md").read_text()


def test_eq13_c_is_the_zero_of_the_linearized_gradient_and_matches_the_gaussian_closed_form():
    import math

    from metagrad.experiments.wormhole.threshold import eq13_c

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 30, generator=g, dtype=torch.float64)
    y = (z + 0.3 * torch.randn(4, 30, generator=g, dtype=torch.float64) > 0).double()
    c = eq13_c(z, y)
    # eq. 9 linearized (eq. 10), term by term: dL/dc ~ -sum_{y=1} (1 - c z) z + sum_{y=0} c z^2. (The
    # paper prints a minus on the y=0 sum in eqs 9, 11, 12; the derivative of -log(1 - sigma(cz)) is
    # +sigma(cz) z, and only the plus sign leads to its eq. 13.)
    for i in range(4):
        lin = sum(-(1 - c[i] * zj) * zj if yj else c[i] * zj * zj for zj, yj in zip(z[i], y[i]))
        assert abs(lin.item()) < 1e-12
    # z ~ N(0, s^2), y = 1[z > 0]: c* -> E[z 1(z>0)] / E[z^2] = 1 / (s sqrt(2 pi))
    for s in (0.4, 2.0):
        zz = s * torch.randn(1, 400_000, generator=g, dtype=torch.float64)
        assert eq13_c(zz, (zz > 0).double()).item() == pytest.approx(1 / (s * math.sqrt(2 * math.pi)), rel=1e-2)


def test_exact_c_minimizes_the_true_cross_entropy():
    import math

    from scipy.optimize import minimize_scalar

    from metagrad.experiments.wormhole.threshold import exact_c

    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = (z + 0.8 * torch.randn(5, 12, generator=g, dtype=torch.float64) > 0).double()
    y[3] = (z[3] > 0).double()  # separable by sign(z): no minimizer, c -> +inf
    y[4] = (z[4] < 0).double()  # separable by -sign(z): c -> -inf
    c = exact_c(z, y)
    assert c[3] == math.inf and c[4] == -math.inf
    for i in range(3):
        loss = lambda t: F.binary_cross_entropy_with_logits(t * z[i], y[i], reduction="sum").item()  # noqa: E731
        ref = minimize_scalar(loss, bracket=(-1.0, 1.0), tol=1e-12).x
        assert c[i].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_ricker_matches_numpy_and_has_unit_l2_norm():
    import math

    import numpy as np

    from metagrad.tasks import ricker

    for a in (0.5, 1.0, 2.5):
        t = np.linspace(-6, 6, 101)
        amp = 2 / (np.sqrt(3 * a) * np.pi ** 0.25)
        ref = amp * (1 - t ** 2 / a ** 2) * np.exp(-t ** 2 / (2 * a ** 2))
        np.testing.assert_allclose(ricker(torch.tensor(t), a).numpy(), ref, rtol=1e-12, atol=1e-14)
        assert ricker(torch.tensor(0.0, dtype=torch.float64), a).item() == pytest.approx(amp)
        assert amp == pytest.approx(2 / (math.sqrt(3 * a) * math.pi ** 0.25))
        # normalization: int psi^2 dt = 1 (trapezoid on a wide fine grid)
        u = np.linspace(-30 * a, 30 * a, 200_001)
        assert (ricker(torch.tensor(u), a).numpy() ** 2).sum() * (u[1] - u[0]) == pytest.approx(1.0, rel=1e-6)


def test_wavelet_tasks_y_is_x_dot_signed_translated_wavelet():
    import numpy as np

    from metagrad.tasks import WaveletTasks

    fam = WaveletTasks(points=12, a=0.8, half_width=4.0, max_shift=1.5, shots=3, queries=4, dtype=torch.float64)
    batch, s, b, f = fam.sample_tasks(40, generator=torch.Generator().manual_seed(3))
    assert batch.support_x.shape == (40, 3, 12) and batch.query_y.shape == (40, 4, 1)
    assert set(s.tolist()) == {-1.0, 1.0} and (b.abs() <= 1.5).all()
    grid = np.linspace(-4.0, 4.0, 12)
    amp = 2 / (np.sqrt(3 * 0.8) * np.pi ** 0.25)
    for i in range(40):
        u = (grid - b[i].item()) / 0.8
        filt = s[i].item() * amp * (1 - u ** 2) * np.exp(-u ** 2 / 2)
        np.testing.assert_allclose(f[i].numpy(), filt, rtol=1e-12, atol=1e-14)
        x = np.concatenate([batch.support_x[i].numpy(), batch.query_x[i].numpy()])
        y = np.concatenate([batch.support_y[i].numpy(), batch.query_y[i].numpy()])[:, 0]
        assert ((x >= 0) & (x < 1)).all()
        np.testing.assert_allclose(y, [sum(xr[j] * filt[j] for j in range(12)) for xr in x], rtol=1e-10, atol=1e-12)


def test_tiny_wavelet_experiment_run(tmp_path):
    from metagrad.experiments import get_experiment, run

    summary = run(get_experiment("wormhole-wavelet"), tmp_path / "r",
                  ["quick=true", "epochs=4", "train.eval_every=2", "train.val_tasks=20", "train.eval_tasks=40",
                   "filter_tasks=5", "steps=[1,2]", "train.checkpoint_every=2"], progress=False)
    assert set(summary["variants"]) == {"vanilla-1step", "vanilla-2step", "tanh-1step", "tanh-2step"}
    e = summary["variants"]["tanh-2step"]
    assert e["paper"] == 6.05 and e["filter_l1"] > 0 and len(e["meta_w"]) == 20
    for f in ("summary.json", "table.md", "wormhole_wavelet_fig5.png", "wormhole_wavelet_loss.png"):
        assert (tmp_path / "r" / f).exists()


def _tiny_mnist(root, per_digit=6):
    import gzip

    import numpy as np

    rng = np.random.RandomState(0)
    lab = np.repeat(np.arange(10), per_digit)
    rng.shuffle(lab)
    imgs = rng.randint(0, 256, (lab.size, 28, 28), dtype=np.uint8)
    d = root / "mnist"
    d.mkdir(parents=True)
    n = lab.size
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + imgs.tobytes()))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
        (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + lab.astype(np.uint8).tobytes()))
    return lab


def test_mnist_t10k_halves_split(tmp_path):
    from metagrad.data import mnist_splits

    lab = _tiny_mnist(tmp_path, per_digit=7)
    source, (tr_x, tr_y), (te_x, te_y) = mnist_splits(tmp_path, "auto")
    assert source == "t10k-halves"
    assert torch.bincount(tr_y, minlength=10).tolist() == [4] * 10
    assert torch.bincount(te_y, minlength=10).tolist() == [3] * 10
    assert tr_x.shape == (40, 1, 28, 28) and te_x.shape == (30, 1, 28, 28)
    # disjoint images: the halves together are the whole file
    assert tr_x.shape[0] + te_x.shape[0] == lab.size
    with pytest.raises(FileNotFoundError):
        mnist_splits(tmp_path / "nowhere", "auto")


def test_episode_sampler_gives_both_label_orders_for_a_digit_pair():
    from metagrad.data import EpisodeSampler

    labels = torch.arange(10).repeat_interleave(3)
    images = torch.zeros(30, 1, 4, 4, dtype=torch.uint8)
    _, cls = EpisodeSampler(images, labels, 2, 1, 1).sample_indices(2000, generator=torch.Generator().manual_seed(0))
    pairs = {tuple(r) for r in cls.tolist()}
    assert (3, 7) in pairs and (7, 3) in pairs  # digit 3 is label 0 in some tasks and label 1 in others
    assert sum((b, a) in pairs for a, b in pairs) == len(pairs)  # every pair seen is seen in both orders


def test_tiny_mnist_experiment_run(tmp_path):
    from metagrad.experiments import get_experiment, run

    _tiny_mnist(tmp_path / "data")
    summary = run(get_experiment("wormhole-mnist"), tmp_path / "r",
                  [f"data_root={tmp_path / 'data'}", "quick=true", "epochs=1", "batches_per_epoch=2", "queries=2",
                   "train.meta_batch_size=2", "train.eval_every=2", "train.val_tasks=4", "train.eval_tasks=4",
                   "train.eval_batch=4", "steps=[2]"], progress=False)
    assert summary["source"] == "t10k-halves" and summary["meta_train_images"] == 30
    assert set(summary["variants"]) == {"vanilla-2step", "tanh-2step"}
    assert summary["variants"]["tanh-2step"]["paper_error"] == 0.141
    assert 0 <= summary["variants"]["tanh-2step"]["error"] <= 1
    for f in ("summary.json", "table.md", "wormhole_mnist.png"):
        assert (tmp_path / "r" / f).exists()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("form", ["tanh", "diag"])
def test_clone_with_phase_steps_matches_the_engine(first_order, form):
    """The object API runs Algorithm 1 with ``adapt(loss, phase=0)``: same meta-gradient as the engine."""
    torch.manual_seed(0)
    wh = Wormhole(_mlp(), form, learn_init=True)
    nc, n = 2, 2
    learner = MetaLearner(wh, F.mse_loss, adapt=wh.model_patterns(), lr=0.3,
                          meta_gradient="first-order" if first_order else "unrolled",
                          schedule=wh.schedule(train_steps=n, c_steps=nc, c_lr=0.7))
    batch = _batch(tasks=2)
    grads, _ = learner.meta_gradient_of(batch)
    learner.zero_grad()
    for i in range(2):
        sx, sy, qx, qy = (f[i] for f in batch)
        task = learner.clone()
        for _ in range(nc):
            task.adapt(F.mse_loss(task(sx), sy), phase=0)
        for _ in range(n):
            task.adapt(F.mse_loss(task(sx), sy))
        (F.mse_loss(task(qx), qy) / 2).backward()
    for name, p in learner.meta_parameters()["model"].items():
        torch.testing.assert_close(p.grad, grads["model"][name], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="phase must be an index"):
        learner.clone().adapt(F.mse_loss(task(sx), sy), phase=1)


def test_avg_threshold_balanced_puts_tau_at_the_support_median():
    from metagrad.tasks import AvgThreshold

    g = torch.Generator().manual_seed(1)
    uniform = AvgThreshold().sample(2000, generator=g)
    one_class = (uniform.support_y.sum((1, 2)) % 10 == 0).double().mean().item()
    assert 0.5 < one_class < 0.7  # most uniform-threshold tasks have a one-class support set
    for shots in (10, 7):
        b = AvgThreshold(shots=shots, threshold="balanced").sample(300, generator=torch.Generator().manual_seed(2))
        m = b.support_x.mean(-1)  # [T, shots]
        ms = m.sort(-1).values
        tau = (ms[:, (shots - 1) // 2] + ms[:, shots // 2]) / 2  # the support median, by hand
        # the sign: the support point with the largest mean is labelled 1 iff s = +1
        top = b.support_y[..., 0].gather(1, m.argmax(-1, keepdim=True))[:, 0]
        sign = torch.where(top == 1, 1.0, -1.0)
        for x, y in ((b.support_x, b.support_y), (b.query_x, b.query_y)):
            expected = (sign[:, None] * x.mean(-1) > sign[:, None] * tau[:, None]).to(y.dtype)
            assert torch.equal(y[..., 0], expected)
        positives = b.support_y.sum((1, 2))  # balanced: shots // 2 (or, odd, one more) positives
        assert torch.all((positives == shots // 2) | (positives == shots - shots // 2))
    with pytest.raises(ValueError, match="threshold must be one of"):
        AvgThreshold(threshold="median")


def test_c_phase_per_form_of_c_overrides_the_shared_setting():
    """``c_phase.<form> = [c_steps, c_lr]`` gives that form's variants their own C phase (the
    learner's schedule holds it); the other form keeps ``c_steps`` / ``c_lr``; bad pairs are refused."""
    from metagrad.experiments import get_experiment

    exp = get_experiment("wormhole-threshold")
    config = exp.resolve(["steps=[2]", "c_steps=3", "c_lr=0.5", "c_phase.tanh=[7,10]"])
    built = {name: make().learner for name, make in exp.variants(config).items()}
    phase = {name: (m.schedule.phases[0].steps, m.schedule.phases[0].lr) for name, m in built.items()
             if m.schedule.phases}
    assert phase == {"tanh-2step": (7, 10.0), "diag-2step": (3, 0.5)}
    assert built["vanilla-2step"].schedule.phases == () and built["tanh-2step"].schedule.train_steps == 2
    for bad in ("[7]", "[-1,1]", "[1.5,1]", "[1,-2]", '"fast"'):
        config = exp.resolve(["steps=[2]", f"c_phase.tanh={bad}"])
        with pytest.raises(ValueError, match="c_phase.tanh must be"):
            exp.variants(config)["tanh-2step"]()
