"""Coordinate check (Yang et al. 2022, "Tensor Programs V", §D.1 / Fig. 5): activation size vs width.

Train a few steps at several widths on one fixed batch and record, before each step, the average
entry size of every block's output, attention and MLP branches, the embedding output and the
logits. Under μP the curves are flat in width; under standard parametrization (SP) they grow
with width (for Adam-like updates, about linearly). Records have the layout of the `mup`
package's coord check (width, module, t and the statistics), written by a forward hook of ours
(mup's own hook is private); its plotting needs seaborn, so the plot here is matplotlib.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._extras import require

require("mup")  # a one-line install hint when it is missing

from .experiment import fixed_batches, width_model

__all__ = ["coord_check", "coord_ratios", "plot_coord_check", "COORD_STATS", "coord_points", "depth_profile",
           "depth_ratios", "plot_coord_depth"]

#: statistics recorded per module output: mean |x| (mup's "l1") and the RMS
COORD_STATS: dict[str, Any] = {"l1": lambda x: x.abs().mean(), "rms": lambda x: x.float().pow(2).mean().sqrt()}
_MODULES = re.compile(r"^(wte|blocks\.\d+|blocks\.\d+\.(attn|mlp))$")


def _coord_hook(records: list[dict[str, Any]], width: int, name: str, t: int,
                initial: dict[str, torch.Tensor] | None = None, depth: int | None = None) -> Any:
    """A forward hook appending ``{"width", "module", "t", **COORD_STATS of the output}`` to ``records``
    (tuple/list outputs: one record per tensor, ``module`` suffixed ``:out[i]``, as mup's coord check names them).

    With ``initial`` (a dict filled at t = 0) each record also holds ``delta_rms``, the RMS of the output's
    change since initialization on the same batch (the feature update), and ``depth`` when given."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        outs = [(name, output)] if isinstance(output, torch.Tensor) else [
            (f"{name}:out[{i}]", o) for i, o in enumerate(output) if isinstance(o, torch.Tensor)]
        with torch.no_grad():
            for label, out in outs:
                rec = {"width": width, "module": label, "t": t, **{stat: float(f(out)) for stat, f in COORD_STATS.items()}}
                if depth is not None:
                    rec["depth"] = depth
                if initial is not None:
                    if t == 0:
                        initial[label] = out.detach().clone()
                    rec["delta_rms"] = float((out.float() - initial[label].float()).pow(2).mean().sqrt())
                records.append(rec)

    return hook


#: the modules watched in a model from a factory: token embedding and transformer blocks (HF naming too)
_ANY_MODULES = re.compile(r"^(wte|blocks\.\d+|model\.embed_tokens|model\.layers\.\d+|transformer\.wte|transformer\.h\.\d+)$")


def _watched(model: nn.Module, pattern: re.Pattern[str] = _MODULES) -> Iterable[tuple[str, nn.Module]]:
    yield "logits", model
    for name, module in model.named_modules():
        if pattern.match(name):
            yield name, module


def _first_tensor(output: Any) -> torch.Tensor:
    """The activation in a module's output: a tensor, ``.logits``, ``.last_hidden_state`` or a tuple's first."""
    for attr in ("logits", "last_hidden_state"):
        if isinstance(getattr(output, attr, None), torch.Tensor):
            return getattr(output, attr)
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    return output


def _record(records: list, width: int, name: str, t: int) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        x = _first_tensor(output).detach()
        records.append({"width": width, "module": name, "t": t, **{k: float(f(x)) for k, f in COORD_STATS.items()}})
    return hook


def coord_points(widths: Sequence[int], depths: Sequence[int] | None) -> list[tuple[int, int | None]]:
    """The (width, depth) points of a coordinate check: every width at the preset's depth (no ``depths``),
    one width at every depth, one depth at every width, or widths and depths paired in order (both
    scaled together, e.g. widths 32 64 128 with depths 2 4 8)."""
    widths = [int(w) for w in widths]
    if not depths:
        return [(w, None) for w in widths]
    depths = [int(d) for d in depths]
    if any(d < 1 for d in depths):
        raise ValueError(f"depths must be positive numbers of layers, got {depths}")
    if len(widths) == 1:
        return [(widths[0], d) for d in depths]
    if len(depths) == 1:
        return [(w, depths[0]) for w in widths]
    if len(widths) != len(depths):
        raise ValueError(f"widths {widths} and depths {depths}: give one width (a depth sweep), one depth (a width "
                         "sweep) or as many widths as depths (paired in order: width and depth scaled together)")
    return list(zip(widths, depths))


def coord_check(
    model: str | Mapping[str, Any] | Callable[[int], nn.Module] = "llama-tiny", optimizer: str = "adamw", *, widths: Sequence[int] = (32, 64, 128, 256),
    base_width: int | None = None, steps: int = 3, lr: float = 1e-2, mup: bool = True, batch_size: int = 8,
    seq_len: int = 32, seed: int = 0, hparams: Mapping[str, Any] | None = None, mix: list | None = None,
    depths: Sequence[int] | None = None, base_depth: int | None = None, depth_rule: str = "none",
    **model_overrides: Any,
) -> list[dict[str, Any]]:
    """Train ``steps`` steps at each width (and depth) and return mup-style records.

    With ``depths`` the points are :func:`coord_points` (a depth sweep at one width, or width and
    depth together), the model is in μP from ``base_width`` with the ``depth_rule`` (``"none"``:
    width-only μP; ``"depth_mup"``, ``"completep"``) relative to ``base_depth`` (default the
    shallowest depth), and every record holds ``depth`` and ``delta_rms``, the RMS of the output's
    change since initialization (the feature update each module sees).

    ``model`` is a preset name / config mapping (its width varied, μP from ``base_width``), or a
    factory ``width -> nn.Module`` returning your own model at that width, already in μP when
    ``mup`` is true (e.g. ``lambda w: mup_hf_model(config_at_width(cfg, w), base_width=32)``); its
    logits (tensor, tuple or ``.logits``), token embedding and blocks are watched
    (``model.layers.N`` / ``transformer.h.N`` for Hugging Face models).

    Returns:
        one dict per (width, module, t): ``{"width", "module", "t", "l1", "rms", "mup"}`` where t is the
        number of optimizer steps taken before that forward pass (0 = at initialization, ..., steps).
    """
    from ..configure import OptimizerSpec, build_optimizer

    points = coord_points(widths, depths)
    if depths and callable(model):
        raise ValueError("depths needs a preset or config as model (a factory builds one width only); vary the "
                         "depth inside your factory instead")
    if depth_rule != "none" and not depths:
        raise ValueError(f"depth_rule={depth_rule!r} needs depths=[...] (the coordinate check over depth)")
    base_width = min(widths) if base_width is None else base_width
    if depths:
        base_depth = min(int(d) for d in depths) if base_depth is None else int(base_depth)
    batch = fixed_batches(1, batch_size, seq_len, seed=seed)[0]
    records: list[dict[str, Any]] = []
    for width, depth in points:
        initial: dict[str, torch.Tensor] | None = {} if depth is not None else None
        if callable(model):
            torch.manual_seed(seed)
            net = model(width)
        elif depth is not None:
            net = width_model(model, width, mup=mup, base_width=base_width, seed=seed, depth=depth,
                              base_depth=base_depth, depth_rule=depth_rule, **model_overrides)
        else:
            net = width_model(model, width, mup=mup, base_width=base_width, seed=seed, **model_overrides)
        spec = OptimizerSpec(name=optimizer, lr=lr, mup=mup, hparams=dict(hparams or {}), mix=list(mix or []))
        opt = build_optimizer(net, spec)
        for t in range(steps + 1):
            mine: list[dict[str, Any]] = []
            if callable(model):
                handles = [m.register_forward_hook(_record(mine, width, name, t)) for name, m in _watched(net, _ANY_MODULES)]
            else:
                handles = [m.register_forward_hook(_coord_hook(mine, width, name, t, initial, depth))
                           for name, m in _watched(net)]
            logits = _first_tensor(net(batch[:, :-1]))
            for h in handles:
                h.remove()
            records.extend({**r, "mup": mup, **({"depth_rule": depth_rule} if depth is not None else {})} for r in mine)
            if t == steps:
                break
            if hasattr(net, "loss") and callable(net.loss):
                loss = net.loss(logits, batch[:, 1:])
            else:
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return records


def coord_ratios(records: list[dict[str, Any]], t: int, stat: str = "rms") -> dict[str, float]:
    """``{module: stat at the widest width / stat at the narrowest}`` at step ``t``."""
    rows = [r for r in records if r["t"] == t]
    out = {}
    for module in sorted({r["module"] for r in rows}):
        by_width = {r["width"]: float(r[stat]) for r in rows if r["module"] == module}
        lo, hi = min(by_width), max(by_width)
        out[module] = by_width[hi] / by_width[lo] if by_width[lo] > 0 else float("inf")
    return out


def plot_coord_check(groups: Mapping[str, list[dict[str, Any]]], path: str, stat: str = "l1", title: str = "") -> None:
    """One row per parametrization (``{"μP": records, "SP": records}``), one column per step, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["t"] for recs in groups.values() for r in recs})
    fig, axes = plt.subplots(len(groups), len(steps), figsize=(3.0 * len(steps), 2.8 * len(groups)), squeeze=False,
                             sharey="row")
    for row, (label, recs) in enumerate(groups.items()):
        modules = sorted({r["module"] for r in recs})
        for col, t in enumerate(steps):
            ax = axes[row][col]
            for module in modules:
                pts = sorted((r["width"], float(r[stat])) for r in recs if r["t"] == t and r["module"] == module)
                ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", ms=2, lw=1, label=module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{label}, step {t}", fontsize=9)
            ax.set_xlabel("width", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"mean |activation| ({stat})", fontsize=8)
    axes[0][-1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: what the depth check follows per model: the embedding, every block's output (the residual stream),
#: the attention and MLP branches (before the branch multiplier), and the logits
_KINDS = ("wte", "stream", "attn", "mlp", "logits")
_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp))?$")


def _kind(module: str) -> tuple[str, int | None]:
    m = _BLOCK.match(module)
    if m is None:
        return module, None
    return (m.group(2) or "stream"), int(m.group(1))


def depth_profile(records: list[dict[str, Any]], t: int, stat: str = "delta_rms") -> dict[str, dict[int, float]]:
    """``{kind: {depth: value}}`` at step ``t`` for the kinds ``wte``, ``stream`` (the last block's
    output: the residual stream the readout sees), ``attn`` and ``mlp`` (mean over layers of the branch
    outputs, before the multiplier) and ``logits``; ``stat`` is ``delta_rms`` (change since init) or
    ``rms``/``l1`` (size)."""
    rows = [r for r in records if r["t"] == t and "depth" in r]
    out: dict[str, dict[int, float]] = {k: {} for k in _KINDS}
    for depth in sorted({r["depth"] for r in rows}):
        mine = [r for r in rows if r["depth"] == depth]
        for kind in _KINDS:
            vals = []
            for r in mine:
                k, layer = _kind(r["module"])
                if k != kind:
                    continue
                if kind == "stream" and layer != depth - 1:
                    continue
                vals.append(float(r[stat]))
            if vals:
                out[kind][depth] = sum(vals) / len(vals)
    return {k: v for k, v in out.items() if v}


def depth_ratios(records: list[dict[str, Any]], t: int, stat: str = "delta_rms") -> dict[str, float]:
    """``{kind: value at the deepest depth / value at the shallowest}`` at step ``t`` (see :func:`depth_profile`)."""
    out = {}
    for kind, by_depth in depth_profile(records, t, stat).items():
        lo, hi = by_depth[min(by_depth)], by_depth[max(by_depth)]
        out[kind] = hi / lo if lo > 0 else float("inf")
    return out


def plot_coord_depth(groups: Mapping[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
    """One row per depth rule (``{"none": records, "completep": records, ...}``); columns: the size of
    each kind vs depth after the last step, its change since initialization vs depth, and the MLP
    branch's change per layer against the layer's relative position l/L, one line per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 3, figsize=(11.5, 2.9 * len(groups)), squeeze=False)
    for row, (label, recs) in enumerate(groups.items()):
        t = max(r["t"] for r in recs)
        points = sorted({(r["width"], r["depth"]) for r in recs})
        xlabel = "depth (layers)" if len({w for w, _ in points}) == 1 else "depth (width scaled with it)"
        for col, (stat, what) in enumerate((("rms", "RMS of the output"), ("delta_rms", "RMS of the change since init"))):
            ax = axes[row][col]
            for kind, by_depth in depth_profile(recs, t, stat).items():
                ds = sorted(by_depth)
                ax.plot(ds, [by_depth[d] for d in ds], marker="o", ms=3, lw=1, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(what, fontsize=8)
            ax.set_title(f"{label}: {what.split(' of ')[0]}{' change' if stat == 'delta_rms' else ''}, step {t}", fontsize=9)
            if col == 0:
                ax.legend(fontsize=6)
        ax = axes[row][2]
        for width, depth in points:
            layers = sorted((layer, float(r["delta_rms"])) for r in recs
                            if r["t"] == t and r["depth"] == depth and r["width"] == width
                            for k, layer in [_kind(r["module"])] if k == "mlp")
            ax.plot([(l + 0.5) / depth for l, _ in layers], [v for _, v in layers], marker="o", ms=2, lw=1,
                    label=f"L={depth}" + ("" if len({w for w, _ in points}) == 1 else f", w={width}"))
        ax.set_yscale("log")
        ax.set_xlabel("layer position l/L", fontsize=8)
        ax.set_ylabel("MLP branch change since init", fontsize=8)
        ax.set_title(f"{label}: per-layer MLP update, step {t}", fontsize=9)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
