"""Seconds per meta-iteration of the Arnold et al. vision variants (``arnold-table3`` methods on
CNN(2), the experiment's default config: 5-way 5-shot Omniglot, meta-batches of 16); prints JSON.

Needs the Omniglot data the experiment reads (``METAGRAD_DATA`` or ``--set data_root=DIR``).
Each method's learner is built exactly as ``metagrad run arnold-table3`` builds it; ``--warmup``
meta-steps are not timed, then ``--iters`` are (on pre-drawn task batches): wall clock
(``s_per_iteration``, ``median``, ``min``) and this process's CPU time (``cpu_s_per_iteration``,
``cpu_median``: user + system, all threads), which is the figure to compare on a shared machine
where other processes take turns on the cores; ``minor_page_faults_per_iteration`` (median)
counts the pages the step's re-allocated buffers made the kernel map afresh.

``--profile`` also runs the timed meta-steps again under ``torch.profiler`` (CPU activities) and
reports, per method, where the time goes (``profile``): every operator's self time is charged to
the outermost enclosing operator of a compute category (``conv``, ``matmul``, ``batchnorm``,
``pool_relu_loss``: forward, backward and double backward, with the allocations and copies done
inside them), or to ``optimizer_step`` (Adam's ``step``), or else by its own name to ``copy_alloc``,
``views`` or ``other_ops`` (elementwise work of the update rule, gradient sums, stacking, checks);
``outside_ops`` is the profiled wall time not inside any operator (Python, ``torch.func``,
``functional_call``, dict handling). Shares are of the profiled wall time; the profiler adds its
own overhead, so ``s_per_iteration`` (unprofiled) is the time to quote. ``sampling`` times
``train_family.sample(meta_batch_size)`` alone (episode indices, then gather and uint8 -> float).

    METAGRAD_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/arnold_step.py --methods maml maml-kfo
    METAGRAD_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/arnold_step.py --methods maml anil --profile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from metagrad.experiments import get_experiment
from metagrad.experiments.base import build_variant

#: categories of operators (by name) whose whole subtree counts as that category
COMPUTE = ("conv", "matmul", "batchnorm", "pool_relu_loss")
_ENGINE = "autograd::engine::evaluate_function: "
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::addmv",
           "aten::mv", "aten::dot")
_COPY_ALLOC = ("aten::clone", "aten::copy_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros",
               "aten::zeros_like", "aten::ones", "aten::ones_like", "aten::full", "aten::full_like", "aten::_to_copy",
               "aten::to", "aten::fill_", "aten::zero_", "aten::contiguous", "aten::new_zeros", "aten::new_empty",
               "aten::new_empty_strided", "aten::resize_", "aten::detach_copy", "aten::lift_fresh")
_VIEWS = ("aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::t", "aten::transpose",
          "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::detach",
          "aten::alias", "aten::flatten", "aten::permute", "aten::_unsafe_view", "aten::numpy_T", "aten::unbind",
          "aten::split", "aten::narrow", "aten::as_strided_", "aten::view_as", "aten::expand_as", "detach")


def categorize(name: str) -> str:
    """The category of one profiled operator or autograd node, by its name."""
    node = name[len(_ENGINE):] if name.startswith(_ENGINE) else name
    low = node.lower()
    if name.startswith("Optimizer."):
        return "optimizer_step"
    if "conv" in low:
        return "conv"
    if "batch_norm" in low or "batchnorm" in low:
        return "batchnorm"
    if node in _MATMUL or low.startswith(("mmbackward", "addmmbackward", "bmmbackward", "mvbackward")):
        return "matmul"
    if any(k in low for k in ("max_pool", "maxpool", "relu", "threshold", "cross_entropy", "log_softmax",
                              "logsoftmax", "nll_loss", "nllloss")):
        return "pool_relu_loss"
    if node in _COPY_ALLOC or low.startswith(("clonebackward", "tobackward", "copybackwards")):
        return "copy_alloc"
    if node in _VIEWS or low.startswith(("viewbackward", "tbackward", "expandbackward", "unsqueezebackward",
                                         "squeezebackward", "selectbackward", "transposebackward",
                                         "reshapealias", "asstridedbackward")):
        return "views"
    return "other_ops"


def attribute(events) -> dict[str, float]:
    """Self CPU seconds per category: an event inside a compute operator or the optimizer step
    counts as that (the outermost such enclosing one), any other by its own name."""
    out: dict[str, float] = defaultdict(float)

    def visit(e, inherited):
        own = categorize(e.name)
        cat = inherited or (own if own in COMPUTE or own == "optimizer_step" else None)
        out[cat or own] += e.self_cpu_time_total / 1e6
        for c in e.cpu_children:
            visit(c, cat)

    for e in events:
        if e.cpu_parent is None:
            visit(e, None)
    return dict(out)


def profile_steps(learner, batches, opt) -> dict:
    """Run ``learner.meta_step`` on ``batches`` under the CPU profiler; the time split (see module doc)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for b in batches:
            learner.meta_step(b, opt)
        wall = time.perf_counter() - t
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None]
    op_time = sum(e.cpu_time_total for e in top) / 1e6
    cats = attribute(events)
    cats["outside_ops"] = max(wall - op_time, 0.0)
    n = len(batches)
    compute = sum(cats.get(c, 0.0) for c in COMPUTE)
    by_op = defaultdict(float)
    for e in events:
        by_op[e.name] += e.self_cpu_time_total / 1e6
    top_ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {
        "profiled_s_per_iteration": wall / n,
        "op_self_time_s_per_iteration": op_time / n,
        "ops_share_of_wall": op_time / wall,
        "compute_share": compute / wall,
        "non_compute_share": 1 - compute / wall,
        "s_per_iteration_by_category": {k: v / n for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "share_by_category": {k: v / wall for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_ops_self_s_per_iteration": {k: v / n for k, v in top_ops},
        "top_level_ops_per_iteration": len(top) / n,
        "events_per_iteration": len(events) / n,
    }


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 1 << 25) -> bool:
    """glibc's ``mallopt``: keep up to ``trim_threshold`` bytes of freed memory at the top of the heap
    (``M_TRIM_THRESHOLD``) and serve blocks below ``mmap_threshold`` (32 MiB, glibc's maximum) from
    the heap, not from fresh ``mmap`` (``M_MMAP_THRESHOLD``). The per-task loop frees and re-allocates
    the same activation buffers (MBs each) for every task; by default glibc may hand them back to the
    OS and the next task page-faults them in again (zero-filled by the kernel). Same as the
    environment variables ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_``. Returns whether
    both settings were accepted (``False`` off glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_trim_threshold, trim_threshold)) & bool(mallopt(m_mmap_threshold, mmap_threshold))


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_sampling(family, size: int, draws: int = 50) -> dict:
    """Milliseconds per ``family.sample(size)`` (and, for an episode sampler, its index draw alone)."""
    gen = torch.Generator().manual_seed(1)
    family.sample(size, generator=gen)
    t = time.perf_counter()
    for _ in range(draws):
        family.sample(size, generator=gen)
    out = {"ms_per_sample": (time.perf_counter() - t) / draws * 1e3}
    if hasattr(family, "sample_indices"):
        t = time.perf_counter()
        for _ in range(draws):
            family.sample_indices(size, generator=gen)
        out["ms_per_sample_indices"] = (time.perf_counter() - t) / draws * 1e3
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["maml", "maml-kfo", "anil", "anil-kfo"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the timed meta-steps (torch.profiler, CPU) and time the task sampling")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc only: mallopt so that malloc keeps freed memory instead of returning it to the OS "
                        "(no page faults re-mapping it on the next allocation); see keep_freed_memory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else None
    exp = get_experiment("arnold-table3")
    config = exp.resolve([f"methods={json.dumps(args.methods)}", *args.set])
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": os.getloadavg(),
           "keep_freed_memory": kept, "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "meta_batch_size": config["train"]["meta_batch_size"], "methods": {}}
    size = config["train"]["meta_batch_size"]
    for method in args.methods:
        t = time.perf_counter()
        variant = build_variant(exp, config, f"{method}-cnn2")
        setup = time.perf_counter() - t
        learner = variant.learner
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(0)
        batches = [variant.train_family.sample(size, generator=gen) for _ in range(args.warmup + args.iters)]
        for b in batches[:args.warmup]:
            learner.meta_step(b, opt)
        times, cpu, faults = [], [], []
        for b in batches[args.warmup:]:
            t, c, f = time.perf_counter(), time.process_time(), _minor_faults()
            learner.meta_step(b, opt)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            faults.append(_minor_faults() - f)
        res = {"s_per_iteration": sum(times) / len(times), "median": statistics.median(times), "min": min(times),
               "cpu_s_per_iteration": sum(cpu) / len(cpu), "cpu_median": statistics.median(cpu),
               "minor_page_faults_per_iteration": statistics.median(faults)}
        if args.profile:
            res["setup_s"] = setup  # build_variant: data load (decoding on the first method), model, learner
            res["profile"] = profile_steps(learner, batches[args.warmup:], opt)
            res["sampling"] = time_sampling(variant.train_family, size)
            sampling = res["sampling"]
            sampling["share_of_s_per_iteration"] = sampling["ms_per_sample"] / 1e3 / res["s_per_iteration"]
        out["methods"][method] = res
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
