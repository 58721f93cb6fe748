"""``logreg-depth``: Arnold et al. (2021) suppl. B.1 / Fig. B.1, logistic regression vs LR + LinNet.

Tasks: ``theta ~ N(0, I_2)``, ``x ~ N(0, I_2)``, binary labels from the linear boundary
``theta.x = 0`` (the "linear separable data" of Fig. B.1; ``labels=bernoulli`` samples
``y ~ Bernoulli(sigmoid(theta.x))`` instead). Models: LR ``sigmoid(c^T x)`` and LR with 2 or 3
bias-free linear layers (``a^T B x``, ...) of hidden width ``hidden``: the same function class.
MAML with one inner SGD step at the adaptation lr 0.9 and outer SGD at the meta lr of Table D.5
(0.01 for LR, 0.1 for the LinNets). Reports post-adaptation (1 step) accuracy and cross-entropy on
held-out tasks.

Note: at LR's MAML solution (the origin) one inner step gives ``c' = alpha * mean((y - 1/2) x)``,
whose *direction* is already a good classifier, so post-adaptation accuracy does not separate the
models here; the post-adaptation loss does, because the LinNets learn a larger effective step.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..core import MetaLearner
from ..metrics import binary_accuracy
from ..models import linear_chain
from ..schedule import Schedule
from ..tasks import LogisticRegression2D
from . import _plot
from .base import Experiment, Variant

LABELS = {"lr": "LR", "lr-linnet2": "LR+LinNet(2)", "lr-linnet3": "LR+LinNet(3)"}


def logreg_learner(config: dict, model: nn.Module) -> MetaLearner:
    """MAML on ``model`` with this experiment's loss, inner rate and steps (also ``linnet-collapse``'s)."""
    return MetaLearner(model, F.binary_cross_entropy_with_logits, lr=config["inner_lr"],
                       meta_gradient=config["meta_gradient"], schedule=Schedule(config["inner_steps"]),
                       metric_fn=binary_accuracy)


def logreg_family(config: dict) -> LogisticRegression2D:
    return LogisticRegression2D(shots=config["shots"], queries=config["queries"], labels=config["labels"])


def adaptation_summary(res: dict, label: str, *, pre_adapt_loss: bool = False) -> dict:
    """Accuracy and cross-entropy after (and accuracy, optionally loss, before) adaptation of one result."""
    entry = {
        "label": label,
        "post_adapt_accuracy": res["metric"]["mean"], "post_adapt_accuracy_ci95": res["metric"]["ci95"],
        "pre_adapt_accuracy": res["metric"]["by_step"][0],
        "post_adapt_loss": res["loss"]["mean"], "post_adapt_loss_ci95": res["loss"]["ci95"],
    }
    if pre_adapt_loss:
        entry["pre_adapt_loss"] = res["loss"]["by_step"][0]
    return entry | {"diverged_tasks": res["loss"]["diverged"], "eval_tasks": res["tasks"]}


class LogregDepth(Experiment):
    name = "logreg-depth"
    resume_keys = ("train.iterations",)
    description = "Arnold et al. Fig B.1: MAML on 2-D logistic regression, LR vs LR+LinNet(2), LR+LinNet(3)"

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "shots": 5,
            "queries": 10,
            "labels": "separable",
            "hidden": 2,
            "inner_lr": 0.9,
            "inner_steps": 1,
            "meta_gradient": "unrolled",
            "meta_lr": {"lr": 0.01, "linnet": 0.1},
            "train": {
                "iterations": 3000, "meta_batch_size": 16, "optimizer": "sgd", "meta_lr": 0.01,
                "momentum": 0.0, "log_every": 10, "eval_every": 50, "val_tasks": 1000,
                "eval_tasks": 5000, "eval_batch": 5000, "checkpoint_every": 500,
            },
        }

    def quick_config(self) -> dict:
        return {"train.iterations": 800, "train.eval_every": 25, "train.eval_tasks": 2000}

    def variants(self, config):
        h = config["hidden"]

        def build(dims, meta_lr):
            def make():
                learner = logreg_learner(config, linear_chain(dims))
                family = logreg_family(config)
                train = {**config["train"], "seed": config["seed"], "meta_lr": meta_lr}
                return Variant(learner, family, family, train)
            return make

        lrs = config["meta_lr"]
        return {
            "lr": build([2, 1], lrs["lr"]),
            "lr-linnet2": build([2, h, 1], lrs["linnet"]),
            "lr-linnet3": build([2, h, h, 1], lrs["linnet"]),
        }

    def report(self, config, results, out_dir: Path) -> dict:
        summary = {}
        fig, axes = _plot.figure(ncols=2, figsize=(9, 3.5))
        for name, res in results.items():
            summary[name] = adaptation_summary(res, LABELS[name])
            for ax, key in zip(axes, ("val_metric", "val_loss")):
                xs, ys = _plot.val_curve(out_dir / name, key)
                ax.plot(xs, ys, label=LABELS[name])
        axes[0].set_ylabel("post-adaptation accuracy (held-out tasks)")
        axes[1].set_ylabel("post-adaptation cross-entropy")
        for ax in axes:
            ax.set_xlabel("meta-iteration")
            ax.legend()
        fig.suptitle("2-D logistic regression, MAML (1 step)")
        _plot.save_figure(fig, out_dir / "logreg_depth.png")
        _plot.close(fig)
        return summary
