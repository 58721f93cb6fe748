"""Small helpers for exceptions that cross a boundary (worker processes, ranks)."""
from __future__ import annotations

import pickle


def prefixed(err: Exception, prefix: str) -> Exception:
    """``err`` again, its message prefixed with ``prefix`` where its type allows (else ``err``)."""
    try:
        return type(err)(f"{prefix}{err}")
    except Exception:
        return err


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name where the message is empty): enough
    of a long torch or pickle error for a one-line report."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (to send it to another process), else a ``RuntimeError``
    naming its type and message (e.g. an exception whose constructor takes keyword arguments)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
