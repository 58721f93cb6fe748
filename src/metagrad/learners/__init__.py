"""Learners: which tensors adapt, and wrappers that change a model's parameterization."""
from .linnet import LinNet
from .select import head_names, select_adapted

__all__ = ["select_adapted", "head_names", "LinNet"]
