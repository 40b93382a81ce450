"""Learning-rate transfer across depth: width-only μP against the depth rules (depth-μP, CompleteP).

Two experiments on the CPU, both with μP in width and the same batches, initialization seed and
schedule at every point of a seed (:mod:`.lr_transfer` trains and scores a point):

* **depth alone**: one width, depths such as 2, 4, 8, 16, a learning-rate grid per optimizer, once
  per depth rule (``none`` is width-only μP; ``depth_mup``, ``completep`` relative to the shallowest
  depth). The fitted optimum's drift across depths in grid steps says whether the rule transfers;
* **width and depth together**, as the proxy → target step: the same grid on a proxy (w, L) and on a
  target (4w, 4L). The learning rate tuned on the proxy (its grid arg-min) is used on the target;
  the *gap* is the target's held-out loss there minus the best of the target's own sweep (nats), and
  the distance between the two fitted optima (grid steps). Run with width-only μP and with a depth
  rule, it shows what the rule buys.

Records have the layout of the width experiment (``results`` keyed ``<optimizer>/<rule>`` with
``depths``; ``joint`` keyed the same with ``points``), so :func:`.lr_transfer.combine` pools seeds.

    optlab mup lr-transfer --config recipes/mup-lr-transfer-depth.yaml --jobs 2 --out runs/depth.png
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .depth import DEPTH_RULES, check_depth_rule
from .lr_transfer import (
    TrainingSettings, axis_of, best_of, check_optimizers, fitted_log2_optimum, grid_best, grid_step, model_overrides, point_loss,
    summarize,
)

__all__ = ["DepthTransferConfig", "load_depth_config", "run_depth_seed", "run_depth", "joint_gaps",
           "depth_verdict", "format_depth_summary", "depth_figure", "write_depth_report", "DEPTH_OPTIMIZERS"]

_MIX_ADAMW = [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"]}]

#: default grids (log2 of the base learning rate), centred on the width-32 optimum of each optimizer
#: with room below it, where width-only μP's optimum moves as the model deepens
DEPTH_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"log2_lrs": [-8, -7, -6, -5, -4, -3], "betas": [0.9, 0.95]},
    "lion": {"log2_lrs": [-11, -10, -9, -8, -7, -6], "betas": [0.9, 0.99]},
    "sophia": {"log2_lrs": [-10, -9, -8, -7, -6, -5, -4]},
    "soap": {"log2_lrs": [-9, -8, -7, -6, -5, -4], "betas": [0.9, 0.95]},
    "muon": {"log2_lrs": [-8, -7, -6, -5, -4, -3], "mix": _MIX_ADAMW},
}


@dataclasses.dataclass
class DepthTransferConfig(TrainingSettings):
    """The ``depth_transfer:`` block of ``recipes/mup-lr-transfer-depth.yaml``.

    ``joint`` is ``{"proxy": [width, depth], "target": [width, depth]}`` (None: no joint experiment);
    ``joint_rules`` the rules it compares (default: ``none`` and the last of ``depth_rules``).
    """

    model: str = "llama-tiny"
    width: int = 32
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8, 16])
    base_width: Optional[int] = None
    base_depth: Optional[int] = None
    depth_rules: list[str] = dataclasses.field(default_factory=lambda: list(DEPTH_RULES))
    joint: Optional[dict[str, list[int]]] = dataclasses.field(
        default_factory=lambda: {"proxy": [32, 2], "target": [128, 8]})
    joint_rules: Optional[list[str]] = None
    optimizers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: copy.deepcopy(DEPTH_OPTIMIZERS))
    steps: int = 100
    qk_layernorm: bool = True
    z_loss: float = 1e-4
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        self.depths = sorted(int(d) for d in self.depths)
        if len(self.depths) < 2 or len(set(self.depths)) != len(self.depths) or self.depths[0] < 1:
            raise ValueError(f"depth_transfer.depths must hold at least two distinct positive depths, got {self.depths}")
        self.base_depth = self.depths[0] if self.base_depth is None else int(self.base_depth)
        self.base_width = self.width if self.base_width is None else int(self.base_width)
        if self.base_width > self.width:
            raise ValueError(f"depth_transfer.base_width {self.base_width} is wider than width {self.width}")
        self.depth_rules = [check_depth_rule(r) for r in self.depth_rules]
        if not self.depth_rules:
            raise ValueError("depth_transfer.depth_rules is empty; name some of " + ", ".join(DEPTH_RULES))
        if self.joint is not None:
            try:
                (pw, pd), (tw, td) = self.joint["proxy"], self.joint["target"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"depth_transfer.joint must be {{proxy: [width, depth], target: [width, depth]}}, "
                                 f"got {self.joint!r}") from None
            if tw < pw or td < pd or (tw, td) == (pw, pd):
                raise ValueError(f"depth_transfer.joint: the target {tw}x{td} must be wider and/or deeper than the "
                                 f"proxy {pw}x{pd}")
            self.joint = {"proxy": [int(pw), int(pd)], "target": [int(tw), int(td)]}
            if self.joint_rules is None:
                self.joint_rules = ["none"] + [r for r in self.depth_rules[-1:] if r != "none"]
            self.joint_rules = [check_depth_rule(r) for r in self.joint_rules]
        self.check_training("depth_transfer")
        check_optimizers(self.optimizers, where="depth_transfer")
        for name, spec in self.optimizers.items():
            if not spec.get("log2_lrs"):
                spec["log2_lrs"] = list(DEPTH_OPTIMIZERS.get(name, {}).get("log2_lrs") or [])
        self.seeds = [int(s) for s in self.seeds] or [0]

    def grid(self, name: str) -> list[float]:
        return [float(x) for x in self.optimizers[name]["log2_lrs"]]

    def runs_per_seed(self) -> int:
        per_lr = len(self.depth_rules) * len(self.depths) + (2 * len(self.joint_rules or []) if self.joint else 0)
        return sum(len(self.grid(n)) for n in self.optimizers) * per_lr


def load_depth_config(raw: Mapping[str, Any], where: str = "recipe", **overrides: Any) -> DepthTransferConfig:
    """A :class:`DepthTransferConfig` from a recipe's ``depth_transfer:`` mapping (plus overrides)."""
    fields = {f.name for f in dataclasses.fields(DepthTransferConfig)}
    unknown = set(raw) - fields
    if unknown:
        raise ValueError(f"{where}: unknown depth_transfer keys {sorted(unknown)}; allowed: {sorted(fields)}")
    return DepthTransferConfig(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})


def _label(width: int, depth: int) -> str:
    return f"w{width} L{depth}"


def run_depth_seed(cfg: DepthTransferConfig, seed: int, *, progress: bool = True) -> dict[str, Any]:
    """Every (optimizer, rule, depth, lr) point and every joint (optimizer, rule, proxy/target, lr) point
    once with ``seed``; the JSON-ready record (``results`` and ``joint``)."""
    from .experiment import fixed_batches, width_model

    train = fixed_batches(cfg.steps, cfg.batch_size, cfg.seq_len, seed=seed)
    held = fixed_batches(cfg.eval_batches, cfg.eval_batch_size, cfg.seq_len, seed=seed + 1, offset=1)
    overrides = model_overrides(cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.runs_per_seed(), desc=f"depth transfer seed {seed}", unit="run", leave=False)

    done: dict[tuple[Any, ...], list[float]] = {}

    def sweep(name: str, width: int, depth: int, base_width: int, base_depth: int, rule: str) -> list[float]:
        # at the base depth every rule is width-only μP exactly (tested): train that sweep once
        key = (name, width, depth, base_width, base_depth, rule if depth != base_depth else "none")
        if key in done:
            if bar is not None:
                bar.update(len(done[key]))
            return list(done[key])
        row = []
        for lg in cfg.grid(name):
            model = width_model(cfg.model, width, mup=True, base_width=base_width, seed=seed, depth=depth,
                                base_depth=base_depth, depth_rule=rule, **overrides)
            row.append(point_loss(cfg, name, lg, model, train, held))
            if bar is not None:
                bar.update(1)
        done[key] = row
        return list(row)

    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    joint: dict[str, dict[str, Any]] = {}
    for name in cfg.optimizers:
        for rule in cfg.depth_rules:
            loss = {str(d): sweep(name, cfg.width, d, cfg.base_width, cfg.base_depth, rule) for d in cfg.depths}
            results[f"{name}/{rule}"] = {"log2_lrs": cfg.grid(name), "depths": list(cfg.depths), "width": cfg.width,
                                         "base_depth": cfg.base_depth, "loss": loss,
                                         "best_per_seed": {d: [best_of(r)] for d, r in loss.items()}}
        if cfg.joint:
            (pw, pd), (tw, td) = cfg.joint["proxy"], cfg.joint["target"]
            for rule in cfg.joint_rules or []:
                loss = {_label(pw, pd): sweep(name, pw, pd, pw, pd, rule), _label(tw, td): sweep(name, tw, td, pw, pd, rule)}
                joint[f"{name}/{rule}"] = {"log2_lrs": cfg.grid(name), "points": list(loss), "loss": loss,
                                           "best_per_seed": {k: [best_of(r)] for k, r in loss.items()}}
    if bar is not None:
        bar.close()
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "seed": seed, "seeds": [seed], "results": results,
                              "seconds": time.perf_counter() - t0, "kind": "depth"}
    if cfg.joint:
        record["joint"] = joint
    return record


def run_depth(cfg: DepthTransferConfig, *, jobs: int = 1, progress: bool = True,
              save: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """:func:`run_depth_seed` for every seed, ``jobs`` seeds at a time in worker processes (one thread each)."""
    from .lr_transfer import run

    return run(cfg, jobs=jobs, progress=progress, save=save, run_one=run_depth_seed)


def joint_gaps(joint: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``<optimizer>/<rule>`` of the joint experiment: the proxy's grid arg-min and fitted optimum,
    the target's, the gap in nats (target loss at the proxy's arg-min − the target's best) and in grid
    steps (target fitted − proxy fitted; negative: the target wants a smaller learning rate)."""
    out = {}
    for key, res in joint.items():
        grid = [float(x) for x in res["log2_lrs"]]
        step = grid_step(grid, where=f"{key} log2_lrs")
        _, (proxy, target) = axis_of(res)
        p_row, t_row = res["loss"][str(proxy)], res["loss"][str(target)]
        p_best = grid_best(grid, p_row)
        p_fit, t_fit = fitted_log2_optimum(grid, p_row), fitted_log2_optimum(grid, t_row)
        at_transfer = float(t_row[grid.index(p_best)]) if p_best is not None else math.inf
        out[key] = {"proxy": proxy, "target": target, "proxy_grid_best": p_best, "target_grid_best": grid_best(grid, t_row),
                    "proxy_fitted": p_fit, "target_fitted": t_fit,
                    "target_loss_at_transfer": at_transfer, "target_best_loss": best_of(t_row),
                    "gap_nats": at_transfer - best_of(t_row),
                    "gap_steps": None if p_fit is None or t_fit is None else (t_fit - p_fit) / step}
    return out


def depth_verdict(summary: Mapping[str, Mapping[str, Any]], max_shift: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per ``<optimizer>/<rule>`` of the depth-alone experiment: the fitted optimum's drift over depths
    (signed: deepest − shallowest, in grid steps; ``shift``: max − min) and whether it is ≤ ``max_shift``."""
    out = {}
    for key, s in summary.items():
        sizes, fit = s["sizes"], s["fitted_best_log2_lr"]
        lo, hi = fit[sizes[0]], fit[sizes[-1]]
        drift = None if lo is None or hi is None else (hi - lo) / s["grid_step"]
        shift = s["fitted_shift_steps"]
        out[key] = {"drift_steps": drift, "shift_steps": shift, "holds": shift is not None and shift <= max_shift,
                    "best_loss": s["best_loss"]}
    return out


def format_depth_summary(summary: Mapping[str, Any], gaps: Mapping[str, Any] | None, max_shift: float = 1.0) -> str:
    def fmt(v: Optional[float], digits: int = 2) -> str:
        return "—" if v is None else f"{v:+.{digits}f}"

    lines = ["depth alone: fitted optimum (log2 base lr) per depth; drift = deepest − shallowest in grid steps"]
    verdict = depth_verdict(summary, max_shift)
    for key, s in summary.items():
        v = verdict[key]
        fits = " ".join("  —  " if s["fitted_best_log2_lr"][d] is None else f"{s['fitted_best_log2_lr'][d]:6.2f}"
                        for d in s["sizes"])
        best = " ".join(f"{s['best_loss'][d]:.3f}" for d in s["sizes"])
        span = "—" if v["shift_steps"] is None else f"{v['shift_steps']:.2f}"
        lines.append(f"  {key:18s} depths {s['sizes']}: fitted {fits}  drift {fmt(v['drift_steps'])}, range "
                     f"{span} steps ({'holds' if v['holds'] else 'moves'} at ≤ {max_shift:g}); best loss {best}")
    if gaps:
        lines.append("proxy → target: target loss at the proxy's learning rate − the target's best (nats), "
                     "optimum distance (grid steps)")
        for key, g in gaps.items():
            lr_p = "—" if g["proxy_grid_best"] is None else f"2^{g['proxy_grid_best']:g}"
            lr_t = "—" if g["target_grid_best"] is None else f"2^{g['target_grid_best']:g}"
            lines.append(f"  {key:18s} {g['proxy']} → {g['target']}: proxy lr {lr_p}, target best {lr_t}; gap "
                         f"{g['gap_nats']:.3f} nats, {fmt(g['gap_steps'])} grid steps")
    return "\n".join(lines)


def depth_figure(record: Mapping[str, Any], summary: Mapping[str, Any], gaps: Mapping[str, Any] | None, title: str = ""):
    """One row per optimizer: held-out loss vs log2 lr per depth for each rule (▼ fitted optimum), the
    fitted optimum vs depth per rule, and (with a joint experiment) proxy and target curves per rule
    with the proxy's learning rate marked on the target's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .lr_transfer import _curves_panel

    results = record["results"]
    names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in results))
    rules = list(dict.fromkeys(k.rsplit("/", 1)[1] for k in results))
    joint = record.get("joint") or {}
    ncols = len(rules) + 1 + (1 if joint else 0)
    fig, axes = plt.subplots(len(names), ncols, figsize=(3.6 * ncols, 3.1 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, rule in enumerate(rules):
            key = f"{name}/{rule}"
            _curves_panel(axes[row][col], results[key], summary[key], key)
        ax = axes[row][len(rules)]
        for rule in rules:
            s = summary[f"{name}/{rule}"]
            grid = [float(x) for x in results[f"{name}/{rule}"]["log2_lrs"]]
            # a vertex far outside the grid (a nearly flat or noisy curve) is left out of the panel
            ds = [d for d in s["sizes"] if s["fitted_best_log2_lr"][d] is not None
                  and grid[0] - 1 <= s["fitted_best_log2_lr"][d] <= grid[-1] + 1]
            ax.plot(ds, [s["fitted_best_log2_lr"][d] for d in ds], "-o", ms=3, label=rule)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("fitted best log2 lr")
        ax.set_title(f"{name}: optimum vs depth", fontsize=9)
        ax.legend(fontsize=7)
        if joint:
            ax = axes[row][-1]
            for rule in [k.rsplit("/", 1)[1] for k in joint if k.rsplit("/", 1)[0] == name]:
                res, g = joint[f"{name}/{rule}"], gaps[f"{name}/{rule}"]
                grid = [float(x) for x in res["log2_lrs"]]
                for label, ls in ((g["proxy"], ":"), (g["target"], "-")):
                    ys = [v if math.isfinite(v) else float("nan") for v in res["loss"][str(label)]]
                    line, = ax.plot(grid, ys, ls, marker="o", ms=2, label=f"{rule}: {label}")
                if g["proxy_grid_best"] is not None:
                    ax.plot([g["proxy_grid_best"]], [g["target_loss_at_transfer"]], "*", ms=10, color=line.get_color())
            finite = [v for k, res in joint.items() if k.rsplit("/", 1)[0] == name for r in res["loss"].values()
                      for v in r if math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.2))
            ax.set_xlabel("log2 learning rate (base)")
            ax.set_ylabel("held-out loss")
            ax.set_title(f"{name}: proxy → target (★ target at the proxy's lr)", fontsize=9)
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_depth_report(record: Mapping[str, Any], out: str | Path, *, title: str = "", max_shift: float = 1.0) -> dict[str, Any]:
    """Print the summary, write ``out`` (PNG) and ``out.with_suffix(".json")`` (record, summaries, gaps)."""
    import json

    import matplotlib.pyplot as plt

    out = Path(out)
    summary = summarize(record["results"])
    gaps = joint_gaps(record["joint"]) if record.get("joint") else None
    seeds = list(record.get("seeds") or [record.get("seed")])
    print(f"held-out loss averaged over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}")
    print(format_depth_summary(summary, gaps, max_shift))
    fig = depth_figure(record, summary, gaps, title=f"{title}; seeds {seeds}" if title else f"seeds {seeds}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    doc = {**record, "summary": summary, "verdict": depth_verdict(summary, max_shift), "joint_gaps": gaps}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return doc
