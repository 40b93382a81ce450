#!/usr/bin/env bash
# The small-scale study campaign (docs/studies.md, "The small scale"): the seven study recipes at ~10
# tokens per parameter, on two cores, one point per core at a time, then the μP learning-rate
# transfer for Sophia (R5; AdamW's and Lion's are docs/mup.md's 7-seed run). A rerun skips finished
# points and resumes broken ones, so an interrupted campaign continues where it stopped.
#
#   bash scripts/studies_small.sh            # ~5.5 hours on an idle 2-core machine (~10 CPU-hours)
#   bash scripts/studies_small.sh --report   # only rebuild the reports and docs/img/studies_small/
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || bash scripts/setup.sh
source .venv/bin/activate
export OMP_NUM_THREADS=1  # one thread per point: two points share the two cores
sweep() { optlab sweep "recipes/$1.yaml" --scale small "${@:2}"; }

if [ "${1:-}" != "--report" ]; then
  optlab check --config recipes/lr_sweep.yaml --scale small > /dev/null  # the corpus and the BPE, once
  sweep lr_sweep --executor local --parallel 2  # first: the momentum sweep reuses its points
  optlab eval prepare --samples --out optlab_runs/eval_tasks > /dev/null  # the budget study's zero-shot files
  # then two lanes, one point each at a time
  ( sweep adam_vs_signum; sweep soap_vs_adamw_shampoo; sweep momentum_sweep ) &
  lane=$!
  sweep adalayer_ablations; sweep soap_precondition_frequency  # its f = 10 baseline is the SOAP study's point
  sweep adamw_lion_sophia_budget
  wait "$lane"
  optlab mup lr-transfer --config recipes/mup-lr-transfer.yaml --optimizers sophia --seeds 0 1 2 --jobs 2 \
    --out docs/img/mup_lr_transfer_sophia.png
fi
for r in lr_sweep momentum_sweep adam_vs_signum adalayer_ablations soap_vs_adamw_shampoo soap_precondition_frequency \
         adamw_lion_sophia_budget; do
  [ -f "optlab_runs/$r-small/results.csv" ] || { echo "optlab_runs/$r-small has not run: left out"; continue; }
  optlab report "optlab_runs/$r-small" > /dev/null
done
python scripts/studies_findings.py --runs optlab_runs --out docs/img/studies_small
