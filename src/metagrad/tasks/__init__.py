"""Task families and task batches."""
from .base import TaskBatch, TaskFamily
from .synthetic import LinearRegression1D, LogisticRegression2D, Sinusoid

__all__ = ["TaskBatch", "TaskFamily", "Sinusoid", "LinearRegression1D", "LogisticRegression2D"]
