#!/bin/bash
# Issue 22, item 1: the C phase (c_steps x c_lr) of Wormhole tanh on the Mexican-hat wavelet tasks
# (sec. 4.2) at the full 1,500 epochs, a grid selected on the validation tasks only: the objective
# is the mean over 1/2/5 steps of each variant's final validation MSE (500 validation tasks,
# seed 0). The chosen setting then runs over seeds 0-2 (run_wavelet.sh).
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
metagrad sweep wormhole-wavelet --out results/wormhole/wavelet-sweep-tanh --grid \
  --param c_steps=grid:1,5,10,20 --param c_lr=grid:0.3,1,3,10 \
  --objective "variants.tanh-*.val_mse" --direction minimize \
  --set 'methods=["tanh"]' --no-progress > results/wormhole/wavelet-sweep-tanh.log 2>&1
find results/wormhole/wavelet-sweep-tanh -name checkpoint.pt -delete
