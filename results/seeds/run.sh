#!/bin/bash
# The cheap experiments at their full default settings, seeds 0, 1 and 2 (issue 22, item 2),
# two at a time on a 2-core CPU; checkpoints removed afterwards.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for e in linreg-depth logreg-depth linnet-collapse linreg-landscape sinusoid; do
  echo "metagrad run $e --out results/seeds/$e --seeds 0 1 2 --no-progress"
done | xargs -P 2 -I{} sh -c "{} > /dev/null"
find results/seeds -name checkpoint.pt -delete
# Wormhole Avg-Threshold (Table 1) at full settings, the paper's reading (tau ~ U[0, 1]):
OMP_NUM_THREADS=1 metagrad run wormhole-threshold --out results/seeds/wormhole-threshold --seeds 0 1 2 --jobs 2 --no-progress
find results/seeds -name checkpoint.pt -delete
OMP_NUM_THREADS=1 metagrad run wormhole-wavelet --out results/seeds/wormhole-wavelet --seeds 0 1 2 --jobs 2 --no-progress
find results/seeds -name checkpoint.pt -delete
