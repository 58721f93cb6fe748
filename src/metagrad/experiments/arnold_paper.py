"""The published numbers of Arnold et al. (2021) the ``arnold-*`` experiments compare with:
learning rates (Tables D.6 / D.7), accuracies (Tables 1, 2, 3, B.4), CNN widths (suppl. D).

Lost table cells: in the paper text available here, Table D.7's MAML+MC, MAML+KFO and ANIL+KFO
columns keep only one number each (0.003, 0.003, 0.001); the tables below hold it as Omniglot's
value and ``None`` elsewhere, and :func:`paper_rates` uses that number for every dataset.
Accuracy cells lost the same way (most of Table 1, two of Table 3's MC column) are ``None``; for
MAML on CNN(2) :func:`paper_accuracy` falls back from Table 1 to Table 3, which reports the same
setting.
"""
from __future__ import annotations

from ..data import VISION_DATASETS as DATASETS

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
