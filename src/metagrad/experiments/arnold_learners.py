"""The learners of the ``arnold-*`` experiments: one per (method, conv layers), each a CNN(k)
(plain, LinNet over a widened head, or T-Nets) with the inner rule and adapted parameters of its
method; and the plain CNN every variant's adapted model reduces to."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core import MetaLearner
from ..data import input_shape
from ..learners import LinNet, TNet
from ..metrics import accuracy
from ..models import CNN
from ..rules import MetaCurvature, MetaKFO, MetaSGD, SGD
from ..schedule import Schedule
from .arnold_paper import METHODS, PAPER_CHANNELS, rates


def _algorithm(method: str) -> tuple[str, str]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    algo, _, mod = method.partition("-")
    return algo, mod


def build_model(method: str, k: int, config: dict) -> nn.Module:
    """The model of ``method`` on CNN(k): a plain CNN, a LinNet over a widened-head CNN or a TNet."""
    _, mod = _algorithm(method)
    ways = config["ways"]
    kw = _cnn_options(config)
    if mod == "linnet":
        widths = list(config["linnet_widths"])
        if not widths:
            return LinNet(CNN(k, ways, **kw), ways, (), ways)
        return LinNet(CNN(k, widths[0], **kw), widths[0], widths[1:], ways)
    cnn = CNN(k, ways, **kw)
    return TNet(cnn) if mod == "tnets" else cnn


#: the CNN shape keys of the config and their values before the keys existed (our network)
CNN_SHAPE = {"downsample": "maxpool", "pool": "flatten"}


def _cnn_options(config: dict) -> dict:
    """CNN keyword arguments of a config: channels (the paper's by default), input shape, init,
    downsampling and pooling (configs from before these keys: ours, max-pooling and flatten)."""
    return dict(channels=config["channels"] or PAPER_CHANNELS[config["dataset"]], init=config.get("init", "torch"),
                **{key: config.get(key, old) for key, old in CNN_SHAPE.items()},
                **input_shape(config["dataset"]))


def base_cnn(k: int, config: dict) -> CNN:
    """The plain CNN(k) every variant's adapted model reduces to."""
    return CNN(k, config["ways"], **_cnn_options(config))


def adapted_model(model: nn.Module) -> nn.Module:
    """The plain CNN that ``model`` computes: a LinNet's chain collapsed and multiplied into the
    CNN's head (``W = W_L ... W_1 W_head``, ``b = W_L ... W_1 b_head``), a TNet's transforms absorbed,
    any other model copied. Detached copies; the result has the base CNN's parameters."""
    if isinstance(model, TNet):
        return model.absorb()
    if isinstance(model, LinNet):
        base = copy.deepcopy(model.base)
        m = model.collapsed_weight().detach()  # [ways, head_out]
        head = base.head
        new = nn.Linear(head.in_features, m.shape[0], dtype=m.dtype, device=m.device)
        with torch.no_grad():
            new.weight.copy_(m @ head.weight)
            new.bias.copy_(m @ head.bias)
        base.head = new
        base.ways = m.shape[0]
        return base
    return copy.deepcopy(model)


def _adapt_spec(method: str, model: nn.Module):
    algo, mod = _algorithm(method)
    if algo == "maml":
        return model.base_parameter_patterns() if isinstance(model, TNet) else "all"
    if mod == "tnets":
        raise ValueError("T-Nets is not run with ANIL (Arnold et al., suppl. B.5: not compatible)")
    return ["base.head", "linear"] if isinstance(model, LinNet) else "head"


def _rule(method: str, lr: float, config: dict):
    _, mod = _algorithm(method)
    if mod == "msgd":
        return MetaSGD(lr)
    if mod == "mc":
        return MetaCurvature(lr)
    if mod == "kfo":
        kfo = config["kfo"]
        return MetaKFO(lr, hidden_layers=kfo["hidden_layers"], nonlinearity=kfo["nonlinearity"],
                       adapt_state=kfo["adapt_state"])
    return SGD(lr)


def build_learner(method: str, k: int, config: dict) -> tuple[MetaLearner, float]:
    """``(learner, meta lr)`` of one variant."""
    adapt_lr, meta_lr = rates(config, method)
    model = build_model(method, k, config)
    learner = MetaLearner(model, F.cross_entropy, adapt=_adapt_spec(method, model), rule=_rule(method, adapt_lr, config),
                          meta_gradient=config["meta_gradient"],
                          schedule=Schedule(config["train_steps"], config["test_steps"]), metric_fn=accuracy,
                          vectorize=config["vectorize"])
    return learner, meta_lr
