"""Plot helpers writing PNGs atomically (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from .._io import atomic_open


def save_figure(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def val_curve(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of ``key`` from a variant's metrics.jsonl."""
    import json

    xs, ys = [], []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                xs.append(rec["iteration"])
                ys.append(rec[key])
    return xs, ys
