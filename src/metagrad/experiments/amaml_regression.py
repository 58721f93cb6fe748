"""``amaml-regression``: A-MAML (Li et al.) Fig. 2, CosMixture and Alpine 2-D regression.

Tasks (:mod:`metagrad.tasks.regression`): a fixed pool of 100 meta-training and 100 new test
functions per family (drawn once from ``pool_seed``), each with its own fixed points
(``points="fixed"``); meta-training tasks have ``shots`` support and ``shots`` query points
(50shot-50val, 100shot-100val), test tasks ``shots`` support and ``test_queries`` (100) query
points. Inputs and targets are standardized per family with training-pool statistics.

Model and training (section 5.1): a 2-32-32-1 tanh MLP (:class:`~metagrad.models.MLP`), inner plain gradient
descent with lr 0.01 on the MSE of the standardized targets, Adam 1e-3, meta-batch 5, 5,000
meta-iterations ("meta-epochs"). Methods are chosen by name in ``methods`` and defined in
``method_defs`` by a registered meta-gradient (:data:`metagrad.gradients.META_GRADIENTS`), its
options and their inner step count: ``"long"`` (200 / 500 for 50 / 100 shots: FOMAML, Reptile,
iMAML; A-MAML with ``T = h * long`` = 2 / 5 and ``h = 0.01``), ``"maml"`` (20 / 50: MAML) or a
fixed number (MAML-1). A method whose meta-gradient is not registered or not implemented yet is
refused before any training, with a message naming it (nothing is faked).

Figure. From each method's learned initialization, every test task is trained by plain GD with
the inner lr on its support set, and the **nRMSE** on its query set is recorded at the steps of
``eval_steps`` (default up to 1,000 steps, in chunks of ``eval_chunk`` tasks). nRMSE of a task =
RMSE of its query predictions / standard deviation of its query targets (population std,
dividing by the number of points); it is the same on raw and standardized targets. The figure
(log-log axes) shows the mean over the 100 test tasks with a band of one standard deviation over
tasks (sample std; the lower edge clipped at half the mean for the log axis), one panel per
function and setting. ``summary.json`` holds, per panel and method, the curves and the final
nRMSE (mean, std, diverged count); ``amaml_regression.md`` the tables at step 0 and the last step.

The curves during training (``val_metric`` in each variant's metrics, nRMSE after ``val_steps``
GD steps) are measured on 20 test tasks for plotting only; no model selection is done.

``quick=true``: CosMixture 50shot-50val only, A-MAML (T = 1), MAML (10 steps), MAML-1, FOMAML
and Reptile (100 steps), 300 meta-iterations at Adam 1e-2 (ten times the paper's rate: at 1e-3,
300 iterations leave A-MAML's initialization untrained, see the measured results), curves up to
500 steps (iMAML: add it with ``--set methods=[...]``); about 4 minutes on one CPU thread, most
of it A-MAML's ODE solves.

Measured results (the quick setting with three seeds, each panel at the paper's settings, and the
four-panel run of Fig. 2): ``results/amaml-regression-fig2/README.md``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import MetaLearner
from ..gradients import META_GRADIENTS, make_meta_gradient
from ..metrics import mse, nrmse
from ..models import MLP
from ..schedule import Schedule
from ..tasks import REGRESSION_FAMILIES, TaskBatch
from . import _plot
from ._report import finite_columns, md_table, write_text
from .base import Experiment, Variant, trained_variant

LABELS = {"a-maml": "A-MAML", "maml": "MAML", "maml-1": "MAML-1", "fomaml": "FOMAML",
          "reptile": "Reptile", "imaml": "iMAML"}


def _method_steps(spec: str, long_steps: int, maml_steps: int) -> int:
    if spec == "long":
        return long_steps
    if spec == "maml":
        return maml_steps
    try:
        steps = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"method steps must be 'long', 'maml' or an integer, got {spec!r}") from None
    if steps < 1:
        raise ValueError(f"method steps must be positive, got {spec!r}")
    return steps


def _options(d: dict, steps: int) -> dict:
    """The meta-gradient's constructor options; A-MAML's ``T: null`` becomes ``h * steps``."""
    options = dict(d.get("options") or {})
    if d["meta_gradient"] == "adjoint" and options.get("T") is None:
        options["T"] = round(options.get("h", 0.01) * steps, 10)
    return options


def check_available(method: str, meta_gradient: str, options: dict) -> None:
    """Raise ``ValueError`` if ``meta_gradient`` is not registered, refuses ``options`` or is not
    implemented yet (probed on a tiny problem: a 2-1 linear model, one task, two inner steps)."""
    if meta_gradient not in META_GRADIENTS:
        raise ValueError(f"method {method!r} needs meta-gradient {meta_gradient!r}, which is not registered "
                         f"(registered: {', '.join(META_GRADIENTS.names())}); leave it out of 'methods'")
    try:
        mg = make_meta_gradient(meta_gradient, **options)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 4, 2, generator=g)
        batch = TaskBatch(x[:, :2], x[:, :2, :1], x[:, 2:], x[:, 2:, :1])
        learner = MetaLearner(nn.Linear(2, 1), mse, lr=0.01, meta_gradient=mg, schedule=Schedule(2))
        learner.meta_gradient_of(batch)
    except (NotImplementedError, TypeError) as e:
        raise ValueError(f"method {method!r}: meta-gradient {meta_gradient!r} with options {options} is not "
                         f"available yet ({type(e).__name__}: {e}); leave it out of 'methods'") from e


class AmamlRegression(Experiment):
    name = "amaml-regression"
    resume_keys = ("train.iterations",)
    description = "A-MAML Fig 2: nRMSE vs test-time GD steps on CosMixture/Alpine from each method's initialization"
    partial_report = True

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "functions": ["cosmixture", "alpine"],
            "shots": [50, 100],  # support = meta-training query ("val") size: 50shot-50val, 100shot-100val
            "long_steps": [200, 500],  # per entry of shots: FOMAML / Reptile / iMAML steps, A-MAML T/h
            "maml_steps": [20, 50],
            "test_queries": 100,
            "pool_size": 100,
            "pool_seed": 0,
            "points": "fixed",
            "hidden": [32, 32],
            "inner_lr": 0.01,
            "methods": ["a-maml", "maml", "maml-1", "fomaml", "reptile", "imaml"],
            "method_defs": {
                "a-maml": {"meta_gradient": "adjoint", "steps": "long", "options": {"T": None, "h": 0.01}},
                "maml": {"meta_gradient": "unrolled", "steps": "maml", "options": {}},
                "maml-1": {"meta_gradient": "unrolled", "steps": "1", "options": {}},
                "fomaml": {"meta_gradient": "first-order", "steps": "long", "options": {}},
                "reptile": {"meta_gradient": "reptile", "steps": "long", "options": {}},
                "imaml": {"meta_gradient": "implicit", "steps": "long", "options": {"lam": 1.0, "cg_steps": 5}},
            },
            "val_steps": 100,
            "eval_steps": [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000],
            "eval_chunk": 20,
            "vectorize": True,
            "train": {
                "iterations": 5000, "meta_batch_size": 5, "optimizer": "adam", "meta_lr": 1e-3,
                "log_every": 50, "eval_every": 500, "val_tasks": 20, "eval_tasks": 100, "eval_batch": 100,
                "checkpoint_every": 500,
            },
        }

    def quick_config(self) -> dict:
        return {
            "functions": ["cosmixture"], "shots": [50], "long_steps": [100], "maml_steps": [10],
            "methods": ["a-maml", "maml", "maml-1", "fomaml", "reptile"],
            "val_steps": 50, "eval_steps": [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500],
            "train.iterations": 300, "train.meta_lr": 1e-2, "train.eval_every": 100, "train.checkpoint_every": 100,
        }

    # ------------------------------------------------------------------
    @staticmethod
    def _check_settings(config: dict, lists: tuple[str, ...]) -> None:
        """The checks both A-MAML experiments share: ``lists`` are non-empty lists of positive
        integers, every method is defined, ``eval_steps`` is an increasing step grid."""
        for key in lists:
            v = config[key]
            if not isinstance(v, list) or not v or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in v):
                raise ValueError(f"{key} must be a non-empty list of positive integers, got {v!r}")
        for m in config["methods"]:
            if m not in config["method_defs"]:
                raise ValueError(f"unknown method {m!r}; defined in method_defs: {', '.join(config['method_defs'])}")
        grid = config["eval_steps"]
        if (not isinstance(grid, list) or not grid or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in grid)
                or grid != sorted(set(grid))):
            raise ValueError(f"eval_steps must be an increasing list of non-negative integers, got {grid!r}")

    def _validate(self, config: dict) -> None:
        self._check_settings(config, ("shots", "long_steps", "maml_steps"))
        if not len(config["shots"]) == len(config["long_steps"]) == len(config["maml_steps"]):
            raise ValueError(f"shots, long_steps and maml_steps must have the same length, got "
                             f"{config['shots']}, {config['long_steps']}, {config['maml_steps']}")
        for f in config["functions"]:
            if f not in REGRESSION_FAMILIES:
                raise ValueError(f"unknown function {f!r}; valid: {', '.join(REGRESSION_FAMILIES)}")

    def families(self, config: dict, function: str, shots: int):
        """(meta-training family, test family) of one panel."""
        cls = REGRESSION_FAMILIES[function]
        common = {"pool_size": config["pool_size"], "seed": config["pool_seed"], "points": config["points"]}
        return (cls(shots=shots, queries=shots, split="train", **common),
                cls(shots=shots, queries=config["test_queries"], split="test", **common))

    def panels(self, config: dict) -> list[tuple[str, str, int, int, int]]:
        """``(panel name, function, shots, long_steps, maml_steps)`` in figure order."""
        return [(f"{f}-{s}shot", f, s, long, maml)
                for f in config["functions"]
                for s, long, maml in zip(config["shots"], config["long_steps"], config["maml_steps"])]

    def method_setup(self, config: dict, method: str, long_steps: int, maml_steps: int) -> tuple[str, int, dict]:
        """(meta-gradient name, inner steps at meta-training, meta-gradient options)."""
        d = config["method_defs"][method]
        steps = _method_steps(str(d.get("steps", "long")), long_steps, maml_steps)
        return d["meta_gradient"], steps, _options(d, steps)

    def variants(self, config):
        self._validate(config)
        checked = set()
        for _, _, _, long, maml in self.panels(config):
            for m in config["methods"]:
                mg, _, options = self.method_setup(config, m, long, maml)
                key = (m, mg, repr(sorted(options.items())))
                if key not in checked:
                    check_available(m, mg, options)
                    checked.add(key)

        def build(function, shots, long, maml, method):
            def make():
                mg, steps, options = self.method_setup(config, method, long, maml)
                learner = MetaLearner(
                    MLP(2, config["hidden"], 1, activation="tanh"), mse, lr=config["inner_lr"],
                    meta_gradient=make_meta_gradient(mg, **options),
                    schedule=Schedule(steps, config["val_steps"]), metric_fn=nrmse, vectorize=config["vectorize"],
                )
                train_family, test_family = self.families(config, function, shots)
                return Variant(learner, train_family, test_family, {**config["train"], "seed": config["seed"]})
            return make

        return {f"{panel}-{m}": build(f, s, long, maml, m)
                for panel, f, s, long, maml in self.panels(config) for m in config["methods"]}

    def variant_config(self, config, name) -> dict:
        """Function, shots, inner steps and method definition of variant ``name``, and the config
        keys every variant shares; not the other panels and methods, so that a variant trained in
        a run of one panel (``--set 'shots=[100]' ...``) merges into a run of all four
        (``metagrad merge``)."""
        own = ("only", "experiment", "functions", "shots", "long_steps", "maml_steps", "methods", "method_defs")
        shared = {key: v for key, v in config.items() if key not in own}
        for panel, f, s, long, maml in self.panels(config):
            for m in config["methods"]:
                if name == f"{panel}-{m}":
                    return shared | {"function": f, "shots": s, "long_steps": long, "maml_steps": maml,
                                     "method": m, "method_def": config["method_defs"][m]}
        raise KeyError(f"{name!r} is not a variant of this config")

    # ------------------------------------------------------------------
    @staticmethod
    def nrmse_curve(learner: MetaLearner, batch: TaskBatch, steps: list[int], *, chunk: int = 20) -> Tensor:
        """nRMSE ``[tasks, len(steps)]`` after each number of GD steps in ``steps``, in task chunks."""
        out = []
        index = torch.tensor(steps)
        for lo in range(0, batch.num_tasks, chunk):
            part = TaskBatch(*(t[lo : lo + chunk] for t in batch))
            out.append(learner.evaluate(part, steps=max(steps))["metric"][:, index])
        return torch.cat(out).double()

    def report(self, config, results, out_dir: Path) -> dict:
        """Test nRMSE curves of every trained variant (``results``' names: all of them, or those a
        ``--variant`` run or a merge holds), by panel and method; table and figure of them."""
        out_dir = Path(out_dir)
        grid = config["eval_steps"]
        summary: dict = {"eval_steps": grid, "final_step": grid[-1], "panels": {}}
        for panel, function, shots, long, maml in self.panels(config):
            methods = [m for m in config["methods"] if f"{panel}-{m}" in results]
            if not methods:
                continue
            _, test_family = self.families(config, function, shots)
            batch = test_family.pool()
            rows = {}
            for m in methods:
                name = f"{panel}-{m}"
                variant, _ = trained_variant(self, config, out_dir, name)
                values = self.nrmse_curve(variant.learner, batch, grid, chunk=config["eval_chunk"])
                stats = finite_columns(values, f"{self.name}:{name}")  # diverged tasks left out, counted
                mean, std = stats["mean"], stats["std"]
                mg, steps, options = self.method_setup(config, m, long, maml)
                fit = results.get(name, {}).get("metric", {})
                rows[m] = {
                    "final_nrmse_mean": mean[-1], "final_nrmse_std": std[-1],
                    "diverged": stats["diverged"],
                    "nrmse_mean": mean, "nrmse_std": std,
                    "meta_gradient": mg, "train_steps": steps, "options": options,
                    "val_steps_nrmse": fit.get("mean"), "test_tasks": batch.num_tasks,
                }
            summary["panels"][panel] = rows
        self._table(config, summary, out_dir / "amaml_regression.md")
        self._plot(config, summary, out_dir / "amaml_regression.png")
        return summary

    def _table(self, config, summary, path: Path) -> None:
        panels = list(summary["panels"])

        def cell(r, i):
            m, s = r["nrmse_mean"][i], r["nrmse_std"][i]
            return "diverged" if m is None else f"{m:.3f} ± {s:.3f}"

        lines = []
        for title, i in ((f"nRMSE after {summary['final_step']} GD steps", -1), ("nRMSE at the initialization (0 steps)", 0)):
            lines += [f"### {title} (mean ± std over test tasks)", ""]
            lines += md_table(["method", *panels], ([LABELS.get(m, m), *(
                cell(summary["panels"][p][m], i) if m in summary["panels"][p] else "not trained" for p in panels)]
                for m in config["methods"] if any(m in summary["panels"][p] for p in panels)))
            lines.append("")
        write_text(path, "\n".join(lines))

    def _plot(self, config, summary, path: Path) -> None:
        rows, cols = len(config["functions"]), len(config["shots"])
        fig, axes = _plot.figure(nrows=rows, ncols=cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
        grid = summary["eval_steps"]
        for (panel, function, shots, _, _), ax in zip(self.panels(config), axes.flat):
            for m, r in summary["panels"].get(panel, {}).items():
                mean = [math.nan if v is None else v for v in r["nrmse_mean"]]
                std = [math.nan if v is None else v for v in r["nrmse_std"]]
                line, = ax.plot(grid, mean, marker=".", label=LABELS.get(m, m))
                # band of one std over tasks, clipped above zero for the log axis
                ax.fill_between(grid, [max(a - b, 0.5 * a) for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=line.get_color(), alpha=0.12, linewidth=0)
            title = {"cosmixture": "CosMixture", "alpine": "Alpine"}.get(function, function)
            ax.set_title(f"{title}, {shots}shot-{shots}val")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_yscale("log")
            ax.set_xlabel("GD steps on the test task")
            ax.set_ylabel("test nRMSE")
            if summary["panels"].get(panel):
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not trained", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        _plot.save_figure(fig, path)
        _plot.close(fig)
