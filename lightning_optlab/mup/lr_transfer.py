"""Learning-rate transfer across widths, μP against standard parametrization (SP).

For each optimizer, parametrization (μP, SP), width and learning rate of a grid, trains a tiny
model on byte-level batches of the embedded corpus (:mod:`.experiment`: same batches and same
initialization seed at every point; warmup then cosine) and records the held-out loss. Under μP the
best learning rate should stay put as width grows (Yang et al. 2022, "Tensor Programs V", Fig. 1);
under SP it moves down.

The best learning rate of a width is estimated two ways:

* **grid arg-min**: the grid point with the lowest held-out loss. On small CPU runs the loss is flat
  near the optimum to within the run-to-run noise, so the arg-min jumps between neighbours;
* **fitted optimum**: the vertex of the least-squares parabola in log2(lr) through every finite
  point of the width's curve (``fitted_log2_optimum``). It uses all points, so one noisy point
  moves it by a fraction of a grid step; it is the estimate the summary's verdict uses.

The shift of the best learning rate across widths is counted in grid steps (max − min of log2(lr)
over widths divided by the grid's spacing). Several seeds are averaged point by point first
(:func:`combine`), weighted by how many seeds each input holds.

    optlab mup lr-transfer --config recipes/mup-lr-transfer.yaml --seeds 0 1 2 3 4 --jobs 2
    optlab mup lr-transfer --combine runs/a.json runs/b.json --out runs/all.png
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..optim.registry import canonical_name
from .rules import mup_family

__all__ = [
    "LRTransferConfig",
    "load_config",
    "run_seed",
    "run",
    "combine",
    "fitted_log2_optimum",
    "grid_best",
    "summarize",
    "plot",
    "figure",
    "best_of",
    "format_summary",
    "verdict",
    "write_report",
    "axis_of",
    "check_optimizers",
    "point_loss",
]

#: default grids (log2 of the base learning rate) and betas per optimizer
DEFAULT_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"log2_lrs": [-9, -8, -7, -6, -5, -4, -3], "betas": [0.9, 0.95]},
    "lion": {"log2_lrs": [-12, -11, -10, -9, -8, -7, -6], "betas": [0.9, 0.99]},
}


@dataclasses.dataclass
class TrainingSettings:
    """How every point of an LR-transfer experiment trains and is scored (shared by the width and
    depth experiments): batches, warmup then cosine to ``min_lr_ratio``, the model options, held-out set."""

    steps: int = 150
    batch_size: int = 8
    seq_len: int = 64
    eval_batches: int = 4
    eval_batch_size: int = 16
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    qk_layernorm: bool = False
    z_loss: float = 0.0
    zero_readout: bool = True

    def check_training(self, where: str) -> None:
        """A ValueError naming ``<where>.<key>`` for a non-positive size or a warmup outside [0, 1)."""
        for key in ("steps", "batch_size", "seq_len", "eval_batches", "eval_batch_size"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"{where}.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"{where}.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclasses.dataclass
class LRTransferConfig(TrainingSettings):
    """One LR-transfer experiment (the ``lr_transfer:`` block of ``recipes/mup-lr-transfer.yaml``).

    ``optimizers`` maps an optimizer name to ``{"log2_lrs": [...], "betas": [b1, b2], "hparams": {...}}``
    (``betas`` and ``hparams`` optional); every grid must be evenly spaced and have ≥ 3 points.
    """

    model: str = "llama-tiny"
    widths: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 256])
    base_width: Optional[int] = None
    optimizers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_OPTIMIZERS))
    steps: int = 150
    head_dim: Optional[int] = None
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        if len(self.widths) < 2 or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"lr_transfer.widths must hold at least two distinct widths, got {self.widths}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"lr_transfer.widths must be positive, got {self.widths}")
        self.widths = sorted(self.widths)
        if self.base_width is None:
            self.base_width = self.widths[0]
        if self.base_width > self.widths[0]:
            raise ValueError(f"lr_transfer.base_width {self.base_width} is wider than the narrowest width "
                             f"{self.widths[0]}; use a base width ≤ every width")
        self.check_training("lr_transfer")
        check_optimizers(self.optimizers)
        self.seeds = [int(s) for s in self.seeds] or [0]

    def grid(self, name: str) -> list[float]:
        """log2 of the learning rates swept for optimizer ``name``."""
        return [float(x) for x in (self.optimizers[name].get("log2_lrs") or DEFAULT_OPTIMIZERS[name]["log2_lrs"])]

    def runs_per_seed(self) -> int:
        """Training runs in one seed: every (optimizer, μP/SP, width, learning rate)."""
        return sum(len(self.grid(name)) for name in self.optimizers) * 2 * len(self.widths)


#: the axis a result entry sweeps: its key holds the sizes, and ``loss`` is keyed by ``str(size)``
AXES = ("widths", "depths", "points")


def axis_of(res: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """``(axis, sizes)`` of a result entry: ``("width", [32, 64, ...])``, ``("depth", [2, 4, ...])`` or
    ``("point", ["w32 L2", "w128 L8"])`` (width and depth together, labels kept as written)."""
    for key in AXES:
        if key in res:
            vals = list(res[key])
            return key[:-1], vals if key == "points" else [int(v) for v in vals]
    raise ValueError(f"a result entry needs one of {', '.join(AXES)}, got keys {sorted(res)}")


def check_optimizers(optimizers: Mapping[str, Any], where: str = "lr_transfer") -> None:
    """Every entry a mapping with an evenly spaced ``log2_lrs`` grid (or a default one) and a μP rule."""
    if not optimizers:
        raise ValueError(f"{where}.optimizers is empty; name at least one, e.g. {{adamw: {{log2_lrs: [-9, ..., -3]}}}}")
    for name, spec in optimizers.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}.optimizers.{name} must be a mapping with log2_lrs, got {spec!r}")
        unknown = set(spec) - {"log2_lrs", "betas", "hparams", "mix"}
        if unknown:
            raise ValueError(f"{where}.optimizers.{name}: unknown keys {sorted(unknown)}; "
                             "allowed: log2_lrs, betas, hparams, mix")
        grid = spec.get("log2_lrs") or DEFAULT_OPTIMIZERS.get(name, {}).get("log2_lrs")
        if not grid:
            raise ValueError(f"{where}.optimizers.{name} needs log2_lrs (no default grid for {name!r})")
        grid_step(grid, where=f"{where}.optimizers.{name}.log2_lrs")
        # an unknown optimizer, or one without a μP rule, is refused here, before any training
        mup_family(canonical_name(name), dict(spec.get("hparams") or {}))


def point_loss(cfg: Any, name: str, log2_lr: float, model: Any, train: list, held: list, *, mup: bool = True) -> float:
    """Train ``model`` with optimizer ``name`` of ``cfg.optimizers`` at base lr 2^log2_lr (warmup then
    cosine to ``cfg.min_lr_ratio``) on ``train``; the held-out loss, inf when training diverged."""
    from ..configure import OptimizerSpec, configure
    from .experiment import eval_loss, train_run

    extra = cfg.optimizers[name]
    kw: dict[str, Any] = dict(name=name, lr=2.0 ** log2_lr, mup=mup,
                              weight_decay=cfg.weight_decay, schedule="cosine",
                              warmup_steps=int(cfg.steps * cfg.warmup_fraction), total_steps=cfg.steps,
                              min_lr_ratio=cfg.min_lr_ratio, hparams=dict(extra.get("hparams") or {}),
                              mix=[dict(m) for m in extra.get("mix") or []])
    betas = extra.get("betas", DEFAULT_OPTIMIZERS.get(name, {}).get("betas"))
    if betas is not None:
        kw["betas"] = tuple(betas)
    spec = OptimizerSpec(**kw)
    losses = train_run(model, lambda m: configure(m, spec), train, cfg.steps)
    ok = len(losses) == cfg.steps and all(math.isfinite(v) for v in losses)
    return eval_loss(model, held) if ok else math.inf


def model_overrides(cfg: Any) -> dict[str, Any]:
    """The model options every point of ``cfg`` shares (zero readout, QK-LayerNorm, z-loss)."""
    out: dict[str, Any] = {"zero_readout": cfg.zero_readout}
    if getattr(cfg, "head_dim", None):
        out["head_dim"] = int(cfg.head_dim)
    if cfg.qk_layernorm:
        out["qk_layernorm"] = True
    if cfg.z_loss:
        out["z_loss"] = cfg.z_loss
    return out


def grid_step(log2_lrs: Sequence[float], where: str = "log2_lrs") -> float:
    """The spacing of an evenly spaced, increasing grid of ≥ 3 points (else a ValueError naming it)."""
    xs = [float(x) for x in log2_lrs]
    if len(xs) < 3:
        raise ValueError(f"{where} needs at least 3 learning rates to locate an optimum, got {xs}")
    diffs = [b - a for a, b in zip(xs, xs[1:])]
    if any(d <= 0 for d in diffs) or max(diffs) - min(diffs) > 1e-9 * max(1.0, abs(diffs[0])):
        raise ValueError(f"{where} must be increasing and evenly spaced in log2(lr), got {xs}")
    return diffs[0]


def load_config(path: str | Path, **overrides: Any) -> LRTransferConfig:
    """An :class:`LRTransferConfig` from the ``lr_transfer:`` block of a YAML recipe (plus overrides)."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    block = raw.get("lr_transfer")
    if not isinstance(block, Mapping):
        raise ValueError(f"{path}: expected a top-level 'lr_transfer:' mapping (see recipes/mup-lr-transfer.yaml)")
    fields = {f.name for f in dataclasses.fields(LRTransferConfig)}
    unknown = set(block) - fields
    if unknown:
        raise ValueError(f"{path}: unknown lr_transfer keys {sorted(unknown)}; allowed: {sorted(fields)}")
    merged = {**block, **{k: v for k, v in overrides.items() if v is not None}}
    return LRTransferConfig(**merged)




def run_seed(cfg: LRTransferConfig, seed: int, *, progress: bool = True) -> dict[str, Any]:
    """Train every (optimizer, μP/SP, width, lr) point once with ``seed``; return the run record.

    The record is JSON-ready: ``{"config", "seed", "seeds": [seed], "results": {"<opt>/<mup|sp>":
    {"log2_lrs", "widths", "loss": {width: [held-out loss per lr, inf where diverged]}}}, "seconds"}``.
    """
    from .experiment import fixed_batches, width_model

    train = fixed_batches(cfg.steps, cfg.batch_size, cfg.seq_len, seed=seed)
    held = fixed_batches(cfg.eval_batches, cfg.eval_batch_size, cfg.seq_len, seed=seed + 1, offset=1)
    overrides = model_overrides(cfg)
    points = [(name, mup, w, lg) for name in cfg.optimizers for mup in (True, False) for w in cfg.widths
              for lg in cfg.grid(name)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc=f"lr transfer seed {seed}", unit="run", leave=False)
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for name in cfg.optimizers:
        grid = cfg.grid(name)
        for mup in (True, False):
            key = f"{name}/{'mup' if mup else 'sp'}"
            results[key] = {"log2_lrs": grid, "widths": list(cfg.widths), "loss": {}}
            for width in cfg.widths:
                row = []
                for lg in grid:
                    model = width_model(cfg.model, width, mup=mup, base_width=cfg.base_width, seed=seed, **overrides)
                    row.append(point_loss(cfg, name, lg, model, train, held, mup=mup))
                    if bar is not None:
                        bar.update(1)
                results[key]["loss"][str(width)] = row
            results[key]["best_per_seed"] = {w: [best_of(r)] for w, r in results[key]["loss"].items()}
    if bar is not None:
        bar.close()
    return {"config": dataclasses.asdict(cfg), "seed": seed, "seeds": [seed], "results": results,
            "seconds": time.perf_counter() - t0}


def _run_seed_worker(args: tuple[Callable[..., dict[str, Any]], type, dict[str, Any], int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    run_one, cfg_type, cfg_dict, seed = args
    return run_one(cfg_type(**cfg_dict), seed, progress=False)


def run(cfg: Any, *, jobs: int = 1, progress: bool = True,
        save: Optional[Callable[[dict[str, Any]], None]] = None,
        run_one: Optional[Callable[..., dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """``run_one(cfg, seed)`` (default :func:`run_seed`) for every seed of ``cfg``, ``jobs`` seeds at a
    time in worker processes (one torch thread each); ``save(record)`` is called as each seed finishes.
    ``run_one`` and ``cfg``'s class must be module-level (the workers are spawned)."""
    run_one = run_one or run_seed
    seeds = list(cfg.seeds)
    if jobs <= 1 or len(seeds) == 1:
        out = []
        for s in seeds:
            rec = run_one(cfg, s, progress=progress)
            if save is not None:
                save(rec)
            out.append(rec)
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    records: dict[int, dict[str, Any]] = {}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_seed_worker, (run_one, type(cfg), dataclasses.asdict(cfg), s)): s for s in seeds}
        for fut in cf.as_completed(futures):
            rec = fut.result()
            records[futures[fut]] = rec
            if save is not None:
                save(rec)
            if progress:
                print(f"seed {futures[fut]} done in {rec['seconds']:.0f}s", flush=True)
    return [records[s] for s in seeds]


def combine(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Point-by-point mean held-out loss over runs, each weighted by its number of seeds.

    A record is a :func:`run_seed` result, a JSON written by it, or an earlier combination (its
    ``seeds`` list gives its weight; records from before ``seeds`` existed count once). A point
    that diverged in any run counts as diverged. The runs must share keys, widths and grids.
    """
    if not records:
        raise ValueError("combine needs at least one run")
    seeds: list[Any] = []
    weights = []
    for rec in records:
        s = rec.get("seeds") or ([rec["seed"]] if "seed" in rec else [rec.get("args", {}).get("seed", "?")])
        seeds.extend(s)
        weights.append(len(s))
    config = records[0].get("config") or records[0].get("args")
    out = {"config": config, "seeds": seeds, "results": _combine_field(records, "results", weights)}
    if all("joint" in rec for rec in records):
        out["joint"] = _combine_field(records, "joint", weights)
    return out


def _combine_field(records: Sequence[Mapping[str, Any]], field: str, weights: list[int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, res in records[0][field].items():
        axis, widths = axis_of(res)
        loss: dict[str, list[float]] = {}
        for rec in records:
            other = rec[field].get(key)
            if other is None or [float(x) for x in other["log2_lrs"]] != [float(x) for x in res["log2_lrs"]] \
                    or axis_of(other) != (axis, widths):
                raise ValueError(f"{key}: the runs do not share one grid of {axis}s and learning rates; combine runs of one recipe")
        for w in widths:
            rows = [rec[field][key]["loss"][str(w)] for rec in records]
            mean = []
            for col in zip(*rows):
                if all(math.isfinite(float(v)) for v in col):
                    mean.append(sum(float(v) * wt for v, wt in zip(col, weights)) / sum(weights))
                else:
                    mean.append(math.inf)
            loss[str(w)] = mean
        out[key] = {k: v for k, v in res.items() if k not in ("loss", "best_per_seed")}
        out[key].update({"log2_lrs": [float(x) for x in res["log2_lrs"]], f"{axis}s": widths, "loss": loss})
        per_seed = _best_per_seed(records, key, widths, field)
        if per_seed is not None:
            out[key]["best_per_seed"] = per_seed
    return out


def _best_per_seed(records: Sequence[Mapping[str, Any]], key: str, widths: Sequence[Any],
                   field: str = "results") -> Optional[dict[str, list[float]]]:
    """Every seed's best-of-grid loss per width, from the records' ``best_per_seed`` (or, for a
    one-seed record without it, from its curve); None when a pooled record lacks them."""
    out: dict[str, list[float]] = {str(w): [] for w in widths}
    for rec in records:
        res = rec[field][key]
        if "best_per_seed" in res:
            for w in widths:
                out[str(w)].extend(float(v) for v in res["best_per_seed"][str(w)])
        elif len(rec.get("seeds") or [rec.get("seed")]) == 1:
            for w in widths:
                out[str(w)].append(best_of(res["loss"][str(w)]))
        else:
            return None
    return out


def best_of(losses: Sequence[float]) -> float:
    """The lowest finite loss of a curve (inf if every point diverged)."""
    finite = [float(v) for v in losses if math.isfinite(float(v))]
    return min(finite) if finite else math.inf


def grid_best(log2_lrs: Sequence[float], losses: Sequence[float]) -> Optional[float]:
    """log2(lr) of the lowest finite loss (None if every point diverged)."""
    finite = [(float(v), float(x)) for x, v in zip(log2_lrs, losses) if math.isfinite(float(v))]
    return min(finite)[1] if finite else None


def fitted_log2_optimum(log2_lrs: Sequence[float], losses: Sequence[float]) -> Optional[float]:
    """Vertex of the least-squares parabola ``loss ≈ a·x² + b·x + c`` in ``x = log2(lr)`` through
    every finite point: ``−b / 2a``. None with fewer than 3 finite points or a fit that is not
    convex (a > 0 fails: no interior optimum). The vertex may lie outside the grid; callers say so.
    """
    import numpy as np

    pts = [(float(x), float(v)) for x, v in zip(log2_lrs, losses) if math.isfinite(float(v))]
    if len(pts) < 3:
        return None
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    a, b, _ = np.polyfit(xs, ys, 2)
    if not a > 0:
        return None
    return float(-b / (2 * a))


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``<optimizer>/<mup|sp>``: best log2(lr) per width (grid arg-min and fitted), and the
    shift of each across widths in grid steps (``None`` where some width has no estimate)."""
    summary: dict[str, dict[str, Any]] = {}
    for key, res in results.items():
        grid = [float(x) for x in res["log2_lrs"]]
        step = grid_step(grid, where=f"{key} log2_lrs")
        axis, widths = axis_of(res)
        rows = {w: res["loss"][str(w)] if str(w) in res["loss"] else res["loss"][w] for w in widths}
        g = {w: grid_best(grid, rows[w]) for w in widths}
        f = {w: fitted_log2_optimum(grid, rows[w]) for w in widths}

        def shift(d: Mapping[int, Optional[float]]) -> Optional[float]:
            vals = list(d.values())
            return None if any(v is None for v in vals) else (max(vals) - min(vals)) / step  # type: ignore[type-var]

        outside = [w for w, v in f.items() if v is not None and not grid[0] <= v <= grid[-1]]
        per_seed = res.get("best_per_seed") or {}
        spread = {}
        for w in widths:
            vals = [float(v) for v in per_seed.get(str(w), []) if math.isfinite(float(v))]
            spread[w] = statistics.stdev(vals) if len(vals) > 1 else None
        summary[key] = {"axis": axis, "sizes": widths, f"{axis}s": widths, "grid_step": step, "grid_best_log2_lr": g, "fitted_best_log2_lr": f,
                        "grid_shift_steps": shift(g), "fitted_shift_steps": shift(f), "fitted_outside_grid": outside,
                        "best_loss": {w: best_of(rows[w]) for w in widths}, "best_loss_seed_std": spread}
    return summary


def verdict(summary: Mapping[str, Mapping[str, Any]], max_mup_shift: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per optimizer with both parametrizations: does μP's fitted optimum move by ≤ ``max_mup_shift``
    grid steps across widths while SP's moves further (``transfers``)? And μP's quality promise
    (Tensor Programs V, Fig. 1): is μP's best loss lower at every wider width, within the seed
    spread, and lower at the widest than at the narrowest (``wider_is_better``); is it no worse than
    SP's best at any width, within the seed spread (``not_worse_than_sp``)? The tolerance at a
    comparison is the larger seed standard deviation of the two points (0 without seeds' bests)."""
    out: dict[str, dict[str, Any]] = {}
    for key in summary:
        name, par = key.rsplit("/", 1)
        if par != "mup" or f"{name}/sp" not in summary:
            continue
        smu, ssp = summary[key], summary[f"{name}/sp"]
        mu, sp = smu["fitted_shift_steps"], ssp["fitted_shift_steps"]
        ok = mu is not None and sp is not None and mu <= max_mup_shift < sp
        out[name] = {"mup_shift": mu, "sp_shift": sp, "transfers": ok, **_quality(smu, ssp)}
    return out


def _quality(smu: Mapping[str, Any], ssp: Mapping[str, Any]) -> dict[str, Any]:
    if "best_loss" not in smu:  # a summary from before best losses were recorded
        return {}
    widths = smu.get("sizes") or smu["widths"]
    best, std = smu["best_loss"], smu.get("best_loss_seed_std") or {}

    def tol(*points: tuple[Mapping[Any, Any], int]) -> float:
        return max([(d.get(w) or 0.0) for d, w in points] + [0.0])

    sstd = ssp.get("best_loss_seed_std") or {}
    wider = all(best[b] <= best[a] + tol((std, a), (std, b)) for a, b in zip(widths, widths[1:])) \
        and best[widths[-1]] < best[widths[0]]
    gaps = {w: best[w] - ssp["best_loss"][w] for w in widths}
    not_worse = all(gaps[w] <= tol((std, w), (sstd, w)) for w in widths)
    return {"wider_is_better": wider, "not_worse_than_sp": not_worse, "mup_minus_sp_best_loss": gaps}


def format_summary(summary: Mapping[str, Mapping[str, Any]], max_mup_shift: float = 1.0) -> str:
    """The summary as text: best log2(lr) per width and the shifts, then the verdict per optimizer."""
    lines = []

    def fmt(v: Optional[float], digits: int) -> str:
        return "  —  " if v is None else f"{v:6.{digits}f}"

    for key, s in summary.items():
        widths = s.get("sizes") or s["widths"]
        lines.append(f"{key:12s} {s.get('axis', 'width') + 's':6s} {' '.join(f'{w!s:>6s}' for w in widths)}")
        lines.append(f"{'':12s} grid   {' '.join(fmt(s['grid_best_log2_lr'][w], 1) for w in widths)}   shift "
                     f"{fmt(s['grid_shift_steps'], 2)} grid steps")
        lines.append(f"{'':12s} fitted {' '.join(fmt(s['fitted_best_log2_lr'][w], 2) for w in widths)}   shift "
                     f"{fmt(s['fitted_shift_steps'], 2)} grid steps"
                     + (f"   (outside the grid at widths {s['fitted_outside_grid']})" if s["fitted_outside_grid"] else ""))
        if "best_loss" in s:
            std = s.get("best_loss_seed_std") or {}
            best = " ".join(f"{s['best_loss'][w]:6.3f}" for w in widths)
            lines.append(f"{'':12s} best   {best}   held-out loss, best of grid"
                         + (f"; seed std {' '.join(fmt(std.get(w), 3) for w in widths)}" if any(std.values()) else ""))
    for name, v in verdict(summary, max_mup_shift).items():
        mu, sp = v["mup_shift"], v["sp_shift"]
        lines.append(f"{name}: fitted optimum moves {fmt(mu, 2).strip()} grid steps under μP, {fmt(sp, 2).strip()} under SP: "
                     + ("transfers (μP ≤ %g, SP further)" % max_mup_shift if v["transfers"] else "not shown"))
        if "wider_is_better" in v:
            gaps = " ".join(f"{g:+.3f}" for g in v["mup_minus_sp_best_loss"].values())
            lines.append(f"{name}: μP's best loss {'falls' if v['wider_is_better'] else 'does NOT fall'} with width; "
                         f"μP − SP best loss per width {gaps}: "
                         + ("μP no worse than SP" if v["not_worse_than_sp"] else "μP WORSE than SP somewhere")
                         + " (within the seed spread)")
    return "\n".join(lines)


def write_report(record: Mapping[str, Any], out: str | Path, *, title: str = "",
                 max_mup_shift: float = 1.0) -> dict[str, Any]:
    """Summarize a run or pooled record, print the summary, write ``out`` (PNG) and
    ``out.with_suffix(".json")`` (the record plus ``summary`` and ``verdict``); returns that JSON."""
    out = Path(out)
    summary = summarize(record["results"])
    seeds = list(record.get("seeds") or [record.get("seed")])
    print(f"held-out loss averaged over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}")
    print(format_summary(summary, max_mup_shift))
    plot(record["results"], summary, out, title=f"{title}; seeds {seeds}" if title else f"seeds {seeds}")
    doc = {**record, "summary": summary, "verdict": verdict(summary, max_mup_shift)}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return doc


def plot(results: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Mapping[str, Any]], out: str | Path,
         title: str = "") -> Path:
    """Draw :func:`figure` and save it as ``out`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(results, summary, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figure(results: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Mapping[str, Any]], title: str = ""):
    """Top row, one panel per ``<optimizer>/<mup|sp>``: held-out loss vs log2 lr per width (★ grid
    arg-min, ▼ and dotted line: fitted optimum). Middle row, one panel per optimizer: best log2(lr)
    vs width, μP against SP (filled: fitted, open: grid arg-min). Bottom row, one panel per
    optimizer: the best held-out loss of the grid vs width, μP against SP, with the seeds' standard
    deviation as error bars where the record has every seed's best (μP's promise: lower with width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in keys))
    ncols = max(len(keys), len(names))
    fig, axes = plt.subplots(3, ncols, figsize=(3.9 * ncols, 10.2), squeeze=False)
    for ax in list(axes[0][len(keys):]) + list(axes[1][len(names):]) + list(axes[2][len(names):]):
        ax.axis("off")
    for ax, key in zip(axes[0], keys):
        _curves_panel(ax, results[key], summary[key], key)
    for ax, name in zip(axes[1], names):
        _best_lr_panel(ax, summary, name)
    for ax, name in zip(axes[2], names):
        _best_loss_panel(ax, summary, name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _curves_panel(ax: Any, res: Mapping[str, Any], s: Mapping[str, Any], key: str) -> None:
    grid = [float(x) for x in res["log2_lrs"]]
    finite_all = []
    axis, sizes = axis_of(res)
    for w in sizes:
        row = [float(v) if math.isfinite(float(v)) else float("nan") for v in res["loss"][str(w)]]
        finite_all += [v for v in row if v == v]
        line, = ax.plot(grid, row, marker="o", ms=3, label=f"{axis} {w}" if axis != "point" else str(w))
        gb = s["grid_best_log2_lr"][w]
        if gb is not None:
            ax.plot([gb], [row[grid.index(gb)]], marker="*", ms=11, color=line.get_color())
        fb = s["fitted_best_log2_lr"][w]
        if fb is not None:
            ax.axvline(fb, color=line.get_color(), ls=":", lw=1)
            ax.plot([fb], [1.0], marker="v", ms=7, color=line.get_color(), transform=ax.get_xaxis_transform(),
                    clip_on=False)
    label = key.replace("/mup", " — μP").replace("/sp", " — SP").replace("/", " — ")
    shift = s["fitted_shift_steps"]
    ax.set_title(f"{label}\nfitted optimum moves {'—' if shift is None else f'{shift:.2f}'} grid steps", fontsize=9)
    ax.set_xlabel("log2 learning rate (base)")
    ax.set_ylabel("held-out loss")
    if finite_all:
        lo = min(finite_all)
        ax.set_ylim(lo - 0.05, min(max(finite_all), lo + 1.2))
    ax.legend(fontsize=7)


def _best_lr_panel(ax: Any, summary: Mapping[str, Mapping[str, Any]], name: str) -> None:
    for par, style in (("mup", "-o"), ("sp", "--s")):
        s = summary.get(f"{name}/{par}")
        if s is None:
            continue
        ws = [w for w in s["widths"] if s["fitted_best_log2_lr"][w] is not None]
        line, = ax.plot(ws, [s["fitted_best_log2_lr"][w] for w in ws], style,
                        label=f"{'μP' if par == 'mup' else 'SP'} fitted")
        gw = [w for w in s["widths"] if s["grid_best_log2_lr"][w] is not None]
        ax.plot(gw, [s["grid_best_log2_lr"][w] for w in gw], style[-1], mfc="none", alpha=0.6, ms=8,
                color=line.get_color(), label=f"{'μP' if par == 'mup' else 'SP'} grid arg-min")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("best log2 learning rate")
    ax.set_title(f"{name}: best learning rate vs width", fontsize=9)
    ax.legend(fontsize=7)


def _best_loss_panel(ax: Any, summary: Mapping[str, Mapping[str, Any]], name: str) -> None:
    for par, style in (("mup", "-o"), ("sp", "--s")):
        s = summary.get(f"{name}/{par}")
        if s is None or "best_loss" not in s:
            continue
        ws = [w for w in s["widths"] if math.isfinite(s["best_loss"][w])]
        std = s.get("best_loss_seed_std") or {}
        err = [std.get(w) or 0.0 for w in ws]
        ax.errorbar(ws, [s["best_loss"][w] for w in ws], yerr=err if any(err) else None, fmt=style, capsize=3,
                    label=f"{'μP' if par == 'mup' else 'SP'}" + (" (± seed std)" if any(err) else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("best held-out loss of the grid")
    ax.set_title(f"{name}: best loss vs width (wider should be better)", fontsize=9)
    ax.legend(fontsize=7)
