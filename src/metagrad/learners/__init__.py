"""Learners: which tensors adapt, and wrappers that change a model's parameterization."""
from .linnet import PAPER_VISION_WIDTHS, LinNet, collapse_linear_chain
from .select import head_names, select_adapted
from .tnet import TNet
from .wormhole import Wormhole

__all__ = ["select_adapted", "head_names", "LinNet", "collapse_linear_chain", "PAPER_VISION_WIDTHS", "TNet", "Wormhole"]
