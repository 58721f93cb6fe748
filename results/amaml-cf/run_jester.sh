#!/bin/bash
# A-MAML Tables 1 and 2 on Jester-1 at the paper's settings (both step settings, both shot
# settings, 5,000 meta-iterations each), as run on a 2-core CPU: the twenty variants in three
# processes, then merged into results/amaml-cf/jester. Run from the repository root with the
# data folder in METAGRAD_DATA (default ../shared/data).
set -e
export OMP_NUM_THREADS=1 METAGRAD_DATA=${METAGRAD_DATA:-../shared/data}
OUT=results/amaml-cf
v() { for p in "$@"; do echo --variant "jester-$p"; done; }
# 1. A-MAML's 50-step variants (18 and 26 minutes)
metagrad run amaml-cf --out $OUT/runs/a-maml --set dataset=jester --no-progress \
  $(v 15shot-50steps-a-maml 20shot-50steps-a-maml) &
# 2. the sixteen baselines (iMAML, MAML, FOMAML, Reptile; 1-4 minutes each, 50 minutes in all)
metagrad run amaml-cf --out $OUT/runs/baselines --set dataset=jester --no-progress \
  $(for p in 15shot-50steps 20shot-50steps 15shot-100steps 20shot-100steps; do
      v $p-imaml $p-maml $p-fomaml $p-reptile; done) &
# 3. A-MAML's 100-step variants: 2,500 meta-iterations first (18 and 23 minutes), then on to
#    5,000 side by side (13 minutes) once the other processes were done
metagrad run amaml-cf --out $OUT/runs/a-maml-100 --set dataset=jester --set train.iterations=2500 \
  --no-progress $(v 15shot-100steps-a-maml 20shot-100steps-a-maml)
wait
metagrad run amaml-cf --out $OUT/runs/a-maml-100 --resume --set train.iterations=5000 --jobs 2 --no-progress
metagrad merge --out $OUT/jester $OUT/runs/a-maml $OUT/runs/a-maml-100 $OUT/runs/baselines
rm -r $OUT/runs
