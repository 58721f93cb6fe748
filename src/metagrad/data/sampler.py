"""Vectorised N-way K-shot episode sampling by tensor indexing."""

from __future__ import annotations

from typing import Sequence

import torch

from ..tasks.base import TaskBatch

__all__ = ["Episode", "EpisodeSampler"]


#: An episode batch is a :class:`metagrad.TaskBatch`: ``support_x`` float ``[B, N*K, C, H, W]``,
#: ``support_y`` int64 ``[B, N*K]`` in ``0..N-1``, ``query_x`` ``[B, N*Q, C, H, W]``, ``query_y``
#: ``[B, N*Q]``. Items are class-major: positions ``[n*K, (n+1)*K)`` of the support hold class ``n``.
Episode = TaskBatch


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class EpisodeSampler:
    """Sample batches of N-way K-shot episodes from an in-memory labelled image tensor.

    Everything is done with batched tensor ops on ``device``: a ``[classes, max_per_class]``
    index table is built once; each call draws ``N`` distinct classes per episode
    (``torch.rand(...).argsort``), then ``K + Q`` distinct items per class the same
    way, and gathers images with a single index operation.  Support and query items
    are therefore disjoint and every class has exactly ``K`` support and ``Q`` query items.

    Args:
        images: uint8 (or float) tensor ``[num_items, C, H, W]``.
        labels: integer tensor ``[num_items]`` (any non-negative class ids).
        ways: ``N``, classes per episode.
        shots: ``K``, support items per class.
        queries: ``Q``, query items per class (may be 0).

    Keyword Args:
        seed: seed of the private :class:`torch.Generator`; equal seeds give equal episodes
            (on the same device).
        device: where the images are stored and episodes produced (default: ``images.device``).
        classes: optional subset of class ids (values of ``labels``) to sample from.
        invert: return ``1 - x`` (e.g. black background / white strokes for Omniglot).
        dtype: floating dtype of the returned images (default ``torch.float32``).

    uint8 images are scaled to ``[0, 1]``; floating images are returned as they are
    (inverted as ``1 - x`` if requested).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        classes: Sequence[int] | torch.Tensor | None = None,
        invert: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise TypeError(f"images must be a tensor [N, ...], got {type(images).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            raise TypeError("labels must be a 1-D integer tensor")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.ways = _check_count("ways", ways, 1)
        self.shots = _check_count("shots", shots, 1)
        self.queries = _check_count("queries", queries, 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.device = torch.device(device) if device is not None else images.device
        self.invert = bool(invert)
        self.dtype = dtype

        labels = labels.detach().to("cpu", torch.int64)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative, found {int(labels.min())}")
        present = torch.unique(labels)
        if classes is None:
            chosen = present
        else:
            chosen = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
            if torch.unique(chosen).numel() != chosen.numel():
                raise ValueError(f"classes contains duplicates: {chosen.tolist()}")
            absent = chosen[~torch.isin(chosen, present)]
            if absent.numel():
                raise ValueError(f"classes {absent.tolist()} do not occur in labels")
        self.classes = chosen
        if chosen.numel() < self.ways:
            raise ValueError(f"ways={self.ways} but only {chosen.numel()} classes are available")

        # Index table [num_classes, max_per_class], padded; counts per class.
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        starts = torch.searchsorted(sorted_labels, chosen)
        counts = torch.searchsorted(sorted_labels, chosen, right=True) - starts
        need = self.shots + self.queries
        short = chosen[counts < need]
        if short.numel():
            raise ValueError(
                f"classes {short.tolist()[:10]} have fewer than shots + queries = {need} items "
                f"(min count {int(counts.min())})"
            )
        width = int(counts.max())
        offs = torch.arange(width)
        pos = (starts[:, None] + offs).clamp_max(labels.numel() - 1)
        self._table = order[pos].to(self.device)  # [C, M] item indices
        # rand in [0, 1) for valid slots, +2 for padding: argsort puts padding last.
        self._pad = (offs[None, :] >= counts[:, None]).to(self.device, torch.float32) * 2.0
        self._uniform = bool((counts == width).all())
        self.counts = counts

        self.images = images.detach().to(self.device)
        self._scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.seed = seed
        n, k, q = self.ways, self.shots, self.queries
        self._support_y = torch.arange(n, device=self.device).repeat_interleave(k)
        self._query_y = torch.arange(n, device=self.device).repeat_interleave(q)

    @property
    def num_classes(self) -> int:
        """Number of classes episodes are drawn from."""
        return int(self.classes.numel())

    def manual_seed(self, seed: int) -> "EpisodeSampler":
        """Reset the generator to ``seed`` (returns ``self``)."""
        self.generator.manual_seed(seed)
        self.seed = seed
        return self

    def sample_indices(self, batch_size: int = 1, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw episode item indices (from ``generator``, default the sampler's own).

        Returns:
            ``(items, cls)``: ``items`` int64 ``[B, N, K+Q]`` indices into ``images``
            (first ``K`` per class are support), ``cls`` int64 ``[B, N]`` class ids.
        """
        b = _check_count("batch_size", batch_size, 1)
        n, kq = self.ways, self.shots + self.queries
        g, dev = (self.generator if generator is None else generator), self.device
        c = self._table.shape[0]
        rows = torch.rand(b, c, generator=g, device=dev).argsort(dim=1)[:, :n]  # [B, N] table rows
        m = self._table.shape[1]
        keys = torch.rand(b, n, m, generator=g, device=dev)
        if not self._uniform:
            keys = keys + self._pad[rows]
        slots = keys.argsort(dim=2)[:, :, :kq]  # [B, N, K+Q]
        items = self._table[rows.unsqueeze(-1), slots]
        return items, self.classes.to(dev)[rows]

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        scale = -self._scale if self.invert else self._scale
        if x.dtype == torch.uint8 and self.dtype == torch.get_default_dtype():
            y = torch.mul(x, scale)  # one fused pass: uint8 -> float, scaled
        else:
            y = x.to(self.dtype).mul_(scale)
        return y.add_(1.0) if self.invert else y

    def sample(self, batch_size: int = 1, *, generator: torch.Generator | None = None) -> Episode:
        """Draw ``batch_size`` episodes; see :data:`Episode` for shapes and layout.

        ``generator`` (on the sampler's device) replaces the sampler's own, which makes the
        sampler a task family for :func:`metagrad.train.fit`.
        """
        items, _ = self.sample_indices(batch_size, generator=generator)
        b, n, k, q = items.shape[0], self.ways, self.shots, self.queries
        shape = self.images.shape[1:]
        # index_select straight into the final [B, N*K] / [B, N*Q] layouts (no extra copies);
        # it is also much faster than advanced indexing on CPU.
        support_x = self._to_float(self.images.index_select(0, items[:, :, :k].reshape(-1)))
        query_x = self._to_float(self.images.index_select(0, items[:, :, k:].reshape(-1)))
        support_y = self._support_y.expand(b, n * k).clone()
        query_y = self._query_y.expand(b, n * q).clone()
        return Episode(support_x.view(b, n * k, *shape), support_y, query_x.view(b, n * q, *shape), query_y)

    def __iter__(self):
        """Infinite iterator of single-episode batches (``batch_size=1``)."""
        while True:
            yield self.sample(1)
