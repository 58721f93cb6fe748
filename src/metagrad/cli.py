"""The ``metagrad`` command line: ``list``, ``run``, ``eval``, ``merge``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .experiments import EXPERIMENTS, evaluate_run, get_experiment, merge_runs, run
from ._io import read_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metagrad", description="Gradient-based meta-learning experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run (or resume) an experiment")
    r.add_argument("name", help="experiment name (see `metagrad list`)")
    r.add_argument("--out", required=True, type=Path, help="run directory")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, JSON value); repeatable")
    r.add_argument("--variant", dest="variants", action="append", default=None, metavar="NAME",
                   help="train only this variant (repeatable; default: all)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoints (with --set train.iterations=N: train "
                        "its variants on to N meta-iterations, where the experiment allows it)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--device", default=None, help="train on this torch device, e.g. cuda (default: cpu)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N variants at once, one process each (default: 1)")
    e = sub.add_parser("eval", help="re-evaluate a run's latest checkpoints on fresh held-out tasks")
    e.add_argument("dir", type=Path, help="run directory")
    e.add_argument("--tasks", type=int, default=None, help="number of evaluation tasks")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate under a changed config value (e.g. test_queries=1); repeatable")
    e.add_argument("--variant", dest="variants", action="append", default=None, metavar="NAME",
                   help="evaluate only this variant (repeatable)")
    e.add_argument("--device", default=None, help="evaluate on this torch device, e.g. cuda (default: cpu)")
    m = sub.add_parser("merge", help="combine runs trained with --variant into one run folder of the first "
                                     "one's experiment and write its report (nothing is retrained)")
    m.add_argument("sources", nargs="+", type=Path, metavar="DIR",
                   help="run directories to combine; runs of another experiment add the variants both have")
    m.add_argument("--out", required=True, type=Path, help="the merged run directory (must not exist)")
    m.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="a config key that may differ between the runs, e.g. vectorize or train.checkpoint_every "
                        "(dotted for nested keys; repeatable)")
    return p


def _device(name: str | None):
    """Check a ``--device`` value before any work starts."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _experiment_of(run_dir: Path):
    """The experiment that made the run in ``run_dir`` (from its ``config.json``)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist: not a metagrad run directory")
    return get_experiment(read_json(cfg_path)["experiment"])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            width = max(len(n) for n in EXPERIMENTS.names())
            for name in EXPERIMENTS.names():
                print(f"{name:<{width}}  {get_experiment(name).description}")
            return 0
        if args.command == "run":
            summary = run(get_experiment(args.name), args.out, args.overrides, resume=args.resume,
                          progress=not args.no_progress, variants=args.variants, device=_device(args.device), jobs=args.jobs)
            print(json.dumps(summary, indent=2))
            print(f"results in {args.out}", file=sys.stderr)
            return 0
        if args.command == "eval":
            if args.tasks is not None and args.tasks < 1:
                raise ValueError(f"--tasks must be a positive integer, got {args.tasks}")
            experiment = _experiment_of(args.dir)
            print(json.dumps(evaluate_run(experiment, args.dir, tasks=args.tasks, overrides=args.overrides,
                                                variants=args.variants, device=_device(args.device)),
                             indent=2))
            return 0
        if args.command == "merge":
            experiment = _experiment_of(args.sources[0])
            print(json.dumps(merge_runs(experiment, args.out, args.sources, ignore=args.ignore), indent=2))
            print(f"results in {args.out}", file=sys.stderr)
            return 0
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as err:
        print(f"metagrad: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
