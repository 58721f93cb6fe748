"""Small helpers for exceptions that cross a boundary (worker processes, ranks)."""
from __future__ import annotations

import pickle


def prefixed(err: Exception, prefix: str) -> Exception:
    """``err`` again, its message prefixed with ``prefix`` where its type allows (else ``err``)."""
    try:
        return type(err)(f"{prefix}{err}")
    except Exception:
        return err


def portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (to send it to another process), else a ``RuntimeError``
    naming its type and message (e.g. an exception whose constructor takes keyword arguments)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
