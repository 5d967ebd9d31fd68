#!/bin/bash
# Issue 38: does FedDPA pay off once its adapters have learnt? SmolLM2-135M-Instruct on FLAN set 1, bfloat16
# (fast only where lscpu shows avx512_bf16). docs/real-models.md has the results. Run from the repo root:
#   bash tools/budget.sh pilot      # one seed, 8 rounds of 12 steps, curves every round: the budget's curves
#   bash tools/budget.sh study      # three seeds at the chosen budget, every row, curves for four of them
# Each resumes where it stopped (run it again); THREADS=1 runs it on one core. Two seeds at once, one
# core each: SEED=0 THREADS=1 bash tools/budget.sh study & SEED=1 THREADS=1 bash tools/budget.sh study;
# then bash tools/budget.sh study runs what is left (seed 2) and writes the study's summary.
#   bash tools/budget.sh rescore    # the inference ablations and the unseen tasks, on the trained adapters
# (SEED=N: that seed's run alone, into runs/budget-<what>/seed<N>; without: the study, whose seeds re-scored
# already are read, not run again). FLAN2=data/feddpa-flan2 for the unseen tasks.
set -e
FLAN=${FLAN:-data/feddpa-flan1}                       # python -m extras.fetch data/feddpa-flan1
M=${M:-~/.cache/feddpa/smollm2-135m-instruct}         # python tools/get_smollm2.py
T=${THREADS:-2}
COMMON="--data $FLAN --model $M --dtype bfloat16 --batch-size 8 --micro-batch-size 8 --lr 1e-3 --targets q_proj,v_proj
        --cutoff 384 --max-new-tokens 16 --local-steps 12 --eval-every 1 --curve-per-task 5 -q"
go() {  # resume the run in $1 if it has begun, else start it: train.py with the remaining flags
  out=$1; shift
  if [ -f $out/config.json ]; then OMP_NUM_THREADS=$T python train.py --resume $out -q
  else OMP_NUM_THREADS=$T python train.py "$@" --out $out; fi
}
case $1 in
  pilot) go runs/pilot-s12 $COMMON --methods local,fedit,feddpa-t --rounds 8 --test-per-task 5 --seed 0 ;;
  study) go runs/budget-flan1${SEED:+/seed$SEED} $COMMON --rounds ${ROUNDS:-6} --test-per-task 20 ${SEED:+--seed $SEED} \
            $([ -z "$SEED" ] && echo --seeds 0,1,2) \
            --methods base,local,fedit,centralized,feddpa-f,feddpa-f-fixed,feddpa-f-calibrated,feddpa-f-oracle,feddpa-t,feddpa-t-fixed,feddpa-t-calibrated,feddpa-t-sum,feddpa-t-oracle \
            --curve-methods local,fedit,feddpa-t,feddpa-t-calibrated ;;
  rescore)
    FLAN2=${FLAN2:-data/feddpa-flan2}
    from=runs/budget-flan1${SEED:+/seed$SEED}
    again() {  # re-score $from's adapters into runs/budget-$1 with the remaining flags
      out=runs/budget-$1${SEED:+/seed$SEED}; shift
      go $out --rescore $from -q "$@"
    }
    for k in 1 3 10; do again k$k --k-refs $k --methods feddpa-t,feddpa-t-calibrated; done
    for s in l2 pearson; do again sim-$s --similarity $s --methods feddpa-t; done
    again pool-mean --pool mean --methods feddpa-t,feddpa-t-calibrated
    again unseen --test-data $FLAN2 --methods fedit,local,feddpa-f,feddpa-t,feddpa-t-calibrated ;;
  *) echo "usage: bash tools/budget.sh pilot|study|rescore" >&2; exit 2 ;;
esac
