"""Data-parallel meta-training throughput: meta-iterations/s with 1 and 2 processes on the CPU.

The workloads of ``maml_throughput.py`` (second-order MAML, Adam 1e-3):

* ``sinusoid``: MLP 1-40-40-1, 10 + 10 points, meta-batch 25, 5 inner steps; tasks under ``vmap``.
* ``omniglot``: Omniglot-shaped 5-way 1-shot (15 queries per class, random 1x28x28 images), the
  4-layer 64-channel conv net with BatchNorm, meta-batch 32, 5 inner steps; the per-task loop
  (faster than ``vmap`` for this net on a CPU, see ``README.md``).

For each process count N the script starts N fresh processes (``spawn``; for N > 1 a ``gloo``
group on a free 127.0.0.1 port, set up by :func:`metagrad.distributed.init_from_env` from the
variables ``torchrun`` would set), one torch thread each (``OMP_NUM_THREADS=1``). Every process
pre-draws the same full meta-batches, keeps its share (:func:`metagrad.distributed.shard`) and
times ``learner.meta_step(share, optimizer)``: its own meta-gradient, the ``all_reduce`` and the
optimizer step. Ranks start together (a barrier); rank 0's step times are reported (the
``all_reduce`` makes every rank wait for the slowest). ``cpu_s_per_meta_iteration`` is the CPU
time of the busiest rank per meta-iteration (``time.process_time``): on a machine whose cores are
taken by other work, wall-clock speed says little, and ``1 process / N processes`` of this figure
is the speedup N free cores would give, collectives aside. ``params_max_abs_diff`` is the largest
difference between the parameters after the timed steps with N processes and with one: float
rounding, as the ranks' sums are ordered differently.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                     # both workloads, 1 and 2 processes
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --workloads sinusoid --iters 100 --out res.json

One JSON object goes to stdout (and to ``--out``); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from maml_throughput import OUTER_LR, WORKLOADS, _loadavg, _log, make_learner

import metagrad
from metagrad import distributed

DEFAULTS = {"sinusoid": {"iters": 50, "warmup": 5, "vectorize": True},
            "omniglot": {"iters": 3, "warmup": 1, "vectorize": False}}


def _rank(rank: int, world: int, port: int, name: str, iters: int, warmup: int, seed: int, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    group = distributed.resolve()
    wl = WORKLOADS[name]
    torch.manual_seed(seed)
    learner = make_learner(wl, wl.make_model())
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    gen = torch.Generator().manual_seed(seed + 1)
    shares = [distributed.shard(wl.sample(gen), group) for _ in range(warmup + iters)]
    vectorize = DEFAULTS[name]["vectorize"]
    for batch in shares[:warmup]:
        learner.meta_step(batch, optimizer, vectorize=vectorize, group=group)
    distributed.barrier(group)
    step_s, cpu_s = [], []
    for batch in shares[warmup:]:
        t0, c0 = time.perf_counter(), time.process_time()
        learner.meta_step(batch, optimizer, vectorize=vectorize, group=group)
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    torch.save({"step_s": step_s, "cpu_s": cpu_s, "params": learner.state_dict()}, f"{out}.{rank}")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, world: int, *, iters: int, warmup: int, seed: int) -> dict:
    """Time ``iters`` meta-steps (after ``warmup``) of workload ``name`` over ``world`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank")
        mp.start_processes(_rank, args=(world, _free_port(), name, iters, warmup, seed, out), nprocs=world,
                           start_method="spawn")
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    step_s = ranks[0]["step_s"]
    return {
        "processes": world,
        "meta_iterations_per_s": iters / sum(step_s),
        "s_per_meta_iteration_median": statistics.median(step_s),
        "s_per_meta_iteration_min": min(step_s),
        "cpu_s_per_meta_iteration": max(sum(r["cpu_s"]) / iters for r in ranks),
        "s_all": [round(s, 4) for s in step_s],
        "params": ranks[0]["params"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts (default: 1 2)")
    p.add_argument("--iters", type=int, default=None, help="timed meta-steps (default: sinusoid 50, omniglot 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed meta-steps first (default: sinusoid 5, omniglot 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.procs) or (args.iters is not None and args.iters < 1):
        p.error("--procs and --iters must be positive")
    out = {"benchmark": "distributed", "torch": torch.__version__, "metagrad": metagrad.__version__,
           "cpu_count": os.cpu_count(), "threads_per_process": 1, "backend": "gloo", "seed": args.seed,
           "loadavg_start": _loadavg(), "results": {}}
    for name in args.workloads:
        iters = args.iters or DEFAULTS[name]["iters"]
        warmup = DEFAULTS[name]["warmup"] if args.warmup is None else args.warmup
        runs = {}
        for world in args.procs:
            _log(f"[{name}] {world} process(es): {warmup} warm-up + {iters} timed meta-steps")
            runs[world] = measure(name, world, iters=iters, warmup=warmup, seed=args.seed)
            _log(f"[{name}] {world} process(es): {runs[world]['meta_iterations_per_s']:.3f} meta-iterations/s")
        base = runs[args.procs[0]]
        base_params = base.pop("params")
        result = {"meta_batch": WORKLOADS[name].meta_batch, "vectorize": DEFAULTS[name]["vectorize"]}
        for world, r in runs.items():
            if r is not base:
                params = r.pop("params")
                r["speedup"] = r["meta_iterations_per_s"] / base["meta_iterations_per_s"]
                r["params_max_abs_diff"] = max((params[k] - base_params[k]).abs().max().item() for k in params)
            result[str(world)] = r
        out["results"][name] = result
    out["loadavg_end"] = _loadavg()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
