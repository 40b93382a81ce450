"""The per-rank memory estimate: its optimizer-state bytes equal a real optimizer's state."""

import pytest
import torch

from lightning_optlab import configure
from lightning_optlab.memory import (MemoryEstimate, format_memory_table, measured_state_bytes, memory_per_rank,
                                     optimizer_state_bytes, state_bytes)
from lightning_optlab.models import build_model
from lightning_optlab.optim.base import iter_leaf_optimizers
from lightning_optlab.optim.registry import available_optimizers

#: hyperparameters an optimizer needs on a LLaMA, or that bring its state to its steady layout
HPARAMS = {
    "adam_mini": {"n_heads": 2},
    "muon": {"mix": [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"], "lr": 3e-3}]},
    "shampoo": {"start_preconditioning_step": 1, "precondition_frequency": 1, "max_precond_dim": 100},
    "soap": {"max_precond_dim": 100},  # the 256-row embedding keeps one side unpreconditioned
    "sgd": {"momentum": 0.9},
}


def _model():
    torch.manual_seed(0)
    return build_model({"preset": "llama-tiny", "n_head": 2, "n_kv_head": 2})


@pytest.mark.parametrize("name", available_optimizers())
def test_estimate_equals_the_state_of_a_real_optimizer(name):
    model = _model()
    opt = configure(model, name, lr=1e-3, **HPARAMS.get(name, {}))["optimizer"]
    x = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        opt.zero_grad()
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
    est = optimizer_state_bytes(opt)
    assert est["unknown"] == []
    measured = sum(measured_state_bytes(leaf) for leaf in iter_leaf_optimizers(opt))
    assert est["elementwise"] + est["factors"] == pytest.approx(measured, rel=0.03), (est, measured)


def test_soap_counts_a_factor_and_a_basis_per_preconditioned_dimension():
    assert state_bytes("SOAP", (512, 2048), {"max_precond_dim": 1024}) == (2 * 512 * 2048 * 4, 2 * 512 * 512 * 4)
    assert state_bytes("SOAP", (64,), {"max_precond_dim": 1024}) == (2 * 64 * 4, 0)
    assert state_bytes("Unknown", (3, 3), {}) is None


def test_fsdp2_divides_by_world_and_ddp_replicates_all_but_owner_rank_state():
    from lightning_optlab.memory import optimizer_state_bytes
    from lightning_optlab.optim.distributed import set_distribution

    with torch.device("meta"):
        model = _model()
    opt = configure(model, "soap", lr=1e-3)["optimizer"]
    whole = optimizer_state_bytes(opt)
    ddp = memory_per_rank(model.parameters(), opt, strategy="ddp", world_size=8)
    fsdp = memory_per_rank(model.parameters(), opt, strategy="fsdp2", world_size=8)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert ddp.weights == ddp.gradients == weights and ddp.factors > 0
    # SOAP's state (moments and factors) lives on owner ranks under DDP too (optim/distributed.py)
    assert ddp.state == pytest.approx(whole["elementwise"] / 8, abs=8) and ddp.factors == pytest.approx(whole["factors"] / 8, abs=8)
    assert fsdp.total == pytest.approx((2 * weights + whole["elementwise"] + whole["factors"]) / 8, abs=32)
    set_distribution(opt, "replicate")  # every rank computes every update: the state everywhere
    rep = memory_per_rank(model.parameters(), opt, strategy="ddp", world_size=8)
    assert rep.state == whole["elementwise"] and rep.factors == whole["factors"]
    adamw = configure(model, "adamw", lr=1e-3)["optimizer"]
    assert memory_per_rank(model.parameters(), adamw, strategy="ddp", world_size=8).state == \
        optimizer_state_bytes(adamw)["elementwise"]  # a diagonal method's state is on every DDP rank
    table = format_memory_table({"soap": ddp, "soap-fsdp": fsdp})
    assert "ddp x8" in table and "fsdp2 x8" in table and "GiB" in table
    with pytest.raises(ValueError, match="strategy must be"):
        MemoryEstimate(strategy="zero3", world_size=1, weights=0, gradients=0, state=0, factors=0)
