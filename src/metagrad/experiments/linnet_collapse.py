"""``linnet-collapse``: Arnold et al. (2021) suppl. B.3 / Fig. B.3, linear layers cannot be collapsed.

The ``logreg-depth`` setting (suppl. B.1): tasks from :class:`~metagrad.tasks.LogisticRegression2D`,
binary cross-entropy on logits, MAML with one inner SGD step at the adaptation lr 0.9, outer SGD at
meta lr 0.01 (LR) and 0.1 (LR + LinNet). After meta-training, the LinNet's bias-free linear layers
are multiplied into one (:meth:`~metagrad.learners.LinNet.collapse`): the collapsed model computes
the same function, but adapted as a plain LR (same inner lr, all its parameters) it adapts like LR,
not like the LinNet. Three models are evaluated on the same held-out tasks after one inner step:

* ``lr``: LR ``c^T x``, meta-trained;
* ``lr-linnet``: LR + LinNet ``W_L ... W_1 x``, meta-trained;
* ``lr-linnet-collapsed``: the trained ``lr-linnet`` collapsed, then adapted (no training).

As noted in ``logreg_depth``, post-adaptation *accuracy* barely separates the models in this setup
(one step from the origin already points the right way); the post-adaptation *loss* does. Both are
reported. The collapsed model's pre-adaptation loss equals the LinNet's (same function), which the
summary records as a check.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core import MetaLearner
from ..learners import LinNet
from ..models import linear_chain
from ..train import evaluate_tasks
from . import _plot
from .base import Experiment, Variant, trained_variant
from .logreg_depth import LogregDepth, adaptation_summary, logreg_family, logreg_learner

LABELS = {"lr": "LR", "lr-linnet": "LR+LinNet", "lr-linnet-collapsed": "LR+LinNet collapsed"}


class LinnetCollapse(Experiment):
    name = "linnet-collapse"
    resume_keys = ("train.iterations",)
    description = "Arnold et al. Fig B.3: LR vs LR+LinNet vs the LinNet collapsed to LR before adaptation"

    def default_config(self) -> dict:
        """The ``logreg-depth`` setting (same tasks, rates and training), with LinNet ``widths``."""
        config = LogregDepth().default_config()
        del config["hidden"]
        config["widths"] = [2]
        return config

    def quick_config(self) -> dict:
        return {"train.iterations": 600, "train.eval_every": 50, "train.val_tasks": 500, "train.eval_tasks": 2000}

    def variants(self, config):
        def build(model_fn, meta_lr):
            def make():
                train = {**config["train"], "seed": config["seed"], "meta_lr": meta_lr}
                family = logreg_family(config)
                return Variant(logreg_learner(config, model_fn()), family, family, train)
            return make

        lrs = config["meta_lr"]
        return {
            "lr": build(lambda: linear_chain([2, 1]), lrs["lr"]),
            "lr-linnet": build(lambda: LinNet(nn.Identity(), 2, list(config["widths"]), 1), lrs["linnet"]),
        }

    def collapsed_learner(self, config, out_dir: Path) -> MetaLearner:
        """The trained ``lr-linnet`` variant (from its checkpoint), collapsed, as a plain-LR learner."""
        variant, _ = trained_variant(self, config, out_dir, "lr-linnet")
        return logreg_learner(config, variant.learner.model.collapse())

    def report(self, config, results, out_dir: Path) -> dict:
        train = config["train"]
        # the same held-out tasks as fit()'s final evaluation of the trained variants
        collapsed = evaluate_tasks(self.collapsed_learner(config, out_dir), logreg_family(config),
                                   train["eval_tasks"], seed=config["seed"] + 20_011, batch=train["eval_batch"])
        results = {**results, "lr-linnet-collapsed": collapsed}
        summary = {}
        for name, res in results.items():
            summary[name] = adaptation_summary(res, LABELS[name], pre_adapt_loss=True)
        summary["collapse_same_function_pre_adapt_loss_gap"] = abs(
            summary["lr-linnet"]["pre_adapt_loss"] - summary["lr-linnet-collapsed"]["pre_adapt_loss"])
        self._plot(summary, out_dir)
        return summary

    @staticmethod
    def _plot(summary, out_dir: Path) -> None:
        names = list(LABELS)
        colors = ["black", "red", "green"]
        fig, axes = _plot.figure(ncols=2, figsize=(10, 3.8))
        for ax, key, ylabel in ((axes[0], "post_adapt_accuracy", "post-adaptation accuracy"),
                                (axes[1], "post_adapt_loss", "post-adaptation cross-entropy")):
            vals = [summary[n][key] for n in names]
            errs = [summary[n][key + "_ci95"] for n in names]
            ax.bar(range(3), vals, yerr=errs, color=colors, capsize=4)
            pre = [summary[n][key.replace("post", "pre")] for n in names]
            ax.scatter(range(3), pre, marker="_", s=300, color="gray", zorder=3)
            ax.set_xticks(range(3), [LABELS[n] for n in names], rotation=12)
            ax.set_ylabel(ylabel + " (held-out)")
        fig.subplots_adjust(wspace=0.3)
        axes[0].set_ylim(0.4, 1.0)
        fig.suptitle("2-D logistic regression, MAML 1 step: collapsing the LinNet before adaptation\n"
                     "(bars: after 1 step, 95% CI; gray ticks: before adaptation)", y=1.06)
        _plot.save_figure(fig, out_dir / "linnet_collapse.png")
        _plot.close(fig)
