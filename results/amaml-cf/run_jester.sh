#!/bin/bash
# Jester-1 at the paper's settings (both tables, both shot settings), on a 2-core CPU:
# A-MAML's four variants in one process, the sixteen baselines in another, then merged.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 METAGRAD_DATA=${METAGRAD_DATA:-../shared/data}
OUT=results/amaml-cf
variants() { for p in jester-15shot-50steps jester-20shot-50steps jester-15shot-100steps jester-20shot-100steps; do
  for m in "$@"; do echo --variant "$p-$m"; done; done; }
metagrad run amaml-cf --out $OUT/runs/a-maml --set dataset=jester --no-progress $(variants a-maml) > $OUT/runs/a-maml.log 2>&1 &
metagrad run amaml-cf --out $OUT/runs/baselines --set dataset=jester --no-progress $(variants imaml maml fomaml reptile) > $OUT/runs/baselines.log 2>&1 &
wait
metagrad merge --out $OUT/jester $OUT/runs/a-maml $OUT/runs/baselines
# What was actually run on the 2-core machine (the A-MAML process above was stopped after its
# two 50-step variants): A-MAML's 100-step variants in a third process at 2,500 meta-iterations,
# trained on towards 5,000 with --resume as time allowed (see README.md):
#   metagrad run amaml-cf --out $OUT/runs/a-maml-100 --set dataset=jester --set train.iterations=2500 \
#     --variant jester-15shot-100steps-a-maml --variant jester-20shot-100steps-a-maml
