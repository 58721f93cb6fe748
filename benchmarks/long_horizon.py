"""Long-horizon meta-gradients: peak memory and seconds per meta-gradient vs inner steps K.

For every (workload, method, K) point a **fresh Python subprocess** builds the learner, runs one
untimed warm-up meta-gradient at 2 inner steps (lazy initialization of kernels and allocator),
then times ``--repeats`` calls of ``learner.meta_gradient_of(batch)`` at K inner steps and
reports their median. Memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed calls (peak stats reset after the
  warm-up), and ``memory_allocated`` before them (model, batch, optimizer-free) as the baseline;
* CPU: the process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), and the RSS before the
  timed calls as the baseline. The peak includes the Python/torch runtime (a few hundred MB),
  so ``delta_mb = peak - baseline`` is reported beside it.

A point that runs past ``--timeout`` seconds is killed and reported with ``"status": "timeout"``;
larger K of the same method and workload are then not started and reported as
``"status": "skipped"`` (with the reason). Errors (e.g. a meta-gradient that is not implemented,
an out-of-memory kill) are reported with ``"status": "error"`` and the message. Nothing is left
out of the JSON.

Methods (registered meta-gradients, :mod:`metagrad.gradients`): ``unrolled`` (exact MAML,
backprop through every step), ``checkpointed`` (exact, O(sqrt K) stored states, default
segments), ``implicit`` (iMAML, ``lam=1``, 5 CG steps, K proximal inner steps) and ``adjoint``
(A-MAML, ``h = inner lr = 0.01``, ``T = K h``, dopri5 at ``--adjoint-rtol`` / ``--adjoint-atol``,
default :class:`~metagrad.gradients.Adjoint`'s: 1e-5 / 1e-7 for these float32 workloads (earlier
runs used torchdiffeq's 1e-7 / 1e-9; each result in ``benchmarks/README.md`` says which);
default segments: every grid state recorded when the states fit in 64 MiB, ``round(sqrt K)``
recomputed segments otherwise).

On the ReLU/max-pool conv net (a right-hand side that is only piecewise smooth) dopri5 crawls at
tight float32 tolerances: for one task at K = 10 (T = 0.1), 1 thread on a loaded 2-core machine,
the forward solve plus Heun backward took about 51 s at rtol 1e-5 / atol 1e-7, 10 s at 1e-4 /
1e-6 and 4.7 s at 1e-3 / 1e-5, against 1.2 s for unrolled MAML (the 1e-7 / 1e-9 point timed out
at 150 s). Pass looser tolerances for conv workloads and report them with the result
(``settings.adjoint_tolerances``). ``--adjoint-backward heun-pec`` times the one-HVP-a-step
variant of the Heun backward (``Adjoint(backward="heun-pec")``), ``--adjoint-record-mb`` another
``record_mb``.

Workloads:

* ``mlp``: A-MAML section 5.2: CosMixture 100shot-100val (:class:`metagrad.tasks.CosMixture`),
  the 2-32-32-1 tanh MLP of the ``amaml-regression`` experiment, meta-batch 5, inner GD lr 0.01,
  MSE; ``vmap`` over tasks.
* ``conv``: 5-way 1-shot, 15 queries per class, random 1x28x28 inputs, the 4-block conv net of
  Finn et al. (:class:`metagrad.models.CNN` ``(4, 5)``, 64 channels, BatchNorm without running
  statistics, max-pool), meta-batch 4, inner GD lr 0.01, cross-entropy; per-task loop on CPU
  (faster there), ``vmap`` on CUDA.

Goals reported in ``goals`` (per workload): adjoint and implicit peak memory at the largest K
within 1.5x of the smallest K (``--memory-ratio``; on CPU measured on peak RSS); adjoint no
slower than unrolled for every K >= 500 where both ran (a K where unrolled timed out or failed
and adjoint finished counts as met).

Usage::

    python benchmarks/long_horizon.py --workloads mlp --threads 1 --timeout 600 --out long_horizon.json
    python benchmarks/long_horizon.py --workloads conv --K 10 100 --methods unrolled checkpointed implicit
    python benchmarks/long_horizon.py --device cuda --out gpu.json

One JSON object goes to stdout (and ``--out``); progress goes to stderr. ``--out`` is rewritten
after every point with ``"complete": false``, so a run killed from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("unrolled", "checkpointed", "implicit", "adjoint")
KS = (10, 100, 500, 1000, 2000, 5000)
WORKLOADS = ("mlp", "conv")
INNER_LR = 0.01
ADJOINT_H = 0.01
IMPLICIT = {"lam": 1.0, "cg_steps": 5}


# ---------------------------------------------------------------- one point (child process)
def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _adjoint_options(args) -> dict:
    """The ``Adjoint`` options given on the command line (``backward`` always)."""
    given = {"rtol": args.adjoint_rtol, "atol": args.adjoint_atol, "record_mb": args.adjoint_record_mb}
    return {"backward": args.adjoint_backward, **{k: v for k, v in given.items() if v is not None}}


def _tolerances(args) -> dict:
    """The adjoint tolerances a run uses on these float32 workloads (``Adjoint``'s where not given)."""
    import torch
    from metagrad.gradients import Adjoint

    rtol, atol = Adjoint(rtol=args.adjoint_rtol, atol=args.adjoint_atol).tolerances(torch.float32)
    return {"rtol": rtol, "atol": atol}


def _meta_gradient(method: str, steps: int, adjoint_options: dict | None = None):
    from metagrad.gradients import make_meta_gradient

    if method == "implicit":
        return make_meta_gradient("implicit", **IMPLICIT)
    if method == "adjoint":
        return make_meta_gradient("adjoint", T=round(steps * ADJOINT_H, 10), h=ADJOINT_H, **(adjoint_options or {}))
    return make_meta_gradient(method)


def _workload(name: str, device, generator):
    """(model, loss_fn, batch, vectorize, description)."""
    import torch
    import torch.nn.functional as F

    if name == "mlp":
        from metagrad.models import MLP
        from metagrad.tasks import CosMixture

        batch = CosMixture(shots=100, queries=100).sample(5, generator=generator)
        desc = {"task": "CosMixture 100shot-100val", "model": "MLP 2-32-32-1 tanh", "meta_batch": 5, "loss": "mse"}
        return MLP(2, [32, 32], 1, activation="tanh").to(device), F.mse_loss, batch.to(device), True, desc
    if name == "conv":
        from metagrad.models import CNN
        from metagrad.tasks import TaskBatch

        tasks, ways, queries = 4, 5, 15
        sx = torch.rand(tasks, ways, 1, 28, 28, generator=generator)
        qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=generator)
        sy = torch.arange(ways).repeat(tasks, 1)
        qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
        batch = TaskBatch(sx, sy, qx, qy).to(device)
        desc = {"task": "5-way 1-shot, 15 queries/class, random 1x28x28", "model": "CNN(4, 5), 64 channels, maxpool",
                "meta_batch": tasks, "loss": "cross_entropy"}
        return CNN(4, ways, channels=64).to(device), F.cross_entropy, batch, device.type == "cuda", desc
    raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")


def run_point(workload: str, method: str, steps: int, *, device: str, repeats: int, seed: int,
              adjoint_options: dict | None = None) -> dict:
    import torch

    from metagrad import MetaLearner, Schedule

    dev = torch.device(device)
    torch.manual_seed(seed)
    model, loss_fn, batch, vectorize, desc = _workload(workload, dev, torch.Generator().manual_seed(seed + 1))

    def learner(k):
        return MetaLearner(model, loss_fn, lr=INNER_LR, meta_gradient=_meta_gradient(method, k, adjoint_options),
                           schedule=Schedule(k), vectorize=vectorize)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    learner(2).meta_gradient_of(batch)  # warm-up
    timed = learner(steps)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev) / 2**20
    else:
        baseline = _rss_mb()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        grads, stats = timed.meta_gradient_of(batch)
        sync()
        seconds.append(time.perf_counter() - t0)
        del grads
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    return {
        "status": "ok", "workload": desc, "vectorize": vectorize,
        "meta_gradient": repr(timed.meta_gradient),
        "seconds_per_meta_gradient": statistics.median(seconds), "seconds_all": seconds,
        "peak_mb": peak, "baseline_mb": baseline, "delta_mb": peak - baseline,
        "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "peak_rss",
        "meta_objective": stats["meta_objective"].item(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------- the sweep (parent process)
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spawn(args, workload: str, method: str, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--point", workload, method, str(steps),
           "--device", args.device, "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.memory_limit_gb is not None:
        cmd += ["--memory-limit-gb", str(args.memory_limit_gb)]
    for key, value in _adjoint_options(args).items():
        cmd += [f"--adjoint-{key.replace('_', '-')}", str(value)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": args.timeout}
    wall = round(time.perf_counter() - t0, 2)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": wall}
    if lines:
        return {**json.loads(lines[-1]), "returncode": proc.returncode, "wall_s": wall}
    return {"status": "error", "returncode": proc.returncode, "error": proc.stderr[-2000:], "wall_s": wall}


def _goals(points: list[dict], ratio: float) -> dict:
    goals = {}
    for wl in sorted({p["workload_name"] for p in points}):
        rows = {(p["method"], p["K"]): p for p in points if p["workload_name"] == wl}
        out = {}
        for method in ("adjoint", "implicit"):
            ok = sorted(k for (m, k), p in rows.items() if m == method and p["status"] == "ok")
            all_k = sorted(k for (m, k) in rows if m == method)
            if not all_k:
                continue
            lo, hi = min(all_k), max(all_k)
            if lo in ok and hi in ok and hi > lo:
                r = rows[(method, hi)]["peak_mb"] / rows[(method, lo)]["peak_mb"]
                d_lo = rows[(method, lo)]["delta_mb"]
                rd = rows[(method, hi)]["delta_mb"] / d_lo if d_lo >= 1.0 else None  # noise below 1 MB
                out[f"{method}_memory_K{hi}_over_K{lo}"] = {"ratio": r, "delta_ratio": rd, "target": ratio, "met": r <= ratio}
            else:
                out[f"{method}_memory_K{hi}_over_K{lo}"] = {"met": None, "why": "a point did not finish",
                                                            "status": {k: rows[(method, k)]["status"] for k in (lo, hi)}}
        checks = {}
        for (m, k), p in sorted(rows.items()):
            if m != "adjoint" or k < 500:
                continue
            u = rows.get(("unrolled", k))
            if p["status"] != "ok" or u is None:
                checks[k] = {"met": None, "adjoint": p["status"], "unrolled": None if u is None else u["status"]}
            elif u["status"] != "ok":
                checks[k] = {"met": True, "adjoint_s": p["seconds_per_meta_gradient"], "unrolled": u["status"]}
            else:
                a, b = p["seconds_per_meta_gradient"], u["seconds_per_meta_gradient"]
                checks[k] = {"met": a <= b, "adjoint_s": a, "unrolled_s": b, "adjoint_over_unrolled": a / b}
        if checks:
            out["adjoint_no_slower_than_unrolled_K>=500"] = {
                "met": None if any(c["met"] is None for c in checks.values()) else all(c["met"] for c in checks.values()),
                "by_K": checks}
        goals[wl] = out
    return goals


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--K", nargs="+", type=int, default=list(KS), help="inner step counts")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["mlp"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per point (subprocess), then reported as timeout")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed meta-gradients per point (median reported; the first at a new K also grows the heap)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-ratio", type=float, default=1.5)
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="address-space limit of each point (CPU): a point over it fails with an error "
                        "instead of exhausting a shared machine")
    p.add_argument("--adjoint-rtol", type=float, default=None,
                   help="dopri5 relative tolerance of the adjoint's forward solve (default: Adjoint's, by dtype)")
    p.add_argument("--adjoint-atol", type=float, default=None,
                   help="dopri5 absolute tolerance (default: Adjoint's, by dtype)")
    p.add_argument("--adjoint-backward", choices=["heun", "heun-pec"], default="heun",
                   help="the adjoint's backward scheme (default: the paper's Heun)")
    p.add_argument("--adjoint-record-mb", type=float, default=None,
                   help="Adjoint(record_mb=): MiB for recording every grid state (default: Adjoint's, 64)")
    p.add_argument("--no-skip", action="store_true", help="also run larger K after a timeout")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.add_argument("--point", nargs=3, metavar=("WORKLOAD", "METHOD", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(k < 1 for k in args.K):
        p.error("--K values must be positive")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    if args.point:
        if args.memory_limit_gb is not None:
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        wl, method, k = args.point
        try:
            res = run_point(wl, method, int(k), device=args.device, repeats=args.repeats, seed=args.seed,
                            adjoint_options=_adjoint_options(args))
        except Exception as e:  # reported, not hidden: e.g. a meta-gradient not implemented yet
            res = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)
        return None

    import torch

    import metagrad
    from metagrad._io import write_json

    def save(obj: dict) -> None:
        if args.out:
            write_json(args.out, obj)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    out = {
        "benchmark": "long_horizon", "torch": torch.__version__, "metagrad": metagrad.__version__,
        "python": platform.python_version(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "settings": {"inner_lr": INNER_LR, "adjoint_h": ADJOINT_H,
                     "adjoint_tolerances": _tolerances(args), "adjoint_backward": args.adjoint_backward,
                     "adjoint_record_mb": args.adjoint_record_mb,
                     "implicit": IMPLICIT, "repeats": args.repeats, "timeout_s": args.timeout, "seed": args.seed,
                     "memory_limit_gb": args.memory_limit_gb},
        "loadavg_start": list(os.getloadavg()), "points": [],
    }
    t0 = time.perf_counter()
    for wl in args.workloads:
        for method in args.methods:
            stopped = None
            for k in sorted(args.K):
                if stopped is not None and not args.no_skip:
                    res = {"status": "skipped", "why": f"K={stopped} timed out"}
                else:
                    _log(f"[{wl}] {method} K={k} ...")
                    res = _spawn(args, wl, method, k)
                    if res["status"] == "timeout":
                        stopped = k
                point = {"workload_name": wl, "method": method, "K": k, **res}
                out["points"].append(point)
                save({**out, "complete": False})  # a killed run keeps its finished points
                if res["status"] == "ok":
                    _log(f"[{wl}] {method} K={k}: {res['seconds_per_meta_gradient']:.3f} s, "
                         f"peak {res['peak_mb']:.0f} MB (delta {res['delta_mb']:.1f})")
                else:
                    _log(f"[{wl}] {method} K={k}: {res['status']} {res.get('error', res.get('why', ''))[:200]}")
    out["goals"] = _goals(out["points"], args.memory_ratio)
    out["loadavg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["complete"] = True
    print(json.dumps(out, indent=2))
    save(out)
    return out


if __name__ == "__main__":
    main()
