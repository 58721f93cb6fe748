"""metagrad: gradient-based meta-learning on PyTorch.

Four orthogonal choices make a method: the learner (which parameters adapt), the update rule,
the meta-gradient and the schedule. :class:`MetaLearner` composes them.
"""
from . import backend, distributed, models
from .core import DivergedError, MetaLearner, TaskModel
from .inner import InnerProblem, InnerResult, InnerState, inner_loop
from .gradients import (
    Adjoint, AdjointSolverError, Checkpointed, FirstOrder, Implicit, MetaGradient, Reptile, Unrolled, make_meta_gradient,
)
from .learners import LinNet, TNet, Wormhole, select_adapted
from .rules import SGD, Adam, MetaCurvature, MetaKFO, MetaSGD, Momentum, UpdateRule, make_rule
from .schedule import Phase, Schedule
from .tasks import LinearRegression1D, LogisticRegression2D, Sinusoid, TaskBatch

__version__ = "0.1.0"

__all__ = [
    "MetaLearner", "TaskModel", "DivergedError", "InnerProblem", "InnerState", "InnerResult", "inner_loop", "Schedule", "Phase", "TaskBatch",
    "UpdateRule", "SGD", "MetaSGD", "MetaCurvature", "MetaKFO", "Adam", "Momentum", "make_rule",
    "MetaGradient", "Unrolled", "FirstOrder", "Reptile", "Adjoint", "AdjointSolverError", "Implicit", "Checkpointed",
    "make_meta_gradient",
    "select_adapted", "LinNet", "TNet", "Wormhole",
    "Sinusoid", "LinearRegression1D", "LogisticRegression2D",
]
