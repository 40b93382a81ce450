"""Run by tests/optim/test_distributed.py: every registered optimizer on a small float64 MLP, in one
process, or in 2 CPU processes (gloo) under FSDP2 (``fully_shard`` per layer) or DDP, at the same
global batch. Saves, from rank 0, per optimizer: the weights after 8 steps, the weights after a
save / load into a fresh optimizer / 2 more steps, the state_dict after 8 steps and ``health()``.

    python distributed_script.py MODE OUT [OPTIMIZER ...]      MODE: one | fsdp | ddp
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_optlab.optim import available_optimizers, get_optimizer_class

GLOBAL_BATCH, STEPS, MORE = 32, 8, 2  # a batch above every width: full-rank factors (no degenerate eigenspaces)

HPARAMS: dict[str, dict] = {
    "sgd": dict(lr=0.05, momentum=0.9),
    "adamw": dict(lr=0.01, weight_decay=0.1),
    "adagrad": dict(lr=0.05),
    "adafactor": dict(lr=0.01),
    "lion": dict(lr=0.003),
    "signum": dict(lr=0.003),
    "adalayer": dict(lr=0.01),
    "sophia": dict(lr=0.003),
    "adam_mini": dict(lr=0.01),
    "schedule_free_adamw": dict(lr=0.01),
    # ≥ 2 refreshes in 8 steps
    "shampoo": dict(lr=0.01, precondition_frequency=3, start_preconditioning_step=1, weight_decay=0.1),
    "soap": dict(lr=0.01, precondition_frequency=3, weight_decay=0.1),
    "muon": dict(lr=0.02, weight_decay=0.1, ns_dtype="float32"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    # Square 15 x 15 matrices (uneven FSDP2 shards: 8 + 7 rows) and a batch above 15: every gradient
    # has full rank, so every Kronecker factor has distinct eigenvalues. A rectangular matrix's larger
    # factor (or a LayerNorm's backward, which leaves the all-ones direction out) has a degenerate
    # eigenspace whose basis is arbitrary; SOAP's diagonal Adam in that basis then turns rounding
    # differences into O(1) differences of the update (in one process too: perturbing the gradient
    # by 1e-15 of its size moves SOAP's weights by ~30% of their movement on such a model).
    model = nn.Sequential(nn.Linear(15, 15), nn.Tanh(), nn.Linear(15, 15), nn.Tanh(), nn.Linear(15, 15)).double()
    if get_optimizer_class(name).traits.matrix_only:  # Muon takes matrices; the rest stays fixed here
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 15, generator=g, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, 15, generator=g, dtype=torch.float64)) for _ in range(STEPS + MORE)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _full_state(value):
    if isinstance(value, torch.Tensor):
        return _full(value)
    if isinstance(value, dict):
        return {k: _full_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full_state(v) for v in value)
    return value


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return model


def _optimizer(name: str, model: nn.Module):
    cls = get_optimizer_class(name)
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    return cls([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], **HPARAMS[name])


def _train(model, opt, batches, rank: int, world: int, steps: range) -> None:
    per = GLOBAL_BATCH // world
    for i in steps:
        x, y = batches[i]
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def run(name: str, mode: str, rank: int, world: int) -> dict:
    batches = _data()
    model = _wrap(_model(name), mode)
    opt = _optimizer(name, model)
    _train(model, opt, batches, rank, world, range(STEPS))
    out = {"weights": {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}}
    sd = opt.state_dict()  # a collective for owner-rank optimizers: every rank calls it
    out["state"] = _full_state(sd["state"])
    out["health"] = opt.health() if hasattr(opt, "health") else {}
    # resume: a fresh model with the trained weights, a fresh optimizer loading the saved state
    fresh = _model(name)
    fresh.load_state_dict({k.removeprefix("module."): v for k, v in out["weights"].items()})
    fresh = _wrap(fresh, mode)
    again = _optimizer(name, fresh)
    again.load_state_dict(sd)
    _train(fresh, again, batches, rank, world, range(STEPS, STEPS + MORE))
    out["resumed"] = {n.removeprefix("module."): _full(p) for n, p in fresh.named_parameters()}
    distributor = getattr(again, "distributor", lambda: None)()
    out["owned_load"] = distributor.owned_load() if distributor is not None else None
    out["state_entries_here"] = len(again.state)
    return out


def _worker(rank: int, world: int, mode: str, out: str, names: list[str], store: str) -> None:
    if mode != "one":
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name in names:
        results[name] = run(name, mode, rank, world)
        if mode != "one":
            entries = [None] * world
            dist.all_gather_object(entries, results[name]["state_entries_here"])
            results[name]["state_entries_per_rank"] = entries
    if mode == "ddp":  # ranks that hold different parameters: a clear error, not a hang or a wrong update
        from lightning_optlab.optim import SOAP

        w = nn.Parameter(torch.randn(4, 3 + rank))
        w.grad = torch.ones_like(w)
        try:
            SOAP([w]).step()
            results["mismatch"] = "no error"
        except RuntimeError as err:
            results["mismatch"] = str(err)
    if rank == 0:
        torch.save(results, out)
    if mode != "one":
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    mode, out, names = argv[0], argv[1], argv[2:] or available_optimizers()
    world = 1 if mode == "one" else 2
    store = os.path.join(tempfile.mkdtemp(), "store")
    if world == 1:
        _worker(0, 1, mode, out, names, store)
    else:
        mp.start_processes(_worker, args=(world, mode, out, names, store), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1:])
