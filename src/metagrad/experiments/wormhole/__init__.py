"""Wormhole MAML, the three experiments of its section 4, and what they share.

* :mod:`.threshold`: ``wormhole-threshold``, Avg-Threshold classification (sec. 4.1, Table 1);
* :mod:`.wavelet`: ``wormhole-wavelet``, Mexican-hat wavelet filters (sec. 4.2, Table 1, Fig. 5);
* :mod:`.mnist`: ``wormhole-mnist``, 2-way 1-shot MNIST (sec. 4.3, Table 1).

Each trains vanilla MAML and Wormhole MAML (:class:`~metagrad.learners.Wormhole`) for every
number of inner steps in ``steps``: variants ``<method>-<k>step``.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ...core import MetaLearner
from ...learners import Wormhole
from ...schedule import Schedule
from .. import _plot
from .._report import md_table

LABELS = {"vanilla": "Vanilla MAML", "tanh": "Wormhole tanh"}


def c_phase(config: dict, method: str) -> tuple[int, float]:
    """``(c_steps, c_lr)`` of Wormhole ``method``: ``config["c_phase"][method]`` where that is a
    ``[c_steps, c_lr]`` pair (e.g. what a sweep chose for that form of C: ``--set
    'c_phase.tanh=[5,10]'``), otherwise the shared ``config["c_steps"]``, ``config["c_lr"]``."""
    own = (config.get("c_phase") or {}).get(method)  # runs made before the key have none
    if own is None:
        return config["c_steps"], config["c_lr"]
    if (not isinstance(own, list) or len(own) != 2 or isinstance(own[0], bool) or not isinstance(own[0], int)
            or own[0] < 0 or isinstance(own[1], bool) or not isinstance(own[1], (int, float)) or own[1] < 0):
        raise ValueError(f"c_phase.{method} must be [c_steps, c_lr] (an integer >= 0 and a number >= 0) or null, "
                         f"got {own!r}")
    return own[0], float(own[1])


def learner(base: nn.Module, method: str, steps: int, config: dict, loss_fn, metric_fn, *, layers=None,
            vectorize: bool = True) -> MetaLearner:
    """Vanilla MAML on ``base`` (``method="vanilla"``) or Wormhole MAML with C of form ``method``:
    ``c_steps`` steps on C at ``c_lr`` (:func:`c_phase`; Algorithm 1), then ``steps`` on the weights."""
    if method == "vanilla":
        model, adapt, schedule = base, "all", Schedule(steps)
    else:
        model = Wormhole(base, method, layers=layers)
        adapt = model.model_patterns()
        c_steps, c_lr = c_phase(config, method)
        schedule = model.schedule(steps, c_steps=c_steps, c_lr=c_lr)
    return MetaLearner(model, loss_fn, adapt=adapt, lr=config["inner_lr"], meta_gradient=config["meta_gradient"],
                       schedule=schedule, metric_fn=metric_fn, vectorize=vectorize)


def by_method_and_steps(config: dict, build) -> dict:
    """``{"<method>-<k>step": build(method, k)}`` for every method and step count of ``config``."""
    return {f"{m}-{k}step": build(m, k) for m in config["methods"] for k in config["steps"]}


def train_config(config: dict, iterations: int) -> dict:
    return {**config["train"], "seed": config["seed"], "iterations": iterations}


def split_name(name: str) -> tuple[str, int]:
    """``"tanh-2step"`` -> ``("tanh", 2)``."""
    method, steps = name.rsplit("-", 1)
    return method, int(steps[: -len("step")])


def plot_by_steps(config: dict, names, out_dir: Path, filename: str, *, key: str, per_epoch: int, ylabel: str,
                  labels: dict, width: float = 4.2, transform=None, log: bool = False, title: str | None = None):
    """One panel per step count: each variant's validation curve of ``key`` (``transform``-ed) by epoch."""
    steps = config["steps"]
    fig, axes = _plot.figure(ncols=len(steps), figsize=(width * len(steps), 3.5), squeeze=False)
    for name in names:
        method, k = split_name(name)
        ax = axes[0][steps.index(k)]
        xs, ys = _plot.val_curve(out_dir / name, key)
        ax.plot([x / per_epoch for x in xs], ys if transform is None else [transform(y) for y in ys],
                label=labels.get(method, method))
        ax.set_title(f"{k}-step adaptation")
    for ax in axes[0]:
        if ax.lines:
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            ax.legend()
    if title is not None:
        fig.suptitle(title)
    _plot.save_figure(fig, out_dir / filename)
    _plot.close(fig)


def seeds_table(result: dict, key: str, title: str, *, labels: dict, paper: dict | None = None,
                digits: int = 3) -> list[str]:
    """Table 1's layout over seeds for :meth:`~metagrad.experiments.Experiment.seeds_report`: one
    row per method, one column per step count, each cell the mean +- 95% CI across seeds of the
    variants' ``key`` (and the paper's number in brackets)."""
    agg = result["aggregate"]
    found = {}  # method -> {steps: aggregate}, in the order the summaries list the variants
    for dotted, a in agg.items():
        parts = dotted.split(".")
        if len(parts) == 3 and parts[0] == "variants" and parts[2] == key:
            method, k = split_name(parts[1])
            found.setdefault(method, {})[k] = a
    if not found:
        return []
    steps = sorted({k for by_steps in found.values() for k in by_steps})

    def cell(a, ref):
        text = "diverged" if a["mean"] is None else f"{a['mean']:.{digits}f}"
        if a["ci95"] is not None:
            text += f" +- {a['ci95']:.{digits}f}"
        return text + ("" if ref is None else f" ({ref})")

    n = max(a["n"] for by_steps in found.values() for a in by_steps.values())
    lines = [f"## {title}", "", f"Mean +- 95% CI over {n} seeds" + (" (the paper's Table 1 in brackets)"
                                                                   if paper else "") + ".", ""]
    return lines + md_table(["method", *(f"{k} step" + ("s" if k > 1 else "") for k in steps)],
                            ([labels.get(m, m), *(cell(by_steps[k], (paper or {}).get(m, {}).get(k))
                                                  if k in by_steps else "-" for k in steps)]
                             for m, by_steps in found.items()))


def table(config: dict, header, rows, cells) -> list[str]:
    """A markdown table of ``rows`` (report entries with ``method`` and ``steps``) in config order."""
    ordered = sorted(rows, key=lambda e: (config["methods"].index(e["method"]), e["steps"]))
    return md_table(header, (cells(e) for e in ordered))
