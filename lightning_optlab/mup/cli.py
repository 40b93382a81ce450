"""``optlab mup coord-check | transfer | lr-find | lr-transfer``: μP from the command line.

``main(argv)`` takes the arguments after ``optlab mup`` and returns the exit status (2 on bad input,
with the reason on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optlab mup", description="μP: coordinate check, proxy→target transfer, LR finder, LR-transfer experiment")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coord-check", help="activation size vs width for μP and SP after a few steps (with --depths: "
                       "activation and update sizes vs depth per depth rule); writes a PNG")
    c.add_argument("--model", default="llama-tiny", help="model preset (default llama-tiny); its width is varied")
    c.add_argument("--optimizer", default="adamw")
    c.add_argument("--lr", type=float, default=1e-2, help="base learning rate (default 1e-2)")
    c.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    c.add_argument("--base-width", type=int, default=None, help="μP base width (default: the smallest width)")
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--hparams", default="{}", help='optimizer arguments as JSON, e.g. \'{"betas": [0.9, 0.99]}\'')
    c.add_argument("--mix", default="[]", help='per-role mix parts as JSON, e.g. for muon: '
                   '\'[{"optimizer": "adamw", "roles": ["embedding", "readout", "norm", "bias"]}]\'')
    c.add_argument("--no-zero-readout", action="store_true", help="keep the random readout init (default: zero, TP5's advice)")
    c.add_argument("--depths", type=int, nargs="+", default=None,
                   help="check over depth: one --widths value and several depths (e.g. 2 4 8 16), or as many widths "
                        "as depths (scaled together); every model is μP from the base width, once per --depth-rules")
    c.add_argument("--base-depth", type=int, default=None, help="the depth rules' base depth (default: the smallest depth)")
    c.add_argument("--depth-rules", nargs="+", default=["none", "depth_mup", "completep"],
                   choices=["none", "depth_mup", "completep"], help="rules compared over depth (default: all three)")
    c.add_argument("--out", default="mup_coord_check.png")

    t = sub.add_parser("transfer", help="write the target recipe from a tuned proxy recipe, print the multipliers")
    t.add_argument("proxy", help="proxy recipe YAML (model + tuned optimizer)")
    t.add_argument("--target", required=True, help="target model preset, e.g. llama-2.7b")
    t.add_argument("--out", required=True, help="target recipe YAML to write (base shapes go beside it as .base_shapes.json)")
    t.add_argument("--depth", default=None, choices=["none", "depth_mup", "completep"],
                   help="depth rule relative to the proxy's depth (default: the proxy recipe's mup.depth, else none): "
                        "depth_mup = branches × (L_base/L)^1/2, completep = × L_base/L, with η/ε/λ corrections")

    f = sub.add_parser("lr-find", help="LR range test that keeps μP's per-group ratios; prints the base LR")
    f.add_argument("--model", default="llama-tiny")
    f.add_argument("--width", type=int, default=None, help="model width (default: the preset's)")
    f.add_argument("--base-width", type=int, default=None, help="μP base width (default: no μP)")
    f.add_argument("--optimizer", default="adamw")
    f.add_argument("--min-lr", type=float, default=1e-5)
    f.add_argument("--max-lr", type=float, default=1.0)
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seq-len", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--plot", default=None, help="optional PNG of loss vs base LR")

    x = sub.add_parser("lr-transfer", help="LR sweep at several widths, μP vs SP: does the best LR stay put? "
                       "writes per-seed JSONs, the combined JSON and a PNG")
    x.add_argument("--config", default=None, help="recipe YAML with an lr_transfer: block "
                   "(recipes/mup-lr-transfer.yaml); default: the built-in defaults")
    x.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: the recipe's)")
    x.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    x.add_argument("--widths", type=int, nargs="+", default=None, help="override the recipe's widths")
    x.add_argument("--base-width", type=int, default=None, help="override the recipe's μP base width")
    x.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process and one thread each")
    x.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="no training: average these runs (per-seed or combined JSONs) and summarize them")
    x.add_argument("--depths", type=int, nargs="+", default=None,
                   help="override the recipe's depths (a recipe with a depth_transfer: block, e.g. "
                        "recipes/mup-lr-transfer-depth.yaml: the transfer across depth per depth rule)")
    x.add_argument("--depth-rules", nargs="+", default=None, choices=["none", "depth_mup", "completep"],
                   help="override the depth experiment's rules")
    x.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                   help="run only these of the recipe's optimizers (e.g. --optimizers sophia)")
    x.add_argument("--max-mup-shift", type=float, default=1.0,
                   help="verdict threshold: μP's fitted optimum may move this many grid steps (default 1)")
    x.add_argument("--out", default="mup_lr_transfer.png",
                   help="PNG to write; the JSONs go beside it (<stem>.json, <stem>_seed<N>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if torch.get_num_threads() > 1 and "OMP_NUM_THREADS" not in __import__("os").environ:
        torch.set_num_threads(1)
    try:
        if args.command == "coord-check":
            return _coord_check(args)
        if args.command == "transfer":
            return _transfer(args)
        if args.command == "lr-transfer":
            return _lr_transfer(args)
        return _lr_find(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"optlab mup {args.command}: {err}", file=sys.stderr)
        return 2


def _coord_check(args: argparse.Namespace) -> int:
    from .coord import coord_check, coord_ratios, plot_coord_check

    hparams = json.loads(args.hparams)
    kw: dict[str, Any] = dict(widths=args.widths, base_width=args.base_width, steps=args.steps, lr=args.lr,
                              batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, hparams=hparams,
                              mix=json.loads(args.mix),
                              zero_readout=not args.no_zero_readout)
    if args.depths:
        return _coord_check_depth(args, kw)
    groups = {"μP": coord_check(args.model, args.optimizer, mup=True, **kw),
              "SP": coord_check(args.model, args.optimizer, mup=False, **kw)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_coord_check(groups, str(out), title=f"{args.model}, {args.optimizer}, lr {args.lr:g}: coordinate check")
    summary = {}
    for label, recs in groups.items():
        ratios = coord_ratios(recs, args.steps)
        summary[label] = ratios
        worst = max(ratios.values(), key=lambda r: max(r, 1 / r) if r > 0 else float("inf"))
        print(f"{label}: RMS(width {max(args.widths)}) / RMS(width {min(args.widths)}) after {args.steps} steps: "
              f"worst {worst:.2f}; " + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "ratios": summary}, indent=1))
    print(f"wrote {out}")
    return 0


def _coord_check_depth(args: argparse.Namespace, kw: dict[str, Any]) -> int:
    from .coord import coord_points, depth_profile, depth_ratios, plot_coord_depth

    points = coord_points(args.widths, args.depths)
    base_depth = args.base_depth or min(args.depths)
    groups = {rule: coord_check_rule(args, kw, rule, base_depth) for rule in args.depth_rules}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"width {points[0][0]}" if len({w for w, _ in points}) == 1 else "width and depth together"
    plot_coord_depth(groups, str(out), title=f"{args.model}, {args.optimizer}, lr {args.lr:g}, {where}, base depth "
                                             f"{base_depth}: coordinate check over depth")
    summary: dict[str, Any] = {}
    (lo_w, lo_d), (hi_w, hi_d) = points[0], points[-1]
    for rule, recs in groups.items():
        ratios = depth_ratios(recs, args.steps)
        summary[rule] = {"delta_rms": ratios, "rms": depth_ratios(recs, args.steps, "rms"),
                         "profile": {k: {str(d): v for d, v in by.items()}
                                     for k, by in depth_profile(recs, args.steps).items()}}
        print(f"{rule:9s}: change since init, L={hi_d} (w={hi_w}) / L={lo_d} (w={lo_w}) after {args.steps} steps: "
              + ", ".join(f"{k} {r:.2f}" for k, r in ratios.items()))
    print("flat (≈1) under a rule that transfers; 'stream' is the residual stream the readout sees, attn/mlp the "
          "branches before their multiplier (per layer)")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "points": points, "ratios": summary}, indent=1))
    print(f"wrote {out}")
    return 0


def coord_check_rule(args: argparse.Namespace, kw: dict[str, Any], rule: str, base_depth: int) -> list[dict[str, Any]]:
    from .coord import coord_check

    return coord_check(args.model, args.optimizer, mup=True, depths=args.depths, base_depth=base_depth,
                       depth_rule=rule, **kw)


def _transfer(args: argparse.Namespace) -> int:
    import yaml

    from .shapes import mup_config
    from .transfer import transfer

    from ..sweep.recipe import load_yaml

    proxy = load_yaml(args.proxy)  # a YAML error names the file and line
    result = transfer(proxy, args.target, depth=args.depth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# μP transfer of {args.proxy} to {args.target} (optlab mup transfer)\n"
                   + yaml.safe_dump(result["recipe"], sort_keys=False))
    shapes = out.with_suffix(".base_shapes.json")
    shapes.write_text(json.dumps(result["base_shapes"], indent=0))
    proxy_cfg, target_cfg = result["proxy"], result["target"]
    print(f"proxy width {proxy_cfg.n_embd} ({proxy_cfg.n_layer} layers) → target width {target_cfg.n_embd} "
          f"({target_cfg.n_layer} layers)")
    print("width multipliers by role: " + ", ".join(f"{r} {'/'.join(f'{m:g}' for m in ms)}"
                                                    for r, ms in result["width_mults"].items()))
    print(f"{'optimizer':10s} {'role':10s} {'lr':>12s} {'weight decay':>13s} {'tensors':>8s}")
    for name, role, lr, wd, n in result["role_lrs"]:
        print(f"{name:10s} {role:10s} {lr:12.4g} {wd:13.4g} {n:8d}")
    mu = mup_config(target_cfg, result["base"])
    print(f"attention scale {mu.softmax_scale:.4g} (∝ 1/d_head, {mu.head_dim}); logit multiplier {mu.logit_scale:g}")
    print(result["depth"]["summary"])
    if result["depth"]["rule"] != "none":
        print("depth η multipliers by role: " + ", ".join(f"{r} {'/'.join(f'{m:g}' for m in ms)}"
                                                          for r, ms in result["depth"]["lr_mults"].items()))
    print("not transferred by μP:")
    for note in result["notes"]:
        print(f"  - {note}")
    print(f"wrote {out} and {shapes}")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..configure import OptimizerSpec, build_optimizer
    from ..models import build_model, resolve_config
    from .experiment import fixed_batches
    from .lr_find import lr_range_test
    from .shapes import build_mup_model

    cfg = resolve_config(args.model)
    if args.width is not None:
        cfg = dataclasses.replace(cfg, n_embd=args.width)
    torch.manual_seed(args.seed)
    mup = args.base_width is not None
    model = build_mup_model(cfg, base=args.base_width) if mup else build_model(cfg)
    spec = OptimizerSpec(name=args.optimizer, lr=1.0, mup=mup)
    optimizer = build_optimizer(model, spec)
    batches = fixed_batches(args.steps, args.batch_size, args.seq_len, seed=args.seed)
    result = lr_range_test(model, optimizer, batches, lambda m, b: m.loss(m(b[:, :-1]), b[:, 1:]), base_lr=1.0,
                           min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps)
    ratios = sorted({round(g.get("mup_lr_ratio", 1.0), 6) for g in optimizer.param_groups})
    print(f"{args.model} width {cfg.n_embd}{f' (μP, base width {args.base_width})' if mup else ' (SP)'}, {args.optimizer}: "
          f"{len(optimizer.param_groups)} groups, lr ratios kept: {', '.join(f'{r:g}' for r in ratios)}")
    if result.suggestion is None:
        print("no suggestion: the loss diverged within the first steps; lower --min-lr")
        return 1
    print(f"suggested base lr (steepest descent): {result.suggestion:.3g}; lowest loss at base lr {result.lr_at_min:.3g}")
    print("put the base lr in the recipe's optimizer.lr; μP scales each group from it")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(result.lrs, result.losses)
        ax.axvline(result.suggestion, ls="--", color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate")
        ax.set_ylabel("smoothed training loss")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


def _seed_saver(out: Path) -> Any:
    """``save(record)`` writing each seed's record beside ``out`` as ``<stem>_seed<N>.json``."""

    def save(rec: dict[str, Any]) -> None:
        path = out.with_name(f"{out.stem}_seed{rec['seed']}.json")
        path.write_text(json.dumps(rec, indent=1))
        print(f"wrote {path}", flush=True)

    return save


def _lr_transfer(args: argparse.Namespace) -> int:
    from . import lr_transfer as lt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    depth_block = None
    if args.config and not args.combine:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        depth_block = raw.get("depth_transfer") if isinstance(raw, dict) else None
    if args.combine:
        runs = [json.loads(Path(p).read_text()) for p in args.combine]
        if all(r.get("kind") == "depth" for r in runs):
            return _lr_transfer_depth(args, out, runs=runs)
    if depth_block is not None or args.depths or args.depth_rules:
        return _lr_transfer_depth(args, out, block=depth_block)
    if args.combine:
        record = lt.combine([json.loads(Path(p).read_text()) for p in args.combine])
        record["combined"] = list(args.combine)
        title = f"mean of {len(args.combine)} run files"
    else:
        overrides = {"seeds": args.seeds, "steps": args.steps, "widths": args.widths, "base_width": args.base_width}
        if args.config:
            cfg = lt.load_config(args.config, **overrides)
        else:
            cfg = lt.LRTransferConfig(**{k: v for k, v in overrides.items() if v is not None})
        cfg = _only_optimizers(cfg, args.optimizers)
        print(f"{cfg.model}: widths {cfg.widths} (μP base {cfg.base_width}), {cfg.steps} steps, "
              f"{cfg.runs_per_seed()} runs per seed, seeds {cfg.seeds}, {args.jobs} at a time", flush=True)

        records = lt.run(cfg, jobs=args.jobs, save=_seed_saver(out))
        record = records[0] if len(records) == 1 else lt.combine(records)
        title = f"{cfg.model}, {cfg.steps} steps"
    lt.write_report(record, out, title=title, max_mup_shift=args.max_mup_shift)
    return 0


def _only_optimizers(cfg: Any, names: list[str] | None) -> Any:
    """``cfg`` with only the named optimizers of its grid (``--optimizers``), in the order given."""
    if not names:
        return cfg
    missing = [n for n in names if n not in cfg.optimizers]
    if missing:
        raise ValueError(f"--optimizers {' '.join(missing)}: not among the recipe's optimizers "
                         f"({', '.join(cfg.optimizers)}); add a grid for it under the recipe's optimizers")
    return dataclasses.replace(cfg, optimizers={n: cfg.optimizers[n] for n in names})


def _lr_transfer_depth(args: argparse.Namespace, out: Path, *, runs: list | None = None, block: Any = None) -> int:
    from . import lr_transfer as lt
    from . import lr_transfer_depth as ld

    if runs is not None:
        record = lt.combine(runs)
        record.update(kind="depth", combined=list(args.combine))
        title = f"mean of {len(runs)} run files"
    else:
        if block is not None and not isinstance(block, dict):
            raise ValueError(f"{args.config}: depth_transfer must be a mapping (see recipes/mup-lr-transfer-depth.yaml)")
        if args.widths and len(args.widths) != 1:
            raise ValueError(f"--widths {args.widths}: the depth experiment runs at one width; give one value")
        overrides = {"seeds": args.seeds, "steps": args.steps, "depths": args.depths, "depth_rules": args.depth_rules,
                     "width": args.widths[0] if args.widths else None, "base_width": args.base_width}
        cfg = _only_optimizers(ld.load_depth_config(block or {}, where=args.config or "defaults", **overrides),
                               args.optimizers)
        print(f"{cfg.model}: width {cfg.width}, depths {cfg.depths} (base depth {cfg.base_depth}), rules "
              f"{cfg.depth_rules}; joint {cfg.joint} with {cfg.joint_rules}; {cfg.steps} steps, {cfg.runs_per_seed()} "
              f"runs per seed (before reuse at the base depth), seeds {cfg.seeds}, {args.jobs} at a time", flush=True)

        records = ld.run_depth(cfg, jobs=args.jobs, save=_seed_saver(out))
        record = records[0] if len(records) == 1 else {**lt.combine(records), "kind": "depth"}
        title = f"{cfg.model}, width {cfg.width}, {cfg.steps} steps"
    ld.write_depth_report(record, out, title=title, max_shift=args.max_mup_shift)
    return 0


if __name__ == "__main__":
    sys.exit(main())
