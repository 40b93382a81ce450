"""Owner ranks vs every rank doing everything: the step time of the whole-tensor optimizers, and
optimizer-state bytes per rank under DDP and FSDP2, on 2 CPU processes (gloo).

    python benchmarks/distributed_step.py                      # width 256, 4 blocks, 20 steps
    python benchmarks/distributed_step.py --width 128 --steps 10 --json out.json

Step time: the model's matrices are those of a transformer block (attention 4 x (d, d), MLP
(4d, d) and (d, 4d)), the gradients are the same random tensors on both ranks (what DDP's
all-reduce leaves), and each rank runs one thread (the 2 processes share the machine's cores).
Baseline, measured in the same run: ``distribute="replicate"`` (every rank computes every update,
what DDP did before owner ranks). Reported: mean step seconds over ``--steps`` steps after 2 warm-up
steps (preconditioner refreshes included: SOAP and Shampoo refresh every 5 steps here; the fastest
of ``--rounds`` alternating rounds per mode), the ratio
owner / replicate (goal ≤ 0.65 at 2 ranks), and the share of the owner step spent in collectives
(gathers of sharded tensors and the return broadcasts).

State bytes per rank: after 2 steps, the bytes of the optimizer state each rank holds (DTensor
shards count their local part), for DDP-replicate, DDP-owner and FSDP2 (``fully_shard`` per block),
for the diagonal optimizers too; the ratio FSDP2 / DDP-replicate (goal ≈ 1/world for the diagonal
ones; the whole-tensor ones keep their factors on owner ranks only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WHOLE = ("soap", "shampoo", "muon")
DIAGONAL = ("adamw", "lion", "adafactor")
HPARAMS = {"soap": dict(lr=3e-3, precondition_frequency=5), "shampoo": dict(lr=3e-3, precondition_frequency=5,
           start_preconditioning_step=1), "muon": dict(lr=0.02, ns_dtype="float32"), "adamw": dict(lr=3e-3),
           "lion": dict(lr=3e-4), "adafactor": dict(lr=3e-3)}


def _model(width: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        block = nn.Module()
        for name in ("q", "k", "v", "o"):
            setattr(block, name, nn.Linear(width, width, bias=False))
        block.up, block.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)
        layers.append(block)
    return nn.Sequential(*layers)


def _optimizer(name: str, model: nn.Module, distribute: str):
    from lightning_optlab.optim import get_optimizer_class

    named = list(model.named_parameters())
    opt = get_optimizer_class(name)([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}],
                                    **HPARAMS[name])
    opt.distribute = distribute
    return opt


def _grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g) * 1e-2
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = full


def _state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        stack = list(st.values())
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return total


def _time_steps(name: str, width: int, blocks: int, steps: int, distribute: str) -> dict:
    model = _model(width, blocks)
    opt = _optimizer(name, model, distribute)
    times, comm = [], []
    for i in range(steps + 2):
        _grads(model, i)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()  # the step ends when the slowest rank is done
        if i >= 2:
            times.append(time.perf_counter() - t0)
            d = opt.distributor()
            comm.append(d.last_comm_seconds if d is not None else 0.0)
    return {"step_s": statistics.mean(times), "comm_s": statistics.mean(comm)}


def _bytes_per_rank(name: str, width: int, blocks: int, mode: str) -> int:
    model = _model(width, blocks)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        fully_shard(model)
    opt = _optimizer(name, model, "replicate" if mode == "ddp_replicate" else "owner")
    for i in range(2):
        _grads(model, i)
        opt.step()
    mine = torch.tensor([_state_bytes(opt)], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the most loaded rank decides the memory needed
    return int(mine.item())


def _worker(rank: int, world: int, args: argparse.Namespace, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = {"time": {}, "bytes": {}}
    for name in WHOLE:
        # alternate the two modes, --rounds times each, and keep each mode's fastest round: other
        # work on the machine slows a round down, never speeds it up
        rounds = {"replicate": [], "owner": []}
        for _ in range(args.rounds):
            for mode in rounds:
                rounds[mode].append(_time_steps(name, args.width, args.blocks, args.steps, mode))
        rep = min(rounds["replicate"], key=lambda r: r["step_s"])
        own = min(rounds["owner"], key=lambda r: r["step_s"])
        rows["time"][name] = {"replicate_s": rep["step_s"], "owner_s": own["step_s"], "comm_s": own["comm_s"]}
    for name in WHOLE + DIAGONAL:
        rows["bytes"][name] = {mode: _bytes_per_rank(name, args.width, args.blocks, mode)
                               for mode in ("ddp_replicate", "ddp_owner", "fsdp")}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def table(rows: dict, world: int) -> str:
    lines = [f"step time, {world} ranks (mean s per step; baseline: every rank computes every update)", "",
             "| optimizer | replicate s | owner s | owner / replicate | communication share |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows["time"].items():
        lines.append(f"| {name} | {r['replicate_s']:.4f} | {r['owner_s']:.4f} | {r['owner_s'] / r['replicate_s']:.2f}x "
                     f"| {r['comm_s'] / r['owner_s']:.0%} |")
    lines += ["", f"optimizer state per rank (MiB, the most loaded of {world} ranks)", "",
              "| optimizer | DDP replicate | DDP owner | FSDP2 | FSDP2 / DDP replicate |", "|---|---:|---:|---:|---:|"]
    for name, r in rows["bytes"].items():
        mib = {k: v / 2**20 for k, v in r.items()}
        lines.append(f"| {name} | {mib['ddp_replicate']:.2f} | {mib['ddp_owner']:.2f} | {mib['fsdp']:.2f} | "
                     f"{r['fsdp'] / r['ddp_replicate']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode (the fastest is kept)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    world = 2
    tmp = tempfile.mkdtemp()
    store, out = os.path.join(tmp, "store"), os.path.join(tmp, "rows.json")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    mp.start_processes(_worker, args=(world, args, store, out), nprocs=world, start_method="spawn")
    with open(out) as f:
        rows = json.load(f)
    print(f"width {args.width}, {args.blocks} blocks, {args.steps} timed steps, fastest of {args.rounds} rounds, "
          f"torch {torch.__version__}\n")
    print(table(rows, world))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
