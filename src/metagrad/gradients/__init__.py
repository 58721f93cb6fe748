"""Meta-gradients: how d(query loss)/d(initialization) is computed. ``make_meta_gradient(name)``."""
from .._registry import Registry
from .adjoint import BACKWARD_SCHEMES, FORWARD_SCHEMES, Adjoint, AdjointSolverError
from .base import MetaGradient
from .checkpointed import Checkpointed
from .implicit import Implicit
from .reptile import Reptile
from .unrolled import FirstOrder, Unrolled

META_GRADIENTS: Registry[MetaGradient] = Registry("meta-gradient")
META_GRADIENTS.register("unrolled", Unrolled)
META_GRADIENTS.register("first-order", FirstOrder)
META_GRADIENTS.register("reptile", Reptile)
META_GRADIENTS.register("adjoint", Adjoint)
META_GRADIENTS.register("implicit", Implicit)
META_GRADIENTS.register("checkpointed", Checkpointed)


def make_meta_gradient(name: str, **kwargs) -> MetaGradient:
    """Build a registered meta-gradient by name (``"unrolled"``, ``"first-order"``, ``"reptile"``,
    ``"adjoint"``, ``"implicit"``, ``"checkpointed"``)."""
    return META_GRADIENTS.make(name, **kwargs)


__all__ = [
    "MetaGradient", "Unrolled", "FirstOrder", "Reptile", "Adjoint", "AdjointSolverError", "Implicit", "Checkpointed",
    "META_GRADIENTS", "make_meta_gradient", "FORWARD_SCHEMES", "BACKWARD_SCHEMES",
]
