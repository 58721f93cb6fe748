#!/bin/bash
# Issue 22, item 1: the C phase (c_steps x c_lr) of Wormhole tanh on 2-way 1-shot MNIST (sec. 4.3),
# selected on the validation tasks only (objective: the final validation error of tanh-2step on
# 200 validation tasks, seed 0). Reduced to what a 2-core CPU affords, not the paper's setting:
# the quick net (channels 8, 16, hidden 64; the paper's is 20, 50, 500), 10 epochs of 26
# meta-batches of 16 tasks (the paper: 100), 2 inner steps only. Data: the t10k halves (the
# shared MNIST slice is t10k only; with mnist/train-* under the data root, source=auto would
# meta-train on the 60k train split).
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
metagrad sweep wormhole-mnist --out results/wormhole/mnist-sweep-tanh --grid \
  --param c_steps=grid:1,5 --param c_lr=grid:0.1,1,10 \
  --objective "variants.tanh-2step.val_error" --direction minimize \
  --set 'methods=["tanh"]' --set 'steps=[2]' --set 'channels=[8,16]' --set hidden=64 --set epochs=10 \
  --set train.eval_every=52 --set train.checkpoint_every=130 --no-progress > results/wormhole/mnist-sweep-tanh.log 2>&1
find results/wormhole/mnist-sweep-tanh -name checkpoint.pt -delete
