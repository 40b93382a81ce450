"""Owner ranks (optim/distributed.py): every registered optimizer, on 2 CPU processes (gloo) under
FSDP2 and (the whole-tensor methods) under DDP, equals one process at the same global batch, in
float64, after 8 steps with ≥ 2 preconditioner refreshes, after a save/load resume, in its
gathered ``state_dict()`` and in ``health()``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_optlab.optim import available_optimizers, get_optimizer_class
from lightning_optlab.optim.distributed import assign_owners, default_cost

SCRIPT = Path(__file__).with_name("distributed_script.py")
WHOLE = [n for n in available_optimizers() if get_optimizer_class(n).traits.whole_tensors]


def _launch(mode: str, out: Path, names: list[str]) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[2])}
    res = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), *names], capture_output=True, text=True,
                         timeout=600, env=env, cwd=out.parent)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("owner_ranks")
    names = available_optimizers()
    return {"one": _launch("one", tmp / "one.pt", names), "fsdp": _launch("fsdp", tmp / "fsdp.pt", names),
            "ddp": _launch("ddp", tmp / "ddp.pt", WHOLE)}


def _start(name: str) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from distributed_script import _model
    finally:
        sys.path.pop(0)
    return {n: p.detach() for n, p in _model(name).named_parameters()}


def _rel(a: dict, b: dict, start: dict) -> float:
    movement = max((a[k] - start[k]).abs().max().item() for k in start)
    return max((a[k] - b[k]).abs().max().item() for k in start) / movement


def _assert_state_equal(a, b, where="state", up_to_sign=False):
    if isinstance(a, torch.Tensor):
        if up_to_sign:  # an eigenvector's sign is arbitrary: bases, and what is stored in their coordinates
            a, b = a.abs(), b.abs()
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), where
        for k in a:
            _assert_state_equal(a[k], b[k], f"{where}.{k}", up_to_sign)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{where}[{i}]", up_to_sign)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-10), where
    else:
        assert a == b, where


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", available_optimizers())
def test_two_ranks_equal_one_process(runs, mode, name):
    if name not in runs[mode]:
        pytest.skip(f"{name} works on its local tensors under DDP (torch's DDP, tests/lit/test_ddp.py)")
    one, two, start = runs["one"][name], runs[mode][name], _start(name)
    assert _rel(one["weights"], two["weights"], start) < 1e-5
    assert _rel(one["resumed"], two["resumed"], start) < 1e-5  # state_dict gathered, loaded, stepped on
    assert sorted(one["health"]) == sorted(two["health"])
    for key, val in one["health"].items():
        assert math.isclose(two["health"][key], val, rel_tol=1e-5, abs_tol=1e-9), key


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", WHOLE)
def test_owner_ranks_keep_their_share_of_the_state_and_checkpoint_it_whole(runs, mode, name):
    one, two = runs["one"][name], runs[mode][name]
    # the gathered state_dict is the one-process one (SOAP's bases and rotated moments up to the sign
    # of each eigenvector, which rounding decides; the weights above show the updates agree)
    _assert_state_equal(one["state"], two["state"], up_to_sign=name == "soap")
    per_rank = two["state_entries_per_rank"]
    assert sum(per_rank) == len(one["state"]) and min(per_rank) > 0, per_rank  # each parameter's state on one rank
    load = two["owned_load"]
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from distributed_script import HPARAMS, _model, _optimizer
    finally:
        sys.path.pop(0)
    opt = _optimizer(name, _model(name))
    biggest = max(opt.distributed_cost(p, g) for g in opt.param_groups for p in g["params"])
    assert sum(load) == pytest.approx(sum(opt.distributed_cost(p, g) for g in opt.param_groups for p in g["params"]))
    assert max(load) - min(load) <= biggest, load  # greedy longest-first: within one item of balanced


def test_refreshes_happened(runs):
    # precondition_frequency 3: SOAP refreshes at its steps 3 and 6 (its first step initializes),
    # Shampoo (start_preconditioning_step 1) at 1, 4 and 7
    for name, expected in (("soap", {6}), ("shampoo", {7})):
        states = runs["one"][name]["state"].values()
        last = {st["last_refresh"] for st in states if any(f is not None for f in st.get("factors", []))}
        assert last == expected, (name, last)


def test_ranks_with_different_parameters_get_a_clear_error(runs):
    msg = runs["ddp"]["mismatch"]
    assert "rank 1 holds other parameters than rank 0" in msg and "distribute='replicate'" in msg, msg


def test_owner_assignment_is_balanced_and_deterministic():
    shapes = [(512, 512), (512, 2048), (2048, 512), (512,), (512, 512), (50304, 512), (512, 2048), (2048, 512)]
    costs = [default_cost(s, max_dim=10000) for s in shapes]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(load) / sum(load) < 0.6
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]  # more ranks than items: the low ranks
    assert default_cost((4096, 50304), max_dim=8192) == 4096 * 50304 + 4096**3  # the big side is not preconditioned
