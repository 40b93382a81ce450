"""The set-up leaves an environment where Lightning, torchmetrics, mup and lm-eval all import."""

import subprocess
import sys


def test_lightning_torchmetrics_mup_and_lm_eval_import_together():
    code = "import lightning, torchmetrics, mup, lm_eval, torch; print(torch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_torch_is_the_cpu_build_within_the_declared_range():
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= (2, 4)
