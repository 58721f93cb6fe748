"""Experiments reproducing the papers' results; ``metagrad list`` shows them."""
from __future__ import annotations

from .._registry import Registry
from .amaml_cf import AmamlCF
from .amaml_regression import AmamlRegression
from .arnold_depth import ArnoldDepth
from .arnold_vision import ArnoldTable1, ArnoldTable2, ArnoldTable3
from .base import Experiment, Variant, evaluate_run, merge_runs, run
from .linnet_collapse import LinnetCollapse
from .linreg_depth import LinregDepth
from .linreg_landscape import LinregLandscape
from .logreg_depth import LogregDepth
from .omniglot_maml import OmniglotMAML
from .seeds import run_seeds
from .sinusoid import SinusoidExperiment
from .wormhole.mnist import WormholeMNIST
from .wormhole.threshold import WormholeThreshold
from .wormhole.wavelet import WormholeWavelet

EXPERIMENTS: Registry[Experiment] = Registry("experiment")
for _cls in (AmamlRegression, AmamlCF, ArnoldTable1, ArnoldTable2, ArnoldTable3, ArnoldDepth,
             LinregDepth, LinregLandscape, LogregDepth, LinnetCollapse, OmniglotMAML, SinusoidExperiment,
             WormholeThreshold, WormholeWavelet, WormholeMNIST):
    EXPERIMENTS.register(_cls.name, _cls)


def get_experiment(name: str) -> Experiment:
    """The experiment registered under ``name`` (``ValueError`` listing the valid names)."""
    return EXPERIMENTS.make(name)


__all__ = ["Experiment", "Variant", "EXPERIMENTS", "get_experiment", "run", "run_seeds", "evaluate_run", "merge_runs"]
