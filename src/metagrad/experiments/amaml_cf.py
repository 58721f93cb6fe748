"""``amaml-cf``: A-MAML (Li et al.) section 5.3, few-shot collaborative filtering, Tables 1 and 2.

Data (:mod:`metagrad.data.ratings`, :mod:`metagrad.tasks.ratings`): ``dataset`` is ``"jester"``
(Jester-1), ``"movielens-100k"`` or ``"movielens-1m"``, or a list of them; files under
``data_root`` (default: ``$METAGRAD_DATA``), fetched with ``download=true``. A task is one user:
input the one-hot encoding of an item (the ``top_items`` = 100 most-rated items, users with at
least ``min_ratings`` = 20 of them), target its rating. ``test_tasks`` (100) users are held out per
shot setting, drawn from ``split_seed`` among the users with at least ``shots + queries`` ratings;
the others are meta-training users. Meta-training tasks: ``shots`` support and ``queries`` query
ratings (15shot-20val and 20shot-30val), users with fewer re-drawn. Ratings are used raw
(``standardize=false``): the paper gives their ranges and no scaling; ``standardize=true`` maps
them with the meta-training users' mean and standard deviation (nRMSE is unchanged by the map;
the training dynamics are not).

Model and training (section 5.3, with section 5.1's settings where 5.3 is silent): an
``items``-40-40-1 tanh MLP, inner plain GD with lr 0.01 on the MSE, meta-batch 5, Adam 1e-3,
5,000 meta-iterations. Two step settings (the two tables): ``long_steps`` 50 / 100 for FOMAML,
Reptile and iMAML (lambda = 1, 5 CG steps; section 5.1), A-MAML with ``T = 0.01 * long_steps`` =
0.5 / 1.0 (dopri5 forward, modified-Euler adjoint), MAML with ``maml_steps`` 5 / 10. Methods are
defined as in ``amaml-regression`` (``method_defs``, by registered meta-gradient).

Test (the tables): from each learned initialization, every held-out user is trained by plain GD
(lr 0.01) on ``shots`` of its ratings and **all** its other ratings are evaluated, after the
method's own number of steps (A-MAML and the long methods 50 / 100, MAML 5 / 10, as the tables'
captions say) and at every step of ``eval_steps``. nRMSE of a task = RMSE of its evaluated
ratings / their population standard deviation (:func:`metagrad.metrics.nrmse`, as in Fig. 2). The
report gives the mean and 95% CI over the 100 test users, the RMSE in rating units, and a paired
test (t-test and Wilcoxon signed-rank over the 100 users) of A-MAML against each other method.

``quick=true``: Jester-1, 15shot-20val, 50 steps (MAML 5), 300 meta-iterations at Adam 1e-2,
about 1 minute on 2 cores with ``--jobs 2``.

Measured results (Jester-1 at the paper's settings): ``results/amaml-cf/README.md``.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..core import MetaLearner
from ..data.ratings import Jester, MovieLens
from ..gradients import make_meta_gradient
from ..metrics import mean_ci95, mse, nrmse
from ..models import MLP
from ..schedule import Schedule
from ..tasks.ratings import UserTasks, split_users, user_matrix
from . import _plot
from ._report import finite_columns, md_table, write_text
from .amaml_regression import LABELS, AmamlRegression, check_available
from .base import Variant, trained_variant

#: Predictors that learn nothing from meta-training, reported beside the methods for scale.
REFERENCES = {"support-mean": "the user's support mean", "item-means": "item means of the training users",
              "biases": "support mean + item offsets"}

DATASETS = {"jester": "Jester-1", "movielens-100k": "MovieLens100K", "movielens-1m": "MovieLens1M"}

#: The paper's Tables 1 (50 steps) and 2 (100 steps): mean and std of nRMSE over 100 tasks, by
#: (steps, dataset, shots). The tables' headers say "10shot-15val" where the text says
#: 15shot-20val; the text's setting is the one run here.
PAPER = {
    50: {
        "jester": {15: {"a-maml": (0.074, 0.005), "imaml": (0.114, 0.007), "maml": (0.120, 0.001),
                        "fomaml": (0.292, 0.012), "reptile": (0.270, 0.012)},
                   20: {"a-maml": (0.027, 0.002), "imaml": (0.050, 0.003), "maml": (0.036, 0.000),
                        "fomaml": (0.115, 0.004), "reptile": (0.106, 0.004)}},
        "movielens-100k": {15: {"a-maml": (0.053, 0.005), "imaml": (0.082, 0.004), "maml": (0.123, 0.001),
                                "fomaml": (0.174, 0.008), "reptile": (0.166, 0.008)},
                           20: {"a-maml": (0.023, 0.003), "imaml": (0.033, 0.002), "maml": (0.050, 0.003),
                                "fomaml": (0.068, 0.004), "reptile": (0.063, 0.003)}},
        "movielens-1m": {15: {"a-maml": (0.094, 0.008), "imaml": (0.138, 0.010), "maml": (0.140, 0.002),
                              "fomaml": (0.270, 0.011), "reptile": (0.266, 0.011)},
                         20: {"a-maml": (0.035, 0.004), "imaml": (0.052, 0.004), "maml": (0.059, 0.001),
                              "fomaml": (0.104, 0.006), "reptile": (0.101, 0.006)}},
    },
    100: {
        "jester": {15: {"a-maml": (0.069, 0.005), "imaml": (0.190, 0.010), "maml": (0.154, 0.001),
                        "fomaml": (0.273, 0.012), "reptile": (0.290, 0.012)},
                   20: {"a-maml": (0.044, 0.003), "imaml": (0.103, 0.005), "maml": (0.061, 0.002),
                        "fomaml": (0.077, 0.004), "reptile": (0.100, 0.004)}},
        "movielens-100k": {15: {"a-maml": (0.057, 0.006), "imaml": (0.168, 0.007), "maml": (0.123, 0.001),
                                "fomaml": (0.191, 0.007), "reptile": (0.171, 0.008)},
                           20: {"a-maml": (0.021, 0.002), "imaml": (0.046, 0.002), "maml": (0.050, 0.002),
                                "fomaml": (0.071, 0.004), "reptile": (0.066, 0.004)}},
        "movielens-1m": {15: {"a-maml": (0.105, 0.009), "imaml": (0.130, 0.007), "maml": (0.197, 0.002),
                              "fomaml": (0.395, 0.010), "reptile": (0.408, 0.011)},
                         20: {"a-maml": (0.035, 0.004), "imaml": (0.045, 0.004), "maml": (0.083, 0.001),
                              "fomaml": (0.119, 0.005), "reptile": (0.128, 0.006)}},
    },
}


@functools.lru_cache(maxsize=4)
def load_ratings(dataset: str, data_root, download: bool):
    """The reader of ``dataset`` (cached per process)."""
    if dataset == "jester":
        return Jester(data_root, download=download)
    if dataset in ("movielens-100k", "movielens-1m"):
        return MovieLens(data_root, dataset.split("-")[1], download=download)
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def paired_tests(ours, other) -> dict:
    """Paired comparison over tasks of two per-task error vectors: mean difference
    (``other - ours``), two-sided p-values of the paired t-test and the Wilcoxon signed-rank test."""
    from scipy import stats

    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].numpy(), b[ok].numpy()
    diff = b - a
    if len(diff) < 2 or not diff.any():
        return {"mean_diff": float(diff.mean()) if len(diff) else None, "p_t": None, "p_wilcoxon": None, "n": len(diff)}
    return {"mean_diff": float(diff.mean()), "p_t": float(stats.ttest_rel(b, a).pvalue),
            "p_wilcoxon": float(stats.wilcoxon(b, a).pvalue), "n": int(len(diff))}


class AmamlCF(AmamlRegression):
    """Inherits ``amaml-regression``'s method plumbing, ``resume_keys`` and partial reports."""

    name = "amaml-cf"
    description = "A-MAML Tables 1-2: few-shot rating prediction (Jester-1, MovieLens) from each method's initialization"

    def default_config(self) -> dict:
        regression = super().default_config()
        return {
            "quick": False,
            "seed": 0,
            "dataset": "jester",
            "data_root": None,
            "download": False,
            "shots": [15, 20],
            "queries": [20, 30],
            "long_steps": [50, 100],  # the two tables: FOMAML / Reptile / iMAML steps, A-MAML T/h
            "maml_steps": [5, 10],
            "top_items": 100,
            "min_ratings": 20,
            "test_tasks": 100,
            "split_seed": 0,
            "standardize": False,
            "hidden": [40, 40],
            "inner_lr": 0.01,
            "methods": ["a-maml", "imaml", "maml", "fomaml", "reptile"],
            "method_defs": {m: regression["method_defs"][m] for m in ("a-maml", "imaml", "maml", "fomaml", "reptile")},
            "eval_steps": [0, 1, 2, 5, 10, 20, 50, 100],
            "eval_chunk": 20,
            "vectorize": True,
            "train": {**regression["train"], "eval_tasks": 100},
        }

    def quick_config(self) -> dict:
        return {"dataset": "jester", "shots": [15], "queries": [20], "long_steps": [50], "maml_steps": [5],
                "train.iterations": 300, "train.meta_lr": 1e-2, "train.eval_every": 100,
                "train.checkpoint_every": 100}

    # ------------------------------------------------------------------
    @staticmethod
    def datasets(config: dict) -> list[str]:
        names = config["dataset"]
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names:
            raise ValueError(f"dataset must be a name or a non-empty list of names, got {config['dataset']!r}")
        for d in names:
            if d not in DATASETS:
                raise ValueError(f"unknown dataset {d!r}; valid: {', '.join(DATASETS)}")
        return names

    def _validate(self, config: dict) -> None:
        self.datasets(config)
        self._check_settings(config, ("shots", "queries", "long_steps", "maml_steps"))
        if len(config["shots"]) != len(config["queries"]) or len(config["long_steps"]) != len(config["maml_steps"]):
            raise ValueError(f"shots and queries, long_steps and maml_steps must have the same lengths, got "
                             f"{config['shots']}, {config['queries']}, {config['long_steps']}, {config['maml_steps']}")

    def panels(self, config: dict) -> list[tuple[str, str, int, int, int, int]]:
        """``(panel name, dataset, shots, queries, long_steps, maml_steps)``, table by table."""
        return [(f"{d}-{s}shot-{long}steps", d, s, q, long, maml)
                for long, maml in zip(config["long_steps"], config["maml_steps"])
                for d in self.datasets(config)
                for s, q in zip(config["shots"], config["queries"])]

    def families(self, config: dict, dataset: str, shots: int, queries: int) -> tuple[UserTasks, UserTasks]:
        """(meta-training users' tasks, held-out users' tasks) of one dataset and shot setting."""
        data = load_ratings(dataset, config["data_root"], config["download"])
        matrix, _, _ = user_matrix(data.index, data.ratings, data.num_users, data.num_items,
                                   top_items=config["top_items"], min_ratings=config["min_ratings"])
        train, test = split_users(matrix, config["test_tasks"], min_ratings=shots + queries, seed=config["split_seed"])
        mean, std = 0.0, 1.0
        if config["standardize"]:
            seen = matrix[train][~matrix[train].isnan()].double()
            mean, std = seen.mean().item(), seen.std().item()
        return (UserTasks(matrix[train], shots, queries, mean, std), UserTasks(matrix[test], shots, queries, mean, std))

    def variants(self, config):
        self._validate(config)
        for _, _, _, _, long, maml in self.panels(config):
            for m in config["methods"]:
                mg, _, options = self.method_setup(config, m, long, maml)
                check_available(m, mg, options)

        def build(dataset, shots, queries, long, maml, method):
            def make():
                mg, steps, options = self.method_setup(config, method, long, maml)
                train_family, test_family = self.families(config, dataset, shots, queries)
                learner = MetaLearner(
                    MLP(train_family.num_items, config["hidden"], 1, activation="tanh"), mse, lr=config["inner_lr"],
                    meta_gradient=make_meta_gradient(mg, **options), schedule=Schedule(steps, long),
                    metric_fn=nrmse, vectorize=config["vectorize"])
                return Variant(learner, train_family, test_family, {**config["train"], "seed": config["seed"]})
            return make

        return {f"{panel}-{m}": build(d, s, q, long, maml, m)
                for panel, d, s, q, long, maml in self.panels(config) for m in config["methods"]}

    def variant_config(self, config, name) -> dict:
        """Dataset, shot and step settings and method definition of variant ``name``, and the keys
        every variant shares (so one-setting runs merge into a run of all of them)."""
        own = ("only", "experiment", "dataset", "shots", "queries", "long_steps", "maml_steps", "methods", "method_defs")
        shared = {key: v for key, v in config.items() if key not in own}
        for panel, d, s, q, long, maml in self.panels(config):
            for m in config["methods"]:
                if name == f"{panel}-{m}":
                    return shared | {"dataset": d, "shots": s, "queries": q, "long_steps": long, "maml_steps": maml,
                                     "method": m, "method_def": config["method_defs"][m]}
        raise KeyError(f"{name!r} is not a variant of this config")

    # ------------------------------------------------------------------
    @staticmethod
    def test_errors(learner: MetaLearner, family: UserTasks, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per test user, nRMSE and RMSE (rating units) ``[users, steps + 1]`` of all its
        evaluated ratings after ``0 .. steps`` GD steps from the learned initialization."""
        batches, _ = family.evaluation_tasks(seed)
        metric, loss = [], []
        for batch in batches:
            out = learner.evaluate(batch, steps=steps)
            metric.append(out["metric"])
            loss.append(out["loss"])
        return torch.cat(metric).double(), torch.cat(loss).double().sqrt() * family.std

    @staticmethod
    def reference_errors(train: UserTasks, test: UserTasks, seed: int) -> dict[str, torch.Tensor]:
        """Per test user nRMSE of two predictors that learn nothing from meta-training, for scale:
        ``"support-mean"`` (every item rated the mean of the user's support ratings) and
        ``"item-means"`` (each item rated its mean over the meta-training users) and ``"biases"``
        (the user's support mean plus the item's offset from its support items' mean item mean)."""
        item_means = ((torch.nanmean(train.matrix, 0) - test.mean) / test.std).to(test.dtype)
        out = {name: [] for name in REFERENCES}
        for batch in test.evaluation_tasks(seed)[0]:
            user = batch.support_y.mean(1, keepdim=True)
            items = (batch.query_x @ item_means).unsqueeze(-1)
            offsets = items - (batch.support_x @ item_means).mean(1)[:, None, None]
            for name, pred in (("support-mean", user.expand_as(batch.query_y)), ("item-means", items),
                               ("biases", user + offsets)):
                out[name].append(torch.stack([nrmse(p, y) for p, y in zip(pred, batch.query_y)]))
        return {k: torch.cat(v).double() for k, v in out.items()}

    def report(self, config, results, out_dir: Path) -> dict:
        out_dir = Path(out_dir)
        grid = config["eval_steps"]
        summary: dict = {"eval_steps": grid, "panels": {}}
        for panel, dataset, shots, queries, long, maml in self.panels(config):
            methods = [m for m in config["methods"] if f"{panel}-{m}" in results]
            if not methods:
                continue
            rows, per_task = {}, {}
            for m in methods:
                variant, _ = trained_variant(self, config, out_dir, f"{panel}-{m}")
                mg, steps, options = self.method_setup(config, m, long, maml)
                values, rmse = self.test_errors(variant.learner, variant.eval_family, max(grid + [steps]),
                                                config["split_seed"])
                per_task[m] = values[:, steps]
                stats = finite_columns(values, f"{self.name}:{panel}-{m}", column=steps)  # diverged users left out
                kept = stats["kept"]
                mean, ci = mean_ci95(values[kept, steps]) if kept.any() else (math.nan, math.nan)
                rows[m] = {
                    "test_steps": steps, "nrmse_mean": mean, "nrmse_ci95": ci,
                    "nrmse_std": values[kept, steps].std().item(), "rmse_mean": rmse[kept, steps].mean().item(),
                    "nonfinite": stats["diverged"],
                    "curve": [math.nan if stats["mean"][k] is None else stats["mean"][k] for k in grid],
                    "paper": PAPER.get(long, {}).get(dataset, {}).get(shots, {}).get(m),
                    "meta_gradient": mg, "options": options, "test_tasks": values.shape[0],
                    "per_task_nrmse": values[:, steps].tolist(),
                }
            if "a-maml" in per_task:
                for m in methods:
                    if m != "a-maml":
                        rows[m]["vs_a_maml"] = paired_tests(per_task["a-maml"], per_task[m])
            # the panel's users are those of its variants (the last one built above)
            references = {name: dict(zip(("nrmse_mean", "nrmse_ci95"), mean_ci95(v))) for name, v in
                          self.reference_errors(variant.train_family, variant.eval_family, config["split_seed"]).items()}
            summary["panels"][panel] = {"dataset": dataset, "shots": shots, "queries": queries,
                                        "long_steps": long, "maml_steps": maml, "methods": rows,
                                        "references": references}
        self._table(config, summary, out_dir / "table.md")
        self._plot(config, summary, out_dir / "amaml_cf.png")
        return summary

    def _table(self, config, summary, path: Path) -> None:
        lines = ["# A-MAML Tables 1 and 2: test nRMSE, ours (mean +- 95% CI over the test users) "
                 "beside the paper's (mean +- std)", ""]
        for long in config["long_steps"]:
            panels = {p: v for p, v in summary["panels"].items() if v["long_steps"] == long}
            if not panels:
                continue
            maml = next(iter(panels.values()))["maml_steps"]
            lines += [f"## {long} inner GD steps (MAML {maml}; A-MAML T = {long / 100:g})", ""]
            header = ["method", *(f"{DATASETS[v['dataset']]} {v['shots']}shot-{v['queries']}val" for v in panels.values())]

            def cell(v, m):
                r = v["methods"].get(m)
                if r is None:
                    return "not trained"
                ours = "diverged" if not math.isfinite(r["nrmse_mean"]) else f"{r['nrmse_mean']:.3f} +- {r['nrmse_ci95']:.3f}"
                paper = "" if r["paper"] is None else f" (paper {r['paper'][0]:.3f} +- {r['paper'][1]:.3f})"
                return ours + paper

            lines += md_table(header, [*([LABELS.get(m, m), *(cell(v, m) for v in panels.values())]
                                         for m in config["methods"]),
                                       *([f"({REFERENCES[r]})", *(
                                           f"{v['references'][r]['nrmse_mean']:.3f} +- {v['references'][r]['nrmse_ci95']:.3f}"
                                           for v in panels.values())] for r in REFERENCES)])
            lines += ["", "Paired tests over the test users, A-MAML against each method: mean nRMSE difference "
                      "(method - A-MAML; positive: A-MAML better), p of the t-test / Wilcoxon test.", ""]

            def test_cell(v, m):
                t = v["methods"].get(m, {}).get("vs_a_maml")
                if t is None or t["p_t"] is None:
                    return "-"
                return f"{t['mean_diff']:+.3f}, p = {t['p_t']:.2g} / {t['p_wilcoxon']:.2g}"

            lines += md_table(header, ([LABELS.get(m, m), *(test_cell(v, m) for v in panels.values())]
                                       for m in config["methods"] if m != "a-maml"))
            lines += ["", "RMSE in rating units at the same steps:", ""]
            lines += md_table(header, ([LABELS.get(m, m), *(
                f"{v['methods'][m]['rmse_mean']:.3f}" if m in v["methods"] else "-" for v in panels.values())]
                for m in config["methods"]))
            lines.append("")
        write_text(path, "\n".join(lines))

    def _plot(self, config, summary, path: Path) -> None:
        panels = list(summary["panels"].items())
        if not panels:
            return
        cols = min(len(panels), 4)
        rows = -(-len(panels) // cols)
        fig, axes = _plot.figure(nrows=rows, ncols=cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
        grid = summary["eval_steps"]
        for (name, v), ax in zip(panels, axes.flat):
            for m, r in v["methods"].items():
                line, = ax.plot(grid, r["curve"], marker=".", label=LABELS.get(m, m))
                ax.plot([r["test_steps"]], [r["nrmse_mean"]], marker="o", color=line.get_color(), markersize=7)
            ax.set_title(f"{DATASETS[v['dataset']]} {v['shots']}shot-{v['queries']}val, table of {v['long_steps']} steps",
                         fontsize=8)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("GD steps on the test user")
            ax.set_ylabel("test nRMSE")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        _plot.save_figure(fig, path)
        _plot.close(fig)
