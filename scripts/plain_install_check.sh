#!/usr/bin/env bash
# The plain-install case, for real: a fresh virtual environment with the CPU torch, then the
# package's wheel with no extras (no lm-eval, no datasets, no mup). Every `optlab ... --help` must
# work, the commands that need an extra must say in one line what to install, and a shipped recipe
# must run by its bare name from outside the checkout. Needs the package registry (PyPI) for the
# core dependencies; tests/test_plain_install.py checks the same without network (simulated extras).
#   bash scripts/plain_install_check.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$(mktemp -d)}
PY=${PYTHON:-python3}
TORCH=${TORCH_SPEC:-torch==2.13.0}
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# the CPU build first (a local wheel when one is given), as scripts/setup.sh does
if [ -n "${TORCH_WHEEL:-}" ]; then "$VPY" -m pip install -q "$TORCH_WHEEL"; else "$VPY" -m pip install -q "$TORCH"; fi
rm -rf "$WORK/dist"
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
"$VPY" -m pip install -q "$WORK"/dist/lightning_optlab-*.whl
# a reused WORK_DIR may hold an older build of the same version: install this one
"$VPY" -m pip install -q --no-deps --force-reinstall "$WORK"/dist/lightning_optlab-*.whl
cd "$WORK"   # away from the checkout: only the installed wheel is importable
export OMP_NUM_THREADS=1
OPTLAB=$WORK/venv/bin/optlab
for cmd in fit validate test check sweep report recipes mup "mup coord-check" "mup transfer" eval "eval prepare" export demo; do
    $OPTLAB $cmd --help > /dev/null 2> err.txt || { echo "FAIL: optlab $cmd --help"; cat err.txt; exit 1; }
    if grep -q Traceback err.txt; then echo "FAIL: traceback in optlab $cmd --help"; cat err.txt; exit 1; fi
done
$OPTLAB recipes > recipes.txt && grep -q lr_sweep recipes.txt
set +e
$OPTLAB mup coord-check --widths 16 32 --steps 1 2> mup.txt; rc_mup=$?
$OPTLAB eval --ckpt nothing.ckpt --task-dir samples 2> eval.txt; rc_eval=$?
set -e
[ $rc_mup = 2 ] && grep -q "pip install --no-deps mup==1.0.0" mup.txt && ! grep -q Traceback mup.txt
[ $rc_eval = 2 ] && grep -q "pip install 'lightning_optlab\[eval\]'" eval.txt && ! grep -q Traceback eval.txt
$OPTLAB sweep lr_sweep --scale tiny --only adamw --set trainer.max_steps=2 --set trainer.val_check_interval=2 \
    --set data.val_batches=1 --set optimizer.warmup_steps=0 \
    --set sweep.checkpoint_every=1000 --no-report --out sweep > sweep.txt 2>&1 || { cat sweep.txt; exit 1; }
$OPTLAB demo --steps 2 --optimizers adamw --out demo > demo.txt 2>&1 || { cat demo.txt; exit 1; }
grep -q "zero-shot table skipped" demo/report.md
echo "plain install ok: $WORK"
