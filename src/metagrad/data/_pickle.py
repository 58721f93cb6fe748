"""Restricted unpickling of dataset pickles (dicts, lists and NumPy arrays only)."""

from __future__ import annotations

import io
import pickle

__all__ = ["safe_load"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a dataset file")


def safe_load(fileobj: io.IOBase):
    """Unpickle ``fileobj`` allowing only NumPy arrays and builtin containers.

    ``encoding="latin1"`` reads the Python 2 pickles of CIFAR-100; ``bytes`` dictionary
    keys are not decoded here (see :func:`str_keys`).
    """
    return _Unpickler(fileobj, encoding="latin1").load()


def str_keys(d: dict) -> dict:
    """Return ``d`` with ``bytes`` keys decoded as ASCII."""
    return {(k.decode("ascii") if isinstance(k, bytes) else k): v for k, v in d.items()}
