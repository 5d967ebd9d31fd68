#!/bin/bash
# The paper's experiments at CPU scale on the built-in world, 3 seeds (docs/paper.md). Run from the repo root.
set -e
R=${R:-runs/paper}
log() { echo "$(date +%T) $*" >> $R-log.txt; }
mkdir -p $(dirname $R)
log start
python train.py --seeds 0,1,2 --eval-every 2 --curve-per-task 10 --out $R-main -q > $R-main.txt 2>&1
log main done
M=feddpa-f,feddpa-t,feddpa-t-calibrated
for k in 1 3 5 10; do python train.py --rescore $R-main --out $R-k$k --k-refs $k --methods $M -q > $R-k$k.txt 2>&1; log k$k; done
for s in cosine l2 pearson; do python train.py --rescore $R-main --out $R-sim-$s --similarity $s --methods feddpa-f,feddpa-t -q > $R-sim-$s.txt 2>&1; log sim $s; done
for p in last mean; do python train.py --rescore $R-main --out $R-pool-$p --pool $p --methods $M -q > $R-pool-$p.txt 2>&1; log pool $p; done
python train.py --seeds 0,1,2 --tasks entailment,paraphrase,coreference --out $R-tasks3 -q > $R-tasks3.txt 2>&1
log tasks done
python train.py --rescore $R-main --out $R-sum --methods feddpa-t,feddpa-t-fixed,feddpa-t-sum -q > $R-sum.txt 2>&1
log sum done
