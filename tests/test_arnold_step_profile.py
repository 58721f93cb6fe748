"""The time split of ``benchmarks/arnold_step.py --profile`` (no data needed)."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "arnold_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("arnold_step_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_categorize_names(bench):
    assert bench.categorize("aten::mkldnn_convolution") == "conv"
    assert bench.categorize("autograd::engine::evaluate_function: ConvolutionBackwardBackward0") == "conv"
    assert bench.categorize("NativeBatchNormBackwardBackward0") == "batchnorm"
    assert bench.categorize("aten::addmm") == "matmul"
    assert bench.categorize("autograd::engine::evaluate_function: MmBackward0") == "matmul"
    assert bench.categorize("aten::max_pool2d_with_indices") == "pool_relu_loss"
    assert bench.categorize("Optimizer.step#Adam.step") == "optimizer_step"
    assert bench.categorize("aten::clone") == "copy_alloc"
    assert bench.categorize("aten::view") == "views"
    assert bench.categorize("aten::mul") == "other_ops"


def test_attribute_charges_every_self_time_once_and_nested_ops_to_their_compute_op(bench):
    torch.manual_seed(0)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    x = torch.randn(3, 1, 6, 6)

    def loss(w):
        return F.batch_norm(F.conv2d(x, w, padding=1), None, None, training=True).pow(2).mean()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (g,) = torch.autograd.grad(loss(w), w, create_graph=True)
        torch.autograd.grad(g.pow(2).sum(), w)
    events = prof.events()
    split = bench.attribute(events)
    # reference: the plain sum of every event's self time
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    assert sum(split.values()) == pytest.approx(total, rel=1e-9)
    # reference: the inclusive time of the outermost batch-norm double-backward nodes
    outer = [e for e in events if "NativeBatchNormBackwardBackward0" in e.name
             and not any("NativeBatchNormBackwardBackward0" in a.name or bench.categorize(a.name) in bench.COMPUTE
                         for a in _ancestors(e))]
    assert outer  # the double backward ran through BatchNorm
    assert split["batchnorm"] >= sum(e.cpu_time_total for e in outer) / 1e6 * (1 - 1e-9)
    assert split["conv"] > 0


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent
