#!/usr/bin/env bash
# Creates .venv (if missing) and installs lightning_optlab with everything the demo and
# the tests need. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.optlab-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then
    exit 0
fi
"$VPY" -m pip install -q --upgrade pip
# 1. torch first, pinned to the CPU build this machine carries on disk. A bare `torch`
#    requirement with no torch installed would pull a multi-GB CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
# 2. the package, its data/eval extras (lm-eval) and its test dependencies.
"$VPY" -m pip install -q -e ".[eval,data,test]"
# 3. mup WITHOUT its declared dependencies: mup 1.0.0 lists torchvision (and seaborn,
#    pandas) as requirements, but `import mup` never imports torchvision; the registry's
#    torchvision fails to load beside a CPU torch ("operator torchvision::nms does not
#    exist") and then breaks `import lightning` and torchmetrics. Its real runtime needs
#    (numpy, pyyaml, tqdm) are already installed above; pandas is installed for its
#    coordinate-check helpers.
"$VPY" -m pip install -q --no-deps "mup==1.0.0"
"$VPY" -m pip install -q pandas
"$VPY" -c "import lightning, torchmetrics, mup, lm_eval, torch; print('set-up ok: torch', torch.__version__)"
rm -f .venv/.optlab-setup-*
touch "$stamp"
