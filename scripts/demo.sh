#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the demo: a small language model trained on
# an embedded corpus (no download) with several optimizers, and a report at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_VISIBLE_DEVICES=""
exec .venv/bin/optlab demo "$@"
