"""CosMixture / Alpine task pools (A-MAML section 5.1) and the ``amaml-regression`` experiment."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metagrad.experiments import get_experiment, merge_runs, run
from metagrad.metrics import nrmse
from metagrad.models import MLP
from metagrad.gradients import META_GRADIENTS, MetaGradient
from metagrad.tasks import Alpine, CosMixture

FAMILIES = [CosMixture, Alpine]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _numpy_cos_mixture(x, a, w, p):
    # eq. 12 written out coordinate by coordinate: -0.1 sum_i A cos(w x_i + p) - sum_i x_i^2
    out = np.zeros(x.shape[:2])
    for i in range(x.shape[2]):
        xi = x[:, :, i]
        out += -0.1 * a[:, None] * np.cos(w[:, None] * xi + p[:, None]) - xi * xi
    return out[..., None]


def _numpy_alpine(x, p):
    # eq. 13: sum_i |x_i sin(x_i + p_i) + 0.1 x_i|
    out = np.zeros(x.shape[:2])
    for i in range(x.shape[2]):
        xi = x[:, :, i]
        out += np.abs(xi * np.sin(xi + p[:, None, i]) + 0.1 * xi)
    return out[..., None]


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_per_seed_and_shapes(family):
    a, b = family(seed=3), family(seed=3)
    for points in ("fixed", "fresh"):
        f1, f2 = family(seed=3, points=points), family(seed=3, points=points)
        x1, x2 = f1.sample(7, generator=_gen(1)), f2.sample(7, generator=_gen(1))
        for t1, t2 in zip(x1, x2):
            assert torch.equal(t1, t2)
        assert not torch.equal(x1.support_y, f1.sample(7, generator=_gen(2)).support_y)
    assert not torch.equal(a.pool().support_y, family(seed=4).pool().support_y)
    assert torch.equal(a.pool().query_x, b.pool().query_x)
    batch = family(shots=50, queries=100, split="test").sample(5, generator=_gen(0))
    assert batch.support_x.shape == (5, 50, 2) and batch.support_y.shape == (5, 50, 1)
    assert batch.query_x.shape == (5, 100, 2) and batch.query_y.shape == (5, 100, 1)
    assert batch.support_x.dtype == torch.float32
    pool = family(shots=100, queries=100).pool()
    assert pool.support_x.shape == (100, 100, 2) and pool.query_y.shape == (100, 100, 1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cos_mixture_raw_values_match_formula(split):
    f = CosMixture(split=split)
    p = {k: v.numpy() for k, v in f.task_params.items()}
    assert p["amplitude"].min() >= 0.1 and p["amplitude"].max() <= 1.0
    assert p["omega"].min() >= 0.5 * math.pi and p["omega"].max() <= 2.0 * math.pi
    assert p["phase"].min() >= 3.0 and p["phase"].max() <= 6.0
    x, y = (t.numpy() for t in f.pool_raw())
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.shape == (100, 100, 2)
    np.testing.assert_allclose(y, _numpy_cos_mixture(x, p["amplitude"], p["omega"], p["phase"]), rtol=1e-12, atol=1e-12)
    # range of f on [-1, 1]^2: -0.2 A <= -0.1 A (cos + cos) and -sum x^2 >= -2
    assert y.max() <= 0.2 and y.min() >= -2.2


@pytest.mark.parametrize("split", ["train", "test"])
def test_alpine_raw_values_match_formula(split):
    f = Alpine(split=split)
    p = f.task_params["phase"].numpy()
    assert p.shape == (100, 2)
    assert np.abs(p).max() <= 5 * math.pi / 12
    x, y = (t.numpy() for t in f.pool_raw())
    assert x.min() >= -10.0 and x.max() <= 10.0
    np.testing.assert_allclose(y, _numpy_alpine(x, p), rtol=1e-12, atol=1e-12)
    assert y.min() >= 0.0 and y.max() <= 2 * 11.0  # |x sin(.) + 0.1 x| <= 1.1 |x| <= 11


@pytest.mark.parametrize("family", FAMILIES)
def test_pool_is_100_distinct_train_and_100_distinct_test_tasks(family):
    train, test = family(split="train"), family(split="test")

    def rows(f):
        return {tuple(np.round(np.atleast_1d(np.stack([v[i].numpy() for v in f.task_params.values()]).ravel()), 12))
                for i in range(f.pool_size)}

    a, b = rows(train), rows(test)
    assert len(a) == 100 and len(b) == 100 and not a & b
    # the setting does not change the functions: 100shot pools hold the same tasks as 50shot pools
    assert rows(family(shots=100, queries=100)) == a
    # sample(100) from the fixed pool gives every task exactly once; a meta-batch has distinct tasks
    pool, batch = test.pool(), test.sample(100, generator=_gen(5))
    order = [int((pool.support_x == batch.support_x[i]).all(-1).all(-1).nonzero()) for i in range(100)]
    assert sorted(order) == list(range(100))
    five = train.sample(5, generator=_gen(6)).support_x
    assert len({tuple(t.flatten()[:4].tolist()) for t in five}) == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_standardization_uses_training_pool_statistics(family):
    train = family(shots=100, queries=100)
    pool = train.pool()
    x = torch.cat([pool.support_x, pool.query_x], 1).double()
    y = torch.cat([pool.support_y, pool.query_y], 1).double()
    assert x.mean((0, 1)).abs().max() < 0.05 and (x.std((0, 1)) - 1).abs().max() < 0.05
    assert abs(y.mean()) < 0.05 and abs(y.std() - 1) < 0.05
    # the same affine map for every split and setting, and it is what pool() applies
    test = family(shots=50, queries=100, split="test")
    for k, v in train.stats.items():
        assert torch.equal(v, test.stats[k])
    xr, yr = test.pool_raw()
    s = test.stats
    std = test.pool()
    torch.testing.assert_close(std.support_x.double(), ((xr - s["x_mean"]) / s["x_std"])[:, :50], rtol=0, atol=1e-6)
    torch.testing.assert_close(std.query_y.double(), ((yr - s["y_mean"]) / s["y_std"])[:, 50:], rtol=0, atol=1e-5)
    raw = family(standardize=False).pool()
    assert torch.equal(raw.support_y, family().pool_raw()[1][:, :50].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_do_not_depend_on_the_number_of_threads(family):
    # torch's sums over 10^5 elements change in the last bits with the intra-op thread count;
    # the statistics must not, or two families of one seed could standardize differently
    threads = torch.get_num_threads()
    try:
        seen = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            seen.append(family(seed=5).stats)
    finally:
        torch.set_num_threads(threads)
    for other in seen[1:]:
        for k, v in seen[0].items():
            assert torch.equal(v, other[k]), k
    # and they are the training pool's moments (reference: float64 torch on one thread)
    f = family(seed=5)
    x = f._draw_x(f.pool_size, f.stats_points, f._streams(3))
    y = f.function(x, **{k: v[: f.pool_size] for k, v in f._all_params().items()})
    ref = {"x_mean": x.mean((0, 1)), "x_std": x.std((0, 1)), "y_mean": y.mean(), "y_std": y.std()}
    for k, v in ref.items():
        torch.testing.assert_close(seen[0][k], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_points_evaluate_a_pool_function(family):
    f = family(points="fresh", split="test", shots=10, queries=10)
    batch = f.sample(3, generator=_gen(0))
    s = f.stats
    x = batch.support_x.double() * s["x_std"] + s["x_mean"]
    y = batch.support_y.double() * s["y_std"] + s["y_mean"]
    for i in range(3):
        # which pool function made task i: evaluate every test function at its points
        candidates = f.function(x[i : i + 1].expand(f.pool_size, -1, -1), **f.task_params)
        err = (candidates - y[i]).abs().amax((1, 2))
        assert err.min() < 1e-4
    assert not torch.equal(batch.support_x, f.pool().support_x[:3])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="split"):
        CosMixture(split="val")
    with pytest.raises(ValueError, match="points"):
        Alpine(points="grid")
    with pytest.raises(ValueError, match="shots"):
        CosMixture(shots=0)


def test_nrmse_matches_numpy():
    g = _gen(0)
    pred, target = torch.randn(30, 1, generator=g), torch.randn(30, 1, generator=g)
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    expected = math.sqrt(((p - t) ** 2).mean()) / t.std()  # numpy std divides by n
    assert nrmse(pred, target).item() == pytest.approx(expected, rel=1e-5)


TINY = ["quick=true", "train.iterations=3", "train.eval_every=3", "train.log_every=1", "long_steps=[6]",
        "maml_steps=[2]", "val_steps=3", "eval_steps=[0,1,4]", "eval_chunk=30",
        'methods=["maml-1","fomaml","a-maml","imaml"]', "pool_size=40"]


def test_quick_run_writes_report_and_step0_nrmse_is_direct(tmp_path):
    s = run(get_experiment("amaml-regression"), tmp_path, TINY, progress=False)
    assert (tmp_path / "amaml_regression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FOMAML" in (tmp_path / "amaml_regression.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(s))
    rows = s["panels"]["cosmixture-50shot"]
    assert set(rows) == {"maml-1", "fomaml", "a-maml", "imaml"} and rows["fomaml"]["train_steps"] == 6
    # the registry's A-MAML and iMAML plug in with their options: T = h * long steps
    assert rows["a-maml"]["meta_gradient"] == "adjoint" and rows["a-maml"]["options"] == {"T": 0.06, "h": 0.01}
    assert rows["imaml"]["options"] == {"lam": 1.0, "cg_steps": 5}
    for method, r in rows.items():
        assert len(r["nrmse_mean"]) == 3 and r["final_nrmse_mean"] == r["nrmse_mean"][-1] and r["test_tasks"] == 40
        # step 0: the learned initialization itself, evaluated directly with numpy
        state = torch.load(tmp_path / f"cosmixture-50shot-{method}" / "checkpoint.pt", weights_only=False)["learner"]
        model = MLP(2, [32, 32], 1, activation="tanh")
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        test = CosMixture(shots=50, queries=100, split="test", pool_size=40).pool()
        with torch.no_grad():
            pred = model(test.query_x).numpy()[..., 0]
        y = test.query_y.numpy()[..., 0]
        direct = np.sqrt(((pred - y) ** 2).mean(1)) / y.std(1)
        assert r["nrmse_mean"][0] == pytest.approx(direct.mean(), rel=1e-5)
        assert r["nrmse_std"][0] == pytest.approx(direct.std(ddof=1), rel=1e-4)


def test_variant_runs_report_their_rows_and_merge_into_the_full_report(tmp_path):
    exp = get_experiment("amaml-regression")
    over = TINY[:-2] + ['methods=["maml-1","fomaml"]', "pool_size=40"]
    full = run(exp, tmp_path / "full", over, progress=False)
    for m in ("maml-1", "fomaml"):
        part = run(exp, tmp_path / m, over, progress=False, variants=[f"cosmixture-50shot-{m}"])
        assert set(part["panels"]["cosmixture-50shot"]) == {m}  # the trained method's row only
        assert part["panels"]["cosmixture-50shot"][m]["nrmse_mean"] == pytest.approx(
            full["panels"]["cosmixture-50shot"][m]["nrmse_mean"], rel=1e-6)
        table = (tmp_path / m / "amaml_regression.md").read_text()
        assert ("FOMAML" in table) == (m == "fomaml") and ("MAML-1" in table) == (m == "maml-1")
        assert (tmp_path / m / "amaml_regression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = merge_runs(exp, tmp_path / "merged", [tmp_path / "fomaml", tmp_path / "maml-1"])
    for m in ("maml-1", "fomaml"):
        assert merged["panels"]["cosmixture-50shot"][m]["nrmse_mean"] == pytest.approx(
            full["panels"]["cosmixture-50shot"][m]["nrmse_mean"], rel=1e-6)


def test_a_one_panel_run_merges_into_a_run_of_every_panel(tmp_path):
    # the 100-shot panel trained alone (its own shots/steps lists) merges into a two-panel run
    exp = get_experiment("amaml-regression")
    base = TINY[:-2] + ['methods=["maml-1","fomaml"]', "pool_size=40", 'functions=["cosmixture","alpine"]']
    two = base + ["shots=[5,8]", "long_steps=[6,7]", "maml_steps=[2,3]"]
    full = run(exp, tmp_path / "full", two, progress=False)
    run(exp, tmp_path / "home", two, progress=False, variants=["cosmixture-5shot-maml-1", "alpine-8shot-fomaml"])
    one = base + ["shots=[8]", "long_steps=[7]", "maml_steps=[3]", "train.checkpoint_every=2"]
    run(exp, tmp_path / "one", one, progress=False, variants=["cosmixture-8shot-fomaml", "alpine-8shot-maml-1"])
    with pytest.raises(ValueError, match="'train' differs"):
        merge_runs(exp, tmp_path / "merged", [tmp_path / "home", tmp_path / "one"])
    assert not (tmp_path / "merged").exists()
    merged = merge_runs(exp, tmp_path / "merged", [tmp_path / "home", tmp_path / "one"],
                        ignore=["train.checkpoint_every"])
    names = ["cosmixture-5shot-maml-1", "cosmixture-8shot-fomaml", "alpine-8shot-maml-1", "alpine-8shot-fomaml"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (tmp_path / "full" / "config.json").read_text()) | {"only": names}  # the home run's two-panel config
    for name in names:
        panel, m = name.rsplit("shot-", 1)
        r = full["panels"][panel + "shot"][m]
        assert merged["panels"][panel + "shot"][m]["nrmse_mean"] == pytest.approx(r["nrmse_mean"], rel=1e-6)
    # a variant of other inner steps is not the same variant
    other = base + ["shots=[8]", "long_steps=[9]", "maml_steps=[3]"]
    run(exp, tmp_path / "other", other, progress=False, variants=["cosmixture-8shot-maml-1"])
    with pytest.raises(ValueError, match="'long_steps' differs"):
        merge_runs(exp, tmp_path / "m2", [tmp_path / "home", tmp_path / "other"])


class _NotYet(MetaGradient):
    def __init__(self, **options):
        self.options = options

    def batch_gradient(self, learner, meta_params, batch, vectorize):
        raise NotImplementedError("work in progress")


def test_unavailable_methods_are_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(META_GRADIENTS._items, "not-yet", _NotYet)
    over = TINY[:-2] + ['methods=["fomaml","imaml"]', "method_defs.imaml.meta_gradient=not-yet"]
    with pytest.raises(ValueError, match="'imaml'.*not available yet.*work in progress"):
        run(get_experiment("amaml-regression"), tmp_path / "a", over, progress=False)
    over[-1] = "method_defs.imaml.meta_gradient=nope"
    with pytest.raises(ValueError, match="'nope', which is not registered"):
        run(get_experiment("amaml-regression"), tmp_path / "b", over, progress=False)
    assert not (tmp_path / "a" / "cosmixture-50shot-fomaml").exists()
