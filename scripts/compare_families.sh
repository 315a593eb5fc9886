#!/usr/bin/env bash
# Issue 26's fair family comparison: every family in configs/compare/ trains on the same data
# (runs/data/smollm2_distill_v3) for the same steps with the same taps, draft vocab and lr, then one
# `paratree bench` runs them all at budgets 8-64 on GSM8K, HumanEval and MT-Bench.
#
#   bash scripts/compare_families.sh train      # resumable: run it again to continue (each family resumes)
#   TIME_LIMIT=40 bash scripts/compare_families.sh train   # at most ~40 min per family per call
#   DEVICE=cuda bash scripts/compare_families.sh train     # the same configs on a GPU
#   bash scripts/compare_families.sh bench      # once every head is trained
set -euo pipefail
cd "$(dirname "$0")/.."
PARATREE=${PARATREE:-paratree}
DEVICE=${DEVICE:-cpu}
FAMILIES=${FAMILIES:-jetspec dflash eagle3 dspark}
case "${1:-train}" in
  train)
    for f in $FAMILIES; do
      if [ -f "runs/compare/$f/head/train_summary.json" ]; then
        echo "compare: $f already trained (runs/compare/$f/head)"; continue
      fi
      $PARATREE train --config "configs/compare/$f.yaml" --resume --device "$DEVICE" \
        ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"}
    done ;;
  bench)
    heads=()
    for f in $FAMILIES; do heads+=(--head "$f=runs/compare/$f/head"); done
    methods=plain
    for f in $FAMILIES; do
      case $f in
        jetspec) methods+=",jetspec,jetspec-pc" ;;
        dflash) methods+=",dflash,ddtree" ;;
        *) methods+=",$f" ;;
      esac
    done
    $PARATREE bench --dataset gsm8k,humaneval,mt_bench --limit 10 --max-new-tokens 128 --repeats 2 --compile \
      --methods "$methods" --budget 8,16,32,64 "${heads[@]}" \
      --json runs/compare/bench.json --report runs/compare/report ;;
  *) echo "usage: $0 train|bench" >&2; exit 2 ;;
esac
