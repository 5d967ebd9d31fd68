#!/bin/bash
# What client-level DP-FedAvg costs FedDPA on the built-in world, 3 seeds (docs/privacy.md): no DP, then a
# clip of 2 (about the clients' update norms at the default budget) and three noise multipliers.
# Run from the repo root; then python tools/privacy.py $R draws the figure and prints the tables.
set -e
R=${R:-runs/privacy}
M=base,local,fedit,feddpa-f,feddpa-t,feddpa-t-calibrated
mkdir -p $(dirname $R)
python train.py --seeds 0,1,2 --methods $M --out $R-none -q > $R-none.txt 2>&1
for s in 0.01 0.03 0.1; do
  python train.py --seeds 0,1,2 --methods $M --dp-clip 2 --dp-noise $s --out $R-$s -q > $R-$s.txt 2>&1
done
