"""Meta-training and evaluation loop with run directories, checkpoints and resume.

A run directory holds::

    config.json      the resolved training config
    metrics.jsonl    one JSON record per logged iteration (train stats, periodic validation)
    metrics.csv      the same records as a table
    checkpoint.pt    learner + optimizer + task-generator state + metrics (written atomically)
    summary.json     held-out evaluation: mean and 95% CI of loss/metric after each inner step

Resuming from ``checkpoint.pt`` continues the same run: on the same machine and seed the final
parameters and metrics are bitwise those of an uninterrupted run. Under ``torchrun`` the ranks
share every meta-batch (:mod:`metagrad.distributed`) and rank 0 alone writes the run directory;
a checkpoint resumes with any number of processes.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from ._errors import first_line, prefixed
from ._io import atomic_open, write_json
from .core import MetaLearner
from .metrics import finite_means, mean_ci95
from .tasks import TaskBatch

#: defaults of every training config; experiments override what they need.
DEFAULT_TRAIN: dict[str, Any] = {
    "iterations": 1000,
    "meta_batch_size": 25,
    "optimizer": "adam",
    "meta_lr": 1e-3,
    "momentum": 0.0,
    "log_every": 10,
    "eval_every": 100,
    "val_tasks": 200,
    "eval_tasks": 1000,
    "eval_batch": 500,
    "checkpoint_every": 200,
    "seed": 0,
}

OPTIMIZERS = ("adam", "sgd")
CHECKPOINT = "checkpoint.pt"


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum) over ``params`` from a training config."""
    name = cfg["optimizer"]
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["meta_lr"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["meta_lr"], momentum=cfg["momentum"])
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


class Stopped(Exception):
    """Training stopped at a safe point, asked by signal ``signum`` (SIGINT, SIGTERM; see
    :func:`stop_on_signals`): the end of meta-iteration ``iteration``, whose checkpoint is written
    in ``run_dir`` (``iteration`` is ``None`` where the fit stopped before it started)."""

    def __init__(self, signum: int, iteration: int | None = None, run_dir: str = ""):
        super().__init__(signum, iteration, run_dir)
        self.signum, self.iteration, self.run_dir = int(signum), iteration, str(run_dir)

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else self.signum
        where = "before it started" if self.iteration is None else f"at meta-iteration {self.iteration} (checkpoint written)"
        return f"stopped by {name} {where} in {self.run_dir}"


class _Flag:
    value = 0


#: the number of the signal that asked training to stop (0: none); a ``--jobs`` worker process
#: shares its parent's (a ``multiprocessing`` value)
_STOP = _Flag()


def request_stop(signum: int = signal.SIGINT) -> None:
    """Ask every :func:`fit` of this process to stop at the end of its current meta-iteration."""
    _STOP.value = int(signum)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """While active (in the main thread): the first of ``signals`` makes training stop at a safe
    point, the end of the current meta-iteration, after writing a checkpoint (:func:`fit` raises
    :class:`Stopped`); a second one stops at once (``KeyboardInterrupt``; the last checkpoint stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _STOP.value:
            raise KeyboardInterrupt
        _STOP.value = signum

    _STOP.value = 0
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.value = 0


def _stop_signal(group) -> int:
    """The signal that asked to stop (0: none); with a process group, that of any rank, so that all stop together."""
    value = int(_STOP.value)
    if group is None:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=distributed._collective_device(group))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(flag.item())


def _validate(cfg: dict) -> dict:
    unknown = set(cfg) - set(DEFAULT_TRAIN)
    if unknown:
        raise ValueError(f"unknown training keys {sorted(unknown)}; valid: {', '.join(DEFAULT_TRAIN)}")
    cfg = {**DEFAULT_TRAIN, **cfg}
    for key in ("iterations", "meta_batch_size", "log_every", "eval_every", "val_tasks", "eval_tasks",
                "eval_batch", "checkpoint_every"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "iterations" else 1):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    if not cfg["meta_lr"] > 0:
        raise ValueError(f"meta_lr must be positive, got {cfg['meta_lr']!r}")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    return cfg


def _draw(family, n: int, gen: torch.Generator, device, group=None) -> TaskBatch:
    """``n`` tasks from ``family``, drawn with the CPU generator ``gen`` (so a seed gives the same
    tasks on every device and every rank), then this rank's share of them
    (:func:`metagrad.distributed.shard`), moved to ``device`` when one is given."""
    batch = distributed.shard(family.sample(n, generator=gen), group)
    return batch if device is None else TaskBatch(*batch).to(device)


def _evaluate(learner: MetaLearner, batch: TaskBatch, group, device, steps: int | None = None) -> dict:
    """``learner.evaluate`` of every task of ``batch`` (drawn whole on every rank): each rank
    adapts to its share and the values are gathered, in task order. A batch with fewer tasks
    than ranks is evaluated whole on every rank."""
    if distributed.world_size(group) > batch.num_tasks:
        group = None
    part = distributed.shard(batch, group)
    out = learner.evaluate(part if device is None else TaskBatch(*part).to(device), steps=steps)
    return distributed.gather_tasks(out, distributed.shard_counts(batch.num_tasks, group), group)


def evaluate_tasks(learner: MetaLearner, family, num_tasks: int, *, seed: int, batch: int = 500,
                   steps: int | None = None, device: str | torch.device | None = None,
                   group=distributed.AUTO, name: str | None = None) -> dict:
    """Evaluate on ``num_tasks`` tasks drawn from ``family`` with a fixed seed.

    ``device``: where the tasks are moved before evaluation (the learner must be there already);
    ``None`` leaves them where ``family`` makes them. ``group``: a process group
    (:mod:`metagrad.distributed`; default: the default group if initialized) whose ranks share
    the tasks of each chunk and gather the results: every rank of it must call this, and every
    rank gets the result one process would compute.

    Returns ``{"loss": {"mean", "ci95", "by_step", "diverged"}, "metric": {...}}`` where the mean
    and CI are after the final inner step, ``by_step`` lists the mean after 0..steps steps and
    ``diverged`` counts tasks whose final value is not finite. The diverged tasks are left out of
    every mean and CI (which are over the other tasks, and ``None``, JSON null, where none is
    left), and a warning naming ``name`` (e.g. the variant) and their count is issued.
    """
    group = distributed.resolve(group)
    gen = torch.Generator().manual_seed(seed)
    chunks: dict[str, list[torch.Tensor]] = {}
    done = 0
    while done < num_tasks:
        n = min(batch, num_tasks - done)
        out = _evaluate(learner, family.sample(n, generator=gen), group, device, steps)
        for k, v in out.items():
            chunks.setdefault(k, []).append(v)
        done += n
    result = {}
    for k, parts in chunks.items():
        values = torch.cat(parts).double().cpu()  # [tasks, steps + 1]
        kept, by_step, _ = finite_means(values)  # the tasks that did not diverge
        mean, ci = mean_ci95(values[kept, -1]) if kept.any() else (None, None)
        result[k] = {"mean": mean, "ci95": ci, "by_step": by_step, "diverged": int((~kept).sum())}
    diverged = result.get("loss", {}).get("diverged", 0)
    if diverged and distributed.is_main(group):
        warnings.warn(f"{name or 'evaluation'}: {diverged} of {num_tasks} evaluation tasks diverged (non-finite "
                      f"query loss after adaptation); means are over the other {num_tasks - diverged}"
                      + ("" if diverged < num_tasks else " (none)") + "; try a smaller inner learning rate",
                      RuntimeWarning, stacklevel=2)
    result["tasks"] = num_tasks
    return result


def _finite_or_none(x: torch.Tensor) -> float | None:
    """A float for JSON, or ``None`` where the value is inf/nan (JSON has no such numbers)."""
    v = x.item()
    return v if torch.isfinite(x) else None


def _records_to_csv(records: list[dict]) -> str:
    columns: list[str] = []
    for r in records:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    with atomic_open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with atomic_open(run_dir / "metrics.csv", "w") as f:
        f.write(_records_to_csv(records))


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary sibling, then rename: a crash leaves the old file intact."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint in ``path``; ``ValueError`` naming it where it is truncated, corrupt or not
    a metagrad checkpoint (what to do: delete it and train again, or restore it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        state = err
    except Exception as err:  # pickle, zip and torch errors of a truncated or foreign file
        state = err
    if isinstance(state, BaseException):
        raise ValueError(f"{path} is truncated or corrupt ({type(state).__name__}: {first_line(state).split('. ')[0][:160]}); delete it "
                         f"to train that variant again from the start, or restore it from a copy") from None
    if not isinstance(state, dict) or not isinstance(state.get("learner"), dict):
        raise ValueError(f"{path} is not a metagrad checkpoint (a {type(state).__name__} without a 'learner' "
                         f"state); remove it, or point at a run folder that `metagrad run` wrote")
    return state


def fit(learner: MetaLearner, train_family, eval_family, cfg: dict, run_dir: str | Path, *,
        resume: bool = False, progress: bool = True, desc: str | None = None,
        device: str | torch.device | None = None, position: int | None = None,
        on_validate: Callable[[dict], None] | None = None, group=distributed.AUTO) -> dict:
    """Meta-train ``learner`` on tasks from ``train_family``; evaluate on ``eval_family``.

    Args:
        learner: the :class:`~metagrad.MetaLearner` to train (modified in place).
        train_family / eval_family: objects with ``sample(n, generator=...) -> TaskBatch``;
            validation during training and the final evaluation use ``eval_family`` with seeds
            derived from ``cfg["seed"]``, so they are fixed held-out tasks.
        cfg: training config (keys of :data:`DEFAULT_TRAIN`; missing keys take the defaults).
        run_dir: output folder (created). Holding a checkpoint already, it is resumed when
            ``resume`` is true and refused otherwise.
        resume: continue from ``run_dir/checkpoint.pt`` (a fresh start if there is none yet).
        device: train there (e.g. ``"cuda"``): the learner is moved to it and every task batch,
            drawn on the CPU from the same seeded generator as without a device, follows it.
            Checkpoints load onto any device, so a run started on one can be resumed on another.
        position: the progress bar's line (``tqdm``'s ``position``), for several fits side by side.
        on_validate: called with each validation record of the training loop (``iteration``,
            ``val_loss`` and, where the learner has a metric, ``val_metric``; ``None`` where not
            finite) once it is logged, e.g. to report it to a hyperparameter search; an exception
            it raises stops training (the last checkpoint stays, for ``resume``). With several
            processes it runs on rank 0, and its exception stops every rank.
        group: a ``torch.distributed`` process group to train data-parallel in (default: the
            default group when ``torchrun`` started this process and it is initialized; ``None``:
            this process alone; see :mod:`metagrad.distributed`). Every rank calls ``fit`` with
            the same config (a rank whose config differs makes every rank raise ``ValueError``),
            draws every meta-batch whole from the same seeded generator and meta-trains on its
            share of the tasks (:meth:`~metagrad.MetaLearner.meta_step`); validation and the final
            evaluation are shared the same way. So the run is that of one process, up to the
            order of floating-point sums. Rank 0 alone reads and writes ``run_dir`` (and shows
            the progress bar), and sends the learner's starting state (the checkpoint's, when
            resuming) to the others, so their folders need not exist and a checkpoint written
            by any number of processes resumes with any other number.

    Returns the summary also written to ``run_dir/summary.json``: :func:`evaluate_tasks`'s on
    ``cfg["eval_tasks"]`` test tasks, ``iterations``, and ``validation``: the last validation
    record (``iteration``, ``loss``, ``metric`` on the ``cfg["val_tasks"]`` validation tasks), the
    number to select hyperparameters on, where the test tasks' numbers are for reporting only.
    """
    group = distributed.resolve(group)
    cfg = distributed.agree(lambda: _validate(dict(cfg)), group, what="training config")
    main = distributed.is_main(group)
    stop = _stop_signal(group)
    if stop:  # asked to stop before this fit began: leave its folder as it is
        raise Stopped(stop, None, str(run_dir))
    if device is not None:
        device = torch.device(device)
        learner.to(device)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT

    def prepare() -> dict | None:
        """Rank 0: the run folder, and the state every rank starts from (``None``: as it is)."""
        if ckpt_path.exists() and not resume:
            raise FileExistsError(f"{run_dir} already holds a checkpoint; resume it or choose another folder")
        state = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
        done = 0 if state is None else state["iteration"]
        if done > cfg["iterations"]:
            raise ValueError(f"{ckpt_path} is at meta-iteration {done}, past the config's {cfg['iterations']}: a run "
                             f"cannot be shortened; train for at least {done} iterations, or start a new run")
        run_dir.mkdir(parents=True, exist_ok=True)
        if done < cfg["iterations"]:  # training (on): until it ends, no summary says the folder is finished
            (run_dir / "summary.json").unlink(missing_ok=True)
        write_json(run_dir / "config.json", cfg)
        _write_metrics(run_dir, [] if state is None else state["metrics"])
        if state is None and group is not None:  # every rank starts from rank 0's parameters
            state = {"learner": {k: v.detach().cpu() for k, v in learner.state_dict().items()}}
        return state

    state = distributed.on_main(prepare, group)
    optimizer = make_optimizer(learner.parameters(), cfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    val_gen = torch.Generator().manual_seed(cfg["seed"] + 10_007)
    val_batch = eval_family.sample(cfg["val_tasks"], generator=val_gen)
    records: list[dict] = []
    start = 0
    if state is not None:
        learner.load_state_dict(state["learner"])
    if state is not None and "iteration" in state:
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        records = state["metrics"]
        start = state["iteration"]

    def validate(iteration: int) -> dict:
        out = _evaluate(learner, val_batch, group, device)
        rec = {"iteration": iteration, "val_loss": _finite_or_none(out["loss"][:, -1].mean())}
        if "metric" in out:
            rec["val_metric"] = _finite_or_none(out["metric"][:, -1].mean())
        return rec

    def log(new: list[dict]) -> None:
        records.extend(new)
        if main and new:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(ckpt_path, {
            "iteration": iteration,
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(),
            "metrics": records,
            "config": cfg,
        })
        _write_metrics(run_dir, records)

    if start == 0:
        log([validate(0)])
    bar = tqdm(range(start, cfg["iterations"]), initial=start, total=cfg["iterations"],
               desc=desc or run_dir.name, disable=not (progress and main), leave=False, dynamic_ncols=True,
               position=position)
    for i in bar:
        it = i + 1
        try:
            stats = learner.meta_step(_draw(train_family, cfg["meta_batch_size"], gen, device, group), optimizer,
                                      group=group)
        except ValueError as err:  # e.g. a diverged inner loop: say which variant and meta-iteration
            raise prefixed(err, f"{desc or run_dir.name}: meta-iteration {it}: ") from err
        new = []
        if it % cfg["log_every"] == 0 or it == cfg["iterations"]:
            new.append({"iteration": it, "meta_objective": stats["meta_objective"].item(),
                        "query_loss": stats["query_loss"].mean().item()})
            bar.set_postfix(query_loss=f"{new[-1]['query_loss']:.4g}", refresh=False)
        if it % cfg["eval_every"] == 0 or it == cfg["iterations"]:
            new.append(validate(it))
        log(new)
        saved = it % cfg["checkpoint_every"] == 0 or it == cfg["iterations"]
        if saved:
            distributed.on_main(lambda: checkpoint(it), group)
        if on_validate is not None:
            for rec in new:
                if "val_loss" in rec:
                    distributed.on_main(lambda: on_validate(rec), group)
        stop = _stop_signal(group)
        if stop:  # SIGINT / SIGTERM: a safe point, with its checkpoint
            if not saved:
                distributed.on_main(lambda: checkpoint(it), group)
            bar.close()
            raise Stopped(stop, it, str(run_dir))
    bar.close()
    if start >= cfg["iterations"]:
        distributed.on_main(lambda: ckpt_path.exists() or checkpoint(cfg["iterations"]), group)
    stop = _stop_signal(group)
    if stop:  # trained to the end (checkpoint written); resuming evaluates it
        raise Stopped(stop, cfg["iterations"], str(run_dir))

    summary = evaluate_tasks(learner, eval_family, cfg["eval_tasks"], seed=cfg["seed"] + 20_011,
                             batch=cfg["eval_batch"], device=device, group=group, name=desc or run_dir.name)
    summary["iterations"] = cfg["iterations"]
    final = next((r for r in reversed(records) if "val_loss" in r), None)  # the last iteration validates
    if final is not None:  # (a rank that resumed without the records has none; rank 0 writes the summary)
        summary["validation"] = {"tasks": cfg["val_tasks"], "iteration": final["iteration"],
                                 **{k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")}}
    if device is not None:
        summary["device"] = str(device)
    distributed.on_main(lambda: write_json(run_dir / "summary.json", summary), group)
    return summary
