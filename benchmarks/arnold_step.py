"""Seconds per meta-iteration of the Arnold et al. vision variants (``arnold-table3`` methods on
CNN(2), the experiment's default config: 5-way 5-shot Omniglot, meta-batches of 16); prints JSON.

Needs the Omniglot data the experiment reads (``METAGRAD_DATA`` or ``--set data_root=DIR``).
Each method's learner is built exactly as ``metagrad run arnold-table3`` builds it; ``--warmup``
meta-steps are not timed, then ``--iters`` are (on pre-drawn task batches).

    METAGRAD_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/arnold_step.py --methods maml maml-kfo
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from metagrad.experiments import get_experiment
from metagrad.experiments.base import build_variant


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["maml", "maml-kfo", "anil", "anil-kfo"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    exp = get_experiment("arnold-table3")
    config = exp.resolve([f"methods={json.dumps(args.methods)}", *args.set])
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "meta_batch_size": config["train"]["meta_batch_size"], "methods": {}}
    for method in args.methods:
        variant = build_variant(exp, config, f"{method}-cnn2")
        learner = variant.learner
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(0)
        batches = [variant.train_family.sample(config["train"]["meta_batch_size"], generator=gen)
                   for _ in range(args.warmup + args.iters)]
        for b in batches[:args.warmup]:
            learner.meta_step(b, opt)
        times = []
        for b in batches[args.warmup:]:
            t = time.perf_counter()
            learner.meta_step(b, opt)
            times.append(time.perf_counter() - t)
        out["methods"][method] = {"s_per_iteration": sum(times) / len(times), "min": min(times)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
