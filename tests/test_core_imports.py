"""The core (optim, params, schedules, configure, models) imports no Lightning (CONVENTIONS.md #1)."""

import subprocess
import sys

CODE = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import lightning_optlab
import lightning_optlab.optim, lightning_optlab.params, lightning_optlab.schedules, lightning_optlab.configure
import lightning_optlab.models, lightning_optlab.data
from lightning_optlab import configure, available_optimizers, get_optimizer_class
import torch
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
mix = [{"optimizer": "adamw", "roles": ["norm", "bias"]}]
for name in available_optimizers():
    configure(model, name, lr=1e-3, **({"mix": mix} if get_optimizer_class(name).traits.matrix_only else {}))
print('ok')
"""


def test_core_imports_without_lightning():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
