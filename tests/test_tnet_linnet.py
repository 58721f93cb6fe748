"""LinNet collapse and T-Nets absorb: exact function equality, parameter counts, and T-Net MAML
meta-gradients against hand-written autograd references (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MetaLearner, TaskBatch
from metagrad.learners import PAPER_VISION_WIDTHS, LinNet, TNet, collapse_linear_chain
from metagrad.metrics import half_mse
from metagrad.models import MLP, linear_chain

DT = torch.float64


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _perturb(module: nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------- LinNet
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (DT, 1e-12)])
def test_linnet_collapse_same_function(dtype, atol):
    torch.manual_seed(0)
    net = LinNet(MLP(6, [16], 32), 32, PAPER_VISION_WIDTHS, out_features=5).to(dtype)
    dims = [m.weight.shape for m in net.linear]
    assert dims == [(256, 32), (128, 256), (64, 128), (64, 64), (5, 64)]
    collapsed = net.collapse()
    x = torch.randn(9, 6, dtype=dtype)
    # reference: the appended layers applied one after another, by hand
    h = net.base(x)
    for layer in net.linear:
        h = h @ layer.weight.T
    torch.testing.assert_close(collapsed(x), h, rtol=0, atol=atol)
    torch.testing.assert_close(collapsed(x), net(x), rtol=0, atol=atol)
    assert collapsed[1].weight.shape == (5, 32) and collapsed[1].bias is None
    assert _count(collapsed) == _count(net.base) + 5 * 32
    # an independent copy: changing the LinNet does not change the collapsed model
    before = collapsed(x).detach().clone()
    _perturb(net, 0.1, 1)
    torch.testing.assert_close(collapsed(x), before, rtol=0, atol=0)


def test_collapse_linear_chain_matches_product():
    torch.manual_seed(1)
    chain = linear_chain([2, 3, 4, 1]).to(DT)
    lr = collapse_linear_chain(chain)
    w1, w2, w3 = (m.weight.detach() for m in chain)
    want = torch.einsum("ab,bc,cd->ad", w3, w2, w1)  # W3 W2 W1, contracted another way
    torch.testing.assert_close(lr.weight.detach(), want, rtol=0, atol=1e-14)
    x = torch.randn(7, 2, dtype=DT)
    torch.testing.assert_close(lr(x), chain(x), rtol=0, atol=1e-12)
    assert _count(lr) == 2 and lr.bias is None
    single = collapse_linear_chain(chain[0])
    torch.testing.assert_close(single.weight, chain[0].weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bias"):
        collapse_linear_chain(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False)))
    with pytest.raises(TypeError):
        collapse_linear_chain(nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU()))
    with pytest.raises(ValueError, match="positive integers"):
        LinNet(nn.Identity(), 2, [0], 1)


# ---------------------------------------------------------------- T-Nets
def _convnet():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4, track_running_stats=False),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_tnet_identity_init_then_absorb_exact():
    torch.manual_seed(2)
    base = _convnet().to(DT)
    tnet = TNet(base)
    assert tnet.layer_names == ("0", "2", "5")
    assert tnet.transform_names() == ("model.0.transform", "model.2.transform", "model.5.transform")
    assert tnet.base_parameter_patterns() == tuple("model." + n for n, _ in base.named_parameters())
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    torch.testing.assert_close(tnet(x), base(x), rtol=0, atol=0)  # T = I computes the base function
    _perturb(tnet, 0.3, 3)  # random T (and W): no longer the base function
    assert (tnet(x) - base(x)).abs().max() > 1e-2
    plain = tnet.absorb()
    assert [type(m) for m in plain] == [type(m) for m in base]  # the base architecture
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert _count(plain) == _count(base) and _count(tnet) == _count(base) + 9 + 16 + 9
    torch.testing.assert_close(plain(x), tnet(x), rtol=0, atol=1e-12)
    # reference for the first conv computed another way: conv, then the 1x1 channel mix by einsum
    t0, c0 = tnet.model[0].transform, tnet.model[0]
    ref = torch.einsum("oc,nchw->nohw", t0, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), c0.weight, c0.bias))
    torch.testing.assert_close(plain[0](x), ref, rtol=0, atol=1e-12)
    # the source model was copied, not modified; absorb shares no tensors
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (base[0], base[2], base[5]))
    ptrs = {p.data_ptr() for p in tnet.parameters()}
    assert not any(p.data_ptr() in ptrs for p in plain.parameters())


def test_tnet_bare_layer_and_errors():
    lin = nn.Linear(3, 2).to(DT)
    tnet = TNet(lin)
    assert [n for n, _ in tnet.named_parameters()] == ["model.weight", "model.bias", "model.transform"]
    _perturb(tnet, 0.5, 4)
    x = torch.randn(4, 3, dtype=DT)
    want = (x @ tnet.model.weight.T + tnet.model.bias) @ tnet.model.transform.T
    torch.testing.assert_close(tnet(x), want, rtol=0, atol=1e-14)
    torch.testing.assert_close(tnet.absorb()(x), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no nn.Linear"):
        TNet(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="groups"):
        TNet(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)))
    with pytest.raises(TypeError):
        TNet("model")


def _batch(tasks=3, shots=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * shots, 3, generator=g, dtype=DT)
    y = torch.randn(tasks, 2 * shots, 2, generator=g, dtype=DT)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


@pytest.mark.parametrize("vectorize", [True, False])
def test_tnet_maml_meta_gradient_hand_reference(vectorize):
    """MAML (1 step, rate alpha) adapting only W, b of a 2-layer T-Net MLP, vs plain autograd."""
    torch.manual_seed(6)
    tnet = TNet(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(DT)
    _perturb(tnet, 0.2, 7)
    alpha = 0.3
    learner = MetaLearner(tnet, half_mse, adapt=tnet.base_parameter_patterns(), lr=alpha)
    assert learner.adapted_names == ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias")
    batch = _batch()
    grads, stats = learner.meta_gradient_of(batch, vectorize=vectorize)

    p = {n: v.detach().clone().requires_grad_(True) for n, v in tnet.named_parameters()}

    def net(q, x):
        h = torch.tanh((x @ q["model.0.weight"].T + q["model.0.bias"]) @ q["model.0.transform"].T)
        return (h @ q["model.2.weight"].T + q["model.2.bias"]) @ q["model.2.transform"].T

    total = 0
    for i in range(batch.num_tasks):
        inner = 0.5 * ((net(p, batch.support_x[i]) - batch.support_y[i]) ** 2).mean()
        names = learner.adapted_names
        g = torch.autograd.grad(inner, [p[n] for n in names], create_graph=True)
        q = {**p, **{n: p[n] - alpha * gi for n, gi in zip(names, g)}}
        total = total + 0.5 * ((net(q, batch.query_x[i]) - batch.query_y[i]) ** 2).mean()
    total = total / batch.num_tasks
    want = dict(zip(p, torch.autograd.grad(total, list(p.values()))))
    torch.testing.assert_close(stats["meta_objective"], total.detach(), rtol=0, atol=1e-13)
    for n in p:
        torch.testing.assert_close(grads["model"][n], want[n], rtol=0, atol=1e-12)
    assert grads["model"]["model.0.transform"].abs().max() > 1e-4  # the transforms are meta-learned


def test_tnet_adaptation_is_preconditioned_step():
    """Adapting W, b under T then absorbing equals a plain-layer step preconditioned by T T^T:
    ``T W' = T W - alpha T T^T G``, with ``G`` the gradient of the absorbed layer (module docstring)."""
    torch.manual_seed(8)
    tnet = TNet(nn.Linear(3, 2)).to(DT)
    _perturb(tnet, 0.5, 9)
    alpha = 0.2
    learner = MetaLearner(tnet, half_mse, adapt=tnet.base_parameter_patterns(), lr=alpha)
    b = _batch(tasks=1, shots=6)
    adapted = learner.adapt(b.support_x[0], b.support_y[0], steps=1)
    after = copy.deepcopy(tnet)
    after.load_state_dict({n: v.detach() for n, v in adapted.items()})
    got = after.absorb()

    plain = tnet.absorb()
    loss = half_mse(plain(b.support_x[0]), b.support_y[0])
    gw, gb = torch.autograd.grad(loss, [plain.weight, plain.bias])
    t = tnet.model.transform.detach()
    m = t @ t.T
    torch.testing.assert_close(got.weight.detach(), plain.weight.detach() - alpha * m @ gw, rtol=0, atol=1e-13)
    torch.testing.assert_close(got.bias.detach(), plain.bias.detach() - alpha * m @ gb, rtol=0, atol=1e-13)
    torch.testing.assert_close(adapted["model.transform"], tnet.model.transform, rtol=0, atol=0)  # T not adapted


def test_tnet_conv_vmap_matches_loop():
    """A conv T-Net (with batch norm) meta-gradient under vmap equals the per-task loop."""
    torch.manual_seed(10)
    tnet = TNet(_convnet()).to(DT)
    _perturb(tnet, 0.1, 11)
    learner = MetaLearner(tnet, F.cross_entropy, adapt=tnet.base_parameter_patterns(), lr=0.1)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 2, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (2, 6), generator=g)
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    gv, sv = learner.meta_gradient_of(batch, vectorize=True)
    gl, sl = learner.meta_gradient_of(batch, vectorize=False)
    torch.testing.assert_close(sv["meta_objective"], sl["meta_objective"], rtol=0, atol=1e-12)
    for n in gl["model"]:
        torch.testing.assert_close(gv["model"][n], gl["model"][n], rtol=0, atol=1e-11)


def test_linnet_collapse_quick_collapsed_adapts_like_lr(tmp_path):
    """Suppl. B.3: the collapsed LinNet computes the LinNet's function (same pre-adaptation loss on the
    same held-out tasks) but after one step its loss is LR's, not the LinNet's."""
    from metagrad.experiments import get_experiment, run

    s = run(get_experiment("linnet-collapse"), tmp_path,
            ["quick=true", "train.iterations=400", "train.val_tasks=100", "train.eval_every=100"], progress=False)
    lr, lin, col = s["lr"], s["lr-linnet"], s["lr-linnet-collapsed"]
    assert s["collapse_same_function_pre_adapt_loss_gap"] < 1e-6
    assert lin["post_adapt_loss"] < lr["post_adapt_loss"] - 3 * (lr["post_adapt_loss_ci95"] + lin["post_adapt_loss_ci95"])
    assert col["post_adapt_loss"] > lin["post_adapt_loss"] + 3 * (col["post_adapt_loss_ci95"] + lin["post_adapt_loss_ci95"])
    assert abs(col["post_adapt_loss"] - lr["post_adapt_loss"]) < 0.05
    assert (tmp_path / "linnet_collapse.png").read_bytes()[:4] == b"\x89PNG"
