"""``omniglot-maml``: 5-way 1-shot and 5-shot MAML on Omniglot with the settings of Finn et al. (2017).

CNN(4) with 64 channels (3x3 conv, BatchNorm without running statistics, ReLU, 2x2 max-pool),
meta-batch 32, inner SGD lr 0.4 with 1 step at meta-training and 3 at test, Adam 1e-3; accuracy
with a 95% confidence interval on 600 test tasks. With the full data (``images_background.zip``
and ``images_evaluation.zip`` under the data root, or ``download=true``) it trains on background
and tests on evaluation characters; with only the ``images_background_small1/2`` subsets it
trains on small1 and tests on small2. The learning curve (``val_metric`` in each variant's
metrics) is measured on a fixed set of tasks from the test characters: it is for plotting only,
no model selection is done on it. Images are 28x28, inverted (strokes 1, background 0).

As in Finn et al.'s code, meta-training tasks have as many query as support images per class
(``train_queries=null``) and the training characters are augmented with rotations by 90, 180 and
270 degrees as new classes (``train_rotations``; the 136 small1 characters become 544 classes).
Test tasks come from unrotated test characters with ``test_queries`` query images per class;
the default (``null``) is Finn et al.'s protocol, as many as the shots (their ``DataGenerator(
update_batch_size * 2)`` serves training and test). BatchNorm normalizes with the current batch's
statistics, so the query-set size changes the accuracy: the old no-rotation 1-shot checkpoint
scored 95.07% with 1 query per class and 94.57% with 15. ``vectorize`` is
off by default: on CPU the per-task loop is about 3x faster than ``vmap`` for this conv net
(vmap's larger temporaries cost page faults: 2.8 s vs 9.1 s per 5-shot meta-step on 2 cores); on
a GPU set ``vectorize=true``.

BatchNorm is Finn et al.'s TensorFlow one by default (``norm="center"``: a learned shift, no scale,
eps 1e-3); ``norm="affine"`` is PyTorch's. ``init``: ``"torch"`` (PyTorch's default) or ``"xavier"``.

Measured results (both norms, seeds 0-2, against Finn et al.'s numbers): ``results/README.md``,
section "Finn et al. MAML on Omniglot (``omniglot-maml``)".
"""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from ..core import MetaLearner
from ..data import EpisodeSampler, Omniglot, omniglot_splits
from ..metrics import accuracy
from ..models import CNN
from ..schedule import Schedule
from . import _plot
from .base import Experiment, Variant

#: the train/test splits with the full data (with only the small subsets: small1/small2)
FULL = ("background", "evaluation")


class OmniglotMAML(Experiment):
    name = "omniglot-maml"
    description = "Finn et al. MAML on Omniglot, 5-way 1-shot and 5-shot, CNN(4), accuracy with 95% CI"
    partial_report = True

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "data_root": None,
            "cache_dir": None,
            "download": False,
            "ways": 5,
            "train_rotations": True,
            "train_queries": None,
            "test_queries": None,
            "layers": 4,
            "channels": 64,
            "downsample": "maxpool",
            "init": "torch",
            "norm": "center",
            "inner_lr": 0.4,
            "train_steps": 1,
            "test_steps": 3,
            "rule": "sgd",
            "meta_gradient": "unrolled",
            "vectorize": False,
            "variants": {
                "5way-1shot": {"shots": 1, "iterations": 5000},
                "5way-5shot": {"shots": 5, "iterations": 3000},
            },
            "train": {
                "meta_batch_size": 32, "optimizer": "adam", "meta_lr": 1e-3,
                "log_every": 10, "eval_every": 250, "val_tasks": 100, "eval_tasks": 600,
                "eval_batch": 100, "checkpoint_every": 250,
            },
        }

    def quick_config(self) -> dict:
        return {
            "variants.5way-1shot.iterations": 60, "variants.5way-5shot.iterations": 40,
            "test_queries": 5, "channels": 32, "train.meta_batch_size": 8, "train.eval_every": 20,
            "train.val_tasks": 50, "train.eval_tasks": 200, "train.checkpoint_every": 20,
        }

    def variants(self, config):
        train_split, test_split = omniglot_splits(config["data_root"], config["download"], FULL)
        datasets: dict[tuple[str, bool], Omniglot] = {}

        def dataset(split, rotations=False):
            if (split, rotations) not in datasets:
                datasets[split, rotations] = Omniglot(config["data_root"], split, download=config["download"],
                                                      rotations=rotations, cache_dir=config["cache_dir"])
            return datasets[split, rotations]

        def build(spec):
            def make():
                ways, shots = config["ways"], spec["shots"]
                train_queries = shots if config["train_queries"] is None else config["train_queries"]
                model = CNN(config["layers"], ways, channels=config["channels"], downsample=config["downsample"],
                            init=config["init"],
                            norm=config.get("norm", "affine"))  # run folders from before the key: affine
                learner = MetaLearner(
                    model, F.cross_entropy, rule=config["rule"], lr=config["inner_lr"],
                    meta_gradient=config["meta_gradient"],
                    schedule=Schedule(config["train_steps"], config["test_steps"]), metric_fn=accuracy,
                    vectorize=config["vectorize"],
                )
                train_ds = dataset(train_split, config["train_rotations"])
                test_ds = dataset(test_split)
                train = EpisodeSampler(train_ds.images, train_ds.labels, ways, shots, train_queries, invert=True)
                test_queries = shots if config["test_queries"] is None else config["test_queries"]
                test = EpisodeSampler(test_ds.images, test_ds.labels, ways, shots, test_queries, invert=True)
                cfg = {**config["train"], "seed": config["seed"], "iterations": spec["iterations"]}
                return Variant(learner, train, test, cfg)
            return make

        return {name: build(spec) for name, spec in config["variants"].items()}

    def report(self, config, results, out_dir: Path) -> dict:
        summary = {"splits": dict(zip(("train", "test"), omniglot_splits(config["data_root"], config["download"], FULL)))}
        fig, ax = _plot.figure(figsize=(5, 3.5))
        for name, res in results.items():
            summary[name] = {
                "accuracy": res["metric"]["mean"], "accuracy_ci95": res["metric"]["ci95"],
                "accuracy_by_step": res["metric"]["by_step"], "diverged_tasks": res["loss"]["diverged"],
                "test_tasks": res["tasks"],
                "iterations": res["iterations"],
            }
            xs, ys = _plot.val_curve(out_dir / name, "val_metric")
            ax.plot(xs, ys, label=name)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(f"accuracy after {config['test_steps']} steps (held-out characters)")
        ax.set_title("Omniglot, MAML")
        ax.legend()
        _plot.save_figure(fig, out_dir / "omniglot_maml.png")
        _plot.close(fig)
        return summary
