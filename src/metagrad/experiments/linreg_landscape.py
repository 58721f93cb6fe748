"""``linreg-landscape``: Arnold et al. (2021) Fig. 2, the Deep model's MAML loss surface over (a, b).

The Deep model ``y = a b x`` (:func:`~metagrad.models.linear_chain` ``([1, 1, 1])``: layer 0 holds
``b``, layer 1 holds ``a``) adapted by one inner SGD step with rate ``alpha`` on the half squared
error (suppl. eq. 30). With population moments (``E x^2 = 1``, ``E x y = theta``) and
``theta ~ N(0, 1)`` the MAML loss is suppl. eq. (53),

    L(a, b) = 1/2 (1 + sigma^2 + p1^2 + p2^2 + 3 p3^2 + 2 p1 p3 - 2 p2),
    p1 = a b (1 - alpha (a^2 + b^2) + alpha^2 a^2 b^2), p2 = alpha (a^2 + b^2) - 2 alpha^2 a^2 b^2,
    p3 = alpha^2 a b                                                         (eq. 49),

where ``sigma^2`` is the label-noise variance (the paper's eq. 53 is the noise-free ``sigma = 0``;
the noise only shifts the constant). Its stationary points are the origin (a maximum) and the four
minima ``(+-1/sqrt(alpha), 0)``, ``(0, +-1/sqrt(alpha))``. Under this half-MSE scaling the Hessians
are ``-2 alpha I`` and ``diag(4 alpha, 3 alpha^3)``: half the paper's eqs. (55)-(57), whose Matlab code
drops eq. (53)'s factor 1/2 (its eq. 54 has the same factor 2).

The experiment contours the closed form and overlays four meta-training trajectories (MAML through
:class:`~metagrad.MetaLearner`, outer SGD), one started in each quadrant, each reaching a different
minimum. Trajectories use sampled tasks with ``shots`` support and query points: with finite samples
the empirical MAML minima sit slightly off the analytic ones, so the summary reports each end
point's distance to the nearest analytic minimum rather than claiming it is zero.

There is nothing to checkpoint: :meth:`variants` is empty and :meth:`report` computes the (short,
deterministic given the seed) trajectories; ``--resume`` recomputes them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .._io import write_json
from ..core import MetaLearner
from ..metrics import half_mse
from ..models import linear_chain
from ..schedule import Schedule
from ..tasks import LinearRegression1D
from . import _plot
from .base import Experiment


def deep_maml_loss(a, b, alpha: float, noise: float = 0.0):
    """Suppl. eq. (53) (half-MSE scaling, population moments, one inner step) plus ``noise^2 / 2``.

    Works elementwise on floats or tensors (differentiable with ``torch.autograd``).
    """
    s = a * a + b * b
    ab = a * b
    p1 = ab * (1 - alpha * s + alpha * alpha * ab * ab)
    p2 = alpha * s - 2 * alpha * alpha * ab * ab
    p3 = alpha * alpha * ab
    return 0.5 * (1 + noise * noise + p1 * p1 + p2 * p2 + 3 * p3 * p3 + 2 * p1 * p3 - 2 * p2)


def stationary_points(alpha: float) -> dict[str, tuple[float, float]]:
    """The origin and the four MAML minima ``(a, b)`` of section 4.4."""
    r = 1 / math.sqrt(alpha)
    return {"origin": (0.0, 0.0), "a+": (r, 0.0), "a-": (-r, 0.0), "b+": (0.0, r), "b-": (0.0, -r)}


def deep_model(a: float, b: float, dtype=torch.float64):
    model = linear_chain([1, 1, 1]).to(dtype)
    with torch.no_grad():
        model[0].weight.fill_(b)
        model[1].weight.fill_(a)
    return model


def meta_train_trajectory(start, config: dict, seed: int) -> list[tuple[float, float]]:
    """(a, b) before every outer step and at the end: MAML from ``start`` with outer SGD."""
    model = deep_model(*start)
    learner = MetaLearner(model, half_mse, lr=config["alpha"], schedule=Schedule(1),
                          meta_gradient=config["meta_gradient"])
    family = LinearRegression1D(shots=config["shots"], queries=config["queries"], noise=config["noise"],
                                dtype=torch.float64)
    opt = torch.optim.SGD(learner.parameters(), lr=config["meta_lr"], momentum=config["momentum"])
    gen = torch.Generator().manual_seed(seed)
    path = [(model[1].weight.item(), model[0].weight.item())]
    for _ in range(config["iterations"]):
        learner.meta_step(family.sample(config["meta_batch_size"], generator=gen), opt)
        path.append((model[1].weight.item(), model[0].weight.item()))
    return path


class LinregLandscape(Experiment):
    name = "linreg-landscape"
    description = "Arnold et al. Fig 2: Deep model MAML loss surface (closed form) with 4 meta-training trajectories"

    def default_config(self) -> dict:
        return {
            "quick": False,
            "seed": 0,
            "alpha": 0.1,
            "noise": 1.0,
            "shots": 2000,
            "queries": 2000,
            "meta_gradient": "unrolled",
            "meta_lr": 0.1,
            "momentum": 0.0,
            "meta_batch_size": 25,
            "iterations": 800,
            "starts": [[1.0, 0.3], [-0.3, 1.0], [-1.0, -0.3], [0.3, -1.0]],  # (a, b), one per quadrant
            "extent": 4.5,
        }

    def quick_config(self) -> dict:
        return {"shots": 1000, "queries": 1000, "meta_batch_size": 10, "iterations": 300}

    def variants(self, config):
        return {}

    def report(self, config, results, out_dir: Path) -> dict:
        alpha, noise = config["alpha"], config["noise"]
        points = stationary_points(alpha)
        minima = {k: v for k, v in points.items() if k != "origin"}
        paths, summary_paths = {}, []
        for i, start in enumerate(config["starts"]):
            path = meta_train_trajectory(tuple(float(s) for s in start), config, config["seed"] + i)
            paths[f"trajectory{i}"] = path
            end = path[-1]
            name, (ma, mb) = min(minima.items(), key=lambda kv: math.dist(end, kv[1]))
            pt = torch.tensor(end, dtype=torch.float64, requires_grad=True)
            grad, = torch.autograd.grad(deep_maml_loss(pt[0], pt[1], alpha, noise), pt)
            summary_paths.append({
                "start": list(start), "end": list(end), "nearest_minimum": name, "minimum": [ma, mb],
                "distance_to_minimum": math.dist(end, (ma, mb)),
                "closed_form_loss_end": deep_maml_loss(end[0], end[1], alpha, noise),
                "closed_form_grad_norm_end": grad.norm().item(),
            })
        write_json(out_dir / "trajectories.json", paths)
        summary = {
            "alpha": alpha, "noise": noise, "shots": config["shots"], "iterations": config["iterations"],
            "minima": {k: list(v) for k, v in minima.items()},
            "closed_form_loss_minimum": deep_maml_loss(1 / math.sqrt(alpha), 0.0, alpha, noise),
            "closed_form_loss_origin": deep_maml_loss(0.0, 0.0, alpha, noise),
            "trajectories": summary_paths,
            "distinct_minima_reached": len({p["nearest_minimum"] for p in summary_paths}),
            "max_distance_to_minimum": max(p["distance_to_minimum"] for p in summary_paths),
        }
        self._plot(config, paths, out_dir)
        return summary

    @staticmethod
    def _plot(config, paths, out_dir: Path) -> None:
        alpha, noise, ext = config["alpha"], config["noise"], config["extent"]
        grid = torch.linspace(-ext, ext, 301, dtype=torch.float64)
        A, B = torch.meshgrid(grid, grid, indexing="xy")
        Z: Tensor = deep_maml_loss(A, B, alpha, noise)
        zmin = deep_maml_loss(1 / math.sqrt(alpha), 0.0, alpha, noise)
        fig, ax = _plot.figure(figsize=(5.5, 5))
        levels = zmin + torch.logspace(-3, math.log10(float(Z.max() - zmin)), 30, dtype=torch.float64)
        cs = ax.contour(A.numpy(), B.numpy(), Z.numpy(), levels=levels.numpy(), cmap="viridis", linewidths=0.7)
        cs.set_alpha(0.9)
        colors = ["tab:red", "tab:orange", "tab:purple", "tab:blue"]
        for (name, path), color in zip(paths.items(), colors):
            xs, ys = zip(*path)
            ax.plot(xs, ys, color=color, lw=1.5)
            ax.plot(xs[0], ys[0], "o", color=color, ms=5)
            ax.plot(xs[-1], ys[-1], "*", color=color, ms=10)
        for key, (a, b) in stationary_points(alpha).items():
            ax.plot(a, b, "kx" if key == "origin" else "k+", ms=9, mew=1.5)
        ax.set_xlabel("a")
        ax.set_ylabel("b")
        ax.set_aspect("equal")
        ax.set_title(f"Deep model MAML loss (eq. 53), alpha={alpha}\n"
                     f"trajectories: MAML, {config['shots']} shots, outer SGD lr {config['meta_lr']}")
        _plot.save_figure(fig, out_dir / "linreg_landscape.png")
        _plot.close(fig)
