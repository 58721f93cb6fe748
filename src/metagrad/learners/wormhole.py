"""Wormhole MAML: a task-specific multiplicative parameter ``C_i`` in the inner loop.

The inner loop adapts ``phi_i = C_i theta + Delta_i`` (paper eq. 2, Algorithm 1): for every task
``C_i`` is re-initialized, takes ``n_c`` gradient steps at rate ``gamma`` with ``theta`` fixed,
then the weights take ``n`` steps at rate ``alpha`` with ``C_i`` fixed; the meta-gradient flows
through both phases to ``theta``. :class:`Wormhole` wraps a model so that its forward pass uses
``C(c) * theta`` for the selected parameters; the C entries live under ``wormhole.*`` and a
:class:`~metagrad.schedule.Phase` adapts them before the main steps (:meth:`Wormhole.schedule`).

Forms (``form=``), with ``theta`` the selected parameter tensors (``layers=``; default all):

* ``"scalar"`` (eq. 3): one scalar ``c``; every selected tensor is multiplied by ``c``.
* ``"tanh"`` (eq. 4): one scalar ``t``; ``C = tanh(t)`` in (-1, 1).
* ``"diag"`` (eq. 5): one entry per parameter entry (``d_theta`` in all), elementwise.
* ``"layer"`` (eq. 6): one scalar per selected parameter tensor (the paper's per-layer diagonal).
* ``"lowrank"`` (eq. 7): ``C = I + U V^T`` per selected weight matrix (``dim >= 2``; a conv
  kernel as ``[out, -1]``), acting on the output side: ``W' = (I + U V^T) W`` with ``U, V`` of
  shape ``[out, rank]``; ``U`` starts at 0 (so C starts at the identity) and ``V`` at a fixed
  random ``N(0, 1/out)`` draw (both zero would be a saddle: no gradient reaches either). Vectors
  (biases) are left alone by this form. ``2 * rank * out`` entries per weight matrix.

``init`` is the initial *value* of C (default 1.0). For ``"tanh"``, ``tanh(t) = 1`` is impossible,
so ``init`` must lie in (-1, 1) and defaults to 0.9 (``t = atanh(0.9) = 1.47``: near 1, as the paper
asks, yet with slope ``1 - 0.81 = 0.19`` so the C phase can still flip its sign). The
``"lowrank"`` form always starts at the identity, so it accepts only ``init=1.0``.

By default (``learn_init=False``) the C entries are *buffers*: they are reset to ``init`` for every
task and receive no meta-gradient (the paper's "Initialize C_i"). With ``learn_init=True`` they are
parameters, and their initialization is meta-learned through both phases; keep them out of the
main steps with ``adapt=wormhole.model_patterns()``.

The phases compose with the ``unrolled``, ``first-order``, ``checkpointed``, ``implicit`` and
``adjoint`` meta-gradients (see :class:`~metagrad.Schedule`) and with every update rule that the
meta-gradient accepts for the main steps; ``reptile`` refuses them.

Usage::

    wh = Wormhole(nn.Linear(5, 1), form="tanh")
    learner = MetaLearner(wh, F.binary_cross_entropy_with_logits, adapt=wh.model_patterns(), lr=1.0,
                          schedule=wh.schedule(train_steps=1, c_steps=1, c_lr=10.0))
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..schedule import Phase, Schedule

FORMS = ("scalar", "tanh", "diag", "layer", "lowrank")
PREFIX = "wormhole"


def _key(name: str) -> str:
    return name.replace(".", "__")


class Wormhole(nn.Module):
    """Wrap ``model`` so that its selected parameters enter the forward pass as ``C(c) * theta``.

    Args:
        model: any ``nn.Module`` (registered as ``self.model``; its parameters read ``model.<name>``).
        form: ``"scalar"``, ``"tanh"``, ``"diag"``, ``"layer"`` or ``"lowrank"`` (see the module doc).
        layers: glob pattern(s) over the *base model's* parameter names that C applies to
            (default: all; ``"lowrank"`` uses only the matched tensors with ``dim >= 2``).
        init: the initial value of C (default 1.0; 0.9 for ``"tanh"``, which needs (-1, 1)).
        rank: the rank of ``U V^T`` for ``"lowrank"``.
        learn_init: meta-learn C's initialization (parameters) instead of a fixed reset (buffers).
    """

    def __init__(self, model: nn.Module, form: str = "tanh", *, layers: str | Sequence[str] | None = None,
                 init: float | None = None, rank: int = 1, learn_init: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if form not in FORMS:
            raise ValueError(f"unknown wormhole form {form!r}; valid forms: {', '.join(FORMS)}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if init is None:
            init = 0.9 if form == "tanh" else 1.0
        init = float(init)
        if form == "tanh" and not -1.0 < init < 1.0:
            raise ValueError(f"the tanh form needs init in (-1, 1) (tanh(t) never reaches +-1), got {init}")
        if form == "lowrank" and init != 1.0:
            raise ValueError(f"the lowrank form starts at the identity (U = 0); init must be 1.0, got {init}")
        self.model = model
        self.form = form
        self.rank = rank
        self.init = init
        self.learn_init = bool(learn_init)
        params = dict(model.named_parameters())
        if layers is None:
            selected = list(params)
        else:
            patterns = [layers] if isinstance(layers, str) else list(layers)
            selected = []
            for pat in patterns:
                hits = [n for n in params if fnmatchcase(n, pat) or fnmatchcase(n, pat + ".*")]
                if not hits:
                    raise ValueError(f"layers pattern {pat!r} matches no parameter; parameters: {', '.join(params)}")
                selected += hits
            selected = [n for n in params if n in set(selected)]
        if form == "lowrank":
            selected = [n for n in selected if params[n].dim() >= 2]
            if not selected:
                raise ValueError("the lowrank form needs at least one selected weight matrix (dim >= 2)")
        self.selected = tuple(selected)

        self.wormhole = nn.Module()
        ref = next(iter(params.values()))
        kw = {"dtype": ref.dtype, "device": ref.device}
        values: dict[str, Tensor] = {}
        if form == "scalar":
            values["c"] = torch.tensor(init, **kw)
        elif form == "tanh":
            values["t"] = torch.tensor(math.atanh(init), **kw)
        elif form == "diag":
            values.update({_key(n): torch.full_like(params[n].detach(), init) for n in selected})
        elif form == "layer":
            values.update({_key(n): torch.tensor(init, **kw) for n in selected})
        else:
            gen = torch.Generator().manual_seed(0)
            for n in selected:
                out = params[n].shape[0]
                values[_key(n) + "__u"] = torch.zeros(out, rank, **kw)
                values[_key(n) + "__v"] = (torch.randn(out, rank, generator=gen, dtype=torch.float64)
                                           / math.sqrt(out)).to(**kw)
        for k, v in values.items():
            if self.learn_init:
                self.wormhole.register_parameter(k, nn.Parameter(v))
            else:
                self.wormhole.register_buffer(k, v)

    # ------------------------------------------------------------------ names
    def c_names(self) -> tuple[str, ...]:
        """Full names (``wormhole.*``) of C's tensors."""
        tensors = self.wormhole.named_parameters() if self.learn_init else self.wormhole.named_buffers()
        return tuple(f"{PREFIX}.{k}" for k, _ in tensors)

    def c_tensors(self) -> dict[str, Tensor]:
        tensors = self.wormhole.named_parameters() if self.learn_init else self.wormhole.named_buffers()
        return {f"{PREFIX}.{k}": v for k, v in tensors}

    def num_c(self) -> int:
        """The number of entries of C (the paper's parameter count of the form)."""
        return sum(v.numel() for v in self.c_tensors().values())

    def model_patterns(self) -> tuple[str, ...]:
        """``adapt=`` patterns for the main steps: the base model's parameters (not C)."""
        return ("model.*",)

    def c_phase(self, steps: int = 1, lr: float = 1.0, *, test_steps: int | None = None) -> Phase:
        """The C phase of Algorithm 1: ``steps`` SGD steps on C at rate ``lr`` (gamma)."""
        return Phase(adapt=(f"{PREFIX}.*",), steps=steps, test_steps=test_steps, lr=lr)

    def schedule(self, train_steps: int = 1, c_steps: int = 1, c_lr: float = 1.0, *, test_steps: int | None = None,
                 c_test_steps: int | None = None, per_step_loss: bool = False) -> Schedule:
        """Algorithm 1 as a :class:`Schedule`: ``c_steps`` steps on C at ``c_lr``, then ``train_steps``."""
        return Schedule(train_steps, test_steps, per_step_loss,
                        phases=(self.c_phase(c_steps, c_lr, test_steps=c_test_steps),))

    # ------------------------------------------------------------------ the multiplier
    def c_value(self) -> Tensor | dict[str, Tensor]:
        """The current value of C: a scalar for ``scalar``/``tanh``, else a dict per tensor."""
        w = self.wormhole
        if self.form == "scalar":
            return w.c
        if self.form == "tanh":
            return torch.tanh(w.t)
        if self.form == "lowrank":
            return {n: getattr(w, _key(n) + "__u") @ getattr(w, _key(n) + "__v").T for n in self.selected}
        return {n: getattr(w, _key(n)) for n in self.selected}

    def effective_parameters(self) -> dict[str, Tensor]:
        """The base model's parameters with C applied (``C theta``)."""
        params = dict(self.model.named_parameters())
        c = self.c_value()
        out = dict(params)
        for n in self.selected:
            p = params[n]
            if self.form in ("scalar", "tanh"):
                out[n] = c * p
            elif self.form in ("diag", "layer"):
                out[n] = c[n] * p
            else:  # W' = (I + U V^T) W = W + U (V^T W)
                u = getattr(self.wormhole, _key(n) + "__u")
                v = getattr(self.wormhole, _key(n) + "__v")
                flat = p.reshape(p.shape[0], -1)
                out[n] = (flat + u @ (v.T @ flat)).reshape(p.shape)
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, {**self.effective_parameters(), **dict(self.model.named_buffers())},
                               args, kwargs)
