"""Losses and metrics for task-level evaluation, plus confidence intervals."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error."""
    return F.mse_loss(pred, target)


def half_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``1/2`` mean squared error: the loss scaling of Arnold et al. (2021) suppl. eq. (30)."""
    return 0.5 * F.mse_loss(pred, target)


def mean_abs_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error."""
    return (pred - target).abs().mean()


def nrmse(pred: Tensor, target: Tensor) -> Tensor:
    """RMSE / population standard deviation of ``target`` (one task's points)."""
    rmse = (pred - target).pow(2).mean().sqrt()
    return rmse / target.std(correction=0)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Multi-class accuracy of ``logits [n, classes]`` against integer labels ``[n]``."""
    return (logits.argmax(-1) == target).to(logits.dtype).mean()


def binary_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Accuracy of a single-logit binary classifier (``logit > 0`` predicts 1) against 0/1 targets."""
    return ((logits > 0).to(target.dtype) == target).to(logits.dtype).mean()


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = v.mean().item()
    if v.numel() == 1:
        return mean, float("nan")
    return mean, 1.96 * v.std(unbiased=True).item() / math.sqrt(v.numel())


def finite_means(values, column: int = -1) -> tuple[Tensor, list, list]:
    """Means over tasks that leave out the diverged ones. ``values`` is ``[tasks, columns]`` (a
    value after each inner step); a task diverged where its value in ``column`` is not finite.
    Returns ``(kept, means, stds)``: ``kept`` bool ``[tasks]``, and per column the mean and
    standard deviation of the kept tasks' finite values (``None`` where there is none)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    kept = torch.isfinite(values[:, column])
    means, stds = [], []
    for col in values[kept].T:  # a kept task may still be non-finite in another column
        col = col[torch.isfinite(col)]
        means.append(col.mean().item() if len(col) else None)
        stds.append(col.std().item() if len(col) else None)
    return kept, means, stds
