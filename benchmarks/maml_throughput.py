"""MAML meta-training throughput: ``torch.func.vmap`` over tasks vs a per-task Python loop.

Two workloads, both second-order MAML (``meta_gradient="unrolled"``), SGD inner rule, Adam outer
optimizer (lr 1e-3):

* ``omniglot``: Omniglot-shaped 5-way 1-shot classification, 15 queries per class, random
  ``1x28x28`` float inputs and random labels (each class once in the support set and 15 times in
  the query set, shuffled), the 4-layer 64-channel stride-2 conv net of Finn et al. (2017) with
  BatchNorm without running statistics, meta-batch 32, 5 inner steps, inner lr 0.4,
  cross-entropy loss.
* ``sinusoid``: 1-40-40-1 ReLU MLP, 10 support + 10 query points from
  :class:`metagrad.Sinusoid`, meta-batch 25, 5 inner steps, inner lr 0.01, MSE loss.

For each workload and mode (``vmap`` = ``learner.meta_step(..., vectorize=True)``, ``loop`` =
``vectorize=False``) the script runs warm-up meta-steps, then times ``--iters`` meta-steps with
``time.perf_counter`` (CUDA is synchronized around every step). It reports tasks/s
(``meta_batch * iters / seconds``), ms per meta-step (mean, median, min and every step) and the
vmap/loop throughput ratio. Batches are sampled before timing, so data generation is not timed.
Each mode starts from the same initial weights.

Sanity check: ``learner.meta_gradient_of(batch, vectorize=True)`` and ``vectorize=False`` on one
batch at the initial weights must agree; the max abs difference over all meta-parameters (and the
max abs gradient entry, for scale) goes into the JSON as ``grad_check``.

Usage::

    python benchmarks/maml_throughput.py                       # both workloads, CPU defaults
    python benchmarks/maml_throughput.py --workload sinusoid --iters 50 --threads 1
    python benchmarks/maml_throughput.py --device cuda --iters 20 --warmup 3 --out results.json

One JSON object goes to stdout (and to ``--out`` if given); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import metagrad
from metagrad import MetaLearner, Schedule, Sinusoid, TaskBatch
from metagrad.models import MLP

OUTER_LR = 1e-3
GRAD_CHECK_RTOL = 1e-4  # max_abs_diff / max_abs_grad; float32 noise is ~1e-6 on these workloads
BATCH_POOL = 4  # distinct pre-sampled batches cycled through during warm-up and timing


# ---------------------------------------------------------------- workloads
def conv4(in_channels: int = 1, image_size: int = 28, ways: int = 5, hidden: int = 64) -> nn.Sequential:
    """Finn et al. (2017) Omniglot net: 4 x [Conv 3x3 stride 2 pad 1, BatchNorm, ReLU], Linear head.

    BatchNorm keeps no running statistics (always normalizes with the statistics of the batch
    it sees, i.e. one task's support or query set under both vmap and the loop).
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
        ]
        channels = hidden
        size = (size + 2 * 1 - 3) // 2 + 1  # conv output size: floor((n + 2p - k) / s) + 1
    layers += [nn.Flatten(), nn.Linear(hidden * size * size, ways)]  # 28 -> 14 -> 7 -> 4 -> 2: 64*2*2
    return nn.Sequential(*layers)


@dataclass
class Workload:
    name: str
    description: dict
    meta_batch: int
    inner_steps: int
    inner_lr: float
    default_iters: int
    default_warmup: int
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    sample: Callable[[torch.Generator], TaskBatch]


def omniglot_batch(generator: torch.Generator, *, tasks: int = 32, ways: int = 5, shots: int = 1,
                   queries: int = 15, size: int = 28) -> TaskBatch:
    """Random 5-way 1-shot episodes: float images in [0, 1), labels 0..ways-1 (each class
    ``shots`` times in the support set and ``queries`` times in the query set, shuffled)."""
    support_x = torch.rand(tasks, ways * shots, 1, size, size, generator=generator)
    query_x = torch.rand(tasks, ways * queries, 1, size, size, generator=generator)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    support_y = support_y.gather(1, torch.rand(support_y.shape, generator=generator).argsort(1))
    query_y = query_y.gather(1, torch.rand(query_y.shape, generator=generator).argsort(1))
    return TaskBatch(support_x, support_y, query_x, query_y)


WORKLOADS: dict[str, Workload] = {
    "omniglot": Workload(
        name="omniglot",
        description={"ways": 5, "shots": 1, "queries_per_class": 15, "input": [1, 28, 28],
                     "model": "conv4 (64ch, 3x3 stride 2, BatchNorm2d(track_running_stats=False), ReLU) + Linear(256, 5)",
                     "loss": "cross_entropy"},
        meta_batch=32, inner_steps=5, inner_lr=0.4, default_iters=3, default_warmup=2,
        make_model=conv4, loss_fn=F.cross_entropy,
        sample=lambda g: omniglot_batch(g, tasks=32),
    ),
    "sinusoid": Workload(
        name="sinusoid",
        description={"shots": 10, "queries": 10, "model": "MLP 1-40-40-1 ReLU", "loss": "mse"},
        meta_batch=25, inner_steps=5, inner_lr=0.01, default_iters=20, default_warmup=3,
        make_model=lambda: MLP(1, [40, 40], 1), loss_fn=F.mse_loss,
        sample=lambda g: Sinusoid(shots=10, queries=10).sample(25, generator=g),
    ),
}


# ---------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_learner(wl: Workload, model: nn.Module) -> MetaLearner:
    return MetaLearner(model, wl.loss_fn, adapt="all", rule="sgd", lr=wl.inner_lr,
                       meta_gradient="unrolled", schedule=Schedule(wl.inner_steps))


def grad_check(wl: Workload, model: nn.Module, batch: TaskBatch) -> dict:
    """Max abs difference between the vmap and the loop meta-gradient on one batch."""
    learner = make_learner(wl, copy.deepcopy(model))
    g_vmap, s_vmap = learner.meta_gradient_of(batch, vectorize=True)
    g_loop, s_loop = learner.meta_gradient_of(batch, vectorize=False)
    diff, scale, n = 0.0, 0.0, 0
    for group in g_loop:
        for name, gl in g_loop[group].items():
            gv = g_vmap[group][name]
            diff = max(diff, (gv - gl).abs().max().item())
            scale = max(scale, gl.abs().max().item())
            n += gl.numel()
    return {
        "max_abs_diff": diff,
        "max_abs_grad": scale,
        "max_rel_diff": diff / scale if scale > 0 else None,
        "agree": bool(scale == 0 or diff / scale < GRAD_CHECK_RTOL),
        "rtol": GRAD_CHECK_RTOL,
        "query_loss_max_abs_diff": (s_vmap["query_loss"] - s_loop["query_loss"]).abs().max().item(),
        "meta_objective": s_loop["meta_objective"].item(),
        "num_meta_parameters": n,
    }


def time_mode(wl: Workload, model: nn.Module, batches: list[TaskBatch], *, vectorize: bool,
              iters: int, warmup: int, device: torch.device) -> dict:
    learner = make_learner(wl, copy.deepcopy(model))
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    for i in range(warmup):
        learner.meta_step(batches[i % len(batches)], optimizer, vectorize=vectorize)
    _sync(device)
    step_s = []
    for i in range(iters):
        batch = batches[(warmup + i) % len(batches)]
        t0 = time.perf_counter()
        stats = learner.meta_step(batch, optimizer, vectorize=vectorize)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
    total = sum(step_s)
    return {
        "iters": iters,
        "warmup": warmup,
        "seconds": total,
        "tasks_per_s": wl.meta_batch * iters / total,
        "ms_per_meta_step": 1e3 * total / iters,
        "ms_per_meta_step_median": 1e3 * statistics.median(step_s),
        "ms_per_meta_step_min": 1e3 * min(step_s),
        "ms_per_step_all": [round(1e3 * s, 3) for s in step_s],
        "final_meta_objective": stats["meta_objective"].item(),
    }


def run_workload(wl: Workload, args, device: torch.device) -> dict:
    iters = wl.default_iters if args.iters is None else args.iters
    warmup = wl.default_warmup if args.warmup is None else args.warmup
    torch.manual_seed(args.seed)
    model = wl.make_model().to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = [wl.sample(generator).to(device) for _ in range(min(BATCH_POOL, max(1, warmup + iters)))]

    result = {
        "workload": wl.description,
        "meta_batch": wl.meta_batch,
        "inner_steps": wl.inner_steps,
        "inner_lr": wl.inner_lr,
        "meta_gradient": "unrolled (second order)",
        "outer_optimizer": f"Adam(lr={OUTER_LR})",
        "num_model_parameters": sum(p.numel() for p in model.parameters()),
    }
    if not args.skip_check:
        _log(f"[{wl.name}] grad check (vmap vs loop meta_gradient_of)")
        result["grad_check"] = grad_check(wl, model, batches[0])
        if not result["grad_check"]["agree"]:
            _log(f"[{wl.name}] WARNING: vmap and loop meta-gradients disagree: {result['grad_check']}")
    modes = {}
    for mode in args.modes:
        _log(f"[{wl.name}] {mode}: {warmup} warm-up + {iters} timed meta-steps")
        modes[mode] = time_mode(wl, model, batches, vectorize=(mode == "vmap"),
                                iters=iters, warmup=warmup, device=device)
        _log(f"[{wl.name}] {mode}: {modes[mode]['tasks_per_s']:.2f} tasks/s, "
             f"{modes[mode]['ms_per_meta_step']:.1f} ms/meta-step")
    result["modes"] = modes
    if "vmap" in modes and "loop" in modes:
        result["vmap_over_loop"] = modes["vmap"]["tasks_per_s"] / modes["loop"]["tasks_per_s"]
        result["vmap_over_loop_median"] = (modes["loop"]["ms_per_meta_step_median"]
                                           / modes["vmap"]["ms_per_meta_step_median"])
    return result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["omniglot", "sinusoid", "all"], default="all")
    p.add_argument("--iters", type=int, default=None,
                   help="timed meta-steps per mode (default: omniglot 3, sinusoid 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up meta-steps per mode (default: omniglot 2, sinusoid 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--modes", nargs="+", choices=["vmap", "loop"], default=["vmap", "loop"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-check", action="store_true", help="skip the vmap-vs-loop meta-gradient check")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    device = torch.device(args.device)

    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    out = {
        "benchmark": "maml_throughput",
        "torch": torch.__version__,
        "metagrad": metagrad.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "seed": args.seed,
        "loadavg_start": _loadavg(),
        "results": {},
    }
    t0 = time.perf_counter()
    for name in names:
        out["results"][name] = run_workload(WORKLOADS[name], args, device)
    out["loadavg_end"] = _loadavg()
    out["wall_s"] = round(time.perf_counter() - t0, 2)

    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
