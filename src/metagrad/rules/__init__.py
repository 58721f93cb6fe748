"""Update rules: how an inner-loop gradient becomes a step. ``make_rule(name, **kw)`` builds one."""
from .._registry import Registry
from .adam import Adam
from .base import UpdateRule
from .curvature import MetaCurvature
from .kfo import MetaKFO
from .momentum import Momentum
from .sgd import SGD, MetaSGD

RULES: Registry[UpdateRule] = Registry("update rule")
RULES.register("sgd", SGD)
RULES.register("meta-sgd", MetaSGD)
RULES.register("meta-curvature", MetaCurvature)
RULES.register("meta-kfo", MetaKFO)
RULES.register("adam", Adam)
RULES.register("momentum", Momentum)


def make_rule(name: str, **kwargs) -> UpdateRule:
    """Build a registered update rule by name (``"sgd"``, ``"meta-sgd"``, ``"meta-curvature"``,
    ``"meta-kfo"``, ``"adam"``, ``"momentum"``)."""
    return RULES.make(name, **kwargs)


__all__ = ["UpdateRule", "SGD", "MetaSGD", "MetaCurvature", "MetaKFO", "Adam", "Momentum", "RULES", "make_rule"]
