"""The ``metagrad`` command line: ``list``, ``run``, ``eval``, ``merge``, ``sweep``.

``torchrun --nproc-per-node N -m metagrad run NAME --out DIR ...`` trains data-parallel over N
processes (:mod:`metagrad.distributed`): the same results as one process, rank 0 writes ``DIR``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from . import distributed
from .experiments import EXPERIMENTS, evaluate_run, get_experiment, merge_runs, run
from .experiments.seeds import run_seeds
from ._errors import first_line
from ._io import read_json
from .data.download import DownloadError
from .train import Stopped, stop_on_signals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metagrad", description="Gradient-based meta-learning experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run (or resume) an experiment")
    r.add_argument("name", help="experiment name (see `metagrad list`)")
    r.add_argument("--out", required=True, type=_folder, help="run directory")
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
    r.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run once per seed into DIR/seed-S (config seed=S) and write DIR/seeds.json and seeds.md: "
                        "mean and 95%% CI (t-distribution) across seeds of every number of the summaries")
    e = sub.add_parser("eval", help="re-evaluate a run's latest checkpoints on fresh held-out tasks")
    e.add_argument("dir", type=_folder, help="run directory")
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
    m.add_argument("--out", required=True, type=_folder, help="the merged run directory (must not exist)")
    m.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="a config key that may differ between the runs, e.g. vectorize or train.checkpoint_every "
                        "(dotted for nested keys; repeatable)")
    s = sub.add_parser("sweep", help="search config values of an experiment with Optuna (TPE with pruning, or a "
                                     "grid); running it again continues the sweep")
    s.add_argument("name", help="experiment name (see `metagrad list`)")
    s.add_argument("--out", required=True, type=_folder,
                   help="sweep directory: the study (sweep.journal), one run folder per trial, sweep.json/.md/.png")
    s.add_argument("--param", dest="params", action="append", required=True, metavar="KEY=SPEC",
                   help="a config key to search: loguniform:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH, "
                        "choice:V1|V2|... or grid:V1,V2,... (values as for --set); repeatable")
    s.add_argument("--trials", type=int, default=None, metavar="N",
                   help="finished trials the sweep should hold (default with --grid: the whole grid)")
    s.add_argument("--grid", action="store_true", help="grid search over the listed values (instead of TPE)")
    s.add_argument("--objective", default=None, metavar="KEY",
                   help="the dotted numeric summary.json key to optimize, '*' within a part averaging several "
                        "(e.g. 'variants.tanh-*.val_ce'; default: the experiment's, if it has one)")
    s.add_argument("--direction", choices=("minimize", "maximize"), default=None,
                   help="whether to minimize or maximize the objective (needed with --objective)")
    s.add_argument("--prune-on", choices=("val_metric", "val_loss", "none"), default="val_metric",
                   help="the validation value that prunes TPE trials (default: val_metric)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every trial; repeatable")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars and per-trial lines")
    s.add_argument("--device", default=None, help="train on this torch device, e.g. cuda (default: cpu)")
    return p


def _folder(text: str):
    """A folder argument as a ``Path``; an empty one stays ``""`` (``Path("")`` would be the
    current folder), for :func:`_check_folders` to refuse by name."""
    return Path(text) if text.strip() else ""


def _check_folders(args) -> None:
    """Refuse an empty ``--out`` / run folder, and an ``--out`` that names an existing file."""
    for attr, flag in (("out", "--out"), ("dir", "the run folder")):
        value = getattr(args, attr, None)
        if value == "":
            raise ValueError(f"{flag} must name a folder, got an empty string")
        if attr == "out" and value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"--out {value} is an existing file, not a folder; choose another --out")


#: what to do about an operating-system error, by errno
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or choose an --out on another disk, then run again "
                  "(with --resume where a run had started)",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose an --out on another disk",
    errno.EACCES: "permission denied: choose an --out you can write to, or change the folder's permissions",
    errno.EPERM: "operation not permitted: choose an --out you can write to, or change the folder's permissions",
    errno.EROFS: "the file system is read-only: choose an --out on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file was expected: choose another path",
}


def _os_error(err: OSError) -> str:
    """One line naming the file of ``err`` and what to do about it."""
    if err.errno is None or not err.strerror:
        return str(err)  # a message of ours, which names its file already
    where = f"{err.filename}: " if err.filename is not None else ""
    hint = _OS_HINTS.get(err.errno)
    return f"{where}{err.strerror}" + (f"; {hint}" if hint else "")


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
    if device.type == "meta":
        raise ValueError(f"--device {name!r}: meta tensors hold no data, so nothing can be trained or evaluated "
                         f"there; use cpu or cuda")
    try:  # e.g. cuda:7 on a one-GPU machine, mps without Apple silicon
        (torch.zeros(2, device=device) + 1).sum().item()
    except Exception as err:
        raise ValueError(f"--device {name!r} is not usable on this machine: {first_line(err)}") from None
    return device


def _experiment_of(run_dir: Path):
    """The experiment that made the run in ``run_dir`` (from its ``config.json``)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist: not a metagrad run directory")
    config = read_json(cfg_path)
    if not isinstance(config, dict) or not isinstance(config.get("experiment"), str):
        raise ValueError(f"{cfg_path} is not a metagrad run's config (no \"experiment\" name in it); "
                         f"point at the folder that `metagrad run` wrote")
    return get_experiment(config["experiment"])


def _start_distributed(args) -> bool:
    """Under ``torchrun`` with several processes (``WORLD_SIZE`` > 1): refuse what does not run
    data-parallel, else start the default process group (``gloo``; ``nccl`` with ``--device
    cuda``). Returns whether it started one."""
    if not distributed.launched() or args.command == "list":
        return False
    if args.command != "run" or args.seeds is not None:
        what = "--seeds" if args.command == "run" else f"metagrad {args.command}"
        raise ValueError(f"{what} runs in one process: start it without torchrun (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); only `metagrad run` trains data-parallel over torchrun's processes")
    return distributed.init_from_env(_device(args.device))


def _resume_command(args) -> str:
    """The command that continues the ``metagrad run`` of ``args`` where it stopped."""
    import shlex

    words = ["metagrad", "run", args.name, "--out", str(args.out)]
    if args.seeds is not None:
        words += ["--seeds", *map(str, args.seeds)]
    words.append("--resume")
    if args.jobs != 1:
        words += ["--jobs", str(args.jobs)]
    if args.device is not None:
        words += ["--device", args.device]
    if args.no_progress:
        words.append("--no-progress")
    return shlex.join(words)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (``metagrad: warning: ...``), without the source line."""
    print(f"metagrad: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the warning display of whoever called main()
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    started = False
    try:
        _check_folders(args)
        started = _start_distributed(args)
        if args.command == "list":
            width = max(len(n) for n in EXPERIMENTS.names())
            for name in EXPERIMENTS.names():
                print(f"{name:<{width}}  {get_experiment(name).description}")
            return 0
        if args.command == "run" and args.seeds is not None:
            with stop_on_signals():  # SIGINT / SIGTERM: stop at a safe point, with a checkpoint
                run_seeds(get_experiment(args.name), args.out, args.seeds, args.overrides, resume=args.resume,
                          progress=not args.no_progress, variants=args.variants, device=_device(args.device),
                          jobs=args.jobs)
            print((Path(args.out) / "seeds.md").read_text(), end="")  # the table run_seeds wrote
            print(f"results in {args.out}", file=sys.stderr)
            return 0
        if args.command == "run":
            with stop_on_signals():  # SIGINT / SIGTERM: stop at a safe point, with a checkpoint
                summary = run(get_experiment(args.name), args.out, args.overrides, resume=args.resume,
                              progress=not args.no_progress, variants=args.variants, device=_device(args.device),
                              jobs=args.jobs)
            if distributed.is_main(distributed.resolve()):
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
        if args.command == "sweep":
            from .sweep import sweep

            sweep(get_experiment(args.name), args.out, args.params, trials=args.trials, grid=args.grid,
                  objective=args.objective, direction=args.direction, overrides=args.overrides,
                  prune_on=args.prune_on, progress=not args.no_progress, device=_device(args.device))
            print((args.out / "sweep.md").read_text(), end="")
            print(f"results in {args.out}", file=sys.stderr)
            return 0
    except Stopped as err:
        if distributed.is_main(distributed.resolve()):
            print(f"metagrad: {err}; continue with: {_resume_command(args)}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("metagrad: interrupted" + (f"; the last checkpoint stays, continue with: {_resume_command(args)}"
                                          if args.command == "run" else ""), file=sys.stderr)
        return 130
    except (ValueError, TypeError, ModuleNotFoundError, DownloadError) as err:
        print(f"metagrad: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # FileExistsError, FileNotFoundError, a read-only folder, a full disk, ...
        print(f"metagrad: error: {_os_error(err)}", file=sys.stderr)
        return 2
    finally:
        if started:
            distributed.shutdown()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
