"""Arnold et al. (2021) vision experiments: 5-way 5-shot MAML / ANIL with LinNet and meta-optimizers.

Four experiments share this module (one *variant* = one (architecture, method) pair, trained in
its own sub-folder of the run directory):

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
(:data:`ADAPTATION_LR`, :data:`META_LR`); LinNet hidden widths 256-128-64-64.

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
* **Lost table cells**: in the paper text available here, Table D.7's MAML+MC, MAML+KFO and
  ANIL+KFO columns keep only one number each (0.003, 0.003, 0.001); the tables below hold it as
  Omniglot's value and ``None`` elsewhere, and :func:`paper_rates` uses that number for every
  dataset. Accuracy cells lost the same way (most of Table 1, two of Table 3's MC column) are
  ``None`` and the report shows "n/a"; for MAML on CNN(2) Table 1 falls back to Table 3, which
  reports the same setting.

``vectorize`` is off by default (the per-task loop is faster than ``vmap`` for this conv net on CPU;
set ``vectorize=true`` on a GPU). ``adapt_lr.<method>`` / ``meta_lr.<method>`` override the paper's
rates of one method (``None``: the paper's); the table shows the rates used and the paper's.

Observed: ANIL+LinNet on Omniglot at D.7's meta lr 0.003 (adaptation lr 0.5) diverges within 20
meta-iterations here (the query loss reaches 10^2 and accuracy falls to chance, with meta-batches
of 4 or 16, with widths 256-128-64-64 or 256-128); at 0.001 it trains. The full config keeps the
paper's 0.003; ``quick`` uses 0.001 (``meta_lr.anil-linnet=0.001``).

Measured on the real Omniglot subsets (small1 -> small2), seed 0, at 1,000 meta-iterations (the
10,000 of the defaults need about 25 CPU hours for Table 3): ``results/`` in the repository holds
the run folders and the tables beside the paper's. Every ANIL comparison points the paper's way
(LinNet, Meta-SGD, Meta-Curvature and Meta-KFO each beat ANIL by 5-8 points). With MAML the
meta-optimizers, which start as plain gradient descent, trail it at 1,000 iterations; continued
to 1,500 and 2,000, Meta-KFO is the best MAML variant, as in the paper, but by under 2 points
(the paper: 30 over a far weaker MAML, 66.6 against our 83-87). Table 1: LinNet helps CNN(2)
(+4.6 points) and CNN(3) (+1.7), is level on CNN(4) (-0.3; the paper's Omniglot cell: -0.4) and
costs 2.9 on CNN(6), where the paper has no gain either. Fig. 4: Meta-KFO's gain over MAML
shrinks from CNN(3) on (+4.3, +2.4, +0.35 on CNN(3), (4), (6)), as in the paper; on CNN(2) it has
not caught up with MAML at 1,000 iterations.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_open
from ..core import MetaLearner
from ..learners import PAPER_VISION_WIDTHS, LinNet, TNet
from ..metrics import accuracy
from ..models import CNN
from ..rules import MetaCurvature, MetaKFO, MetaSGD, SGD
from ..schedule import Schedule
from . import _plot
from .base import Experiment, Variant

DATASETS = ("omniglot", "cifar-fs", "mini-imagenet")

#: Table D.6: adaptation (inner) learning rates, CNN(2), 5-way 5-shot.
ADAPTATION_LR: dict[str, dict[str, float | None]] = {
    "omniglot": {"maml": 0.08, "maml-linnet": 0.05, "maml-msgd": 0.5, "maml-mc": 0.5, "maml-kfo": 0.1,
                 "anil": 0.5, "anil-linnet": 0.5, "anil-msgd": 0.05, "anil-mc": 0.05, "anil-kfo": 0.1},
    "cifar-fs": {"maml": 0.07, "maml-linnet": 0.01, "maml-msgd": 0.7, "maml-mc": 0.7, "maml-kfo": 0.1,
                 "anil": 0.5, "anil-linnet": 0.5, "anil-msgd": 0.1, "anil-mc": 0.1, "anil-kfo": 0.1},
    "mini-imagenet": {"maml": 0.001, "maml-linnet": 0.001, "maml-msgd": 0.1, "maml-mc": 0.05, "maml-kfo": 0.001,
                      "anil": 0.5, "anil-linnet": 0.5, "anil-msgd": 0.1, "anil-mc": 0.1, "anil-kfo": 0.1},
}

#: Table D.7: meta (outer, Adam) learning rates, CNN(2). ``None``: the cell is lost in the text
#: (its column keeps one number, held here as Omniglot's; see the module docstring).
META_LR: dict[str, dict[str, float | None]] = {
    "omniglot": {"maml": 0.003, "maml-linnet": 0.003, "maml-msgd": 0.0005, "maml-mc": 0.003, "maml-kfo": 0.003,
                 "anil": 0.001, "anil-linnet": 0.003, "anil-msgd": 0.001, "anil-mc": 0.001, "anil-kfo": 0.001},
    "cifar-fs": {"maml": 0.003, "maml-linnet": 0.003, "maml-msgd": 0.001, "maml-mc": None, "maml-kfo": None,
                 "anil": 0.002, "anil-linnet": 0.001, "anil-msgd": 0.001, "anil-mc": 0.001, "anil-kfo": None},
    "mini-imagenet": {"maml": 0.0005, "maml-linnet": 0.0005, "maml-msgd": 0.001, "maml-mc": None,
                      "maml-kfo": None, "anil": 0.001, "anil-linnet": 0.001, "anil-msgd": 0.001,
                      "anil-mc": 0.001, "anil-kfo": None},
}

#: Table 1: accuracy (%) of MAML and MAML w/ LinNet by number of conv layers. The text available
#: here keeps CIFAR-FS's row and the CNN(4) LinNet column (98.1 / 74.4 / 64.9); lost cells are None.
PAPER_TABLE1: dict[str, dict[str, dict[int, float | None]]] = {
    "omniglot": {"maml": {2: None, 3: None, 4: None, 6: None}, "maml-linnet": {2: None, 3: None, 4: 98.1, 6: None}},
    "cifar-fs": {"maml": {2: 62.2, 3: 68.9, 4: 70.9, 6: 71.3}, "maml-linnet": {2: 66.1, 3: 71.1, 4: 74.4, 6: 71.9}},
    "mini-imagenet": {"maml": {2: None, 3: None, 4: None, 6: None},
                      "maml-linnet": {2: None, 3: None, 4: 64.9, 6: None}},
}

#: Table 2: ANIL on CNN(2) without / with LinNet.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "omniglot": {"anil": 91.00, "anil-linnet": 93.02},
    "cifar-fs": {"anil": 66.10, "anil-linnet": 67.55},
    "mini-imagenet": {"anil": 56.42, "anil-linnet": 56.64},
}

#: Table 3: MAML and meta-optimizers on CNN(2). The MC column keeps one number (68.37), held as
#: Omniglot's.
PAPER_TABLE3: dict[str, dict[str, float | None]] = {
    "omniglot": {"maml": 66.6, "maml-msgd": 74.07, "maml-mc": 68.37, "maml-tnets": 92.27, "maml-kfo": 96.62},
    "cifar-fs": {"maml": 62.2, "maml-msgd": 62.82, "maml-mc": None, "maml-tnets": 66.42, "maml-kfo": 69.64},
    "mini-imagenet": {"maml": 52.6, "maml-msgd": 59.90, "maml-mc": None, "maml-tnets": 58.47, "maml-kfo": 59.08},
}

#: Table B.4: ANIL and meta-optimizers on CNN(2).
PAPER_TABLE_B4: dict[str, dict[str, float]] = {
    "omniglot": {"anil": 91.00, "anil-msgd": 92.47, "anil-mc": 92.67, "anil-kfo": 94.40},
    "cifar-fs": {"anil": 66.10, "anil-msgd": 67.55, "anil-mc": 67.43, "anil-kfo": 68.81},
    "mini-imagenet": {"anil": 56.42, "anil-msgd": 57.45, "anil-mc": 59.07, "anil-kfo": 62.65},
}

#: CNN channels of suppl. D.
PAPER_CHANNELS = {"omniglot": 32, "cifar-fs": 32, "mini-imagenet": 64}

METHODS = ("maml", "maml-linnet", "maml-msgd", "maml-mc", "maml-tnets", "maml-kfo",
           "anil", "anil-linnet", "anil-msgd", "anil-mc", "anil-kfo")
LABELS = {"maml": "MAML", "maml-linnet": "MAML+LinNet", "maml-msgd": "MAML+Meta-SGD", "maml-mc": "MAML+MC",
          "maml-tnets": "MAML+T-Nets", "maml-kfo": "MAML+Meta-KFO", "anil": "ANIL", "anil-linnet": "ANIL+LinNet",
          "anil-msgd": "ANIL+Meta-SGD", "anil-mc": "ANIL+MC", "anil-kfo": "ANIL+Meta-KFO"}


def _rate_key(method: str) -> str:
    return "maml" if method == "maml-tnets" else method  # no T-Nets column in D.6/D.7: MAML's rates


def paper_rates(dataset: str, method: str) -> tuple[float, float]:
    """(adaptation lr, meta lr) of ``method`` from Tables D.6/D.7 (lost D.7 cells: the column's
    surviving number; T-Nets: MAML's rates)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    key = _rate_key(method)
    meta = META_LR[dataset][key]
    if meta is None:
        meta = META_LR["omniglot"][key]
    return ADAPTATION_LR[dataset][key], meta


def rates(config: dict, method: str) -> tuple[float, float]:
    """(adaptation lr, meta lr) of ``method``: the paper's unless ``config`` overrides them."""
    adapt_lr, meta_lr = paper_rates(config["dataset"], method)
    a, m = config["adapt_lr"].get(method), config["meta_lr"].get(method)
    return (adapt_lr if a is None else a), (meta_lr if m is None else m)


def paper_accuracy(dataset: str, method: str, k: int, prefer: tuple[str, ...] = ()) -> tuple[float | None, str]:
    """The paper's accuracy (%) for ``method`` on CNN(k) and the table it comes from ('' if none)."""
    tables = [("Table 1", lambda: PAPER_TABLE1[dataset].get(method, {}).get(k)),
              ("Table 2", lambda: PAPER_TABLE2[dataset].get(method) if k == 2 else None),
              ("Table 3", lambda: PAPER_TABLE3[dataset].get(method) if k == 2 else None),
              ("Table B.4", lambda: PAPER_TABLE_B4[dataset].get(method) if k == 2 else None)]
    tables.sort(key=lambda t: t[0] not in prefer)
    for name, get in tables:
        value = get()
        if value is not None:
            return value, name
    return None, ""


# ---------------------------------------------------------------------------------- models
def _algorithm(method: str) -> tuple[str, str]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    algo, _, mod = method.partition("-")
    return algo, mod


def build_model(method: str, k: int, config: dict) -> nn.Module:
    """The model of ``method`` on CNN(k): a plain CNN, a LinNet over a widened-head CNN or a TNet."""
    _, mod = _algorithm(method)
    ways = config["ways"]
    kw = _cnn_options(config)
    if mod == "linnet":
        widths = list(config["linnet_widths"])
        if not widths:
            return LinNet(CNN(k, ways, **kw), ways, (), ways)
        return LinNet(CNN(k, widths[0], **kw), widths[0], widths[1:], ways)
    cnn = CNN(k, ways, **kw)
    return TNet(cnn) if mod == "tnets" else cnn


def _cnn_options(config: dict) -> dict:
    """CNN keyword arguments of a config: channels (the paper's by default), input shape, init."""
    return dict(channels=config["channels"] or PAPER_CHANNELS[config["dataset"]], init=config.get("init", "torch"),
                **_input_shape(config["dataset"]))


def base_cnn(k: int, config: dict) -> CNN:
    """The plain CNN(k) every variant's adapted model reduces to."""
    return CNN(k, config["ways"], **_cnn_options(config))


def adapted_model(model: nn.Module) -> nn.Module:
    """The plain CNN that ``model`` computes: a LinNet's chain collapsed and multiplied into the
    CNN's head (``W = W_L ... W_1 W_head``, ``b = W_L ... W_1 b_head``), a TNet's transforms absorbed,
    any other model copied. Detached copies; the result has the base CNN's parameters."""
    if isinstance(model, TNet):
        return model.absorb()
    if isinstance(model, LinNet):
        base = copy.deepcopy(model.base)
        m = model.collapsed_weight().detach()  # [ways, head_out]
        head = base.head
        new = nn.Linear(head.in_features, m.shape[0], dtype=m.dtype, device=m.device)
        with torch.no_grad():
            new.weight.copy_(m @ head.weight)
            new.bias.copy_(m @ head.bias)
        base.head = new
        base.ways = m.shape[0]
        return base
    return copy.deepcopy(model)


def _adapt_spec(method: str, model: nn.Module):
    algo, mod = _algorithm(method)
    if algo == "maml":
        return model.base_parameter_patterns() if isinstance(model, TNet) else "all"
    if mod == "tnets":
        raise ValueError("T-Nets is not run with ANIL (Arnold et al., suppl. B.5: not compatible)")
    return ["base.head", "linear"] if isinstance(model, LinNet) else "head"


def _rule(method: str, lr: float, config: dict):
    _, mod = _algorithm(method)
    if mod == "msgd":
        return MetaSGD(lr)
    if mod == "mc":
        return MetaCurvature(lr)
    if mod == "kfo":
        kfo = config["kfo"]
        return MetaKFO(lr, hidden_layers=kfo["hidden_layers"], nonlinearity=kfo["nonlinearity"],
                       adapt_state=kfo["adapt_state"])
    return SGD(lr)


def build_learner(method: str, k: int, config: dict) -> tuple[MetaLearner, float]:
    """``(learner, meta lr)`` of one variant."""
    adapt_lr, meta_lr = rates(config, method)
    model = build_model(method, k, config)
    learner = MetaLearner(model, F.cross_entropy, adapt=_adapt_spec(method, model), rule=_rule(method, adapt_lr, config),
                          meta_gradient=config["meta_gradient"],
                          schedule=Schedule(config["train_steps"], config["test_steps"]), metric_fn=accuracy,
                          vectorize=config["vectorize"])
    return learner, meta_lr


# ---------------------------------------------------------------------------------- data
def _input_shape(dataset: str) -> dict:
    if dataset == "omniglot":
        return {"in_channels": 1, "image_size": 28}
    if dataset in ("cifar-fs", "mini-imagenet"):
        return {"in_channels": 3, "image_size": 32}
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def omniglot_splits(root, download: bool) -> tuple[str, str]:
    """(train, test) Omniglot splits: maml-train/maml-test with the full data, else small1/small2."""
    from ..data.download import resolve_root

    folder = resolve_root(root) / "omniglot"
    if download or ((folder / "images_background.zip").exists() and (folder / "images_evaluation.zip").exists()):
        return "maml-train", "maml-test"
    if (folder / "images_background_small1.zip").exists() and (folder / "images_background_small2.zip").exists():
        return "small1", "small2"
    raise FileNotFoundError(
        f"no Omniglot data under {folder}: need images_background.zip + images_evaluation.zip (or the "
        f"small1/small2 subsets); pass --set download=true to fetch the full data, or point "
        f"--set data_root=DIR / METAGRAD_DATA at a folder holding omniglot/"
    )


def downsample(images: torch.Tensor, size: int = 32, chunk: int = 1000) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]`` (antialiased bilinear), in chunks."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp_(0, 255).to(torch.uint8)
    return out


def _load_split(config: dict, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data import CIFARFS, MiniImageNet, Omniglot

    ds, root, cache, dl = config["dataset"], config["data_root"], config["cache_dir"], config["download"]
    if ds == "omniglot":
        split = omniglot_splits(root, dl)[which == "test"]
        d = Omniglot(root, split, download=dl, cache_dir=cache)
        return d.images, d.labels
    if ds == "cifar-fs":
        d = CIFARFS(root, which, download=dl, cache_dir=cache)
        return d.images, d.labels
    if ds == "mini-imagenet":
        d = MiniImageNet(root, which, download=dl, cache_dir=cache)
        return downsample(d.images, 32), d.labels
    raise ValueError(f"unknown dataset {ds!r}; valid: {', '.join(DATASETS)}")


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
        shared = {key: v for key, v in config.items() if key not in own}
        return shared | {"method": method, "conv_layers": k, "rates": list(rates(config, method))}

    def _split(self, config, which):
        key = (config["dataset"], config["data_root"], config["cache_dir"], config["download"], which)
        if key not in self._data:
            self._data[key] = _load_split(config, which)
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

        from ..data import EpisodeSampler

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
        comparisons = [_compare(rows[a], rows[b]) | {"baseline": a, "variant": b} for a, b in self._pairs(config)]
        summary = {
            "dataset": config["dataset"],
            "splits": self._splits_used(config),
            "variants": rows,
            "comparisons": comparisons,
        }
        summary.update(self._extra(config, rows))
        with atomic_open(out_dir / "table.md", "w") as f:
            f.write(self._markdown(config, rows, comparisons, summary))
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
                 f"on {t['eval_tasks']} test tasks ({summary['splits']['test']} split), mean +- 95% CI.", "",
                 "| variant | CNN layers | adapt lr | meta lr | ours (%) | paper (%) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in rows.values():
            paper = "n/a" if r["paper_accuracy"] is None else f"{r['paper_accuracy']:.2f} ({r['paper_source']})"
            pa, pm = r["paper_rates"]
            alr = f"{r['adapt_lr']:g}" + ("" if r["adapt_lr"] == pa else f" (paper {pa:g})")
            mlr = f"{r['meta_lr']:g}" + ("" if r["meta_lr"] == pm else f" (paper {pm:g})")
            lines.append(f"| {r['label']} | {r['conv_layers']} | {alr} | {mlr} | "
                         f"{_fmt(r['accuracy'], r['accuracy_ci95'])} | {paper} |")
        if comparisons:
            lines += ["", "| comparison | CNN layers | ours: gain (pts) | paper: gain (pts) | same direction as paper? |",
                      "| --- | --- | --- | --- | --- |"]
            for c in comparisons:
                ours = "n/a" if c["gain"] is None else f"{c['gain']:+.2f} +- {c['gain_ci95']:.2f}"
                paper = "n/a" if c["paper_gain"] is None else f"{c['paper_gain']:+.2f}"
                lines.append(f"| {rows[c['variant']]['label']} vs {rows[c['baseline']]['label']} | "
                             f"{rows[c['variant']]['conv_layers']} | {ours} | {paper} | {c['agrees']} |")
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


def _fmt(mean, ci) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.2f} +- {ci:.2f}" if ci is not None else f"{mean:.2f}"


def _compare(base: dict, other: dict) -> dict:
    """Gain of ``other`` over ``base`` (points), its 95% CI (independent test tasks) and whether its
    sign matches the paper's gain."""
    if base["accuracy"] is None or other["accuracy"] is None:
        gain = ci = None
    else:
        gain = other["accuracy"] - base["accuracy"]
        ci = math.hypot(base["accuracy_ci95"] or 0.0, other["accuracy_ci95"] or 0.0)
    pb, po = base["paper_accuracy"], other["paper_accuracy"]
    paper_gain = None if pb is None or po is None else po - pb
    if gain is None or paper_gain is None:
        agrees = "n/a"
    elif (gain > 0) == (paper_gain > 0) and gain != 0:
        agrees = "yes" if abs(gain) > ci else "yes*"
    else:
        agrees = "no" if abs(gain) > ci else "no (within CI)"
    return {"gain": gain, "gain_ci95": ci, "paper_gain": paper_gain, "agrees": agrees}


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


class ArnoldDepth(_ArnoldVision):
    name = "arnold-depth"
    description = "Arnold et al. Fig. 4: Meta-KFO's gain over MAML vs number of conv layers, 5-way 5-shot"
    methods = ("maml", "maml-kfo")
    architectures = (2, 3, 4, 6)
    quick_architectures = (2, 4)
    plot_name = "depth.png"

    def _extra(self, config, rows) -> dict:
        gains = {}
        for k in config["architectures"]:
            a, b = rows.get(f"maml-cnn{k}"), rows.get(f"maml-kfo-cnn{k}")
            if a is None or b is None or a["accuracy"] is None or b["accuracy"] is None:
                continue
            gains[k] = {"gain": b["accuracy"] - a["accuracy"],
                        "gain_ci95": math.hypot(a["accuracy_ci95"] or 0.0, b["accuracy_ci95"] or 0.0)}
        ks = sorted(gains)
        shrinks = None if len(ks) < 2 else gains[ks[0]]["gain"] > gains[ks[-1]]["gain"]
        return {"kfo_gain_by_depth": {str(k): v for k, v in gains.items()},
                "gain_shrinks_with_depth": shrinks,
                "paper_gain_shrinks_with_depth": True}

    def _extra_markdown(self, summary) -> list[str]:
        shrinks = summary["gain_shrinks_with_depth"]
        if shrinks is None:
            ours = "n/a (fewer than two depths)"
        else:
            ours = f"**{'yes' if shrinks else 'no'}** ({'same as' if shrinks else 'unlike'} the paper)"
        return ["", "Fig. 4 gives no numbers; its finding is that Meta-KFO's gain over MAML shrinks as conv layers "
                f"are added. Ours, gain at the fewest layers > gain at the most layers: {ours}."]

    def _plot(self, config, rows, summary, path: Path) -> None:
        fig, axes = _plot.figure(ncols=2, figsize=(9, 3.6))
        ks = sorted(config["architectures"])
        for method, marker in (("maml", "o"), ("maml-kfo", "s")):
            pts = [(k, rows[f"{method}-cnn{k}"]) for k in ks]
            pts = [(k, r) for k, r in pts if r["accuracy"] is not None]
            axes[0].errorbar([k for k, _ in pts], [r["accuracy"] for _, r in pts],
                             yerr=[r["accuracy_ci95"] or 0 for _, r in pts], marker=marker, capsize=3,
                             label=LABELS[method])
        axes[0].set_xlabel("conv layers")
        axes[0].set_ylabel("test accuracy after adaptation (%)")
        axes[0].legend()
        g = summary["kfo_gain_by_depth"]
        gk = sorted(int(k) for k in g)
        axes[1].errorbar(gk, [g[str(k)]["gain"] for k in gk], yerr=[g[str(k)]["gain_ci95"] for k in gk],
                         marker="o", capsize=3, color="C2")
        axes[1].axhline(0, color="grey", lw=1)
        axes[1].set_xlabel("conv layers")
        axes[1].set_ylabel("Meta-KFO gain over MAML (points)")
        for ax in axes:
            ax.set_xticks(ks)
        fig.suptitle(f"{self.name} ({config['dataset']}, {config['ways']}-way {config['shots']}-shot)")
        _plot.save_figure(fig, path)
        _plot.close(fig)


EXPERIMENT_CLASSES = (ArnoldTable1, ArnoldTable2, ArnoldTable3, ArnoldDepth)
