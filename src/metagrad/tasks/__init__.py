"""Task families and task batches."""
from .base import TaskBatch, TaskFamily
from .ratings import UserTasks, split_users, user_matrix
from .regression import REGRESSION_FAMILIES, Alpine, CosMixture, alpine, cos_mixture
from .synthetic import LinearRegression1D, LogisticRegression2D, Sinusoid
from .wormhole import AvgThreshold, WaveletTasks, ricker

__all__ = ["TaskBatch", "TaskFamily", "Sinusoid", "LinearRegression1D", "LogisticRegression2D",
           "CosMixture", "Alpine", "cos_mixture", "alpine", "REGRESSION_FAMILIES",
           "AvgThreshold", "WaveletTasks", "ricker", "UserTasks", "user_matrix", "split_users"]
