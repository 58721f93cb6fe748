"""Nested-dict configs with dotted ``key=value`` overrides; unknown keys are rejected by name."""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Iterable, Mapping


#: the largest integer a config value may hold (counts of iterations, tasks, steps; a seed): beyond it
#: nothing finishes, and a float such as 1e30 has lost the integer it was meant to be
MAX_INT = 10**12


def flat_items(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested config by dotted key (``{"train.iterations": 1000, ...}``)."""
    items: dict[str, Any] = {}
    for k, v in config.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            items.update(flat_items(v, path + "."))
        else:
            items[path] = v
    return items


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """All dotted leaf keys of a nested config."""
    return list(flat_items(config, prefix))


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if not isinstance(new, bool):
            raise ValueError(f"config key {key!r} expects true/false, got {new!r}")
        return new
    if isinstance(old, int) and not isinstance(old, bool):
        if isinstance(new, bool) or not isinstance(new, (int, float)) or (isinstance(new, float) and not new.is_integer()):
            raise ValueError(f"config key {key!r} expects an integer, got {new!r}")
        if abs(new) > MAX_INT:
            raise ValueError(f"config key {key!r} expects an integer of at most {MAX_INT:.0e} in size, got {new!r}")
        return int(new)
    if isinstance(old, float):
        if isinstance(new, bool) or not isinstance(new, (int, float)):
            raise ValueError(f"config key {key!r} expects a number, got {new!r}")
        if not math.isfinite(new):
            raise ValueError(f"config key {key!r} expects a finite number, got {new!r}")
        return float(new)
    if isinstance(old, str):
        if not isinstance(new, str):
            new = json.dumps(new)
        return new
    if isinstance(old, list):
        if not isinstance(new, list):
            raise ValueError(f"config key {key!r} expects a list (JSON, e.g. [1,2]), got {new!r}")
        return new
    return new


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict:
    """A copy of ``config`` with ``"a.b=value"`` overrides applied (values parsed as JSON).

    Raises ``ValueError`` for a malformed override, an unknown key (listing the valid keys), or a
    value of the wrong type.
    """
    out = copy.deepcopy(dict(config))
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
    valid = flat_keys(out)
    for key, value in items:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            node = node[p]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        node[parts[-1]] = _coerce(key, node[parts[-1]], value)
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if not isinstance(text, str) or "=" not in text or text.startswith("="):
        raise ValueError(f"override must look like key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)
