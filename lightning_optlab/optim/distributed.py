"""Owner ranks for optimizers that need whole tensors: gather, compute once, return.

An optimizer whose traits say ``whole_tensors`` (SOAP, Shampoo, Muon, Adafactor, Adalayer and any
later matrix method) cannot update a shard of a matrix by itself: its factors, bases, Newton-Schulz
iteration or row/column statistics see the whole matrix. Under several ranks every such parameter
gets one **owner rank**, chosen by the cost of its preconditioner work (a greedy longest-first
assignment, the scheme of Distributed Shampoo's distributor, Shi et al. 2023). At each step

1. the owner gets the whole gradient and the whole weight (FSDP2: the shards are gathered to the
   owner, weights and gradients in one buffer per owner and dtype; DDP: every rank holds both already);
2. only the owner runs the optimizer's own update on them, and only the owner keeps the
   parameter's state (factors, bases, moments);
3. the new weight goes back from the owner: FSDP2 row shards by one scatter per (owner, dtype,
   device) bucket, each rank receiving only its rows; replicated parameters (DDP) by one broadcast
   per bucket, each rank keeping the whole tensor.

The optimizer's update code is not changed for this: :class:`Distributor` hands it param groups
holding the owned parameters only (whole tensors standing in for the shards), with their state
under the stand-ins, and puts everything back afterwards. One process is the special case of one
owner. ``state_dict()`` gathers every owner's state, so a checkpoint looks exactly like a
single-process one (and can be resumed at another world size); ``load_state_dict`` keeps on each
rank the entries of the parameters it owns.

The mode is the optimizer attribute ``distribute`` (:func:`set_distribution`, or the
``OptimizerSpec`` field of the same name):

* ``"owner"`` (default): as above whenever a process group with more than one rank is initialized;
* ``"replicate"``: every rank computes every update (DDP only; sharded parameters are refused).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DISTRIBUTE_MODES", "Distributor", "assign_owners", "default_cost", "is_sharded", "set_distribution",
           "world_info"]

#: values of an optimizer's ``distribute`` attribute
DISTRIBUTE_MODES = ("owner", "replicate")


def world_info(min_world: int = 2) -> Optional[tuple[int, int]]:
    """(rank, world size) of the default process group when it has at least ``min_world`` ranks, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world >= min_world else None


def is_sharded(p: Tensor) -> bool:
    """True for a DTensor with a non-replicated placement (FSDP2's parameters, tensor parallelism)."""
    placements = getattr(p, "placements", None)
    return placements is not None and not all(getattr(pl, "is_replicate", lambda: False)() for pl in placements)


def default_cost(shape: Sequence[int], max_dim: Optional[int] = None) -> float:
    """Preconditioner work of a tensor of ``shape``: an eigendecomposition (~d³) per dimension that
    gets a factor (2 ≤ d ≤ ``max_dim``) plus the element-wise work (the number of elements)."""
    numel = math.prod(shape) if shape else 1
    return float(numel) + float(sum(d**3 for d in shape if d > 1 and (max_dim is None or d <= max_dim)))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: the costliest first, each to the least loaded rank (ties: the
    earlier item, the lower rank). Deterministic, so every rank computes the same assignment."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += costs[i]
    return owners


def set_distribution(optimizer: Any, mode: str) -> None:
    """Set ``distribute`` on every optimizer inside ``optimizer`` (a mix's parts, Lightning's wrapper)
    that needs whole tensors; the others work on shards and have nothing to distribute."""
    from .base import iter_leaf_optimizers, optimizer_traits

    if mode not in DISTRIBUTE_MODES:
        raise ValueError(f"distribute must be one of {', '.join(map(repr, DISTRIBUTE_MODES))}, got {mode!r}")
    for leaf in iter_leaf_optimizers(optimizer):
        if optimizer_traits(leaf).whole_tensors:
            leaf.distribute = mode


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t


class Distributor:
    """The owner-rank step of one optimizer (see the module docstring). Built by the optimizer's
    base on the first distributed step; the plan is rebuilt when the param groups change."""

    def __init__(self, optimizer: torch.optim.Optimizer, rank: int, world: int) -> None:
        self.optimizer = optimizer
        self.rank, self.world = rank, world
        self._signature: Optional[tuple] = None
        self._owners: dict[int, int] = {}
        #: seconds of the last step spent in collectives (gathers and returns), for benchmarks
        self.last_comm_seconds = 0.0

    # ------------------------------------------------------------------------------ plan
    def _params(self) -> list[tuple[int, int, Tensor]]:
        return [(gi, j, p) for gi, g in enumerate(self.optimizer.param_groups) for j, p in enumerate(g["params"])]

    def plan(self) -> dict[int, int]:
        """{id(param): owner rank} for every parameter; checked once to be the same on every rank."""
        params = self._params()
        signature = tuple((gi, j, tuple(p.shape), str(p.dtype)) for gi, j, p in params)
        if signature != self._signature:
            cost = getattr(self.optimizer, "distributed_cost", None)
            costs = [cost(p, self.optimizer.param_groups[gi]) if cost else default_cost(p.shape) for gi, _, p in params]
            owners = assign_owners(costs, self.world)
            theirs: list[Any] = [None] * self.world
            dist.all_gather_object(theirs, (signature, owners))
            for r, (sig, own) in enumerate(theirs):
                if sig != signature or own != owners:
                    raise RuntimeError(
                        f"{type(self.optimizer).__name__}: rank {r} holds other parameters than rank {self.rank} "
                        "(names, shapes or dtypes differ), so their updates cannot be shared out. Every rank must "
                        "build the same model and param groups; for independent models per rank set "
                        "distribute='replicate' (lightning_optlab.optim.distributed.set_distribution)."
                    )
            self._signature = signature
            self._owners = {id(p): o for (_, _, p), o in zip(params, owners)}
        return self._owners

    def owns(self, p: Tensor) -> bool:
        return self.plan().get(id(p)) == self.rank

    def owned_load(self) -> list[float]:
        """Preconditioner cost per rank under the current plan (for benchmarks and docs)."""
        cost = getattr(self.optimizer, "distributed_cost", None)
        owners = self.plan()
        load = [0.0] * self.world
        for gi, _, p in self._params():
            load[owners[id(p)]] += cost(p, self.optimizer.param_groups[gi]) if cost else default_cost(p.shape)
        return load

    # ------------------------------------------------------------------------------ step
    def step(self, update: Callable[[], None]) -> None:
        """Run ``update`` (the optimizer's own update) on the owned parameters, then share the results."""
        import time

        opt = self.optimizer
        owners = self.plan()
        active = [(gi, j, p) for gi, j, p in self._params() if p.grad is not None]
        saved = [(g["params"], g.get("param_names")) for g in opt.param_groups]
        stand_ins: list[tuple[Tensor, Tensor]] = []  # (sharded param, whole stand-in) owned here
        kept: list[list[int]] = [[] for _ in opt.param_groups]
        work: list[list[Tensor]] = [[] for _ in opt.param_groups]
        t0 = time.perf_counter()
        sharded = [p for _, _, p in active if is_sharded(p)]
        # weights and gradients together, to their owners only (same-dtype ones share a buffer)
        gathered = self._gather([p.detach() for p in sharded] + [p.grad for p in sharded],
                                [owners[id(p)] for p in sharded] * 2)
        wholes = dict(zip(map(id, sharded), gathered[: len(sharded)]))
        whole_grads = dict(zip(map(id, sharded), gathered[len(sharded):]))
        comm = time.perf_counter() - t0
        for gi, j, p in active:
            mine = owners[id(p)] == self.rank
            if is_sharded(p):
                grad, whole = whole_grads.pop(id(p)), wholes.pop(id(p))
                if not mine:
                    continue
                assert whole is not None and grad is not None  # gathered on this rank, the owner
                whole.grad = grad
                for attr, value in vars(p).items():  # the pack's tags (Conv1D orientation, fused QKV, μP shapes)
                    if attr.startswith("optlab_") or attr == "infshape":
                        setattr(whole, attr, value)
                if p in opt.state:
                    opt.state[whole] = opt.state.pop(p)
                stand_ins.append((p, whole))
                p = whole
            elif not mine:
                continue
            kept[gi].append(j)
            work[gi].append(p)
        try:
            for gi, g in enumerate(opt.param_groups):
                g["params"] = work[gi]
                names = saved[gi][1]
                if names is not None:
                    g["param_names"] = [names[j] for j in kept[gi]]
            update()
        finally:
            for g, (params, names) in zip(opt.param_groups, saved):
                g["params"] = params
                if names is not None:
                    g["param_names"] = names
            for p, whole in stand_ins:
                if whole in opt.state:
                    opt.state[p] = opt.state.pop(whole)
                whole.grad = None
        t0 = time.perf_counter()
        self._return(active, owners, dict((id(p), w) for p, w in stand_ins))
        self.last_comm_seconds = comm + time.perf_counter() - t0

    def _gather(self, tensors: list[Tensor], owners: list[int]) -> list[Optional[Tensor]]:
        """The whole tensors of DTensor shards, on their owner ranks (None elsewhere). FSDP2's layout
        (rows split over all ranks, ``Shard(0)`` on a one-dimensional mesh of the world) goes in one
        gather to the owner per (owner, dtype, device); any other layout through ``full_tensor()``,
        one collective per tensor, kept on the owner only."""
        out: list[Optional[Tensor]] = [None] * len(tensors)
        buckets: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
        for i, (t, owner) in enumerate(zip(tensors, owners)):
            if self._rows_over_world(t):
                local = t.to_local()
                buckets.setdefault((owner, local.dtype, local.device), []).append(i)
            else:
                full = t.full_tensor()
                out[i] = full if owner == self.rank else None
        for (owner, dtype, device), idx in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            # rank r holds rows [r·c, (r+1)·c) of a tensor with n rows, c = ceil(n / world) (torch.chunk)
            rows = [[self._rows_of(tensors[i].shape[0], r) for i in idx] for r in range(self.world)]
            inner = [math.prod(tensors[i].shape[1:]) for i in idx]
            sizes = [sum(n * k for n, k in zip(rr, inner)) for rr in rows]
            flat = torch.cat([tensors[i].to_local().reshape(-1) for i in idx])
            padded = torch.zeros(max(sizes), dtype=dtype, device=device)
            padded[: flat.numel()] = flat
            mine = owner == self.rank
            parts = [torch.empty_like(padded) for _ in range(self.world)] if mine else None
            dist.gather(padded, parts, dst=owner)
            if not mine:
                continue
            pieces = [part[:size].split([n * k for n, k in zip(rr, inner)]) for part, size, rr in zip(parts, sizes, rows)]
            for k, i in enumerate(idx):
                shape = tuple(tensors[i].shape)
                out[i] = torch.cat([pieces[r][k].view(rows[r][k], *shape[1:]) for r in range(self.world)])
        return out

    def _rows_over_world(self, t: Tensor) -> bool:
        mesh, placements = getattr(t, "device_mesh", None), getattr(t, "placements", ())
        return (mesh is not None and mesh.ndim == 1 and mesh.size() == self.world and len(placements) == 1
                and placements[0].is_shard() and getattr(placements[0], "dim", None) == 0 and t.dim() >= 1
                and mesh.mesh.flatten().tolist() == list(range(self.world)))  # mesh coordinate = global rank

    def _rows_of(self, n: int, rank: int) -> int:
        c = -(-n // self.world)
        return max(0, min(c, n - rank * c))

    def _return(self, active: list[tuple[int, int, Tensor]], owners: dict[int, int], stand_ins: dict[int, Tensor]) -> None:
        """Send each owner's new weights back. FSDP2 row shards: one scatter per (owner, dtype,
        device), each rank receiving only its rows; replicated parameters (DDP) and other shard
        layouts: one broadcast per bucket, each rank keeping its shard or the whole tensor."""
        rows_buckets: dict[tuple[int, torch.dtype, torch.device], list[Tensor]] = {}
        whole_buckets: dict[tuple[int, torch.dtype, torch.device], list[Tensor]] = {}
        for _, _, p in active:
            local = p.to_local() if is_sharded(p) else p
            target = rows_buckets if is_sharded(p) and self._rows_over_world(p) else whole_buckets
            target.setdefault((owners[id(p)], p.dtype, local.device), []).append(p)
        order = lambda kv: (kv[0][0], str(kv[0][1]))  # noqa: E731  (one device per rank)
        for (owner, dtype, device), params in sorted(rows_buckets.items(), key=order):
            rows = [[self._rows_of(p.shape[0], r) for p in params] for r in range(self.world)]
            inner = [math.prod(p.shape[1:]) for p in params]
            sizes = [sum(n * k for n, k in zip(rr, inner)) for rr in rows]
            recv = torch.empty(max(sizes), dtype=dtype, device=device)
            sends = None
            if owner == self.rank:
                sends = []
                for r in range(self.world):
                    out = torch.zeros(max(sizes), dtype=dtype, device=device)
                    chunks = []
                    for p, n in zip(params, rows[r]):
                        start = r * -(-p.shape[0] // self.world)
                        chunks.append(stand_ins[id(p)].detach()[start:start + n].reshape(-1))
                    if chunks:
                        flat = torch.cat(chunks)
                        out[: flat.numel()] = flat
                    sends.append(out)
            dist.scatter(recv, sends, src=owner)
            mine = rows[self.rank]
            for p, piece, n in zip(params, recv[: sizes[self.rank]].split([n * k for n, k in zip(mine, inner)]), mine):
                p.to_local().copy_(piece.view(n, *p.shape[1:]))
        for (owner, dtype, device), params in sorted(whole_buckets.items(), key=order):
            numels = [p.numel() for p in params]
            if owner == self.rank:
                flat = torch.cat([stand_ins.get(id(p), p).detach().reshape(-1) for p in params])
            else:
                flat = torch.empty(sum(numels), dtype=dtype, device=device)
            dist.broadcast(flat, src=owner)
            for p, piece in zip(params, flat.split(numels)):
                whole = piece.view(p.shape)
                if is_sharded(p):
                    from torch.distributed.tensor import distribute_tensor

                    p.detach().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))
                elif owner != self.rank:  # the owner updated its replicated parameters in place
                    p.detach().copy_(whole)

    # ------------------------------------------------------------------------------ state
    def gather_state(self, state: dict[Any, Any]) -> dict[Any, Any]:
        """Every owner's entries of a ``state_dict()["state"]`` (index -> state), merged on every rank
        (tensors travel on the CPU; torch's ``load_state_dict`` moves them to the parameters' devices)."""
        mine = {k: _to_cpu(v) for k, v in state.items()}
        theirs: list[Any] = [None] * self.world
        dist.all_gather_object(theirs, mine)
        merged: dict[Any, Any] = {}
        for part in theirs:
            merged.update(part)
        return dict(sorted(merged.items(), key=lambda kv: kv[0]))

    def drop_unowned(self) -> None:
        """Forget the state of parameters this rank does not own (after loading a full state)."""
        owners = self.plan()
        for _, _, p in self._params():
            if owners[id(p)] != self.rank:
                self.optimizer.state.pop(p, None)

    def gather_health(self, compute: Callable[[Iterable[tuple[str, Tensor, dict, dict]]], dict[str, float]]) -> dict[str, float]:
        """Health statistics from the owner ranks, the same dict on every rank. ``compute`` gets
        (name, whole parameter, group, state) of the parameters this rank owns."""
        from .health import named_params

        owners = self.plan()
        items = []
        for name, p, group in named_params(self.optimizer):
            whole = p.detach().full_tensor() if is_sharded(p) else p  # collective: every rank takes part
            state = self.optimizer.state.get(p)
            if owners[id(p)] == self.rank and state:
                items.append((name, whole, group, state))
        mine = compute(items)
        theirs: list[Any] = [None] * self.world
        dist.all_gather_object(theirs, mine)
        out: dict[str, float] = {}
        for part in theirs:
            out.update(part)
        return out


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
