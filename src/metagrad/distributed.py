"""Data-parallel meta-training over ``torch.distributed``, in processes started by ``torchrun``.

The scheme: every process ("rank") draws the whole meta-batch from the same seeded generator and
keeps its share (:func:`shard`: contiguous slices in rank order, the first ``n % world`` ranks one
task more). It computes the meta-gradient of its tasks (any meta-gradient, any rule, the rule's
meta-learned state included), and :func:`task_mean` averages the meta-gradients over the ranks
with one ``all_reduce``, each weighted by its rank's task count: the result is the mean over all
the tasks, as one process computes it, up to the order of floating-point sums. Every rank then
steps the same optimizer on the same gradient, so the parameters stay equal without being sent
again. There is no ``DistributedDataParallel`` wrapper: its hooks do not survive the double
backward of second-order meta-gradients, and an explicit ``all_reduce`` of the finished
meta-gradient needs none. Per-task values (query losses, inner losses, evaluation scores) are
gathered in rank order (:func:`gather_tasks`), so they too are the values of one process.

Rank 0 alone reads and writes run folders (:func:`on_main` runs a function there and hands its
result, or its exception, to every rank); :func:`check_same` and :func:`agree` make ranks started
with different configs fail at once, each with the same message.

A process group argument ``group`` takes :data:`AUTO` (the default: the default group when
``torch.distributed`` is initialized with more than one process, else none), a ``ProcessGroup``,
or ``None`` (this process alone). :func:`init_from_env` starts the default group from the
environment variables that ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), with the ``gloo`` backend on the CPU and ``nccl`` on CUDA.

Where a rank's share is not computed task by task, the result depends on the shares beyond
rounding: the adjoint's adaptive ODE solve (``Adjoint(forward="ode")`` under ``vectorize=True``)
shares its step sizes among the tasks of one stacked solve, so ranks agree with one process to the
solver tolerance (exactly with ``forward="euler"`` or ``vectorize=False``); and horizons per task
do not split: ``Adjoint(T=tensor)`` has the length of the whole meta-batch, not of a share, and a
callable ``T`` sets the steps common to a share from that share's longest horizon. If you initialize
the process group yourself, import ``torch._dynamo`` first (see :func:`init_from_env`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ._errors import portable, prefixed
from .config import flat_items

_tree_flatten = torch.utils._pytree.tree_flatten
_tree_unflatten = torch.utils._pytree.tree_unflatten


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


#: the default ``group``: the default process group if ``torch.distributed`` is initialized with
#: more than one process, else none (one process).
AUTO = _Auto()
_ALONE = [0]  # > 0 while on_main runs its function on rank 0 alone


def _dist():
    import torch.distributed as dist

    return dist


def _env_world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {text!r}") from None


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return _env_world_size() > 1


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Initialize the default process group from ``torchrun``'s environment variables.

    Does nothing (and returns ``False``) when ``WORLD_SIZE`` is unset or 1, or when the group is
    already initialized; returns ``True`` when it started the group (then :func:`shutdown` ends
    it). The backend is ``nccl`` when ``device`` is a CUDA device (each rank then uses
    ``cuda:LOCAL_RANK``), else ``gloo``. Several machines need nothing more: start ``torchrun``
    on each with ``--nnodes``, ``--node-rank`` or ``--rdzv-*`` and it sets the same variables.
    Collectives wait for torch's default timeout (30 minutes for gloo, 10 for nccl), which also
    bounds what rank 0 does alone meanwhile (:func:`on_main`: checkpoints, an experiment's report).
    """
    if not launched():
        return False
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run in one process")
    if dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_device(device))
    # torch.func imports torch._dynamo on first use; imported after the group exists, it keeps
    # references to it (torch 2.13) that outlive destroy_process_group, and the group's destructor
    # then aborts the process at exit ("terminate called without an active exception")
    import torch._dynamo  # noqa: F401
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return True


def shutdown() -> None:
    """Destroy the default process group, if there is one."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # frames of a handled error may still hold the group (a reference cycle)
        dist.destroy_process_group()


def local_device(device: str | torch.device | None) -> torch.device | None:
    """``device``, with a CUDA device without an index turned into ``cuda:LOCAL_RANK`` when this
    process was started by ``torchrun`` (one GPU per rank of a machine)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def resolve(group=AUTO):
    """The process group to use: a group of two or more processes, or ``None`` for this process
    alone (also for a group of one). ``group`` is :data:`AUTO`, ``None`` or a ``ProcessGroup``.
    :data:`AUTO` is ``None`` inside :func:`on_main`'s function, which runs on rank 0 alone."""
    if group is AUTO:
        dist = _dist()
        if _ALONE[0] or not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    if group is None:
        return None
    return group if _dist().get_world_size(group) > 1 else None


def rank(group) -> int:
    """This process's rank in ``group`` (a resolved group; ``None``: 0)."""
    return 0 if group is None else _dist().get_rank(group)


def world_size(group) -> int:
    """The number of processes in ``group`` (a resolved group; ``None``: 1)."""
    return 1 if group is None else _dist().get_world_size(group)


def is_main(group) -> bool:
    """Whether this process is rank 0 of ``group`` (the one that writes run folders)."""
    return rank(group) == 0


def barrier(group) -> None:
    """Wait until every rank of ``group`` gets here (nothing for ``None``)."""
    if group is not None:
        _dist().barrier(group=group)


# ---------------------------------------------------------------- tasks
def shard_counts(num_tasks: int, group) -> list[int]:
    """How many of ``num_tasks`` tasks each rank of ``group`` takes: ``num_tasks // world``, one
    more for the first ``num_tasks % world`` ranks."""
    world = world_size(group)
    return [num_tasks // world + (r < num_tasks % world) for r in range(world)]


def shard(batch, group):
    """This rank's contiguous slice of a meta-batch (a ``TaskBatch`` or any tuple of tensors with
    a leading task dimension), the whole batch for ``group=None``. Raises ``ValueError`` when
    there are fewer tasks than ranks (a rank would have none)."""
    n, world = batch[0].shape[0], world_size(group)
    if group is None:
        return batch
    if n < world:
        raise ValueError(f"a meta-batch of {n} task(s) cannot be shared by {world} processes: "
                         f"use a meta-batch of at least {world} tasks or fewer processes")
    counts = shard_counts(n, group)
    lo = sum(counts[: rank(group)])
    return type(batch)(*(t[lo: lo + counts[rank(group)]] for t in batch))


def _collective_device(group) -> torch.device:
    """Where ``group``'s backend wants tensors: the current CUDA device for ``nccl``, else the CPU."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat(leaves: Sequence[Tensor], device) -> Tensor:
    dtype = leaves[0].dtype
    for t in leaves[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in leaves])


def _split(flat: Tensor, like: Sequence[Tensor], shapes: Sequence[torch.Size]) -> list[Tensor]:
    parts = flat.split([s.numel() for s in shapes])
    return [p.reshape(s).to(device=t.device, dtype=t.dtype) for p, s, t in zip(parts, shapes, like)]


def _average(tree, counts: list[int], group):
    """The mean over ranks of ``tree`` (this rank's mean over its tasks), weighted by ``counts``."""
    leaves, spec = _tree_flatten(tree)
    flat = _flat(leaves, _collective_device(group)) * counts[rank(group)]
    _dist().all_reduce(flat, group=group)
    flat /= sum(counts)
    return _tree_unflatten(_split(flat, leaves, [t.shape for t in leaves]), spec)


def gather_tasks(tree, counts: list[int], group):
    """Every rank's per-task values, concatenated in rank order along dim 0.

    ``tree``: tensors (in dicts, lists, tuples) of this rank's ``[tasks, ...]`` values;
    ``counts``: each rank's task count (e.g. :func:`shard_counts`). The trailing shapes must
    agree across ranks. For ``group=None`` the tree is returned as it is.
    """
    if group is None:
        return tree
    leaves, spec = _tree_flatten(tree)
    if not leaves:
        return tree
    most = max(counts)
    padded = [torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for t in leaves]
    flat = _flat(padded, _collective_device(group))
    parts = [torch.empty_like(flat) for _ in counts]
    _dist().all_gather(parts, flat, group=group)
    per_rank = [_split(p, leaves, [t.shape for t in padded]) for p in parts]
    out = [torch.cat([per_rank[r][i][: counts[r]] for r in range(len(counts))]) for i in range(len(leaves))]
    return _tree_unflatten(out, spec)


def task_mean(compute: Callable[[], tuple[int, Any, Any]], group):
    """Run ``compute() -> (num_tasks, means, per_task)`` on this rank's tasks; return the means over
    every rank's tasks (weighted by task count: the mean one process computes) and every rank's
    per-task values in rank order (:func:`gather_tasks`).

    ``means``: tensors averaged over this rank's ``num_tasks`` tasks (e.g. the meta-gradient and
    objective); ``per_task``: tensors ``[num_tasks, ...]``. If ``compute`` raises on any rank
    (bad input, a solver failure), every rank raises that error, the first failing rank's,
    prefixed with the rank and where its tasks start, instead of waiting for it.
    """
    if group is None:
        _, means, per_task = compute()
        return means, per_task
    failure = None
    try:
        num_tasks, means, per_task = compute()
    except Exception as err:  # the other ranks are waiting for this one in the collectives
        failure, num_tasks = err, 0
    dist = _dist()
    mine = torch.tensor([num_tasks, failure is not None], dtype=torch.int64, device=_collective_device(group))
    every = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(every, mine, group=group)
    counts = [int(t[0]) for t in every]
    if any(int(t[1]) for t in every):
        errors = [None] * len(counts)
        dist.all_gather_object(errors, None if failure is None else portable(failure), group=group)
        r = next(i for i, e in enumerate(errors) if e is not None)
        err = prefixed(errors[r], f"rank {r} (its tasks start at task {sum(counts[:r])} of the meta-batch): ")
        raise err from failure
    return _average(means, counts, group), gather_tasks(per_task, counts, group)


# ---------------------------------------------------------------- agreement
def on_main(fn: Callable[[], Any], group):
    """``fn()`` on rank 0 only; its result (picklable) is sent to every rank and returned there.

    If ``fn`` raises on rank 0, every rank raises that error, so that ranks do not wait forever
    for one that has stopped. Also a barrier: no rank returns before rank 0 has run ``fn``. Runs
    ``fn`` here for ``group=None``. While ``fn`` runs, :data:`AUTO` means this process alone, so
    what it calls (e.g. an experiment's report that evaluates a learner) starts no collective
    that the other ranks would never join.
    """
    if group is None:
        return fn()
    dist = _dist()
    box: list = [None]
    failure = None
    if is_main(group):
        _ALONE[0] += 1
        try:
            box[0] = (True, fn())
        except Exception as err:
            failure = err
            box[0] = (False, portable(err))
        finally:
            _ALONE[0] -= 1
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    ok, value = box[0]
    if ok:
        return value
    raise failure if failure is not None else value


def _digest(obj) -> int:
    text = json.dumps(obj, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def check_same(obj, group, *, what: str = "config") -> None:
    """Raise ``ValueError`` on every rank unless every rank of ``group`` holds the same ``obj``
    (JSON-like: a resolved config, a command's arguments).

    Compares a hash of ``obj``; where they differ the message names the ranks and, for mappings,
    the first differing (dotted) keys and their values.
    """
    if group is None:
        return
    dist = _dist()
    mine = torch.tensor([_digest(obj)], dtype=torch.int64, device=_collective_device(group))
    every = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(every, mine, group=group)
    if all(torch.equal(t, every[0]) for t in every):
        return
    objs: list = [None] * len(every)
    dist.all_gather_object(objs, obj, group=group)
    lines = []
    for r, other in enumerate(objs):
        if _digest(other) == _digest(objs[0]):
            continue
        if isinstance(other, Mapping) and isinstance(objs[0], Mapping):
            a, b = flat_items(objs[0]), flat_items(other)
            keys = sorted((k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING)), key=str)
            extra = [k for k in keys if k not in a]  # what only this rank has (e.g. agree's "invalid") first
            shown = (extra or keys)[:5]
            text = "; ".join(f"{k}={b.get(k, _MISSING)!r} where rank 0 has {a.get(k, _MISSING)!r}" for k in shown)
            more = f" (and {len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
            lines.append(f"rank {r}: {text}{more}")
        else:
            lines.append(f"rank {r}: {other!r} where rank 0 has {objs[0]!r}")
    raise ValueError(f"the {what} differs between the {len(objs)} processes (start every rank with the same "
                     f"command and the same metagrad version): " + "; ".join(lines))


def agree(fn: Callable[[], Any], group, *, what: str = "config"):
    """``fn()`` (e.g. resolving a config), checked by :func:`check_same` to be the same on every
    rank of ``group``, and returned. A ``ValueError`` / ``TypeError`` of ``fn`` takes part in the
    comparison as its message, so that a rank whose input is invalid while the others' is not
    makes every rank fail at once; ranks that agree raise it after the check."""
    if group is None:
        return fn()
    try:
        value, failure = fn(), None
    except (ValueError, TypeError) as err:
        value, failure = {"invalid": f"{type(err).__name__}: {err}"}, err
    check_same(value, group, what=what)
    if failure is not None:
        raise failure
    return value


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()

__all__ = [
    "AUTO", "launched", "init_from_env", "shutdown", "local_device", "resolve", "rank", "world_size", "is_main",
    "barrier", "shard_counts", "shard", "gather_tasks", "task_mean", "on_main", "check_same", "agree",
]
