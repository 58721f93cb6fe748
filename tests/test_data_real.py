"""Integration tests on the real dataset slices under ``$METAGRAD_DATA`` (skipped when absent).

Run with e.g. ``METAGRAD_DATA=/work/shared/data pytest tests/test_data_real.py``.  The decoded
cache goes to a temporary folder so the (possibly read-only) data folder is never written.
"""

import os
import zipfile
from pathlib import Path

import pytest
import torch

from metagrad.data import MNIST, EpisodeSampler, Omniglot, md5sum

MD5 = {
    "omniglot/images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "omniglot/images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "jester/jester-data-1.zip": "12889ac500b43c388f9f8db696574e85",
}


def _root_with(*rel):
    env = os.environ.get("METAGRAD_DATA")
    if not env:
        pytest.skip("METAGRAD_DATA not set")
    root = Path(env)
    missing = [r for r in rel if not (root / r).exists()]
    if missing:
        pytest.skip(f"real data files missing under {root}: {missing}")
    return root


@pytest.mark.parametrize("rel", sorted(MD5))
def test_real_md5(rel):
    root = _root_with(rel)
    assert md5sum(root / rel) == MD5[rel]


@pytest.mark.parametrize("split,chars", [("small1", 136), ("small2", 156)])
def test_real_omniglot_small(tmp_path, split, chars):
    root = _root_with(f"omniglot/images_background_{split}.zip")
    ds = Omniglot(None, split, cache_dir=tmp_path)  # root=None -> $METAGRAD_DATA
    assert ds.root == root
    assert ds.num_classes == chars and len(ds) == chars * 20
    assert torch.equal(ds.labels.bincount(), torch.full((chars,), 20))
    assert ds.images.shape == (chars * 20, 1, 28, 28)
    # reference class list straight from the zip member names
    with zipfile.ZipFile(root / f"omniglot/images_background_{split}.zip") as zf:
        ref = sorted({"/".join(n.split("/")[1:3]) for n in zf.namelist() if n.endswith(".png")})
    assert ds.class_names == ref
    # white background: most pixels are bright
    assert ds.images.float().mean() > 200
    sampler = EpisodeSampler(ds.images, ds.labels, 5, 1, 15, seed=0, invert=True)
    ep = sampler.sample(4)
    assert ep.support_x.shape == (4, 5, 1, 28, 28) and ep.query_x.shape == (4, 75, 1, 28, 28)
    assert ep.query_x.mean() < 0.25  # inverted: mostly black


def test_real_mnist_t10k(tmp_path):
    _root_with("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz")
    ds = MNIST(None, "test", cache_dir=tmp_path)
    assert ds.images.shape == (10000, 1, 28, 28) and len(ds) == 10000
    assert ds.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert ds.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    again = MNIST(None, "test", cache_dir=tmp_path)  # from the decoded cache
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)


def test_omniglot_maml_runs_on_real_subsets(tmp_path):
    """A few meta-iterations of ``omniglot-maml`` on small1 -> small2 beat chance (20%)."""
    _root_with("omniglot/images_background_small1.zip", "omniglot/images_background_small2.zip")
    from metagrad.experiments import get_experiment, run

    sets = ["quick=true", f"cache_dir={tmp_path / 'cache'}", "variants.5way-1shot.iterations=25",
            "variants.5way-5shot.iterations=15", "train.eval_tasks=100", "train.eval_every=25"]
    s = run(get_experiment("omniglot-maml"), tmp_path / "run", sets, progress=False)
    assert s["splits"] == {"train": "small1", "test": "small2"}
    for name in ("5way-1shot", "5way-5shot"):
        acc, ci = s[name]["accuracy"], s[name]["accuracy_ci95"]
        assert s[name]["accuracy_by_step"][0] == pytest.approx(0.2, abs=0.06)  # untrained head: chance
        assert acc - ci > 0.3
    assert (tmp_path / "run" / "omniglot_maml.png").exists()


def test_real_jester_as_the_paper_describes_it(tmp_path):
    """Jester-1 (section 5.3): 24,983 users, 100 jokes, every user rated at least 36, ratings
    in [-10, 10]; with the paper's filter (top 100 items, users with >= 20 of them) every user is
    kept."""
    from metagrad.data import Jester
    from metagrad.tasks import user_matrix

    root = _root_with("jester/jester-data-1.zip")
    data = Jester(root, cache_dir=tmp_path)
    assert (data.num_users, data.num_items) == (24_983, 100)
    counts = torch.bincount(data.index[:, 0], minlength=data.num_users)
    assert int(counts.min()) == 36 and int(counts.sum()) == len(data)
    assert data.ratings.abs().max() <= 10
    matrix, users, items = user_matrix(data.index, data.ratings, data.num_users, data.num_items)
    assert matrix.shape == (24_983, 100) and len(users) == 24_983
    assert torch.equal((~matrix.isnan()).sum(1), counts[users])
