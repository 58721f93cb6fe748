"""``linreg-depth``: Arnold et al. (2021) Fig. 1 (left), Shallow ``y = c x`` vs Deep ``y = a b x``.

Tasks: ``theta ~ N(0,1)``, ``x ~ N(0,1)``, ``y ~ N(theta x, 1)`` (section 4.1). Both models meta-train
with MAML (one inner SGD step, adaptation lr 0.1) and an outer SGD with lr 0.01 and momentum 0.9
(suppl. D). The training loss is the paper's half squared error (suppl. eq. 30), under which the
Deep model's MAML minima are ``(+-1/sqrt(alpha), 0)`` and ``(0, +-1/sqrt(alpha))``; the reported
figure is the plain post-adaptation MSE on held-out tasks, whose noise floor is 1 (the label noise
variance). Shallow stays near ``1 + (1 - alpha)^2 = 1.81`` for alpha 0.1 (eq. 10-11).
"""
from __future__ import annotations

from pathlib import Path

from ..core import MetaLearner
from ..metrics import half_mse, mse
from ..models import linear_chain
from ..schedule import Schedule
from ..tasks import LinearRegression1D
from . import _plot
from ._report import validation
from .base import Experiment, Variant


class LinregDepth(Experiment):
    name = "linreg-depth"
    resume_keys = ("train.iterations",)
    sweep_objective = ("deep.val_mse", "minimize")  # validation tasks, not test
    description = "Arnold et al. Fig 1 left: MAML on 1-D linear regression, Shallow (c x) vs Deep (a b x)"

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "shots": 20,
            "queries": 20,
            "inner_lr": 0.1,
            "inner_steps": 1,
            "meta_gradient": "unrolled",
            "train": {
                "iterations": 5000, "meta_batch_size": 10, "optimizer": "sgd", "meta_lr": 0.01,
                "momentum": 0.9, "log_every": 10, "eval_every": 50, "val_tasks": 1000,
                "eval_tasks": 5000, "eval_batch": 5000, "checkpoint_every": 500,
            },
        }

    def quick_config(self) -> dict:
        return {"train.iterations": 1500, "train.eval_every": 25, "train.eval_tasks": 2000}

    def variants(self, config):
        def build(depth):
            def make():
                model = linear_chain([1] * (depth + 1))
                learner = MetaLearner(
                    model, half_mse, lr=config["inner_lr"], meta_gradient=config["meta_gradient"],
                    schedule=Schedule(config["inner_steps"]), metric_fn=mse,
                )
                family = LinearRegression1D(shots=config["shots"], queries=config["queries"])
                return Variant(learner, family, family, {**config["train"], "seed": config["seed"]})
            return make

        return {"shallow": build(1), "deep": build(2)}

    def report(self, config, results, out_dir: Path) -> dict:
        summary = {}
        for name, res in results.items():
            summary[name] = {
                "post_adapt_mse": res["metric"]["mean"],
                "post_adapt_mse_ci95": res["metric"]["ci95"],
                "pre_adapt_mse": res["metric"]["by_step"][0], "val_mse": validation(res, "metric"),
                "diverged_tasks": res["loss"]["diverged"], "eval_tasks": res["tasks"],
            }
        summary["noise_floor_mse"] = 1.0
        summary["shallow_theory_mse"] = 1.0 + (1.0 - config["inner_lr"]) ** 2
        fig, ax = _plot.figure(figsize=(5, 3.5))
        for name, color in (("shallow", "black"), ("deep", "red")):
            xs, ys = _plot.val_curve(out_dir / name, "val_metric")
            ax.plot(xs, ys, color=color, label=name.capitalize())
        ax.axhline(1.0, color="gray", ls=":", label="noise floor")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("post-adaptation MSE (held-out tasks)")
        ax.set_title("1-D linear regression, MAML")
        ax.legend()
        _plot.save_figure(fig, out_dir / "linreg_depth.png")
        _plot.close(fig)
        return summary
