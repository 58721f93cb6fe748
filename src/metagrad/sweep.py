"""Hyperparameter sweeps over an experiment's config on Optuna: ``metagrad sweep``.

A sweep searches some config keys of one experiment. Each trial is an ordinary run
(:func:`metagrad.experiments.run`) in its own folder ``DIR/trial-NNNN``, with the trial's values
applied as ``--set`` overrides after the sweep's own ``overrides``; its objective is a dotted
numeric key of the run's ``summary.json`` (the experiment's :attr:`~metagrad.experiments.Experiment.
sweep_objective` by default), or the mean of several such keys through ``*`` wildcards
(:func:`objective_value`). A diverged objective (``null``) counts as the worst value. To select
on validation tasks only, name a validation number (the experiments' ``val_*`` keys, from each
variant's last validation in training), not a test-task one.

A parameter is ``KEY=SPEC``:

- ``loguniform:LOW:HIGH`` / ``uniform:LOW:HIGH``: a float in ``[LOW, HIGH]`` (log scale or not);
- ``int:LOW:HIGH``: an integer in ``[LOW, HIGH]``;
- ``choice:V1|V2|...``: one of the values, each read as for ``--set`` (JSON or a bare string), so
  ``hidden=choice:[32,32]|[40,40]``; values may also be separated by commas outside brackets;
- ``grid:V1,V2,...``: the same, for a grid search (``grid=True`` / ``--grid``), which runs every
  combination of the values (Optuna's ``GridSampler``); a grid takes lists of values only.

Without ``grid``, Optuna's TPE sampler proposes the values and its median pruner stops trials
whose validation curve lags behind the other trials' at the same iteration: the ``val_metric``
(or ``val_loss``, see ``prune_on``) that the training loop records every ``train.eval_every``
iterations, of the variant the objective key starts with (``deep`` in ``deep.val_mse``;
none if it starts with no variant's name). That value must improve in the objective's direction.

The study lives in ``DIR/sweep.journal`` (Optuna's ``JournalStorage``, one append-only file), so
running the same command again continues the sweep: ``trials`` counts the finished (complete or
pruned) trials of the whole study, so a second run with a larger ``trials`` adds trials, and
several processes or machines sharing ``DIR`` (a shared filesystem) run one sweep together.
Every trial holds a lock on ``DIR/trial-NNNN/.sweep-trial.lock`` (``fcntl.flock``) while it
runs; a trial left running in the study whose lock is free was killed: it is marked failed and
retried (at most :data:`MAX_RETRIES` times), continuing from the checkpoints in its folder.
A trial whose training diverges (:class:`~metagrad.DivergedError`, a non-finite loss) is complete
with a diverged objective, its error kept in ``sweep.json``; the sweep goes on.
A folder without ``summary.json`` is not a finished run.

After every trial ``DIR/sweep.json`` (every trial: number, state, params, objective, folder),
``DIR/sweep.md`` (a table sorted by objective, best first) and ``DIR/sweep.png`` (the objective
against each parameter) are rewritten. Needs ``pip install 'metagrad[sweep]'`` (optuna).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._errors import first_line
from ._io import write_json
from ._lock import try_lock
from .config import _parse_value, _split_override
from .core import DivergedError
from .experiments import Experiment, run
from .experiments.base import _dotted
from .experiments import _plot
from .experiments._report import fmt_g, fmt_overrides, md_table, numeric_leaves, write_text

KINDS = ("loguniform", "uniform", "int", "choice", "grid")
DIRECTIONS = ("minimize", "maximize")
PRUNE_ON = ("val_metric", "val_loss", "none")
STORAGE = "sweep.journal"
LOCK = ".sweep-trial.lock"
STUDY = "metagrad-sweep"
#: how often a trial killed mid-run is retried (then it stays failed)
MAX_RETRIES = 3
#: a trial still running in the study without having taken its lock after this many seconds is dead
_CLAIM_GRACE_S = 60.0


@dataclass(frozen=True)
class Param:
    """One swept config key: a range (``low``, ``high``) or a list of ``values``."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "Param":
        """A parameter from ``"KEY=KIND:..."`` (see the module docstring); ``ValueError`` naming
        the bad part otherwise."""
        if not isinstance(text, str) or "=" not in text or text.startswith("="):
            raise ValueError(f"--param must look like KEY=KIND:..., got {text!r}")
        key, spec = (s.strip() for s in text.split("=", 1))
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"--param {text!r}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
        if kind in ("choice", "grid"):
            values = tuple(_parse_value(v) for v in _split_values(rest, text))
            encoded = [_encode(v) for v in values]
            dup = next((e for i, e in enumerate(encoded) if e in encoded[:i]), None)
            if dup is not None:
                raise ValueError(f"--param {text!r}: the value {dup} is listed twice")
            return cls(key, kind, values=values, text=text)
        bounds = rest.split(":")
        number = int if kind == "int" else float
        try:
            if len(bounds) != 2:
                raise ValueError
            low, high = number(bounds[0]), number(bounds[1])
        except ValueError:
            raise ValueError(f"--param {text!r}: {kind} takes LOW:HIGH, two {'integers' if kind == 'int' else 'numbers'}"
                             f", got {rest!r}") from None
        if not low < high or not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"--param {text!r}: LOW must be below HIGH, got {low!r} and {high!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"--param {text!r}: loguniform needs LOW > 0, got {low!r}")
        return cls(key, kind, low, high, text=text)

    @property
    def is_list(self) -> bool:
        return self.kind in ("choice", "grid")

    def distribution(self):
        """The Optuna distribution (lists as categorical over the values' JSON text)."""
        from optuna import distributions as d

        if self.is_list:
            return d.CategoricalDistribution([_encode(v) for v in self.values])
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high)
        return d.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def decode(self, raw):
        """The config value of Optuna's ``raw`` value."""
        return json.loads(raw) if self.is_list else raw

    def probes(self) -> list:
        """Values that check the key and its type: every listed value, or both ends of a range."""
        return list(self.values) if self.is_list else [self.low, self.high]


def _encode(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _split_values(text: str, spec: str) -> list[str]:
    """``"a|b"`` or ``"a,b"`` into items; commas inside brackets, braces or quotes stay."""
    if "|" in text:
        items = text.split("|")
    else:
        items, depth, quote, start = [], 0, None, 0
        for i, ch in enumerate(text):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(text[start:i])
                start = i + 1
        items.append(text[start:])
    items = [s.strip() for s in items]
    if not text.strip() or any(not s for s in items):
        raise ValueError(f"--param {spec!r}: empty value in the list {text!r}")
    return items


def require_optuna():
    """The ``optuna`` module, or ``ModuleNotFoundError`` saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ModuleNotFoundError("metagrad sweep needs optuna: pip install 'metagrad[sweep]'") from None
    return optuna


def sweep(experiment: Experiment, out_dir: str | Path, params, *, trials: int | None = None, grid: bool = False,
          objective: str | None = None, direction: str | None = None, overrides=(), prune_on: str = "val_metric",
          sampler=None, pruner=None, progress: bool = True, device=None) -> dict:
    """Run (or continue) a sweep of ``experiment`` in ``out_dir``; returns what ``sweep.json`` holds.

    Args:
        params: ``"KEY=SPEC"`` strings or :class:`Param` (see the module docstring).
        trials: how many finished (complete or pruned) trials the study should hold; default for a
            grid: all its points (more is refused); required otherwise.
        grid: grid search over the listed values instead of TPE with pruning.
        objective / direction: the dotted numeric ``summary.json`` key to optimize and
            ``"minimize"`` / ``"maximize"``; default the experiment's ``sweep_objective``. Another
            ``objective`` needs its ``direction``.
        overrides: ``"key=value"`` config overrides of every trial (not of a swept key).
        prune_on: the validation record that the pruner watches, ``"val_metric"`` (``val_loss``
            where the learner has no metric), ``"val_loss"`` or ``"none"``.
        sampler / pruner: Optuna objects to use instead of TPE / the median pruner (grid: ignored).
        progress: progress bars and one line per finished trial on stderr. device: as for a run.

    Everything is checked before anything is written: a bad parameter, a key the experiment does not
    have, a value of the wrong type raise ``ValueError`` naming it. Continuing a sweep in ``out_dir``
    needs the same experiment, parameters, overrides and direction (the objective may change while
    no trial has finished).
    """
    optuna = require_optuna()
    spec = _check(experiment, params, trials=trials, grid=grid, objective=objective, direction=direction,
                  overrides=overrides, prune_on=prune_on)
    params = spec.pop("_params")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial of our own instead
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        restore.callback(optuna.logging.set_verbosity, verbosity)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = _study(optuna, out_dir, spec, params, sampler, pruner)
        prune = None if grid or prune_on == "none" else _prune_variant(experiment, spec)
        while _wanted(optuna, study, out_dir, spec["trials"]):
            trial = study.ask({p.key: p.distribution() for p in params})
            _run_trial(optuna, study, trial, experiment, out_dir, spec, params, prune, progress=progress,
                       device=device)
            report(study, out_dir, params)
    return report(study, out_dir, params)


def _check(experiment, params, *, trials, grid, objective, direction, overrides, prune_on) -> dict:
    """The sweep's spec from the arguments, each checked (``ValueError`` naming the bad value)."""
    params = [p if isinstance(p, Param) else Param.parse(p) for p in params]
    if not params:
        raise ValueError("a sweep needs at least one --param")
    keys = [p.key for p in params]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise ValueError(f"--param {dup} is given twice")
    pairs = [_split_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    clash = next((k for k, _ in pairs if k in keys), None)
    if clash is not None:
        raise ValueError(f"--set {clash}=... conflicts with --param {clash}")
    if grid:
        ranged = next((p for p in params if not p.is_list), None)
        if ranged is not None:
            raise ValueError(f"--grid takes lists of values (grid:V1,V2,...), got the range {ranged.text!r}")
    else:
        listed = next((p for p in params if p.kind == "grid"), None)
        if listed is not None:
            raise ValueError(f"--param {listed.text!r} is a grid: pass --grid (or write choice:... for TPE)")
    size = math.prod(len(p.values) for p in params) if grid else None
    if trials is None and size is None:
        raise ValueError("--trials N is needed for a TPE sweep")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ValueError(f"--trials must be a positive integer, got {trials!r}")
    if size is not None and trials is not None and trials > size:
        raise ValueError(f"--trials {trials} is more than the grid's {size} points")
    default = experiment.sweep_objective
    if objective is None:
        if default is None:
            raise ValueError(f"{experiment.name} has no default objective: pass --objective KEY (a dotted numeric "
                             f"key of its summary.json) and --direction minimize|maximize")
        objective = default[0]
    if direction is None:
        if default is None or objective != default[0]:
            raise ValueError(f"--objective {objective} needs --direction minimize or maximize")
        direction = default[1]
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if prune_on not in PRUNE_ON:
        raise ValueError(f"unknown prune_on {prune_on!r}; valid: {', '.join(PRUNE_ON)}")
    base = experiment.resolve(pairs)
    for p in params:  # every value through the experiment's own checks
        for value in p.probes():
            try:
                config = experiment.resolve([*pairs, (p.key, value)])
                experiment.variants(config)
            except (ValueError, TypeError) as err:
                raise ValueError(f"--param {p.text}: the value {value!r}: {err}") from None
        current = _dotted(base, p.key)
        if p.kind in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ValueError(f"--param {p.text}: {p.key} takes integers (it is {current!r}): use int:LOW:HIGH")
    return {"experiment": experiment.name, "params": [p.text for p in params], "grid": grid,
            "overrides": [list(pair) for pair in pairs], "objective": objective, "direction": direction,
            "prune_on": prune_on, "trials": trials or size, "_params": params}


def _study(optuna, out_dir: Path, spec: dict, params: list[Param], sampler, pruner):
    """The study in ``out_dir``'s journal, created with ``spec`` or checked against it."""
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out_dir / STORAGE)))
    if spec["grid"]:
        sampler = _GridSampler(optuna)({p.key: [_encode(v) for v in p.values] for p in params})
    study = optuna.create_study(storage=storage, study_name=STUDY, direction=spec["direction"], load_if_exists=True,
                                sampler=sampler or optuna.samplers.TPESampler(),
                                pruner=pruner or optuna.pruners.MedianPruner())
    stored = study.user_attrs.get("spec")
    if stored is not None:
        finished = study.get_trials(deepcopy=False, states=_FINISHED(optuna))
        for key in ("experiment", "params", "grid", "overrides", "direction", "prune_on", "objective"):
            if stored.get(key) != spec[key] and (key != "objective" or finished):
                raise ValueError(f"{out_dir} holds a sweep with {key} {stored.get(key)!r}, not {spec[key]!r}; "
                                 f"choose another --out")
    study.set_user_attr("spec", {k: v for k, v in spec.items() if k != "trials"})
    return study


def _GridSampler(optuna):
    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` at the grid's end, which works only
        inside ``study.optimize``; :func:`_wanted` stops this ask-and-tell loop."""

        def after_trial(self, study, trial, state, values):
            pass

    return GridSampler


def _FINISHED(optuna):
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _wanted(optuna, study, out_dir: Path, trials: int) -> bool:
    """Whether to start another trial: one waits (a retry), or the finished and running ones
    (in other processes) are fewer than ``trials``. Fails killed trials first."""
    _fail_killed(optuna, study, out_dir)
    state = optuna.trial.TrialState
    counts = {s: 0 for s in state}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts[state.WAITING] > 0 or counts[state.COMPLETE] + counts[state.PRUNED] + counts[state.RUNNING] < trials


def _fail_killed(optuna, study, out_dir: Path) -> None:
    """Mark failed, and retry, the running trials whose process is gone: their folder's lock is
    free, or they never took it (:data:`_CLAIM_GRACE_S`)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("locked") != t.number:  # not started: dead only if that has taken long
            age = time.time() - t.datetime_start.timestamp() if t.datetime_start else 0.0
            if age < _CLAIM_GRACE_S:
                continue
            lock = contextlib.nullcontext()
        else:
            lock = _try_lock(out_dir / t.user_attrs["folder"])
            if lock is None:
                continue  # its process is alive
        with lock:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):  # finished meanwhile, or failed by another process
                continue
            _retry(optuna, study, t.number)


def _retry(optuna, study, number: int) -> None:
    """Queue a copy of failed trial ``number`` (its params, folder and grid point), unless the
    trials it copies have failed :data:`MAX_RETRIES` times."""
    t = study.get_trials(deepcopy=False)[number]
    history = [*t.system_attrs.get("retry_history", []), t.number]
    if len(history) > MAX_RETRIES:
        return
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
        user_attrs=t.user_attrs, system_attrs={**t.system_attrs, "retry_history": history}))


def _try_lock(folder: Path):
    """The lock file of ``folder``, opened and locked by this process, or ``None`` if another
    process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    return try_lock(folder / LOCK)


def _prune_variant(experiment: Experiment, spec: dict) -> str | None:
    """The variant whose validation curve the pruner watches: the objective's first key part
    (none for a wildcard objective, which averages several)."""
    first = spec["objective"].split(".", 1)[0]
    config = experiment.resolve([tuple(p) for p in spec["overrides"]])
    return first if first in experiment.variants(config) else None


def _run_trial(optuna, study, trial, experiment, out_dir, spec, params, prune, *, progress, device) -> None:
    """Run one trial (a retry continues in its predecessor's folder) and tell the study its result.
    Any failure marks it failed, queues a retry and is raised."""
    name = trial.user_attrs.get("folder", f"trial-{trial.number:04d}")
    folder = out_dir / name
    state = optuna.trial.TrialState
    lock = _try_lock(folder)
    if lock is None:  # a second retry of the same killed trial: the first one runs it
        study.tell(trial, state=state.FAIL)
        return
    values = {p.key: p.decode(trial.params[p.key]) for p in params}
    with lock:
        trial.set_user_attr("folder", name)
        trial.set_user_attr("locked", trial.number)
        started = time.time()

        def report_validation(variant: str, record: dict) -> None:
            if variant != prune:
                return
            value = record.get("val_metric", record["val_loss"]) if spec["prune_on"] == "val_metric" \
                else record["val_loss"]
            trial.report(math.nan if value is None else value, record["iteration"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            resume = (folder / "config.json").exists()
            overrides = [] if resume else [*map(tuple, spec["overrides"]), *values.items()]
            try:
                summary = run(experiment, folder, overrides, resume=resume, progress=progress, device=device,
                              on_validate=report_validation if prune else None)
                value = objective_value(summary, spec["objective"], folder)
            except DivergedError as err:  # these settings diverge in training: a result (the worst), not a failure
                trial.set_user_attr("diverged", first_line(err))
                value = None
        except optuna.TrialPruned:
            study.tell(trial, state=state.PRUNED)
            outcome = f"pruned at iteration {max(study.get_trials(deepcopy=False)[trial.number].intermediate_values)}"
        except BaseException:
            study.tell(trial, state=state.FAIL)
            _retry(optuna, study, trial.number)
            raise
        else:
            worst = math.inf if spec["direction"] == "minimize" else -math.inf
            study.tell(trial, worst if value is None else value)
            outcome = f"{spec['objective']} = {'diverged' if value is None else fmt_g(value, 6)}"
    if progress:
        shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
        print(f"trial {trial.number} ({shown}): {outcome} in {folder} [{time.time() - started:.0f} s]", file=sys.stderr)


def objective_value(summary: dict, key: str, folder: Path | str = "the run") -> float | None:
    """The number at dotted ``key`` of a run's summary (``None`` if it diverged); ``ValueError``
    listing the numeric keys there are if it has none.

    A part of ``key`` may hold ``*`` / ``?`` wildcards (:mod:`fnmatch`, within one part): the
    objective is then the mean of every matching number, e.g. ``variants.tanh-*.val_ce`` averages
    the validation loss of the ``tanh`` variants at every step count; it is ``None`` if any of
    them diverged."""
    leaves = numeric_leaves(summary)
    parts = key.split(".")
    matches = [k for k in leaves if k == key or (len(k.split(".")) == len(parts) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(k.split("."), parts)))]
    if not matches:
        keys = [k for k in leaves if not k.rsplit(".", 1)[-1].isdigit()]  # list items left out
        raise ValueError(f"{Path(folder) / 'summary.json'} has no numeric key {key!r}; its keys: {', '.join(keys)} "
                         f"(list items by index, e.g. KEY.0; * matches within a part)")
    values = [_leaf_value(summary, leaves, k) for k in matches]
    return None if any(v is None for v in values) else math.fsum(values) / len(values)


def _leaf_value(summary: dict, leaves: dict, key: str) -> float | None:
    """The number at ``key``, ``None`` if it is not finite or its dict counts diverged tasks."""
    value = leaves[key]
    parent = summary  # the dict that holds ``key``: its count of diverged tasks makes the value diverged
    for part in key.split(".")[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if isinstance(parent, dict) and any(isinstance(parent.get(k), int) and not isinstance(parent.get(k), bool)
                                        and parent[k] > 0 for k in ("diverged", "diverged_tasks")):
        return None  # a mean over the tasks that did not diverge must not look better than it is
    return None if value is None or not math.isfinite(value) else value


def _show(value) -> str:
    return fmt_g(value) if isinstance(value, float) else _encode(value) if not isinstance(value, str) else value


def report(study, out_dir: str | Path, params: list[Param]) -> dict:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` of ``study`` into ``out_dir``; returns
    what ``sweep.json`` holds."""
    import optuna

    out_dir = Path(out_dir)
    spec = study.user_attrs["spec"]
    state = optuna.trial.TrialState
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == state.COMPLETE else None
        row = {"number": t.number, "state": t.state.name.lower(),
               "params": {p.key: p.decode(t.params[p.key]) for p in params if p.key in t.params},
               "objective": value if value is not None and math.isfinite(value) else None,
               "folder": t.user_attrs.get("folder")}
        if t.state == state.COMPLETE and row["objective"] is None:
            row["diverged"] = t.user_attrs.get("diverged", True)  # the training error, where training diverged
        if t.state == state.PRUNED and t.intermediate_values:
            row["pruned_at_iteration"] = max(t.intermediate_values)
        if "retry_history" in t.system_attrs:
            row["retry_of"] = t.system_attrs["retry_history"][-1]
        rows.append(row)
    for row in rows:
        if "retry_of" in row:
            rows[row["retry_of"]]["retried_by"] = row["number"]
    sign = 1.0 if spec["direction"] == "minimize" else -1.0
    order = ("complete", "pruned", "running", "waiting", "fail")
    rows.sort(key=lambda r: (order.index(r["state"]), "diverged" in r,
                             sign * r["objective"] if r["objective"] is not None else 0.0, r["number"]))
    result = {**spec, "trials": rows}
    best = next((r for r in rows if r["objective"] is not None), None)
    result["best"] = best
    write_json(out_dir / "sweep.json", result)
    write_text(out_dir / "sweep.md", _table(result, params))
    _plot_sweep(result, params, out_dir / "sweep.png")
    return result


def _table(result: dict, params: list[Param]) -> str:
    counts = {s: sum(r["state"] == s for r in result["trials"]) for s in ("complete", "pruned", "fail", "running",
                                                                          "waiting")}
    how = "grid search" if result["grid"] else "TPE" + ("" if result["prune_on"] == "none" else " with pruning")
    lines = [f"# Sweep of {result['experiment']}: {result['objective']} ({result['direction']})", "",
             f"{how}; trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". Parameters: "
             + ", ".join(f"`{p.text}`" for p in params) + "."]
    if result["overrides"]:
        lines[-1] += " Overrides: " + fmt_overrides(result["overrides"]) + "."
    lines.append("")
    header = ["trial", result["objective"], *(p.key for p in params), "state", "folder"]
    body = [[r["number"], "diverged" if r.get("diverged") else fmt_g(r["objective"], 6),
             *(_show(r["params"][p.key]) if p.key in r["params"] else "-" for p in params),
             _state(r), r["folder"] or "-"]
            for r in result["trials"]]
    return "\n".join(lines + md_table(header, body)) + "\n"


def _state(row: dict) -> str:
    if "retried_by" in row:
        return f"{row['state']} (retried: trial {row['retried_by']})"
    if "pruned_at_iteration" in row:
        return f"pruned at iteration {row['pruned_at_iteration']}"
    return row["state"]


def _plot_sweep(result: dict, params: list[Param], path: Path) -> None:
    """The objective of every complete trial against each parameter, the best one in red."""
    done = [r for r in result["trials"] if r["objective"] is not None]
    ys = [r["objective"] for r in done]
    fig, axes = _plot.figure(ncols=len(params), figsize=(3.6 * len(params), 3.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], params):
        if p.is_list and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p.values):
            labels = [_show(v) for v in p.values]
            xs = [labels.index(_show(r["params"][p.key])) for r in done]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [r["params"][p.key] for r in done]
            low, high = (p.low, p.high) if not p.is_list else (min(p.values), max(p.values))
            if p.kind == "loguniform" or (p.is_list and low > 0 and high >= 10 * low):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter("")  # no labels crowding the decades
        ax.scatter(xs, ys, color="black", s=18)
        if done:
            ax.scatter(xs[:1], ys[:1], color="red", s=30, label="best")  # rows are sorted, best first
        ax.set_xlabel(p.key)
    if ys and min(ys) > 0 and max(ys) > 10 * min(ys):
        axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel(result["objective"])
    if done:
        axes[0][0].legend()
    fig.suptitle(f"{result['experiment']} sweep ({result['direction']})")
    _plot.save_figure(fig, path)
    _plot.close(fig)
