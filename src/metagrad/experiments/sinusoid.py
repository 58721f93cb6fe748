"""``sinusoid``: MAML sinusoid regression of Finn et al. (2017), 5-shot and 10-shot.

A 1-40-40-1 ReLU MLP, one inner SGD step with lr 0.01 at meta-training, meta-batch 25, Adam 1e-3;
evaluation adapts up to 10 steps and reports post-adaptation MSE after each step on held-out
tasks. The paper trains 70,000 meta-iterations; the default here is 10,000 and ``quick`` 1,500.
"""
from __future__ import annotations

from pathlib import Path

from ..core import MetaLearner
from ..metrics import mse
from ..models import MLP
from ..schedule import Schedule
from ..tasks import Sinusoid
from . import _plot
from ._report import validation
from .base import Experiment, Variant


class SinusoidExperiment(Experiment):
    name = "sinusoid"
    resume_keys = ("train.iterations",)
    sweep_objective = ("5-shot.val_mse", "minimize")  # validation tasks, not test
    description = "Finn et al. sinusoid regression: MAML 5-shot vs 10-shot, post-adaptation MSE vs inner steps"

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "shots": [5, 10],
            "queries": 10,
            "hidden": [40, 40],
            "inner_lr": 0.01,
            "train_steps": 1,
            "test_steps": 10,
            "adapt": "all",
            "rule": "sgd",
            "meta_gradient": "unrolled",
            "per_step_loss": False,
            "vectorize": True,
            "train": {
                "iterations": 10000, "meta_batch_size": 25, "optimizer": "adam", "meta_lr": 1e-3,
                "log_every": 50, "eval_every": 250, "val_tasks": 200, "eval_tasks": 1000,
                "eval_batch": 500, "checkpoint_every": 1000,
            },
        }

    def quick_config(self) -> dict:
        return {"train.iterations": 1500, "train.eval_every": 100, "train.eval_tasks": 500}

    def variants(self, config):
        def build(shots):
            def make():
                learner = MetaLearner(
                    MLP(1, config["hidden"], 1), mse, adapt=config["adapt"], rule=config["rule"],
                    lr=config["inner_lr"], meta_gradient=config["meta_gradient"],
                    schedule=Schedule(config["train_steps"], config["test_steps"], per_step_loss=config["per_step_loss"]),
                    metric_fn=mse, vectorize=config["vectorize"],
                )
                family = Sinusoid(shots=shots, queries=config["queries"])
                return Variant(learner, family, family, {**config["train"], "seed": config["seed"]})
            return make

        shots = config["shots"]
        if not isinstance(shots, list) or not shots or any(not isinstance(s, int) or s < 1 for s in shots):
            raise ValueError(f"shots must be a non-empty list of positive integers, got {shots!r}")
        return {f"{s}-shot": build(s) for s in shots}

    def report(self, config, results, out_dir: Path) -> dict:
        summary = {}
        fig, ax = _plot.figure(figsize=(5, 3.5))
        for name, res in results.items():
            curve = res["loss"]["by_step"]
            summary[name] = {
                "post_adapt_mse": res["loss"]["mean"], "post_adapt_mse_ci95": res["loss"]["ci95"],
                "mse_after_train_steps": curve[config["train_steps"]], "mse_by_step": curve,
                "val_mse": validation(res, "loss"),
                "diverged_tasks": res["loss"]["diverged"], "eval_tasks": res["tasks"],
            }
            ax.plot(range(len(curve)), [float("nan") if v is None else v for v in curve], marker="o",
                    label=f"MAML {name}")
        ax.set_xlabel("inner gradient steps at test time")
        ax.set_ylabel("query MSE (held-out tasks)")
        ax.set_yscale("log")
        ax.set_title("Sinusoid regression")
        ax.legend()
        _plot.save_figure(fig, out_dir / "sinusoid.png")
        _plot.close(fig)
        return summary
