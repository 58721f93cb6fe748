#!/bin/bash
# Issue 22, item 1: each Wormhole experiment over seeds 0, 1, 2 with the C phase its sweep chose on
# validation tasks (sweep_*.sh; read from each sweep.json's "best"), test results beside Table 1
# in each folder's seeds.md. Checkpoints are removed afterwards. Argument: threshold-vanilla,
# threshold, wavelet, mnist or all (default).
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
W=results/wormhole
best() {  # "[c_steps, c_lr]" of the best trial of a sweep
  python3 -c 'import json, sys; p = json.load(open(sys.argv[1]))["best"]["params"]; print(json.dumps([p["c_steps"], p["c_lr"]]))' "$1"
}
which=${1:-all}
if [ "$which" = all ] || [ "$which" = threshold-vanilla ]; then
  # Avg-Threshold at the full 150 epochs on balanced tasks (tau at the support median): vanilla
  # MAML (no C phase, so it needs no sweep), then the two forms of C with their chosen C phase
  metagrad run wormhole-threshold --out $W/threshold-balanced-vanilla --seeds 0 1 2 --no-progress \
    --set threshold='"balanced"' --set 'methods=["vanilla"]'
  find $W/threshold-balanced-vanilla -name checkpoint.pt -delete
fi
if [ "$which" = all ] || [ "$which" = threshold ]; then
  metagrad run wormhole-threshold --out $W/threshold-balanced-tuned --seeds 0 1 2 --jobs 2 --no-progress \
    --set threshold='"balanced"' --set 'methods=["tanh","diag"]' \
    --set "c_phase.tanh=$(best $W/threshold-sweep-tanh/sweep.json)" \
    --set "c_phase.diag=$(best $W/threshold-sweep-diag/sweep.json)"
  find $W/threshold-balanced-tuned -name checkpoint.pt -delete
fi
if [ "$which" = all ] || [ "$which" = wavelet ]; then
  # Mexican-hat wavelets at the full 1,500 epochs
  metagrad run wormhole-wavelet --out $W/wavelet-tuned --seeds 0 1 2 --jobs 2 --no-progress \
    --set "c_phase.tanh=$(best $W/wavelet-sweep-tanh/sweep.json)"
  find $W/wavelet-tuned -name checkpoint.pt -delete
fi
if [ "$which" = all ] || [ "$which" = mnist ]; then
  # 2-way 1-shot MNIST, reduced as in sweep_mnist.sh (quick net, 10 epochs), 2 and 5 steps
  metagrad run wormhole-mnist --out $W/mnist-tuned --seeds 0 1 2 --jobs 2 --no-progress \
    --set 'steps=[2,5]' --set 'channels=[8,16]' --set hidden=64 --set epochs=10 \
    --set train.eval_every=52 --set train.checkpoint_every=130 \
    --set "c_phase.tanh=$(best $W/mnist-sweep-tanh/sweep.json)"
  find $W/mnist-tuned -name checkpoint.pt -delete
fi
