"""Arnold et al. (2021) vision experiments: 5-way 5-shot MAML / ANIL with LinNet and meta-optimizers.

Four experiments share this module's config, variants and report (one *variant* = one
(architecture, method) pair, trained in its own sub-folder of the run directory); the paper's
numbers are in :mod:`.arnold_paper`, the learners are built in :mod:`.arnold_learners`, and
``arnold-depth`` adds its gain-by-depth report in :mod:`.arnold_depth`:

* ``arnold-table1``: MAML vs MAML+LinNet on CNN(2, 3, 4, 6) (Table 1);
* ``arnold-table2``: ANIL vs ANIL+LinNet on CNN(2) (Table 2);
* ``arnold-table3``: on CNN(2), MAML, +Meta-SGD, +Meta-Curvature, +T-Nets, +Meta-KFO (Table 3) and
  ANIL, +Meta-SGD, +Meta-Curvature, +Meta-KFO (Table B.4);
* ``arnold-depth``: Meta-KFO's gain over MAML against the number of conv layers (Fig. 4 / B.4).

Each writes ``table.md`` (our post-adaptation accuracy with a 95% CI over test tasks beside the
paper's number for the same dataset, and whether each comparison points the same way as the
paper's), a PNG and ``summary.json``.

Settings from the paper (section 5, suppl. D): 5-way 5-shot; CNN of Finn et al. (3x3 conv,
BatchNorm, ReLU, 2x2 max-pool) with 32 channels on Omniglot and CIFAR-FS, 64 on mini-ImageNet
(downsampled from 84x84 to 32x32, antialiased bilinear, once at load); Adam with default betas;
meta-batches of 16 tasks; adaptation and meta learning rates from Tables D.6 / D.7
(:data:`.arnold_paper.ADAPTATION_LR`, :data:`.arnold_paper.META_LR`); LinNet hidden widths 256-128-64-64.

Data (``dataset``): ``"omniglot"`` (28x28, inverted: strokes 1). With the full data
(``images_background.zip`` + ``images_evaluation.zip``, or ``download=true``) meta-training uses the
learn2learn-style 1100-character ``maml-train`` split and testing the 423-character ``maml-test``
split of :class:`~metagrad.data.Omniglot` (the paper used learn2learn's benchmarks); with only the
``images_background_small1/2`` subsets it trains on small1 and tests on small2. ``"cifar-fs"``
(:class:`~metagrad.data.CIFARFS`, train -> test, 32x32 RGB) and ``"mini-imagenet"``
(:class:`~metagrad.data.MiniImageNet`, train -> test) run when the data is under ``data_root``.
The validation curve in each variant's metrics is measured on fixed test-split tasks, for
plotting only: no model selection.

Where the paper is silent, this module chooses (all configurable):

* **LinNet on a CNN** (``maml-linnet``, ``anil-linnet``): the CNN's linear head is factorized into
  a chain of linear layers, ``features -> 256 -> 128 -> 64 -> 64 -> ways``: the head of the CNN
  becomes ``Linear(feature_dim, 256)`` (with its bias) and :class:`~metagrad.learners.LinNet`
  appends bias-free layers ``256 -> 128 -> 64 -> 64 -> ways`` to that output. This is how LR+LinNet
  extends logistic regression (suppl. D: "the added linear network consists of 256-128-64-64
  hidden units"); the composition collapses into one ``Linear(feature_dim, ways)``
  (:func:`adapted_model`), i.e. exactly the base CNN(k), so the adapted model has the base CNN's
  size, as section 2 says. (Section 5.2 speaks of "adding two linear layers"; set
  ``linnet_widths=[64]`` for a two-layer chain.)
* **ANIL + LinNet**: ANIL adapts the head; with LinNet the head *is* the whole linear chain (it
  collapses into ANIL's head), so the inner loop adapts the widened head and every appended
  layer. Adapting only the last appended layer would leave nothing above the adapted weights
  to shape their gradient, which is the mechanism LinNet is meant to add.
* **T-Nets**: :class:`~metagrad.learners.TNet` (a meta-learned transform after every conv and
  linear layer, identity at init; base parameters adapt). Tables D.6/D.7 have no T-Nets column:
  we use MAML's rates. T-Nets with ANIL is not run (the paper: "not compatible with ANIL").
* **Meta-KFO**: ``kfo`` config, default one hidden Kronecker layer with ReLU (the residual form
  of :class:`~metagrad.rules.MetaKFO`, identity at init: eq. 26 calls ``f`` a nonlinear network)
  and ``adapt_state=true`` (Algorithm 1); with one inner step the state adaptation is a no-op.
* **Inner steps**: 1 at meta-training and 1 at test (``train_steps``/``test_steps``), as in the
  learn2learn vision examples the paper builds on.
* **Query sets**: ``queries=5`` per class at meta-training (learn2learn splits ``2 * shots``
  images per class), ``test_queries=15`` at test; ``eval_tasks=1000`` test tasks.
* **Iterations**: ``iterations=10000`` meta-iterations per variant (not stated in the paper;
  learn2learn's examples use 60,000).
* **Architectures other than CNN(2)**: Tables D.6/D.7 are "for the two-layer CNN experiments";
  CNN(3), CNN(4), CNN(6) use the same rates as CNN(2).
* **Lost table cells** of the paper text available here: see :mod:`.arnold_paper`; the report
  shows "n/a" for a lost accuracy.

**The paper's CNN.** The paper's code builds on learn2learn, whose Omniglot network
(``l2l.vision.models.OmniglotCNN``, like Finn et al.'s Omniglot network) has stride-2 convolutions
instead of max-pooling and averages the last feature map over positions before the linear head
(so CNN(2)'s head sees 32 features, ours 32 x 7 x 7), BatchNorm scales initialized uniform in [0, 1)
and a standard-normal head. ``downsample="stride"``, ``pool="mean"``, ``init="l2l"`` select that
network; the defaults (``"maxpool"``, ``"flatten"``, ``"torch"``) are the network of our stored
tables. learn2learn's BatchNorm tracks running statistics, but neither its examples nor the
authors' released code (github.com/Sha-Lab/kfo) calls ``model.eval()``: they normalize with batch
statistics at test time too, as ours always does. See ``results/README.md``, "Why our MAML on
CNN(2) beats the paper's 66.6".

``vectorize`` is off by default (the per-task loop is faster than ``vmap`` for this conv net on CPU;
set ``vectorize=true`` on a GPU). ``adapt_lr.<method>`` / ``meta_lr.<method>`` override the paper's
rates of one method (``None``: the paper's); the table shows the rates used and the paper's.

Observed: ANIL+LinNet on Omniglot at D.7's meta lr 0.003 (adaptation lr 0.5) diverges within 20
meta-iterations here (the query loss reaches 10^2 and accuracy falls to chance, with meta-batches
of 4 or 16, with widths 256-128-64-64 or 256-128); at 0.001 it trains. The full config keeps the
paper's 0.003; ``quick`` uses 0.001 (``meta_lr.anil-linnet=0.001``).

Measured results (Omniglot, 1,000-2,000 meta-iterations, against the paper): ``results/README.md``
(the Arnold et al. sections) and the run folders ``results/arnold-*``.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..data import EpisodeSampler, load_meta_split, omniglot_splits
from ..learners import PAPER_VISION_WIDTHS
from . import _plot
from ._report import compare, fmt_ci, md_table, write_text
from .arnold_learners import CNN_SHAPE, _algorithm, build_learner
from .arnold_paper import DATASETS, LABELS, paper_accuracy, paper_rates, rates
from .base import Experiment, Variant


# ---------------------------------------------------------------------------------- experiments
class _ArnoldVision(Experiment):
    """Shared config, variants and report; subclasses set the name, methods and architectures."""

    methods: tuple[str, ...] = ()
    resume_keys = ("train.iterations",)
    architectures: tuple[int, ...] = (2,)
    quick_methods: tuple[str, ...] | None = None
    quick_architectures: tuple[int, ...] | None = None
    tables: tuple[str, ...] = ()  # the paper tables preferred for the "paper" column
    plot_name: str = ""

    def __init__(self):
        self._data: dict = {}

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "dataset": "omniglot",
            "data_root": None,
            "cache_dir": None,
            "download": False,
            "ways": 5,
            "shots": 5,
            "queries": 5,
            "test_queries": 15,
            "channels": None,  # None: the paper's (32 Omniglot / CIFAR-FS, 64 mini-ImageNet)
            # CNN init: "torch", or "xavier" as in learn2learn's CNN4, on which the paper built
            "init": "torch",
            # CNN shape (module docstring, "The paper's CNN"): ours "maxpool" + "flatten"; learn2learn's
            # OmniglotCNN is downsample=stride, pool=mean, init=l2l
            **CNN_SHAPE,
            "architectures": list(self.architectures),
            "methods": list(self.methods),
            "linnet_widths": list(PAPER_VISION_WIDTHS),
            "kfo": {"hidden_layers": 1, "nonlinearity": "relu", "adapt_state": True},
            # per-method overrides of Tables D.6 / D.7 (None: the paper's rate), e.g. meta_lr.anil-linnet=0.001
            "adapt_lr": {m: None for m in self.methods},
            "meta_lr": {m: None for m in self.methods},
            "train_steps": 1,
            "test_steps": 1,
            "meta_gradient": "unrolled",
            "vectorize": False,
            "train": {
                "iterations": 10000, "meta_batch_size": 16, "optimizer": "adam", "log_every": 10,
                "eval_every": 500, "val_tasks": 100, "eval_tasks": 1000, "eval_batch": 100,
                "checkpoint_every": 500,
            },
        }

    def quick_config(self) -> dict:
        q = {"channels": 16, "test_queries": 5, "train.iterations": 40, "train.meta_batch_size": 4,
             "train.eval_every": 20, "train.val_tasks": 20, "train.eval_tasks": 100,
             "train.checkpoint_every": 40}
        if "anil-linnet" in self.methods:
            # D.7's 0.003 diverged within 20 meta-iterations here (module docstring); quick shows the method works
            q["meta_lr.anil-linnet"] = 0.001
        if self.quick_methods is not None:
            q["methods"] = list(self.quick_methods)
        if self.quick_architectures is not None:
            q["architectures"] = list(self.quick_architectures)
        return q

    # ------------------------------------------------------------------ variants
    def variant_specs(self, config) -> dict[str, tuple[str, int]]:
        """``{variant name: (method, conv layers)}``, validated."""
        if config["dataset"] not in DATASETS:
            raise ValueError(f"unknown dataset {config['dataset']!r}; valid: {', '.join(DATASETS)}")
        specs = {}
        for k in config["architectures"]:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"architectures must be positive conv-layer counts, got {k!r}")
            for method in config["methods"]:
                algo, mod = _algorithm(method)
                if method not in config["adapt_lr"] or method not in config["meta_lr"]:
                    raise ValueError(f"method {method!r} is not one of this experiment's: {', '.join(self.methods)}")
                if algo == "anil" and mod == "tnets":
                    raise ValueError("anil-tnets is not a method (T-Nets is not compatible with ANIL)")
                specs[f"{method}-cnn{k}"] = (method, k)
        if not specs:
            raise ValueError("no variants: methods and architectures must be non-empty")
        return specs

    def variant_config(self, config, name) -> dict:
        """Method, conv layers and rates of variant ``name``, and the config keys every variant
        shares; not the experiment's other methods and architectures, so that a variant trained in
        one of these experiments merges into another's run (``metagrad merge``)."""
        method, k = self.variant_specs(config)[name]
        own = ("only", "experiment", "methods", "architectures", "adapt_lr", "meta_lr")
        shared = CNN_SHAPE | {key: v for key, v in config.items() if key not in own}  # runs from before the keys
        return shared | {"method": method, "conv_layers": k, "rates": list(rates(config, method))}

    def _split(self, config, which):
        key = (config["dataset"], config["data_root"], config["cache_dir"], config["download"], which)
        if key not in self._data:
            self._data[key] = load_meta_split(config["dataset"], which, root=config["data_root"],
                                              cache_dir=config["cache_dir"], download=config["download"])
        return self._data[key]

    def variants(self, config):
        def build(method, k):
            def make():
                learner, meta_lr = build_learner(method, k, config)
                invert = config["dataset"] == "omniglot"
                ways, shots = config["ways"], config["shots"]
                train = EpisodeSampler(*self._split(config, "train"), ways, shots, config["queries"], invert=invert)
                test = EpisodeSampler(*self._split(config, "test"), ways, shots, config["test_queries"], invert=invert)
                cfg = {**config["train"], "seed": config["seed"], "meta_lr": meta_lr}
                return Variant(learner, train, test, cfg)
            return make

        return {name: build(method, k) for name, (method, k) in self.variant_specs(config).items()}

    # ------------------------------------------------------------------ report
    def _rows(self, config, results) -> dict:
        rows = {}
        for name, (method, k) in self.variant_specs(config).items():
            res = results[name]
            mean, ci = res["metric"]["mean"], res["metric"]["ci95"]
            paper, source = paper_accuracy(config["dataset"], method, k, self.tables)
            adapt_lr, meta_lr = rates(config, method)
            rows[name] = {
                "method": method, "label": LABELS[method], "conv_layers": k,
                "accuracy": None if mean is None else 100 * mean,
                "accuracy_ci95": None if ci is None or math.isnan(ci) else 100 * ci,
                "accuracy_by_step": [None if v is None else 100 * v for v in res["metric"]["by_step"]],
                "paper_accuracy": paper, "paper_source": source,
                "adapt_lr": adapt_lr, "meta_lr": meta_lr,
                "paper_rates": list(paper_rates(config["dataset"], method)),
                "test_tasks": res["tasks"], "iterations": res["iterations"],
                "diverged": res["metric"]["diverged"],
            }
        return rows

    def _pairs(self, config) -> list[tuple[str, str]]:
        """(baseline variant, variant) pairs compared in the table."""
        specs = self.variant_specs(config)
        pairs = []
        for name, (method, k) in specs.items():
            algo, mod = _algorithm(method)
            base = f"{algo}-cnn{k}"
            if mod and base in specs:
                pairs.append((base, name))
        return pairs

    def report(self, config, results, out_dir: Path) -> dict:
        rows = self._rows(config, results)
        comparisons = [compare(rows[a], rows[b]) | {"baseline": a, "variant": b} for a, b in self._pairs(config)]
        summary = {
            "dataset": config["dataset"],
            "splits": self._splits_used(config),
            "variants": rows,
            "comparisons": comparisons,
        }
        summary.update(self._extra(config, rows))
        write_text(out_dir / "table.md", self._markdown(config, rows, comparisons, summary))
        self._plot(config, rows, summary, out_dir / self.plot_name)
        return summary

    def _splits_used(self, config) -> dict:
        if config["dataset"] == "omniglot":
            return dict(zip(("train", "test"), omniglot_splits(config["data_root"], config["download"])))
        return {"train": "train", "test": "test"}

    def _extra(self, config, rows) -> dict:
        return {}

    def _markdown(self, config, rows, comparisons, summary) -> str:
        t = config["train"]
        lines = [f"# {self.name}: {self.description}", "",
                 f"{config['dataset']}, {config['ways']}-way {config['shots']}-shot, "
                 f"{t['iterations']} meta-iterations x {t['meta_batch_size']} tasks, "
                 f"{config['train_steps']} inner step(s) (test: {config['test_steps']}); accuracy after adaptation "
                 f"on {t['eval_tasks']} test tasks ({summary['splits']['test']} split), mean +- 95% CI.", ""]
        lines += md_table(["variant", "CNN layers", "adapt lr", "meta lr", "ours (%)", "paper (%)"],
                          map(_variant_cells, rows.values()), rule=" --- ")
        if comparisons:
            lines += ["", *md_table(["comparison", "CNN layers", "ours: gain (pts)", "paper: gain (pts)",
                                     "same direction as paper?"],
                                    (_comparison_cells(rows, c) for c in comparisons), rule=" --- ")]
        lines += self._extra_markdown(summary)
        lines += ["", "Paper numbers: Arnold et al. (2021), Tables 1-3 and B.4 (n/a: not given, or lost in the "
                  "paper text this project holds). 'same direction' compares the signs of the gains; 'yes*' "
                  "means ours is within its 95% CI of zero."]
        return "\n".join(lines) + "\n"

    def _extra_markdown(self, summary) -> list[str]:
        return []

    def _plot(self, config, rows, summary, path: Path) -> None:
        fig, ax = _plot.figure(figsize=(max(5, 0.9 * len(rows) + 2), 3.8))
        xs = range(len(rows))
        ours = [r["accuracy"] or 0.0 for r in rows.values()]
        err = [r["accuracy_ci95"] or 0.0 for r in rows.values()]
        paper = [r["paper_accuracy"] for r in rows.values()]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, yerr=err, capsize=3, label="ours")
        ax.bar([x + 0.2 for x, p in zip(xs, paper) if p is not None], [p for p in paper if p is not None], 0.4,
               label="paper")
        ax.axhline(100 / config["ways"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{r['label']}\nCNN({r['conv_layers']})" for r in rows.values()], fontsize=7)
        ax.set_ylabel("test accuracy after adaptation (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{self.name} ({config['dataset']}, {config['ways']}-way {config['shots']}-shot)")
        ax.legend(fontsize=7)
        _plot.save_figure(fig, path)
        _plot.close(fig)


def _variant_cells(r: dict) -> list[str]:
    paper = "n/a" if r["paper_accuracy"] is None else f"{r['paper_accuracy']:.2f} ({r['paper_source']})"
    pa, pm = r["paper_rates"]
    alr = f"{r['adapt_lr']:g}" + ("" if r["adapt_lr"] == pa else f" (paper {pa:g})")
    mlr = f"{r['meta_lr']:g}" + ("" if r["meta_lr"] == pm else f" (paper {pm:g})")
    return [r["label"], r["conv_layers"], alr, mlr, fmt_ci(r["accuracy"], r["accuracy_ci95"]), paper]


def _comparison_cells(rows: dict, c: dict) -> list[str]:
    ours = "n/a" if c["gain"] is None else f"{c['gain']:+.2f} +- {c['gain_ci95']:.2f}"
    paper = "n/a" if c["paper_gain"] is None else f"{c['paper_gain']:+.2f}"
    return [f"{rows[c['variant']]['label']} vs {rows[c['baseline']]['label']}", rows[c["variant"]]["conv_layers"],
            ours, paper, c["agrees"]]


class ArnoldTable1(_ArnoldVision):
    name = "arnold-table1"
    description = "Arnold et al. Table 1: MAML vs MAML+LinNet on CNN(2, 3, 4, 6), 5-way 5-shot"
    methods = ("maml", "maml-linnet")
    architectures = (2, 3, 4, 6)
    quick_architectures = (2,)
    tables = ("Table 1",)
    plot_name = "table1.png"


class ArnoldTable2(_ArnoldVision):
    name = "arnold-table2"
    description = "Arnold et al. Table 2: ANIL vs ANIL+LinNet on CNN(2), 5-way 5-shot"
    methods = ("anil", "anil-linnet")
    tables = ("Table 2",)
    plot_name = "table2.png"


class ArnoldTable3(_ArnoldVision):
    name = "arnold-table3"
    description = ("Arnold et al. Table 3 + B.4: MAML/ANIL with Meta-SGD, Meta-Curvature, T-Nets, Meta-KFO "
                   "on CNN(2), 5-way 5-shot")
    methods = ("maml", "maml-msgd", "maml-mc", "maml-tnets", "maml-kfo", "anil", "anil-msgd", "anil-mc", "anil-kfo")
    quick_methods = ("maml", "maml-kfo", "anil")
    tables = ("Table 3", "Table B.4")
    plot_name = "table3.png"
