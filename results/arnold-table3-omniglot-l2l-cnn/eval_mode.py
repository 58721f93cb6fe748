"""Test accuracy of a trained arnold-table3 MAML variant with BatchNorm in eval mode (running statistics).

learn2learn's BatchNorm2d keeps running statistics (momentum 0.1) that every train-mode forward updates,
including the forwards of MAML's task clones, which share the buffers with the model. Its examples and the
paper authors' released code (github.com/Sha-Lab/kfo) never call ``model.eval()``, so those buffers are
never read: training and testing both normalize with batch statistics, exactly as metagrad's CNN does.
This script asks what the accuracy would be had the test been run in eval mode:

1. load ``checkpoint.pt`` of a finished variant (trained with batch statistics, as learn2learn trains);
2. accumulate running statistics as learn2learn would at the end of meta-training: ``--warmup`` meta-
   iterations of ``meta_batch_size`` training tasks, each a train-mode support forward with the meta-learned
   parameters and a train-mode query forward with the adapted ones (one SGD step at the variant's adapt lr),
   updating the running mean/variance with momentum 0.1 from mean 0 / variance 1 (the final parameters stand
   in for the slowly changing ones of the last iterations; momentum 0.1 forgets all but the last few dozen
   forwards);
3. evaluate the run's 1,000 test tasks (same seed as ``metagrad run``) twice: in train mode (batch
   statistics: must reproduce the run's summary.json, a check of this script) and in eval mode (support
   gradient and query predictions both with the running statistics).

Usage: ``python eval_mode.py RUN_DIR [--variant maml-cnn2] [--warmup 20]`` (prints JSON).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metagrad.data import EpisodeSampler, load_meta_split
from metagrad.experiments import arnold_learners as al
from metagrad.experiments.arnold_paper import rates
from metagrad.metrics import mean_ci95


def _with_running_stats(model: nn.Module, momentum: float) -> nn.Module:
    """``model`` with every ``BatchNorm2d`` replaced by one that tracks running statistics (same affine
    parameters, fresh buffers: mean 0, variance 1)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=momentum, affine=True,
                                track_running_stats=True)
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
            setattr(model, name, bn)
        else:
            _with_running_stats(child, momentum)
    return model


def _adapt(model, params, x, y, lr):
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: p - lr * g for (n, p), g in zip(params.items(), grads)}


def _test(model, params, sampler, tasks, seed, lr, batch=100):
    gen = torch.Generator().manual_seed(seed)
    accs = []
    done = 0
    while done < tasks:
        n = min(batch, tasks - done)
        ep = sampler.sample(n, generator=gen)
        for i in range(n):
            fast = _adapt(model, params, ep.support_x[i], ep.support_y[i], lr)
            with torch.no_grad():
                pred = functional_call(model, fast, (ep.query_x[i],)).argmax(1)
            accs.append((pred == ep.query_y[i]).float().mean().item())
        done += n
    mean, ci = mean_ci95(torch.tensor(accs, dtype=torch.float64))
    return {"accuracy": 100 * mean, "ci95": 100 * ci, "tasks": tasks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variant", default="maml-cnn2")
    ap.add_argument("--warmup", type=int, default=20, help="meta-iterations of running-stat updates")
    ap.add_argument("--momentum", type=float, default=0.1, help="BatchNorm momentum (learn2learn: PyTorch's 0.1)")
    args = ap.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())
    ck = torch.load(args.run_dir / args.variant / "checkpoint.pt", weights_only=False)
    method, _, arch = args.variant.rpartition("-cnn")
    if method != "maml":
        raise SystemExit("this script handles plain MAML variants (maml-cnnK) only")
    k = int(arch)
    vcfg = json.loads((args.run_dir / args.variant / "config.json").read_text())
    lr, _ = rates(config, method)
    model = al.build_model(method, k, config)
    model.load_state_dict({n.removeprefix("model."): v for n, v in ck["learner"].items()})
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    invert = config["dataset"] == "omniglot"
    train_x, train_y = load_meta_split(config["dataset"], "train", root=config["data_root"])
    test_x, test_y = load_meta_split(config["dataset"], "test", root=config["data_root"])
    ways, shots = config["ways"], config["shots"]
    train = EpisodeSampler(train_x, train_y, ways, shots, config["queries"], invert=invert, seed=12345)
    test = EpisodeSampler(test_x, test_y, ways, shots, config["test_queries"], invert=invert)
    seed = vcfg["seed"] + 20_011  # the test tasks of metagrad.train.fit
    tasks = vcfg["eval_tasks"]
    out = {"run": str(args.run_dir), "variant": args.variant, "adapt_lr": lr, "iterations": ck["iteration"]}
    model.train()
    out["train_mode_batch_stats"] = _test(model, params, test, tasks, seed, lr)
    _with_running_stats(model, args.momentum).train()
    for _ in range(args.warmup):  # the forwards of learn2learn's last meta-iterations, in train mode
        ep = train.sample(vcfg["meta_batch_size"])
        for i in range(ep.support_x.shape[0]):
            fast = _adapt(model, params, ep.support_x[i], ep.support_y[i], lr)  # support forward: updates the running stats
            with torch.no_grad():
                functional_call(model, fast, (ep.query_x[i],))  # query forward with the adapted parameters: updates them
    out["warmup"] = {"meta_iterations": args.warmup, "tasks": args.warmup * vcfg["meta_batch_size"],
                     "momentum": args.momentum}
    model.eval()
    out["eval_mode_running_stats"] = _test(model, params, test, tasks, seed, lr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
