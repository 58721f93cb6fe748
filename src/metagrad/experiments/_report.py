"""What the experiments' reports share: number formats, markdown tables, gains with their 95% CI."""
from __future__ import annotations

import math
from pathlib import Path

from .._io import atomic_open
from ..metrics import finite_means


def finite_columns(values, name: str, column: int = -1) -> dict:
    """Means over tasks that leave out the diverged ones (:func:`metagrad.metrics.finite_means`):
    ``{"kept": bool [tasks], "diverged": count, "mean": [...], "std": [...]}``; warns naming
    ``name`` (the variant) and the count if any task diverged."""
    import warnings

    kept, mean, std = finite_means(values, column)
    diverged = int((~kept).sum())
    if diverged:
        warnings.warn(f"{name}: {diverged} of {len(kept)} test tasks diverged (non-finite value); means are "
                      f"over the other {len(kept) - diverged}", RuntimeWarning, stacklevel=2)
    return {"kept": kept, "diverged": diverged, "mean": mean, "std": std}


def fmt(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``"-"`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_g(value, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits; ``"-"`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}g}"


def fmt_ci(mean, ci) -> str:
    """``"mean +- ci"`` (2 decimals; the mean alone without a CI); ``"diverged"`` for ``None``."""
    if mean is None:
        return "diverged"
    return f"{mean:.2f} +- {ci:.2f}" if ci is not None else f"{mean:.2f}"


def fmt_overrides(pairs) -> str:
    """``(key, value)`` config overrides as the ``--set`` arguments that make them, in backticks."""
    import json

    return ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}`" for k, v in pairs)


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def validation(result: dict, key: str) -> float | None:
    """A variant's final validation ``key`` (``"loss"`` / ``"metric"``) on its validation tasks
    (``train.fit``'s summary): the number to select settings on, where the test tasks' numbers are
    for reporting only. ``None`` for runs made before fit recorded it."""
    return result.get("validation", {}).get(key)


def md_table(header, rows=(), *, rule: str = "---") -> list[str]:
    """The lines of a markdown table: ``header``, a rule of ``rule`` cells, then ``rows``."""
    return [md_row(header), "|" + "|".join([rule] * len(header)) + "|", *(md_row(r) for r in rows)]


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def gain(base, other) -> tuple[float | None, float | None]:
    """``other - base`` and its 95% CI (independent estimates: the CIs add in quadrature) from two
    ``(mean, ci95)`` pairs; ``(None, None)`` if either mean is ``None``, a missing CI counts as 0."""
    (b, b_ci), (o, o_ci) = base, other
    if b is None or o is None:
        return None, None
    return o - b, math.hypot(b_ci or 0.0, o_ci or 0.0)


def compare(base: dict, other: dict, key: str = "accuracy") -> dict:
    """Gain of ``other`` over ``base`` in ``key`` (rows with ``key``, ``key + "_ci95"`` and
    ``"paper_" + key``), its 95% CI and whether its sign matches the paper's gain: ``"yes"``,
    ``"yes*"`` (ours within its CI of zero), ``"no"``, ``"no (within CI)"`` or ``"n/a"``."""
    g, ci = gain((base[key], base[key + "_ci95"]), (other[key], other[key + "_ci95"]))
    pb, po = base["paper_" + key], other["paper_" + key]
    paper_gain = None if pb is None or po is None else po - pb
    if g is None or paper_gain is None:
        agrees = "n/a"
    elif (g > 0) == (paper_gain > 0) and g != 0:
        agrees = "yes" if abs(g) > ci else "yes*"
    else:
        agrees = "no" if abs(g) > ci else "no (within CI)"
    return {"gain": g, "gain_ci95": ci, "paper_gain": paper_gain, "agrees": agrees}


def numeric_leaves(tree, prefix: str = "") -> dict:
    """Every number in a nested summary (dicts and lists), by dotted key: ``deep.post_adapt_mse``,
    list items by index (``5-shot.mse_by_step.3``). ``None`` leaves (a mean that was not finite)
    are kept as ``None``; strings and booleans are left out."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        number = tree is None or (isinstance(tree, (int, float)) and not isinstance(tree, bool))
        return {prefix: tree} if number and prefix else {}
    out = {}
    for key, value in items:
        out.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
