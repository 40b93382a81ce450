"""The studies' plots and table from a sweep folder (``optlab report RUNS_DIR``).

Per run label (an optimizer configuration), over the seeds' mean final loss:

* **best loss** and the hyperparameters where it is reached;
* **stability width**: the contiguous range of learning rates around the best one whose final
  loss stays within ``tolerance`` nats of that label's best, and its width in decades
  ``log10(hi / lo)``. This is how Zhao et al. (2025, "Deconstructing What Makes a Good Optimizer
  for Autoregressive Language Models") judge stability: by how the final loss degrades away from
  the optimal learning rate. A diverged point (or any diverged seed) counts as outside;
* zero-shot scores (``eval/<task>/acc``...) at the best point, when logged.

Plots (PNG): final loss against each swept axis (log x for the learning rate and for other
axes spanning a factor ≥ 10; the optimum starred, diverged points as crosses on the top edge),
and loss against steps and against training wall-clock for each label's best point.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from .runner import read_csv

__all__ = ["aggregate", "numeric_axes", "stability_range", "summarize", "format_table", "format_race", "race",
           "best_curve", "plot_axis", "plot_curves", "build_report"]

_FIXED = {"point", "label", "optimizer", "seed", "status", "final_train_loss", "final_val_loss", "steps", "tokens",
          "train_seconds", "elapsed_seconds", "optimizer_share", "tokens_per_sec", "diverged_step",
          "resumed_from_step", "error", "this_session_seconds"}


def axes_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The swept hyperparameter columns of a results table (``lr`` first when present)."""
    axes: list[str] = []
    for r in rows:
        axes += [k for k in r if k not in _FIXED and not k.startswith("eval/") and k not in axes]
    axes = [a for a in axes if any(r.get(a) is not None for r in rows)]
    return sorted(axes, key=lambda a: (a != "lr", axes.index(a)))


def numeric_axes(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> list[str]:
    """The axes whose values are all numbers (plotted, and used for the stability width)."""
    return [a for a in axes if all(isinstance(r.get(a), (int, float)) for r in rows if r.get(a) is not None)]


def aggregate(rows: Sequence[Mapping[str, Any]], metric: str, axes: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per label, one entry per grid point: seeds' mean ``metric`` (inf if any seed diverged).

    Unfinished or failed points are left out (they are not results); each entry holds
    ``values`` (axis -> value), ``loss``, ``seeds``, ``diverged`` (seeds), ``points`` and the
    seeds' mean of every ``eval/...`` column.
    """
    groups: dict[tuple[str, tuple[Any, ...]], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("status") not in ("done", "diverged"):
            continue
        groups[(r["label"], tuple(r.get(a) for a in axes))].append(r)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (label, values), members in groups.items():
        diverged = sum(m["status"] == "diverged" or not _finite(m.get(metric)) for m in members)
        loss = math.inf if diverged else sum(float(m[metric]) for m in members) / len(members)
        entry = {"values": dict(zip(axes, values)), "loss": loss, "seeds": len(members), "diverged": diverged,
                 "points": [m["point"] for m in members],
                 "losses": [float(m[metric]) if _finite(m.get(metric)) else math.inf for m in members]}
        for k in sorted({k for m in members for k in m if k.startswith("eval/")}):
            vals = [float(m[k]) for m in members if _finite(m.get(k))]
            entry[k] = sum(vals) / len(vals) if vals else None
        out[label].append(entry)
    return dict(out)


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def stability_range(values: Sequence[float], losses: Sequence[float], tolerance: float) -> tuple[float, float] | None:
    """The contiguous range of ``values`` around the best loss with loss ≤ best + tolerance.

    ``values`` are sorted first; None when no loss is finite.
    """
    pairs = sorted(zip(values, losses))
    finite = [i for i, (_, loss) in enumerate(pairs) if math.isfinite(loss)]
    if not finite:
        return None
    best_i = min(finite, key=lambda i: pairs[i][1])
    bound = pairs[best_i][1] + tolerance
    lo = hi = best_i
    while lo - 1 >= 0 and pairs[lo - 1][1] <= bound:
        lo -= 1
    while hi + 1 < len(pairs) and pairs[hi + 1][1] <= bound:
        hi += 1
    return pairs[lo][0], pairs[hi][0]


def _std(losses: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (None for one seed or a diverged one)."""
    if len(losses) < 2 or not all(math.isfinite(x) for x in losses):
        return None
    return statistics.stdev(losses)


def _bracket(line: list[dict[str, Any]], axis: str, best: Mapping[str, Any]) -> tuple[str | None, list[float | None]]:
    """Whether the best value lies inside the grid ("yes"), or at its "low"/"high" edge (extend the grid
    there: the optimum may lie beyond), and the loss increase one grid value below and above the best:
    how fast the loss degrades away from the optimum (None past an edge; inf for a diverged neighbour)."""
    ordered = sorted(line, key=lambda e: float(e["values"][axis]))
    if len(ordered) < 2:
        return None, [None, None]
    i = next(k for k, e in enumerate(ordered) if e is best)
    where = "low" if i == 0 else "high" if i == len(ordered) - 1 else "yes"
    away = [ordered[j]["loss"] - best["loss"] if 0 <= j < len(ordered) else None for j in (i - 1, i + 1)]
    return where, away


def _slice(entries: list[dict[str, Any]], axis: str, best: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entries varying ``axis`` with every other axis at its best value."""
    others = {a: v for a, v in best.items() if a != axis}
    return [e for e in entries if all(e["values"].get(a) == v for a, v in others.items())
            and e["values"].get(axis) is not None]


def summarize(rows: Sequence[Mapping[str, Any]], *, metric: str = "final_val_loss", tolerance: float = 0.1
              ) -> list[dict[str, Any]]:
    """One summary per label, best first (labels with nothing finite last)."""
    axes = axes_of(rows)
    groups = aggregate(rows, metric, axes)
    optimizer_of = {r["label"]: r.get("optimizer") for r in rows}
    out = []
    for label, entries in groups.items():
        best = min(entries, key=lambda e: e["loss"])
        s: dict[str, Any] = {"label": label, "optimizer": optimizer_of.get(label), "best_loss": best["loss"],
                             "best": dict(best["values"]), "points": sum(e["seeds"] for e in entries),
                             "diverged": sum(e["diverged"] for e in entries), "axis": None, "range": None,
                             "width_decades": None, "seed_std": _std(best["losses"]), "seeds": best["seeds"],
                             "bracketed": None, "steps_away": None,
                             "evals": {k: v for k, v in best.items() if k.startswith("eval/") and v is not None}}
        numeric = numeric_axes(rows, axes)
        if numeric and math.isfinite(best["loss"]):
            axis = numeric[0]
            line = _slice(entries, axis, best["values"])
            rng = stability_range([float(e["values"][axis]) for e in line], [e["loss"] for e in line], tolerance)
            s["axis"], s["range"] = axis, rng
            s["bracketed"], s["steps_away"] = _bracket(line, axis, best)
            # a width in decades for log-scale axes (the learning rate); momentum's range is given as is
            if rng is not None and rng[0] > 0 and _log_axis(axis, [float(e["values"][axis]) for e in line]):
                s["width_decades"] = math.log10(rng[1] / rng[0])
        out.append(s)
    return sorted(out, key=lambda s: (not math.isfinite(s["best_loss"]), s["best_loss"]))


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def format_table(summaries: Sequence[Mapping[str, Any]], *, metric: str, tolerance: float) -> str:
    """The markdown table: per label the best loss, where, the stability range and width, evals."""
    evals = sorted({k for s in summaries for k in s["evals"]})
    axis = next((s["axis"] for s in summaries if s["axis"]), "lr")
    head = ["run", "optimizer", f"best {metric}", "at", "bracketed", "loss one value below / above",
            f"{axis} range within {tolerance:g} of best", "width (decades)", "points (diverged)"] + evals
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for s in summaries:
        finite = math.isfinite(s["best_loss"])
        at = ", ".join(f"{a}={_num(v)}" for a, v in s["best"].items()) if finite else "-"
        rng = f"[{_num(s['range'][0])}, {_num(s['range'][1])}]" if s["range"] else "-"
        width = f"{s['width_decades']:.2f}" if s["width_decades"] is not None else "-"
        loss = f"{s['best_loss']:.4f}" if finite else "diverged"
        if finite and s.get("seed_std") is not None:
            loss += f" ± {s['seed_std']:.4f} ({s['seeds']} seeds)"
        bracketed = {"yes": "yes", "low": "no: lowest value", "high": "no: highest value"}.get(s.get("bracketed"), "-")
        away = " / ".join("-" if d is None else "diverged" if not math.isfinite(d) else f"+{d:.3f}" if d >= 0
                          else f"{d:.3f}" for d in (s.get("steps_away") or [None, None]))
        cells = [s["label"], str(s["optimizer"]), loss, at, bracketed, away, rng, width,
                 f"{s['points']} ({s['diverged']})"] + [f"{s['evals'][k]:.4f}" if k in s["evals"] else "-" for k in evals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_race(races: Mapping[str, Mapping[str, Any]], reference: str, *, held_out: bool = False) -> str:
    """Markdown: steps and wall-clock to the reference's final (training or validation) loss, and their ratios."""
    target = next(iter(races.values()))["target"]
    what = ("validation loss (interpolated between validations)" if held_out
            else "training loss (moving average of 10 steps)")
    lines = [f"Steps and training wall-clock to reach {reference}'s final {what}, {target:.4f}, "
             f"each run at its best point (ratios to {reference}'s own first crossing of it):", "",
             "| run | steps | vs " + reference + " | seconds | vs " + reference + " |", "|---|---:|---:|---:|---:|"]
    for label, r in races.items():
        if r["step"] is None:
            lines.append(f"| {label} | not reached | - | not reached | - |")
        else:
            lines.append(f"| {label} | {r['step']:.0f} | {r['step_ratio']:.2f}x | {r['seconds']:.1f} | {r['seconds_ratio']:.2f}x |")
    return "\n".join(lines)


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label, the same in every plot of a report (labels sorted)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(sorted(labels))}


def _log_axis(axis: str, values: Sequence[float]) -> bool:
    pos = [v for v in values if v > 0]
    return axis == "lr" or (len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) >= 10)


def plot_axis(rows: Sequence[Mapping[str, Any]], axis: str, path: str | Path, *, metric: str, title: str = "") -> None:
    """Final ``metric`` against ``axis`` per label (other axes at the label's best); optimum starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = axes_of(rows)
    groups = aggregate(rows, metric, axes)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite_losses = [e["loss"] for es in groups.values() for e in es if math.isfinite(e["loss"])]
    top = max(finite_losses) if finite_losses else 1.0
    all_x: list[float] = []
    colors = _colors(list(groups))
    for label, entries in sorted(groups.items()):
        best = min(entries, key=lambda e: e["loss"])
        line = sorted(_slice(entries, axis, best["values"]), key=lambda e: float(e["values"][axis]))
        xs = [float(e["values"][axis]) for e in line]
        all_x += xs
        ok = [(x, e["loss"]) for x, e in zip(xs, line) if math.isfinite(e["loss"])]
        bad = [x for x, e in zip(xs, line) if not math.isfinite(e["loss"])]
        color = colors[label]
        if ok:
            ax.plot(*zip(*ok), marker="o", ms=4, label=label, color=color)
            if math.isfinite(best["loss"]):
                ax.plot([float(best["values"][axis])], [best["loss"]], marker="*", ms=14, color=color,
                        markeredgecolor="black", zorder=5)
        if bad:
            ax.plot(bad, [top] * len(bad), linestyle="none", marker="x", ms=8, color=color,
                    label=None if ok else f"{label} (diverged)")
    if _log_axis(axis, all_x):
        ax.set_xscale("log")
    ax.set(xlabel=axis, ylabel=f"{metric.replace('_', ' ')} (nats/token)",
           title=title or f"final loss vs {axis} (★ optimum, × diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smoothed(ys: Sequence[float], window: int) -> list[float]:
    return [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]


def _best_point_curve(runs_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                      summary: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The ``curve.csv`` rows of a label's best point (its first seed), or None."""
    if not math.isfinite(summary["best_loss"]):
        return None
    point = next((r["point"] for r in rows if r["label"] == summary["label"] and r.get("status") == "done"
                  and all(r.get(a) == v for a, v in summary["best"].items())), None)
    path = Path(runs_dir) / str(point) / "curve.csv"
    if point is None or not path.exists():
        return None
    from .record import read_curve  # (imports Lightning: only when curves are drawn)

    return read_curve(path)


def best_curve(runs_dir: str | Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *,
               smooth: int = 10) -> list[tuple[int, float, float]] | None:
    """``(step, training seconds, smoothed training loss)`` of a label's best point (its first seed), or None."""
    curve = [r for r in _best_point_curve(runs_dir, rows, summary) or [] if r["train_loss"] is not None]
    if not curve:
        return None
    avg = _smoothed([r["train_loss"] for r in curve], smooth)
    return [(int(r["step"]), float(r["train_seconds"]), a) for r, a in zip(curve, avg)]


def best_val_curve(runs_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                   summary: Mapping[str, Any]) -> list[tuple[int, float, float]] | None:
    """``(step, training seconds, validation loss)`` at each validation of a label's best point, or None."""
    curve = [r for r in _best_point_curve(runs_dir, rows, summary) or []
             if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    return [(int(r["step"]), float(r["train_seconds"]), float(r["val_loss"])) for r in curve] or None


def race(curves: Mapping[str, list[tuple[int, float, float]]], reference: str, *,
         interpolate: bool = False) -> dict[str, dict[str, Any]]:
    """Steps and seconds each label needs to reach the reference label's final loss.

    ``curves`` are ``(step, seconds, loss)``: the smoothed training loss at every step, or the
    validation loss at each validation (then ``interpolate``: the crossing is placed linearly
    between the two validations around it, in steps and in seconds).
    Returns ``{label: {"target", "step", "seconds", "step_ratio", "seconds_ratio"}}``: the ratios are
    to the reference's own first crossing of its final value (its end, unless its loss was lower
    before and rose again); None where a label never reaches the target.
    """
    if reference not in curves:
        return {}
    target = curves[reference][-1][2]

    def first_hit(curve: list[tuple[int, float, float]]) -> tuple[float, float] | None:
        i = next((k for k, (_, _, loss) in enumerate(curve) if loss <= target), None)
        if i is None:
            return None
        step, secs, loss = curve[i]
        if interpolate and i > 0 and curve[i - 1][2] > target:
            s0, t0, l0 = curve[i - 1]
            f = (l0 - target) / (l0 - loss)
            step, secs = s0 + f * (step - s0), t0 + f * (secs - t0)
        return step, secs

    ref_step, ref_secs = first_hit(curves[reference])  # reached at the latest at its own end
    out = {}
    for label, curve in curves.items():
        hit = first_hit(curve)
        out[label] = {"target": target, "step": hit[0] if hit else None, "seconds": hit[1] if hit else None,
                      "step_ratio": hit[0] / ref_step if hit and ref_step else None,
                      "seconds_ratio": hit[1] / ref_secs if hit and ref_secs else None}
    return out


def plot_curves(curves: Mapping[str, list[tuple[int, float, float]]], path: str | Path, *, smooth: int = 10,
                labels: Sequence[str] | None = None) -> bool:
    """Training loss (moving average of ``smooth`` steps) against steps and wall-clock, best point per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = _colors(list(labels or curves))  # labels: every label of the report, for the same colours
    for label, curve in sorted(curves.items()):
        steps, secs, losses = zip(*curve)
        a1.plot(steps, losses, label=label, color=colors[label])
        a2.plot(secs, losses, label=label, color=colors[label])
    a1.set(xlabel="optimizer step", ylabel=f"training loss (moving average, {smooth} steps)", title="loss vs steps")
    a2.set(xlabel="training wall-clock (s, validation excluded)", title="loss vs wall-clock")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle("each run's best point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_report(runs_dir: str | Path, *, tolerance: float | None = None, metric: str | None = None,
                 out_dir: str | Path | None = None, title: str | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and the PNGs for a sweep folder (its ``results.csv``).

    ``tolerance``/``metric`` default to the sweep's own (``sweep.json``), else 0.1 nats and the
    final validation loss. Returns ``{"summaries": ..., "files": [...], "markdown": ...}``.
    """
    runs = Path(runs_dir)
    if not (runs / "results.csv").exists():
        raise FileNotFoundError(f"{runs / 'results.csv'} not found: run `optlab sweep` first (it writes the table)")
    meta = json.loads((runs / "sweep.json").read_text()) if (runs / "sweep.json").exists() else {}
    tolerance = float(tolerance if tolerance is not None else meta.get("tolerance", 0.1))
    metric = metric or meta.get("metric", "final_val_loss")
    out = Path(out_dir) if out_dir is not None else runs
    out.mkdir(parents=True, exist_ok=True)
    rows = read_csv(runs / "results.csv")
    if metric == "final_val_loss" and not any(_finite(r.get(metric)) for r in rows):
        metric = "final_train_loss"  # runs without validation
    summaries = summarize(rows, metric=metric, tolerance=tolerance)
    files, figures = [], []
    for axis in numeric_axes(rows, axes_of(rows)):
        name = f"loss_vs_{axis.split('.')[-1]}.png"
        plot_axis(rows, axis, out / name, metric=metric)
        files.append(out / name)
        figures.append(f"![final loss vs {axis}]({name})")
    curves = {s["label"]: c for s in summaries if (c := best_curve(runs, rows, s)) is not None}
    if plot_curves(curves, out / "loss_curves.png", labels=[s["label"] for s in summaries]):
        files.append(out / "loss_curves.png")
        figures.append("![loss vs steps and wall-clock](loss_curves.png)")
    reference = meta.get("reference")
    races, held_out = {}, False
    if reference:
        # held out where every run was validated twice or more: a corpus read in a fixed order gives training
        # losses that dip below their final value on easy stretches, so the training race can end early
        val_curves = {s["label"]: best_val_curve(runs, rows, s) for s in summaries if s["label"] in curves}
        held_out = bool(val_curves) and all(c is not None and len(c) >= 2 for c in val_curves.values())
        races = race(val_curves, reference, interpolate=True) if held_out else race(curves, reference)
    table = format_table(summaries, metric=metric, tolerance=tolerance)
    if races:
        table += "\n\n" + format_race(races, reference, held_out=held_out)
    unfinished = [r["point"] for r in rows if r.get("status") not in ("done", "diverged")]
    lines = [f"# {title or 'Sweep report'}: {runs.name}", "",
             f"{len(rows)} points; seeds averaged; judged by `{metric}`. Stability: the learning-rate range around "
             f"each run's best whose final loss is within {tolerance:g} nats of that best (diverged points count as "
             "outside); width in decades = log10(hi/lo).", "", table, ""]
    if unfinished:
        lines += [f"Not finished (left out): {', '.join(unfinished)}", ""]
    lines += figures + [""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps({"metric": metric, "tolerance": tolerance, "summaries": summaries,
                                                 "race": races, "race_held_out": held_out},
                                                indent=1, default=str))
    files += [out / "report.md", out / "report.json"]
    return {"summaries": summaries, "files": files, "markdown": markdown, "table": table, "race": races,
            "race_held_out": held_out}
