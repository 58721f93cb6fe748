"""Update rules: how an inner-loop gradient becomes a step. ``make_rule(name, **kw)`` builds one."""
from .._registry import Registry
from .base import UpdateRule
from .curvature import MetaCurvature
from .kfo import MetaKFO
from .sgd import SGD, MetaSGD

RULES: Registry[UpdateRule] = Registry("update rule")
RULES.register("sgd", SGD)
RULES.register("meta-sgd", MetaSGD)
RULES.register("meta-curvature", MetaCurvature)
RULES.register("meta-kfo", MetaKFO)


def make_rule(name: str, **kwargs) -> UpdateRule:
    """Build a registered update rule by name (``"sgd"``, ``"meta-sgd"``, ``"meta-curvature"``,
    ``"meta-kfo"``)."""
    return RULES.make(name, **kwargs)


__all__ = ["UpdateRule", "SGD", "MetaSGD", "MetaCurvature", "MetaKFO", "RULES", "make_rule"]
