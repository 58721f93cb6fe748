"""The experiment protocol and the generic runner behind ``metagrad run`` / ``metagrad eval``.

An experiment owns its default config (and a ``quick`` variant), builds one or more *variants*
(a learner plus task families plus a training config), and turns the variants' summaries into its
report (``summary.json``, a table, plots). Each variant trains in its own sub-folder of the run
directory, with its own checkpoint, so a run can be resumed variant by variant.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import _lock, distributed
from .._errors import prefixed
from .._io import _umask, clean_tmp, read_json, write_json
from ..config import apply_overrides, _split_override
from ..core import MetaLearner
from ..train import CHECKPOINT, _validate as _validate_train, evaluate_tasks, fit, load_checkpoint


@dataclass
class Variant:
    """One thing to train: a learner, its task families and its training config."""

    learner: MetaLearner
    train_family: Any
    eval_family: Any
    train: dict = field(default_factory=dict)


class Experiment:
    """Base class. Subclasses set ``name``/``description`` and implement the hooks below."""

    name: str = ""
    description: str = ""
    #: whether :meth:`report` accepts the results of a subset of the variants (``metagrad run
    #: --variant``); if not, such a run's summary is the plain per-variant results
    partial_report: bool = False
    #: dotted config keys that ``--resume --set`` may raise, to train a run's variants for longer
    #: (they must be how many meta-iterations each variant trains, read by nothing else)
    resume_keys: tuple[str, ...] = ()
    #: the dotted ``summary.json`` key and direction (``"minimize"`` / ``"maximize"``) that ``metagrad
    #: sweep`` optimizes unless told otherwise; ``None``: the sweep must name one (``--objective``)
    sweep_objective: tuple[str, str] | None = None

    def default_config(self) -> dict:
        """The full default config; must contain ``quick`` (bool) and ``seed`` (int)."""
        raise NotImplementedError

    def quick_config(self) -> dict:
        """Dotted overrides applied when ``quick=true`` (under a minute on 2 CPU cores)."""
        return {}

    def variants(self, config: dict) -> dict[str, Callable[[], Variant]]:
        """Named builders of the variants; each is called right after seeding torch."""
        raise NotImplementedError

    def report(self, config: dict, results: dict[str, dict], out_dir: Path) -> dict:
        """Make the experiment's summary (returned, written as summary.json) and plots."""
        return {name: res for name, res in results.items()}

    def seeds_report(self, result: dict) -> list[str]:
        """Markdown lines that ``seeds.md`` of a multi-seed run (:mod:`.seeds`) shows before its
        table of every summary key: the experiment's own table with each number's mean and 95% CI
        across seeds. ``result`` is what ``seeds.json`` holds (``aggregate``: dotted summary key ->
        ``mean``, ``ci95``, ``n``, ``values``). Default: none."""
        return []

    def variant_config(self, config: dict, name: str) -> dict:
        """What in ``config`` determines how variant ``name`` trains and evaluates. Two runs whose
        variant configs are equal train that variant alike, so :func:`merge_runs` may take it from
        either, even from a run of another experiment that has a variant of the same name.
        Default: the whole config but ``"only"`` and ``"experiment"``."""
        return {k: v for k, v in config.items() if k not in ("only", "experiment")}

    # ------------------------------------------------------------------
    def resolve(self, overrides=()) -> dict:
        """Defaults, then the quick settings if ``quick=true`` is asked for, then the overrides."""
        pairs = [_split_override(o) if isinstance(o, str) else o for o in overrides]
        config = apply_overrides(self.default_config(), dict(pairs))
        if config.get("quick"):
            config = apply_overrides(apply_overrides(config, self.quick_config()), dict(pairs))
        config["experiment"] = self.name
        return config


def build_variant(experiment: Experiment, config: dict, name: str) -> Variant:
    builders = experiment.variants(config)
    torch.manual_seed(config["seed"])
    return builders[name]()


def trained_variant(experiment: Experiment, config: dict, out_dir: str | Path, name: str) -> tuple[Variant, dict]:
    """Variant ``name`` of ``config`` with its learner loaded from the run in ``out_dir``, and
    the checkpoint (``iteration``, ``config``, ...) it was loaded from."""
    variant = build_variant(experiment, config, name)
    ckpt = Path(out_dir) / name / CHECKPOINT
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} does not exist: the variant {name!r} has not been trained")
    state = load_checkpoint(ckpt)
    variant.learner.load_state_dict(state["learner"])
    return variant, state


def _selected(experiment: Experiment, config: dict, names: list[str] | None = None) -> list[str]:
    """The variant names a run trains: all of them (``names``, default the experiment's), or the
    config's ``"only"`` selection."""
    if names is None:
        names = list(experiment.variants(config))
    only = config.get("only")
    if only is None:
        return names
    unknown = [n for n in only if n not in names]
    if unknown or not only:
        raise ValueError(f"unknown variant {unknown[0] if unknown else only!r} of {experiment.name}; "
                         f"valid: {', '.join(names)}")
    return [n for n in names if n in only]


def run(experiment: Experiment, out_dir: str | Path, overrides=(), *, resume: bool = False,
        progress: bool = True, variants=None, device=None, jobs: int = 1, on_validate=None,
        group=distributed.AUTO) -> dict:
    """Run (or resume) an experiment into ``out_dir``; returns its summary.

    ``device``: train and evaluate there (``"cuda"``, ``"cuda:1"``; default: the CPU). It is not
    part of the config: a run started on one device can be resumed on another.

    ``resume``: continue the run in ``out_dir`` under its own ``config.json``; ``overrides`` may
    then only raise the experiment's :attr:`Experiment.resume_keys` (e.g.
    ``train.iterations=2000``), which trains every variant on from its last checkpoint.

    ``variants``: train only these of the experiment's variants (names; recorded in the run's
    ``config.json`` as ``"only"``, so ``resume`` keeps the selection); the report covers them.

    ``jobs``: train up to this many variants at once, each in its own process (started fresh,
    ``spawn``), with ``torch.get_num_threads() // jobs`` threads each (at least one). Each variant
    is seeded as in a sequential run, so the results are the same up to floating-point rounding;
    the report is written once all have finished. A variant that fails stops the others (their
    checkpoints stay, for ``resume``) and its error is raised, naming it. Small models on a GPU
    keep it busy this way: their kernels are too short to fill it one variant at a time.

    ``on_validate``: called as ``on_validate(variant_name, record)`` with each validation record
    of the training loops (see :func:`~metagrad.train.fit`); only with ``jobs=1``.

    ``group``: a ``torch.distributed`` process group (default: the default group when
    ``torchrun`` started this process and it is initialized; ``None``: this process alone; see
    :mod:`metagrad.distributed`). Its ranks train each variant data-parallel
    (:func:`~metagrad.train.fit`), which gives the results of one process up to the order of
    floating-point sums; rank 0 alone reads and writes ``out_dir`` and writes the report, and
    every rank returns the summary. Every rank must be started with the same arguments: if one
    differs (or resolves to another config), every rank raises ``ValueError`` naming it. ``jobs``
    must then be 1. A CUDA ``device`` without an index means ``cuda:LOCAL_RANK`` there.
    """
    group = distributed.resolve(group)
    out_dir = Path(out_dir)
    overrides = list(overrides)
    if group is not None:  # every rank must be asked the same (else all fail now, with the same message)
        distributed.agree(lambda: {"experiment": experiment.name, "resume": resume, "variants": variants, "jobs": jobs,
                                   "config": experiment.resolve(overrides)},
                          group, what="command (experiment, config, --resume, --variant, --jobs)")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if on_validate is not None and jobs > 1:
        raise ValueError(f"on_validate needs jobs=1 (a callback does not reach worker processes), got jobs={jobs}")
    if group is not None and jobs > 1:
        raise ValueError(f"jobs={jobs} cannot be combined with a data-parallel run over {distributed.world_size(group)} "
                         f"processes (torchrun): each variant already trains on all of them; use jobs=1")
    device = distributed.local_device(device)

    lock = contextlib.ExitStack()  # rank 0: the run folder's lock (metagrad._lock), held to the end

    def prepare() -> dict:
        """Rank 0: the run's config (``config.json`` when resuming); checks the folder."""
        cfg_path = out_dir / "config.json"
        if out_dir.is_dir():  # a run there may be going on: fail now, naming it
            lock.enter_context(_lock.hold(out_dir))
        if resume:
            return _longer(experiment, read_resumable(cfg_path, experiment, variants), overrides)
        config = experiment.resolve(overrides)
        if variants:
            config["only"] = list(variants)
        if cfg_path.exists():
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume or choose another --out")
        return config

    def write_config(stale: list[str]) -> None:
        """Rank 0: lock and create the folder, clear what a killed process left; when resuming to
        train on, first remove the summaries that would make the folder look finished."""
        if not resume:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.enter_context(_lock.hold(out_dir))
            if (out_dir / "config.json").exists():  # another process started a run there meanwhile
                raise FileExistsError(f"{out_dir} already holds a run; pass --resume or choose another --out")
        clean_tmp(out_dir)
        if resume and (stale or overrides):
            for path in [out_dir / "summary.json", *(out_dir / name / "summary.json" for name in stale)]:
                path.unlink(missing_ok=True)  # the run is partial until the report is written again
        if not resume or overrides:
            write_json(out_dir / "config.json", config)

    try:
        config = distributed.on_main(prepare, group)
        every = list(experiment.variants(config))  # checks data and options before anything is written
        names = _selected(experiment, config, every)
        stale = distributed.on_main(lambda: _check_variants(experiment, config, names, out_dir, resume), group)
        distributed.on_main(lambda: write_config(stale), group)
        if jobs > 1 and len(names) > 1:
            results = _train_parallel(experiment, config, names, out_dir, jobs, resume=resume, progress=progress,
                                       device=device)
        else:
            results = {name: _train_variant(experiment, config, name, out_dir, resume=resume, progress=progress,
                                            device=device, on_validate=on_validate, group=group) for name in names}
        return distributed.on_main(
            lambda: _write_report(experiment, config, results, out_dir, partial=len(names) < len(every)), group)
    finally:
        lock.close()


def _check_variants(experiment: Experiment, config: dict, names: list[str], out_dir: Path, resume: bool) -> list[str]:
    """Build every variant in ``names`` and check its training config, so that a bad setting fails
    before anything is written; when resuming, check each checkpoint against its variant's
    meta-iterations (a run cannot be shortened). Returns the variants that will train on from a
    checkpoint, or train at all (their ``summary.json``, if any, is stale)."""
    stale = []
    for name in names:
        variant = build_variant(experiment, config, name)
        iterations = _validate_train(dict(variant.train))["iterations"]
        del variant
        ckpt = out_dir / name / CHECKPOINT
        if not (resume and ckpt.exists()):
            stale.append(name)
            continue
        done = load_checkpoint(ckpt)["iteration"]
        if done > iterations:
            raise ValueError(f"{ckpt} is at meta-iteration {done}, past the {iterations} that {out_dir / 'config.json'} "
                             f"gives variant {name!r}: a run cannot be shortened; set its iterations back to at least "
                             f"{done} there, or start a new run")
        if done < iterations:
            stale.append(name)
    return stale


def read_resumable(path: Path, experiment: Experiment, variants=None, what: str = "run") -> dict:
    """The JSON record ``path`` (``config.json``, a multi-seed plan) of a run to resume, checked:
    it exists, holds an ``experiment`` run, and no ``variants`` selection is asked for (a resumed
    run keeps its own)."""
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    if variants:
        raise ValueError("--variant cannot be combined with --resume: the run's selection is kept")
    record = read_json(path)
    if record.get("experiment") != experiment.name:
        raise ValueError(f"{path.parent} holds a {record.get('experiment')!r} {what}, not {experiment.name!r}")
    return record


def _longer(experiment: Experiment, config: dict, overrides) -> dict:
    """``config`` with the ``overrides`` of a resumed run applied: only ``experiment.resume_keys``,
    each to an integer no smaller than the run's (finished variants then train on from their last
    checkpoint to the new count)."""
    pairs = [_split_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    for key, _ in pairs:
        if key not in experiment.resume_keys:
            allowed = ", ".join(experiment.resume_keys) or f"no key of {experiment.name}"
            raise ValueError(f"--set {key} cannot be combined with --resume: the run's config.json is used as "
                             f"is, except that {allowed} may be raised to train for longer")
    longer = apply_overrides(config, dict(pairs))
    for key, _ in pairs:
        old, new = _dotted(config, key), _dotted(longer, key)
        if new < old:  # apply_overrides has checked the type
            raise ValueError(f"{key} must be at least the run's {old} to resume it, got {new!r}")
    return longer


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _without(config: dict, keys) -> dict:
    """A copy of ``config`` without ``keys`` (dotted keys name nested entries, ``train.seed``)."""
    config = copy.deepcopy(config)
    for key in keys:
        parent, _, last = key.rpartition(".")
        try:
            node = _dotted(config, parent) if parent else config
        except (KeyError, TypeError):
            continue  # no such entry: nothing to leave out
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def _train_variant(experiment: Experiment, config: dict, name: str, out_dir: Path, *, resume: bool,
                   progress: bool, device=None, position: int | None = None, on_validate=None,
                   group=None) -> dict:
    """Build and fit one variant into ``out_dir / name`` (data-parallel over ``group``); returns its summary."""
    variant = build_variant(experiment, config, name)
    return fit(variant.learner, variant.train_family, variant.eval_family, variant.train, out_dir / name,
               resume=resume, progress=progress, desc=f"{experiment.name}:{name}", device=device,
               position=position,
               on_validate=None if on_validate is None else functools.partial(on_validate, name), group=group)


_WORKER: dict = {}  # in a worker process of _train_parallel: its progress-bar line


def _init_worker(slots, threads: int, stop, parent: int) -> None:
    _die_with_parent(parent)
    import signal

    from .. import train

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which asks every worker to stop
    train._STOP = stop  # the parent's request to stop at a safe point
    torch.set_num_threads(threads)
    with slots.get_lock():
        _WORKER["position"] = slots.value
        slots.value += 1


def _die_with_parent(parent: int) -> None:
    """End this (worker) process when process ``parent`` ends, however it ends, so that no worker
    trains on into a run folder that its parent has left: Linux's ``PR_SET_PDEATHSIG`` (SIGKILL),
    and a thread that watches the parent's pid (elsewhere, and against a race at start)."""
    import os
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread below does it
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the line above could take effect
        os._exit(1)
    threading.Thread(target=watch, name="metagrad-parent-watch", daemon=True).start()


def _worker_fit(experiment: Experiment, config: dict, name: str, out_dir: Path, resume: bool, progress: bool,
                device) -> dict:
    from ..train import _STOP, Stopped

    if _STOP.value:  # the run is stopping: do not start this variant
        raise Stopped(_STOP.value, None, str(out_dir / name))
    return _train_variant(experiment, config, name, out_dir, resume=resume, progress=progress, device=device,
                          position=_WORKER.get("position"))


def _train_parallel(experiment: Experiment, config: dict, names: list[str], out_dir: Path, jobs: int, *,
                    resume: bool, progress: bool, device) -> dict:
    """:func:`_train_variant` for every name, ``jobs`` processes at a time; results in ``names`` order.

    The workers die with this process. A stop asked of this process (:func:`metagrad.train.
    stop_on_signals`) is passed on to them: each stops at its safe point, and once all have,
    :class:`~metagrad.train.Stopped` is raised here."""
    import multiprocessing
    import os
    import time

    from .. import train

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    jobs = min(jobs, len(names))
    threads = max(1, torch.get_num_threads() // jobs)
    stop = ctx.RawValue("i", 0)
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(ctx.Value("i", 0), threads, stop, os.getpid())) as pool:
        pending = {name: pool.apply_async(_worker_fit, (experiment, config, name, out_dir, resume, progress,
                                                        None if device is None else str(device)))
                   for name in names}
        results, stopped = {}, None
        while pending:  # poll, so that a failure stops the others at once
            if train._STOP.value and not stop.value:
                stop.value = int(train._STOP.value)
            for name in [n for n, r in pending.items() if r.ready()]:
                try:
                    results[name] = pending.pop(name).get()
                except train.Stopped as err:
                    stopped = stopped if stopped is not None and stopped.iteration is not None else err
                except Exception as err:  # the pool's exit terminates the other workers
                    raise prefixed(err, f"variant {name!r}: ") from err
            if pending:
                time.sleep(0.2)
        pool.close()  # every variant has ended: let the workers exit on their own (terminating them
        pool.join()   # can leave a semaphore behind, which the resource tracker then reports)
        if stopped is not None:
            raise stopped
    return {name: results[name] for name in names}


def _write_report(experiment: Experiment, config: dict, results: dict, out_dir: Path, *, partial: bool) -> dict:
    if partial and not experiment.partial_report:
        summary = Experiment.report(experiment, config, results, out_dir)
    else:
        summary = experiment.report(config, results, out_dir)
    write_json(out_dir / "summary.json", summary)
    return summary


def merge_runs(experiment: Experiment, out_dir: str | Path, sources, *, ignore=()) -> dict:
    """Combine run folders, each trained with some of ``experiment``'s variants (``metagrad run
    --variant``, e.g. side by side on one GPU), into ``out_dir`` and write the experiment's report
    there; returns the summary. Nothing is trained or evaluated: each variant's folder
    (checkpoint, metrics, ``summary.json``) is copied as it is.

    The merged run's config is that of the first source holding an ``experiment`` run. Other
    sources may hold runs of other experiments: they contribute the variants whose names
    ``experiment`` has too (Arnold et al.'s MAML on CNN(2) is a variant of Table 1, Table 3 and
    Fig. 4, so it need only be trained once). A variant is taken only where its
    :meth:`Experiment.variant_config` equals the merged run's, apart from the keys in ``ignore``
    (e.g. ``vectorize``, ``cache_dir`` or ``train.checkpoint_every``, which change speed or files,
    not results; dotted keys name nested entries); a variant may come from
    one source only, and must have finished there (its ``summary.json`` exists). ``out_dir`` must
    not exist: it is built beside itself under a temporary name and renamed at the end, so a
    failure leaves nothing there. Holds every source's lock (:mod:`metagrad._lock`) while it reads.
    """
    out_dir = Path(out_dir)
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("merge needs at least one source run folder")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder for the merged run")
    with contextlib.ExitStack() as locks:
        return _merge(experiment, out_dir, sources, set(ignore), locks)


def _merge(experiment: Experiment, out_dir: Path, sources: list[Path], ignore: set, locks) -> dict:
    import shutil
    import tempfile

    from . import get_experiment

    configs = []
    for src in sources:
        cfg_path = src / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} does not exist: not a metagrad run directory")
        locks.enter_context(_lock.hold(src))  # no run may train on in a source while it is copied
        configs.append(read_json(cfg_path))
    home = next((i for i, cfg in enumerate(configs) if cfg.get("experiment") == experiment.name), None)
    if home is None:
        raise ValueError(f"none of {', '.join(map(str, sources))} holds a {experiment.name!r} run; other "
                         f"experiments' runs can only add variants to one")
    config = {k: v for k, v in configs[home].items() if k != "only"}
    every = list(experiment.variants(config))
    owner: dict[str, Path] = {}
    for src, cfg in zip(sources, configs):
        src_exp = experiment if cfg.get("experiment") == experiment.name else get_experiment(cfg.get("experiment"))
        for name in _selected(src_exp, cfg):
            if name not in every:
                continue  # not a variant of ``experiment``
            if not (src / name / "summary.json").exists():
                raise ValueError(f"variant {name!r} of {src} has not finished (no summary.json: the run was killed "
                                 f"or is partial); resume it with `metagrad run {cfg.get('experiment')} --out {src} "
                                 f"--resume` first")
            if name in owner:
                raise ValueError(f"variant {name!r} is in both {owner[name]} and {src}")
            want = _without(experiment.variant_config(config, name), ignore)
            got = _without(src_exp.variant_config(cfg, name), ignore)
            for key in sorted(set(want) | set(got)):
                if want.get(key) != got.get(key):
                    raise ValueError(f"config key {key!r} differs: {want.get(key)!r} in {sources[home]}, "
                                     f"{got.get(key)!r} in {src} (variant {name!r}; pass it in ignore / --ignore "
                                     f"if it does not change results)")
            owner[name] = src
    if not owner:
        raise ValueError(f"no finished variant in {', '.join(map(str, sources))}")
    names = [n for n in every if n in owner]
    if len(names) < len(every):
        config["only"] = names
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
        for name in names:
            shutil.copytree(owner[name] / name, tmp / name)
        write_json(tmp / "config.json", config)
        results = {name: read_json(tmp / name / "summary.json") for name in names}
        summary = _write_report(experiment, config, results, tmp, partial=len(names) < len(every))
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def evaluate_run(experiment: Experiment, out_dir: str | Path, *, tasks: int | None = None, overrides=(),
                 variants=None, device=None) -> dict:
    """Re-evaluate every variant of a run from its latest checkpoint (fresh held-out tasks);
    writes ``eval.json``.

    ``overrides`` (``"key=value"``, as for a run) change the run's config for this evaluation only,
    e.g. ``test_queries=1`` or ``test_steps=10``; they must leave the model's parameters the same
    shape. Each result records them and the checkpoint's ``iteration``. ``variants``: evaluate
    only these (default: those the run trains). ``device``: evaluate there (default: the CPU).
    A variant whose checkpoint is short of its meta-iterations (a run killed before the end) is
    marked ``"partial": true``. Holds the run folder's lock (:mod:`metagrad._lock`).
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        raise FileNotFoundError(f"{out_dir / 'config.json'} does not exist: not a metagrad run directory")
    with _lock.hold(out_dir, what="run"):
        config = read_json(out_dir / "config.json")
        overrides = list(overrides)
        if overrides:
            config = apply_overrides(config, overrides)
        if variants:
            config["only"] = list(variants)
        results = {}
        for name in _selected(experiment, config):
            variant, state = trained_variant(experiment, config, out_dir, name)
            if device is not None:
                variant.learner.to(device)
            cfg = {**state["config"]}
            results[name] = evaluate_tasks(variant.learner, variant.eval_family, tasks or cfg["eval_tasks"],
                                           seed=cfg["seed"] + 30_011, batch=cfg["eval_batch"], device=device)
            results[name]["iteration"] = state["iteration"]
            if state["iteration"] < _validate_train(dict(variant.train))["iterations"]:
                results[name]["partial"] = True  # killed before the end: resume the run to finish it
            if overrides:
                results[name]["overrides"] = overrides
        write_json(out_dir / "eval.json", results)
    return results


def copy_config(config: dict) -> dict:
    return copy.deepcopy(config)
