"""EpisodeSampler tests: composition, disjointness, balance, determinism, subsets."""

import pytest
import torch

from metagrad.data import EpisodeSampler


def _data(num_classes=12, per_class=10, shape=(1, 6, 6), seed=0, uneven=False):
    g = torch.Generator().manual_seed(seed)
    counts = [per_class + (c % 3 if uneven else 0) for c in range(num_classes)]
    labels = torch.cat([torch.full((n,), 3 * c + 1) for c, n in enumerate(counts)])  # sparse ids
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    images = torch.randint(0, 256, (labels.numel(), *shape), dtype=torch.uint8, generator=g)
    return images, labels


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("n,k,q", [(5, 1, 15), (3, 2, 0), (12, 3, 4)])
def test_episode_structure(n, k, q, uneven):
    images, labels = _data(per_class=20 if k + q > 10 else 10, uneven=uneven)
    s = EpisodeSampler(images, labels, n, k, q, seed=1)
    b = 6
    items, cls = s.sample_indices(b)
    s.manual_seed(1)
    ep = s.sample(b)
    assert ep.support_x.shape == (b, n * k, 1, 6, 6) and ep.query_x.shape == (b, n * q, 1, 6, 6)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert ep.support_y.tolist() == [[i for i in range(n) for _ in range(k)]] * b
    assert ep.query_y.tolist() == [[i for i in range(n) for _ in range(q)]] * b
    for e in range(b):
        flat = items[e].reshape(-1).tolist()
        assert len(flat) == n * (k + q) == len(set(flat))  # all distinct -> support/query disjoint
        assert len(set(cls[e].tolist())) == n  # distinct classes
        for j in range(n):
            # every item of slot j has the original label cls[e, j]: balanced K + Q per class
            assert all(int(labels[i]) == int(cls[e, j]) for i in items[e, j].tolist())
        # pixels: reference gathered with a Python loop
        sup_ref = torch.stack([images[i] for j in range(n) for i in items[e, j, :k].tolist()]).float() / 255
        torch.testing.assert_close(ep.support_x[e], sup_ref)
        if q:
            qry_ref = torch.stack([images[i] for j in range(n) for i in items[e, j, k:].tolist()]).float() / 255
            torch.testing.assert_close(ep.query_x[e], qry_ref)


def test_deterministic_per_seed():
    images, labels = _data()
    a = EpisodeSampler(images, labels, 5, 2, 3, seed=7).sample(4)
    b = EpisodeSampler(images, labels, 5, 2, 3, seed=7).sample(4)
    c = EpisodeSampler(images, labels, 5, 2, 3, seed=8).sample(4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, c.support_x)


def test_class_subset_and_invert():
    images, labels = _data()
    subset = [1, 4, 7, 10]
    s = EpisodeSampler(images, labels, 3, 1, 2, seed=0, classes=subset, invert=True)
    assert s.num_classes == 4
    for _ in range(20):
        items, cls = s.sample_indices(3)
        assert set(cls.reshape(-1).tolist()) <= set(subset)
        assert set(labels[items.reshape(-1)].tolist()) <= set(subset)
    s.manual_seed(0)
    items, _ = s.sample_indices(1)
    s.manual_seed(0)
    ep = s.sample(1)
    ref = 1 - images[items[0, :, :1].reshape(-1)].float() / 255
    torch.testing.assert_close(ep.support_x[0], ref)


def test_classes_drawn_roughly_uniformly():
    images, labels = _data(num_classes=10)
    s = EpisodeSampler(images, labels, 2, 1, 1, seed=3)
    _, cls = s.sample_indices(5000)
    counts = torch.bincount(cls.reshape(-1), minlength=31)[1::3].float()
    # each class is picked with prob 2/10 per episode: 1000 expected, sd ~ 28
    assert counts.sum() == 10000 and (counts - 1000).abs().max() < 150
    items, _ = s.sample_indices(5000)
    # within a class, every item is used
    assert torch.unique(items).numel() == labels.numel()


def test_invalid_arguments():
    images, labels = _data(num_classes=4, per_class=5)
    with pytest.raises(ValueError, match="ways=5"):
        EpisodeSampler(images, labels, 5, 1, 1)
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 6"):
        EpisodeSampler(images, labels, 2, 1, 5)
    with pytest.raises(ValueError, match=r"classes \[99\]"):
        EpisodeSampler(images, labels, 2, 1, 1, classes=[1, 99])
    with pytest.raises(TypeError, match="shots"):
        EpisodeSampler(images, labels, 2, 1.5, 1)
    with pytest.raises(ValueError, match="queries"):
        EpisodeSampler(images, labels, 2, 1, -1)
    with pytest.raises(ValueError, match="5 labels"):
        EpisodeSampler(images[:3], labels[:5], 2, 1, 1)
    s = EpisodeSampler(images, labels, 2, 1, 1)
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device():
    images, labels = _data()
    s = EpisodeSampler(images, labels, 5, 1, 3, device="cuda")
    ep = s.sample(2)
    assert ep.support_x.is_cuda and ep.query_y.is_cuda
    items, cls = s.sample_indices(2)
    assert items.is_cuda
