"""Two CPU processes under Lightning's ModelParallelStrategy (FSDP2, gloo) train like one process.

The script (tests/lit/fsdp_script.py) trains every optimizer below in one launch (torchrun, 2
processes) and again in one plain process, in float64, at the same global batch; the test compares
the whole weights after 8 steps with the weights' movement.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp_script.py")
ROOT = Path(__file__).parents[2]

DIAGONAL = ["adamw", "adamw:llama", "lion", "signum", "sgd", "sophia", "schedule_free_adamw",
            "adam_mini", "adafactor", "adalayer"]
# need the optimizer-side distributor (owner ranks); refused as "needs whole tensors" until it lands
MATRIX = ["soap", "shampoo", "muon"]
OPTIMIZERS = DIAGONAL + MATRIX

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run_script(*args: str, world: int, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """``fsdp_script.py ARGS`` in one plain process (world 1) or under torchrun with ``world`` CPU processes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    launch = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    res = subprocess.run([*launch, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=cwd)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_parity")
    names = ",".join(OPTIMIZERS)
    run_script("parity", str(tmp / "one.pt"), names, world=1, cwd=tmp)
    run_script("parity", str(tmp / "two.pt"), names, world=2, cwd=tmp)
    return torch.load(tmp / "one.pt", weights_only=False), torch.load(tmp / "two.pt", weights_only=False)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_process_fsdp2_matches_one_process(parity_runs, optimizer):
    one, two = parity_runs[0][optimizer], parity_runs[1][optimizer]
    assert "error" not in one, one.get("trace")
    if "error" in two:
        # the clear refusal before training, until the optimizer-side distributor handles shards
        if "needs whole tensors" in two["error"]:
            pytest.xfail(f"{optimizer} refuses FSDP2 shards until lightning_optlab.optim's distributor lands: "
                         f"{two['error'][:160]}")
        pytest.fail(two["trace"])
    assert len(one["losses"]) == len(two["losses"]) == 8
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-12, abs=1e-12)
    for name, w0 in one["start"].items():
        assert torch.equal(two["start"][name], w0), f"{name}: the sharded run starts from other weights"
        assert two["end"][name].dtype == torch.float64
        moved = (one["end"][name] - w0).norm().item()
        diff = (two["end"][name] - one["end"][name]).norm().item()
        # atol: a parameter whose true gradient is 0 (the key bias: softmax ignores a shift shared by
        # all keys) moves by rounding noise only
        assert diff <= 1e-5 * moved + 1e-12, f"{name}: differs by {diff:.3g}, moved {moved:.3g}"
