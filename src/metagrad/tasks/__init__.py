"""Task families and task batches."""
from .base import TaskBatch, TaskFamily
from .regression import REGRESSION_FAMILIES, Alpine, CosMixture, alpine, cos_mixture
from .synthetic import LinearRegression1D, LogisticRegression2D, Sinusoid
from .wormhole import AvgThreshold, WaveletTasks, ricker

__all__ = ["TaskBatch", "TaskFamily", "Sinusoid", "LinearRegression1D", "LogisticRegression2D",
           "CosMixture", "Alpine", "cos_mixture", "alpine", "REGRESSION_FAMILIES",
           "AvgThreshold", "WaveletTasks", "ricker"]
