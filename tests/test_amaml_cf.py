"""Users as tasks (tasks/ratings.py) and the amaml-cf experiment, on hand-checked fixtures."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from metagrad.experiments import get_experiment, run
from metagrad.experiments.amaml_cf import paired_tests
from metagrad.experiments.base import trained_variant
from metagrad.metrics import nrmse
from metagrad.tasks.ratings import UserTasks, split_users, user_matrix

NAN = math.nan


def _index(rows):
    """(index [N, 2], ratings [N]) of (user, item, rating) rows."""
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, :2].long(), t[:, 2].float()


def test_user_matrix_counts_by_hand():
    # item counts: item 0: 4, item 1: 2, item 2: 4, item 3: 1, item 4: 2
    rows = [(0, 0, 1), (0, 1, 2), (0, 2, 3),
            (1, 0, 4), (1, 2, 5), (1, 4, 1),
            (2, 0, 2), (2, 3, 3),
            (3, 2, 4), (3, 4, 5), (3, 1, 1),
            (4, 0, 5), (4, 2, 2)]
    index, ratings = _index(rows)
    matrix, users, items = user_matrix(index, ratings, 5, 5, top_items=3, min_ratings=2)
    # top 3 by count, ties by smaller index: 0 (4), 2 (4), then 1 and 4 tie at 2 -> 1
    assert items.tolist() == [0, 2, 1]
    # ratings among items {0, 2, 1}: user 0: 3, user 1: 2, user 2: 1, user 3: 2, user 4: 2
    assert users.tolist() == [0, 1, 3, 4]
    expected = torch.tensor([[1, 3, 2], [4, 5, NAN], [NAN, 4, 1], [5, 2, NAN]])
    torch.testing.assert_close(matrix, expected, equal_nan=True)
    full, users_all, items_all = user_matrix(index, ratings, 5, 5, top_items=None, min_ratings=3)
    assert users_all.tolist() == [0, 1, 3] and items_all.tolist() == [0, 2, 1, 4, 3]
    with pytest.raises(ValueError, match="top_items"):
        user_matrix(index, ratings, 5, 5, top_items=0)


def _matrix(users=30, items=12, seed=0):
    g = np.random.default_rng(seed)
    m = g.integers(1, 6, size=(users, items)).astype(np.float32)
    counts = g.integers(3, items + 1, size=users)
    for u, n in enumerate(counts):
        m[u, g.permutation(items)[n:]] = np.nan
    return torch.from_numpy(m), torch.from_numpy(counts)


def test_split_users_holds_out_eligible_users_with_spread():
    m, counts = _matrix()
    m[0, ~m[0].isnan()] = 3.0  # one value only: never a test user
    train, test = split_users(m, 5, min_ratings=8, seed=1)
    assert len(test) == 5 and sorted(train.tolist() + test.tolist()) == list(range(30))
    assert (counts[test] >= 8).all() and 0 not in test.tolist()
    assert torch.equal(split_users(m, 5, min_ratings=8, seed=1)[1], test)
    with pytest.raises(ValueError, match="cannot hold out test_tasks=30"):
        split_users(m, 30, min_ratings=8, seed=1)


def test_user_tasks_sample_draws_each_users_own_ratings():
    m, counts = _matrix()
    fam = UserTasks(m, shots=3, queries=4, mean=2.0, std=0.5)
    assert set(fam.eligible.tolist()) == set(torch.nonzero(counts >= 7).reshape(-1).tolist())
    batch = fam.sample(40, generator=torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (40, 3, 12) and batch.query_y.shape == (40, 4, 1)
    for t in range(40):
        x = torch.cat([batch.support_x[t], batch.query_x[t]])
        y = torch.cat([batch.support_y[t], batch.query_y[t]])[:, 0] * 0.5 + 2.0
        items = x.argmax(1)
        assert torch.equal(x.sum(1), torch.ones(7)) and len(set(items.tolist())) == 7  # one-hot, distinct
        # some eligible user rated exactly these items with exactly these values
        assert any(torch.equal(m[u, items], y) for u in fam.eligible.tolist())


def test_evaluation_tasks_support_is_shots_and_the_rest_is_evaluated():
    m, counts = _matrix()
    fam = UserTasks(m, shots=4, queries=4)
    batches, users = fam.evaluation_tasks(seed=3)
    assert sorted(users.tolist()) == torch.nonzero(counts > 4).reshape(-1).tolist()
    j = 0
    for b in batches:
        for t in range(b.num_tasks):
            u = int(users[j])
            j += 1
            x = torch.cat([b.support_x[t], b.query_x[t]])
            assert b.support_x.shape[1] == 4 and b.query_x.shape[1] == counts[u] - 4
            items = x.argmax(1)
            assert sorted(items.tolist()) == torch.nonzero(~m[u].isnan()).reshape(-1).tolist()
            assert torch.equal(torch.cat([b.support_y[t], b.query_y[t]])[:, 0], m[u, items])
    assert j == len(users)


def test_nrmse_by_hand():
    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 5.0])
    rmse = math.sqrt((1 + 0 + 1) / 3)
    mean = 3.0
    std = math.sqrt(((2 - mean) ** 2 * 2 + (5 - mean) ** 2) / 3)
    assert nrmse(pred, target).item() == pytest.approx(rmse / std)


def test_paired_tests_against_scipy_free_hand_computation():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    b = a + torch.tensor([0.05, 0.02, 0.04, 0.01, 0.03])
    out = paired_tests(a, b)
    d = (b - a).double()
    t = d.mean() / (d.std() / math.sqrt(5))
    assert out["mean_diff"] == pytest.approx(0.03) and out["n"] == 5
    from scipy import stats
    assert out["p_t"] == pytest.approx(2 * stats.t.sf(float(t), 4))
    assert out["p_wilcoxon"] == pytest.approx(2 / 32)  # all five differences positive: exact p = 2 / 2^5


def _write_jester_csv(path, users=160, seed=0):
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(users):
        r = np.round(g.uniform(-10, 10, 100), 2)
        r[g.permutation(100)[g.integers(36, 101):]] = 99
        rows.append(",".join([str(int((r != 99).sum()))] + [f"{v:g}" for v in r]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def test_amaml_cf_tiny_run_end_to_end(tmp_path):
    _write_jester_csv(tmp_path / "data" / "jester" / "jester-data-1.csv")
    overrides = [f"data_root={json.dumps(str(tmp_path / 'data'))}", "quick=true", "test_tasks=10",
                 "long_steps=[4]", "maml_steps=[2]", "eval_steps=[0,1,4]", "hidden=[8]",
                 "methods=[\"a-maml\",\"maml\",\"fomaml\"]", "train.iterations=3", "train.eval_every=3",
                 "train.checkpoint_every=3", "train.val_tasks=4", "train.eval_tasks=4"]
    summary = run(get_experiment("amaml-cf"), tmp_path / "run", overrides, progress=False)
    panel = summary["panels"]["jester-15shot-4steps"]
    rows = panel["methods"]
    assert set(rows) == {"a-maml", "maml", "fomaml"}
    assert rows["maml"]["test_steps"] == 2 and rows["a-maml"]["test_steps"] == 4
    assert rows["a-maml"]["paper"] is None  # no paper cell for 4 steps
    for m, r in rows.items():
        assert r["test_tasks"] == 10 and len(r["per_task_nrmse"]) == 10
        assert r["nrmse_mean"] == pytest.approx(float(np.mean(r["per_task_nrmse"])))
    assert rows["maml"]["vs_a_maml"]["n"] == 10
    table = (tmp_path / "run" / "table.md").read_text()
    assert "Jester-1 15shot-20val" in table and "A-MAML" in table
    assert (tmp_path / "run" / "amaml_cf.png").stat().st_size > 0

    # the report's per-user nRMSE against plain torch.optim.SGD from the saved initialization
    exp = get_experiment("amaml-cf")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    variant, _ = trained_variant(exp, config, tmp_path / "run", "jester-15shot-4steps-maml")
    batches, _ = variant.eval_family.evaluation_tasks(config["split_seed"])
    b = batches[0]
    model = copy.deepcopy(variant.learner.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(b.support_x[0]), b.support_y[0]).backward()
        opt.step()
    with torch.no_grad():
        expected = nrmse(model(b.query_x[0]), b.query_y[0]).item()
    assert rows["maml"]["per_task_nrmse"][0] == pytest.approx(expected, rel=1e-5)


def test_amaml_cf_refuses_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'netflix'"):
        run(get_experiment("amaml-cf"), tmp_path / "run", ["dataset=\"netflix\""], progress=False)
    assert not (tmp_path / "run").exists()


def test_reference_predictors_by_hand():
    from metagrad.experiments.amaml_cf import AmamlCF

    train = UserTasks(torch.tensor([[1.0, 3.0, 5.0, NAN], [3.0, 5.0, NAN, 1.0]]), shots=1, queries=1)
    test = UserTasks(torch.tensor([[4.0, 2.0, 5.0, 1.0]]), shots=2, queries=1)
    batches, _ = test.evaluation_tasks(seed=0)
    (b,) = batches
    s_items, q_items = b.support_x[0].argmax(1), b.query_x[0].argmax(1)
    item_means = torch.tensor([2.0, 4.0, 5.0, 1.0])
    row = test.matrix[0]
    user = row[s_items].mean()
    expected = {"support-mean": nrmse(user.expand(2), row[q_items]),
                "item-means": nrmse(item_means[q_items], row[q_items]),
                "biases": nrmse(user + item_means[q_items] - item_means[s_items].mean(), row[q_items])}
    out = AmamlCF.reference_errors(train, test, seed=0)
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-6), name
