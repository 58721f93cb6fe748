"""Update rules: how an inner-loop gradient becomes a step. ``make_rule(name, **kw)`` builds one."""
from .._registry import Registry
from .base import UpdateRule
from .sgd import SGD, MetaSGD

RULES: Registry[UpdateRule] = Registry("update rule")
RULES.register("sgd", SGD)
RULES.register("meta-sgd", MetaSGD)


def make_rule(name: str, **kwargs) -> UpdateRule:
    """Build a registered update rule by name (``"sgd"``, ``"meta-sgd"``, ...)."""
    return RULES.make(name, **kwargs)


__all__ = ["UpdateRule", "SGD", "MetaSGD", "RULES", "make_rule"]
