"""Which parameters adapt in the inner loop: all (MAML), the head (ANIL), or a named subset."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence, Union

from torch import nn

AdaptSpec = Union[str, Sequence[str]]

MODES = ("all", "head")


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of the last module (in registration order) that owns parameters."""
    last = None
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            last = tuple(f"{prefix}.{n}" if prefix else n for n in own)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no head to adapt")
    return last


def select_adapted(model: nn.Module, adapt: AdaptSpec = "all") -> tuple[str, ...]:
    """Names of the parameters of ``model`` that the inner loop adapts.

    Args:
        model: any ``nn.Module``.
        adapt: ``"all"`` (MAML), ``"head"`` (ANIL: the parameters of the last module that has
            any), or one or more glob patterns over parameter names (``"head.*"``,
            ``["features.3.*", "fc.weight"]``); a pattern also matches everything under a module
            prefix (``"fc"`` selects ``fc.weight`` and ``fc.bias``).

    Frozen parameters (``requires_grad=False``) never adapt: every mode leaves them out (they stay
    constants, as learn2learn's ``MAML`` never updates them either).

    Returns the names in the model's parameter order. Raises ``ValueError`` when a pattern matches
    nothing, naming the pattern and the available parameters, or when everything selected is frozen.
    """
    names = [n for n, p in model.named_parameters()]
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameters to adapt")
    if isinstance(adapt, str) and adapt == "all":
        chosen = tuple(names)
    elif isinstance(adapt, str) and adapt == "head":
        chosen = head_names(model)
    else:
        patterns = [adapt] if isinstance(adapt, str) else list(adapt)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"adapt must be 'all', 'head' or non-empty name patterns, got {adapt!r}")
        chosen = match_names(names, patterns, what=f"adapt pattern (modes: {', '.join(MODES)})")
    frozen = frozen_names(model)
    kept = tuple(n for n in chosen if n not in frozen)
    if not kept:
        raise ValueError(f"adapt={adapt!r} selects only frozen parameters (requires_grad=False): "
                         f"{', '.join(chosen)}; unfreeze them or select others")
    return kept


def frozen_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of ``model`` with ``requires_grad=False`` (never adapted nor meta-trained)."""
    return tuple(n for n, p in model.named_parameters() if not p.requires_grad)


def match_names(names: Sequence[str], patterns: Sequence[str], *, what: str = "pattern") -> tuple[str, ...]:
    """The ``names`` matched by glob ``patterns`` (a pattern also matches everything under a module
    prefix), in the order of ``names``. A pattern that matches nothing raises ``ValueError``."""
    chosen = set()
    for pat in patterns:
        hits = [n for n in names if fnmatchcase(n, pat) or fnmatchcase(n, pat + ".*")]
        if not hits:
            raise ValueError(f"{what} {pat!r} matches nothing; names: {', '.join(names)}")
        chosen.update(hits)
    return tuple(n for n in names if n in chosen)
