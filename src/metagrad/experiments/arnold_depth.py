"""``arnold-depth``: Arnold et al. (2021) Fig. 4 / B.4, Meta-KFO's gain over MAML against the
number of conv layers. Config, variants and table as the other ``arnold-*`` experiments
(:mod:`~metagrad.experiments.arnold_vision`); the report adds the gain by depth and its plot."""
from __future__ import annotations

from pathlib import Path

from . import _plot
from ._report import gain
from .arnold_paper import LABELS
from .arnold_vision import _ArnoldVision


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
            if a is not None and b is not None:
                g, ci = gain((a["accuracy"], a["accuracy_ci95"]), (b["accuracy"], b["accuracy_ci95"]))
                if g is not None:
                    gains[k] = {"gain": g, "gain_ci95": ci}
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
