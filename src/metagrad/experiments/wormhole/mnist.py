"""``wormhole-mnist``: Wormhole MAML section 4.3 (2-way 1-shot MNIST) and Table 1."""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from ...data import EpisodeSampler, mnist_splits
from ...metrics import accuracy
from ...models import MNISTNet
from .._report import fmt, validation, write_text
from ..base import Experiment, Variant
from . import LABELS, by_method_and_steps, learner, plot_by_steps, seeds_table, split_name, table, train_config

PAPER_MNIST = {"vanilla": {1: 0.500, 2: 0.463, 5: 0.312}, "tanh": {1: 0.500, 2: 0.141, 5: 0.009}}


def _error(accuracy: float | None) -> float | None:
    """Classification error ``1 - accuracy`` (``None`` where the accuracy is)."""
    return None if accuracy is None else 1 - accuracy


class WormholeMNIST(Experiment):
    """``wormhole-mnist``: Wormhole MAML section 4.3 (2-way 1-shot MNIST) and Table 1.

    Tasks: an :class:`~metagrad.data.EpisodeSampler` over the ten digits, 2-way 1-shot. It draws
    the two digits of a task in random order and labels them 0, 1 in that order, so the same digit
    pair appears with both label orders across tasks (the conflicting-gradient setting of the paper;
    ``tests/test_wormhole.py`` checks it). Model: the paper's net (:class:`~metagrad.models.MNISTNet`,
    two 5x5 conv + ReLU + 2x2 max-pool, two linear layers), cross-entropy; Wormhole adds one
    ``C = tanh(t)`` on the last linear layer only (``head.weight``; C reset to 0.9 per task, not
    meta-learned). Adam at 0.005, task batch 16, adaptation lr 0.01, 1/2/5 steps; meta-test error
    = 1 - accuracy on held-out images after adaptation.

    Choices the paper leaves open (config keys):

    * data (``source``): ``"auto"`` meta-trains on the 60k train split and meta-tests on t10k when
      ``mnist/train-*`` exist under the data root, otherwise (``"t10k-halves"``) it splits the t10k
      file: each digit's images in file order, first half meta-train, second half meta-test. The
      classes are the same ten digits on both sides; only the images are disjoint.
    * ``queries = 5`` query images per class (15 would be usual; 5 keeps CPU cost down).
    * the C phase: ``c_steps = 5`` at ``c_lr = 1.0`` (the values the paper states for sec 4.2).
      The bias of the head is not multiplied by C (``layers="head.weight"``).
    * *epoch*: one pass over the meta-train images in tasks, i.e. ``batches_per_epoch =
      max(1, N_train // (16 * ways * (shots + queries)))`` meta-batches (26 for the t10k halves,
      312 for the full train split) unless ``batches_per_epoch`` is set.
    * ``vectorize = false`` (the per-task loop is faster than vmap for conv nets on CPU).
    * ``quick=true`` is a smoke run, not a reproduction (CPU cost of the paper's net with second-order
      5+5-step inner loops is ~2 s per meta-batch of 16): 40 meta-batches of 8 tasks, a smaller
      net (channels (8, 16), hidden 64; the paper's is (20, 50), 500) and ``c_steps = 2``.

    Measured results: ``results/README.md``, section "Wormhole MAML sec. 4.3 (``wormhole-mnist``)".
    """

    name = "wormhole-mnist"
    description = "Wormhole MAML sec 4.3: 2-way 1-shot MNIST with both label orders, vanilla vs tanh C on the head"

    def default_config(self) -> dict:
        return {
            "quick": False, "seed": 0, "data_root": None, "source": "auto",
            "ways": 2, "shots": 1, "queries": 5, "channels": [20, 50], "hidden": 500,
            "inner_lr": 0.01, "steps": [1, 2, 5], "methods": ["vanilla", "tanh"],
            "c_steps": 5, "c_lr": 1.0, "c_phase": {"tanh": None}, "c_layers": "head.weight",
            "epochs": 100, "batches_per_epoch": None,
            "meta_gradient": "unrolled", "vectorize": False,
            "train": {
                "meta_batch_size": 16, "optimizer": "adam", "meta_lr": 0.005,
                "log_every": 20, "eval_every": 260, "val_tasks": 200, "eval_tasks": 1000,
                "eval_batch": 250, "checkpoint_every": 260,
            },
        }

    def quick_config(self) -> dict:
        return {"epochs": 1, "batches_per_epoch": 40, "channels": [8, 16], "hidden": 64, "c_steps": 2,
                "train.meta_batch_size": 8, "train.eval_every": 10, "train.val_tasks": 40, "train.eval_tasks": 300,
                "train.eval_batch": 100, "train.checkpoint_every": 40}

    def _batches_per_epoch(self, config, n_train: int) -> int:
        if config["batches_per_epoch"] is not None:
            return int(config["batches_per_epoch"])
        per_task = config["ways"] * (config["shots"] + config["queries"])
        return max(1, n_train // (config["train"]["meta_batch_size"] * per_task))

    def variants(self, config):
        cache = {}

        def data():
            if "d" not in cache:
                cache["d"] = mnist_splits(config["data_root"], config["source"])
            return cache["d"]

        def build(method, steps):
            def make():
                _, (tr_x, tr_y), (te_x, te_y) = data()
                base = MNISTNet(config["ways"], channels=tuple(config["channels"]), hidden=config["hidden"])
                meta = learner(base, method, steps, config, F.cross_entropy, accuracy, layers=config["c_layers"],
                               vectorize=config["vectorize"])
                w, k, q = config["ways"], config["shots"], config["queries"]
                train_family = EpisodeSampler(tr_x, tr_y, w, k, q)
                test_family = EpisodeSampler(te_x, te_y, w, k, q)
                iterations = config["epochs"] * self._batches_per_epoch(config, tr_x.shape[0])
                return Variant(meta, train_family, test_family, train_config(config, iterations))
            return make

        return by_method_and_steps(config, build)

    def seeds_report(self, result: dict) -> list[str]:
        return [*seeds_table(result, "error", "Meta-test error (Table 1)", labels=LABELS, paper=PAPER_MNIST), "",
                *seeds_table(result, "error_before_adapt",
                             "Error before the steps on the weights (Wormhole: after its C phase)", labels=LABELS)]

    def report(self, config, results, out_dir: Path) -> dict:
        source, (tr_x, _), (te_x, _) = mnist_splits(config["data_root"], config["source"])
        bpe = self._batches_per_epoch(config, tr_x.shape[0])
        summary = {"source": source, "meta_train_images": int(tr_x.shape[0]), "meta_test_images": int(te_x.shape[0]),
                   "epoch": f"{bpe} meta-batches of {config['train']['meta_batch_size']} tasks",
                   "units": "meta-test classification error (1 - query accuracy after adaptation)", "variants": {}}
        for name, res in results.items():
            method, k = split_name(name)
            summary["variants"][name] = {
                "method": method, "steps": k, "error": _error(res["metric"]["mean"]),
                "error_ci95": res["metric"]["ci95"], "query_ce": res["loss"]["mean"],
                "val_error": _error(validation(res, "metric")),
                "error_before_adapt": _error(res["metric"]["by_step"][0]),
                "paper_error": PAPER_MNIST.get(method, {}).get(k), "diverged_tasks": res["loss"]["diverged"],
                "eval_tasks": res["tasks"],
                "iterations": res["iterations"]}
        plot_by_steps(config, results, out_dir, "wormhole_mnist.png", key="val_metric", per_epoch=bpe,
                      ylabel="meta-test error (held-out images)", labels=LABELS,
                      transform=_error,
                      title=f"2-way 1-shot MNIST ({source}): vanilla MAML vs Wormhole MAML")

        lines = [f"# 2-way 1-shot MNIST (Wormhole MAML sec 4.3, Table 1), {config['epochs']} epochs "
                 f"({bpe} meta-batches each, data: {source})", "",
                 "Meta-test error = 1 - query accuracy after adaptation; paper = Table 1.", ""]
        lines += table(config, ["method", "steps", "error (ours)", "+- 95% CI", "paper", "error before adapt",
                                "query CE"], summary["variants"].values(),
                       lambda e: [LABELS.get(e["method"], e["method"]), e["steps"], fmt(e["error"]),
                                  fmt(e["error_ci95"]), fmt(e["paper_error"]), fmt(e["error_before_adapt"]),
                                  fmt(e["query_ce"])])
        write_text(out_dir / "table.md", "\n".join(lines) + "\n")
        return summary
