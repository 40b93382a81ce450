#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_VISIBLE_DEVICES=""
# two pytest workers on two cores: one torch thread each, or they oversubscribe the cores and
# every test runs several times slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
