"""CNN / MNISTNet: shapes, layout and torch.func (vmap + functional_call) equivalence."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metagrad.models import CNN, MNISTNet


def _ref_size(size, k, downsample):
    for _ in range(k):
        if downsample == "stride":
            size = (size + 2 - 3) // 2 + 1  # conv output formula, kernel 3, padding 1, stride 2
        elif size > 1:
            size = size // 2
    return size


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
@pytest.mark.parametrize("image_size,in_ch,ch", [(28, 1, 64), (84, 3, 32)])
def test_cnn_shapes(k, downsample, image_size, in_ch, ch):
    m = CNN(k, 5, channels=ch, in_channels=in_ch, image_size=image_size, downsample=downsample)
    x = torch.randn(3, in_ch, image_size, image_size)
    feats = m.features(x)
    s = _ref_size(image_size, k, downsample)
    assert feats.shape == (3, ch, s, s)
    assert m.feature_dim == ch * s * s
    assert isinstance(m.head, nn.Linear) and m.head.in_features == ch * s * s and m.head.out_features == 5
    assert m(x).shape == (3, 5)
    assert list(m.buffers()) == []  # no running stats: pure function of params
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert len(convs) == k and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)


def test_cnn_known_sizes():
    assert CNN(4, 5).feature_dim == 64  # MAML Omniglot: 28 -> 14 -> 7 -> 3 -> 1
    assert CNN(4, 5, channels=32, in_channels=3, image_size=84).feature_dim == 800  # 84 -> 5


def test_cnn_forward_matches_manual():
    torch.manual_seed(0)
    m = CNN(2, 4, channels=8, image_size=8)
    x = torch.randn(5, 1, 8, 8)
    h = x
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    bns = [l for l in m.features if isinstance(l, nn.BatchNorm2d)]
    for conv, bn in zip(convs, bns):
        h = torch.nn.functional.conv2d(h, conv.weight, conv.bias, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        h = torch.nn.functional.max_pool2d(h.relu(), 2)
    ref = h.flatten(1) @ m.head.weight.T + m.head.bias
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    m.eval()  # without running stats, eval mode also uses batch statistics
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def _task_params(model, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.stack([p.detach() + 0.05 * torch.randn(p.shape, generator=g) for _ in range(tasks)])
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: CNN(4, 5, channels=16), (1, 28, 28)),
        (lambda: CNN(3, 5, channels=8, downsample="stride", in_channels=3, image_size=20), (3, 20, 20)),
        (lambda: MNISTNet(5, channels=(6, 12), hidden=32), (1, 28, 28)),
    ],
)
def test_vmap_functional_call_matches_loop(make, shape):
    torch.manual_seed(0)
    model = make()
    tasks = 4
    params = _task_params(model, tasks)
    x = torch.randn(tasks, 10, *shape)
    y = torch.randint(0, 5, (tasks, 10))

    def logits(p, xb):
        return functional_call(model, p, (xb,))

    batched = vmap(logits)(params, x)
    looped = torch.stack([logits({n: v[t] for n, v in params.items()}, x[t]) for t in range(tasks)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)

    def loss(p, xb, yb):
        return torch.nn.functional.cross_entropy(logits(p, xb), yb)

    g_batched = vmap(grad(loss))(params, x, y)
    for t in range(tasks):
        pt = {n: v[t].clone().requires_grad_(True) for n, v in params.items()}
        gt = torch.autograd.grad(loss(pt, x[t], y[t]), list(pt.values()))
        for (n, _), g in zip(pt.items(), gt):
            torch.testing.assert_close(g_batched[n][t], g, atol=1e-5, rtol=1e-4)


def test_mnistnet_layout():
    m = MNISTNet(10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)]
    assert m.feature_dim == 50 * 4 * 4 and m.fc.in_features == 800
    assert isinstance(m.head, nn.Linear) and m.head.in_features == 500 and m.head.out_features == 10


def test_invalid_arguments():
    with pytest.raises(ValueError, match="downsample"):
        CNN(4, 5, downsample="avgpool")
    with pytest.raises(ValueError, match="k must be >= 1"):
        CNN(0, 5)
    with pytest.raises(TypeError, match="ways"):
        CNN(4, 5.0)
    with pytest.raises(ValueError, match="image_size=12"):
        MNISTNet(10, image_size=12)


def test_maml_init_is_xavier_uniform_with_zero_biases_and_a_standard_normal_head():
    import math

    torch.manual_seed(0)
    net = CNN(4, 5, channels=64, init="maml")
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    for m in convs:
        fan_in, fan_out = m.in_channels * 9, m.out_channels * 9
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.1)  # U(-b, b) has variance b^2/3
        assert (m.bias == 0).all()
    assert net.head.weight.std().item() == pytest.approx(1.0, rel=0.2) and (net.head.bias == 0).all()
    x = CNN(4, 5, channels=64, init="xavier")
    bound = math.sqrt(6 / (64 + 5))
    assert x.head.weight.abs().max() <= bound and x.head.weight.abs().max() > 0.9 * bound
    assert (x.head.bias == 0).all() and all((m.bias == 0).all() for m in x.features if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="init must be"):
        CNN(4, 5, init="he")


def test_center_norm_is_tensorflow_batchnorm_shift_only():
    """norm='center' (Finn et al.'s tf.contrib batch_norm): per-channel batch statistics, eps 1e-3,
    a learned shift and no scale; checked against the formula written out by hand."""
    torch.manual_seed(0)
    net = CNN(2, 5, channels=8, norm="center").double()
    names = dict(net.named_parameters())
    assert not any(n.endswith("1.weight") for n in names)  # BatchNorm layers are features.1, features.5
    assert "features.1.bias" in names and "features.5.bias" in names
    with torch.no_grad():
        for m in net.features:
            if type(m).__name__ == "_ShiftBatchNorm2d":
                m.bias.uniform_(-0.5, 0.5)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)

    def reference(x):
        for m in net.features:
            if type(m).__name__ == "_ShiftBatchNorm2d":
                mean = x.mean(dim=(0, 2, 3), keepdim=True)
                var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
                x = (x - mean) / torch.sqrt(var + 1e-3) + m.bias.view(1, -1, 1, 1)
            else:
                x = m(x)
        return net.head(x.flatten(1))

    torch.testing.assert_close(net(x), reference(x), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in CNN(2, 5, channels=8).parameters()) - 16
    with pytest.raises(ValueError, match="norm must be"):
        CNN(2, 5, norm="layer")


def test_center_norm_has_second_derivatives():
    """MAML differentiates through the inner gradient: gradgradcheck the shift-only BatchNorm."""
    torch.manual_seed(0)
    bn = CNN(1, 2, channels=3, image_size=4, norm="center").features[1].double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, b):
        return torch.func.functional_call(bn, {"bias": b}, (x,)).pow(2).sum(dim=(0, 2, 3))

    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))


def test_mean_pool_stride_cnn_matches_manual_learn2learn_omniglot_network():
    # learn2learn's OmniglotCNN (Finn et al.'s Omniglot net): stride-2 convs, no max-pooling, the head on
    # the per-channel mean of the last feature map; computed here with the functional ops
    torch.manual_seed(0)
    m = CNN(2, 5, channels=6, image_size=28, downsample="stride", pool="mean", init="l2l")
    assert m.feature_dim == 6 and m.head.in_features == 6
    x = torch.randn(7, 1, 28, 28)
    h = x
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    bns = [l for l in m.features if isinstance(l, nn.BatchNorm2d)]
    assert not any(isinstance(l, nn.MaxPool2d) for l in m.features)
    for conv, bn in zip(convs, bns):
        h = torch.nn.functional.conv2d(h, conv.weight, conv.bias, stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = ((h - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]).relu()
    assert h.shape[2:] == (7, 7)
    ref = h.sum(dim=(2, 3)) / 49 @ m.head.weight.T + m.head.bias
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    # the l2l init: Xavier convs with zero biases, BatchNorm scales U(0, 1), standard-normal head, zero head bias
    big = CNN(2, 5, channels=256, downsample="stride", pool="mean", init="l2l")
    scales = torch.cat([l.weight.detach() for l in big.features if isinstance(l, nn.BatchNorm2d)])
    assert scales.min() >= 0 and scales.max() < 1 and scales.mean().item() == pytest.approx(0.5, abs=0.05)
    assert all((l.bias == 0).all() for l in big.features if isinstance(l, (nn.Conv2d, nn.BatchNorm2d)))
    assert big.head.weight.std().item() == pytest.approx(1.0, rel=0.2) and (big.head.bias == 0).all()
    with pytest.raises(ValueError, match="pool must be"):
        CNN(2, 5, pool="max")


def test_default_cnn_is_unchanged_by_the_pool_option():
    torch.manual_seed(3)
    a = CNN(2, 5, channels=8)
    torch.manual_seed(3)
    b = CNN(2, 5, channels=8, downsample="maxpool", pool="flatten", init="torch")
    assert a.feature_dim == 8 * 7 * 7
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(a(x), a.head(a.features(x).flatten(1)))
