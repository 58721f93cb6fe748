"""The quick settings of the depth experiments show the papers' comparisons."""
from __future__ import annotations

from metagrad.experiments import get_experiment, run


def test_linreg_depth_quick_deep_beats_shallow(tmp_path):
    s = run(get_experiment("linreg-depth"), tmp_path, ["quick=true"], progress=False)
    shallow, deep = s["shallow"]["post_adapt_mse"], s["deep"]["post_adapt_mse"]
    # Deep adapts to near the noise floor (1.0); Shallow stays near 1 + (1 - alpha)^2 = 1.81 (eq. 10)
    assert deep < 1.25
    assert abs(shallow - s["shallow_theory_mse"]) < 5 * s["shallow"]["post_adapt_mse_ci95"] + 0.05
    assert shallow - deep > 3 * (s["shallow"]["post_adapt_mse_ci95"] + s["deep"]["post_adapt_mse_ci95"])


def test_logreg_depth_quick_linnet_adapts_better(tmp_path):
    s = run(get_experiment("logreg-depth"), tmp_path, ["quick=true"], progress=False)
    for name in ("lr-linnet2", "lr-linnet3"):
        gap = s["lr"]["post_adapt_loss"] - s[name]["post_adapt_loss"]
        assert gap > 3 * (s["lr"]["post_adapt_loss_ci95"] + s[name]["post_adapt_loss_ci95"])
        # accuracy: LinNet at least as good as LR (see the experiment's docstring for why not more)
        assert s[name]["post_adapt_accuracy"] >= s["lr"]["post_adapt_accuracy"] - s["lr"]["post_adapt_accuracy_ci95"]
