#!/bin/bash
# Issue 22, item 1: the C phase (c_steps x c_lr) of Wormhole tanh and diag on balanced
# Avg-Threshold tasks, a grid each, selected on the validation tasks only: the objective is the
# mean over 1/2/5 steps of each variant's final validation cross-entropy (500 validation tasks,
# seed 0), never a test-task number. 50 of the paper's 150 epochs (a third of the cost); the
# chosen settings then run at full length over seeds 0-2 (run_threshold.sh).
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for m in tanh diag; do
  metagrad sweep wormhole-threshold --out results/wormhole/threshold-sweep-$m --grid \
    --param c_steps=grid:1,5,10 --param c_lr=grid:1,3,10,30 \
    --objective "variants.$m-*.val_ce" --direction minimize \
    --set threshold='"balanced"' --set epochs=50 --set "methods=[\"$m\"]" --no-progress \
    > results/wormhole/threshold-sweep-$m.log 2>&1 &
done
wait
find results/wormhole/threshold-sweep-tanh results/wormhole/threshold-sweep-diag -name checkpoint.pt -delete
