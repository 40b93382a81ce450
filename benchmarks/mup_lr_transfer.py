"""Learning-rate transfer under μP vs standard parametrization (SP), for AdamW and Lion.

For each optimizer, parametrization, width and learning rate, trains a tiny LLaMA-style model on
byte-level batches of the embedded corpus (same seed, same batches; 10% warmup, cosine to 10%;
zero-initialized readout in both parametrizations) and records the held-out loss.
Under μP the best learning rate should stay put across widths (Yang et al. 2022, Fig. 1); under SP
it should move down as width grows. Prints a table and the best LR per width, writes a JSON and a
plot (``docs/img/mup_lr_transfer.png``).

    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py            # ~15 min on one core
    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py --quick    # a smoke run
    # several seeds, then the mean held-out loss per point:
    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py --qk-layernorm --seed 1 --out /tmp/s1.png
    python benchmarks/mup_lr_transfer.py --combine docs/img/mup_lr_transfer_qknorm.json /tmp/s1.json \
        --out docs/img/mup_lr_transfer_qknorm_seeds.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lightning_optlab.configure import OptimizerSpec, configure
from lightning_optlab.mup.experiment import eval_loss, fixed_batches, train_run, width_model


def best_index(losses: list[float]) -> int:
    finite = [(l if math.isfinite(l) else math.inf) for l in losses]
    return min(range(len(finite)), key=finite.__getitem__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "lion"])
    ap.add_argument("--log2-lrs", type=float, nargs="+", default=None, help="log2 of the LRs (default per optimizer)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qk-layernorm", action="store_true",
                    help="the studies' 'standard' variant: QK-norm and z-loss 1e-4 (Wortsman et al. 2023: fewer attention-logit instabilities)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="docs/img/mup_lr_transfer.png")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="average the held-out losses of earlier runs (one JSON per seed) instead of training; "
                         "a point that diverged in any seed counts as diverged")
    args = ap.parse_args(argv)
    if args.combine:
        return _combine(args.combine, Path(args.out))
    torch.set_num_threads(1)
    if args.quick:
        args.widths, args.steps = [32, 64], 10
    grids = {"adamw": [-9, -8, -7, -6, -5, -4, -3], "lion": [-12, -11, -10, -9, -8, -7, -6]}
    train = fixed_batches(args.steps, args.batch_size, args.seq_len, seed=args.seed)
    held = fixed_batches(4, 16, args.seq_len, seed=args.seed + 1, offset=1)
    stability = {"qk_layernorm": True, "z_loss": 1e-4} if args.qk_layernorm else {}
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for opt_name in args.optimizers:
        log2s = args.log2_lrs or grids.get(opt_name, grids["adamw"])
        for mup in (True, False):
            key = f"{opt_name}/{'mup' if mup else 'sp'}"
            results[key] = {"log2_lrs": log2s, "widths": args.widths, "loss": {}}
            for width in args.widths:
                row = []
                for lg in log2s:
                    model = width_model(args.model, width, mup=mup, base_width=args.base_width, seed=args.seed,
                                        zero_readout=True, **stability)
                    spec = OptimizerSpec(name=opt_name, lr=2.0**lg, betas=(0.9, 0.95) if opt_name == "adamw" else (0.9, 0.99),
                                         mup=mup, schedule="cosine", warmup_steps=args.steps // 10,
                                         total_steps=args.steps, min_lr_ratio=0.1)
                    losses = train_run(model, lambda m: configure(m, spec), train, args.steps)
                    ok = len(losses) == args.steps and all(math.isfinite(l) for l in losses)
                    row.append(eval_loss(model, held) if ok else math.inf)
                results[key]["loss"][width] = row
                best = log2s[best_index(row)]
                print(f"{key:12s} width {width:4d}  best log2(lr) {best:6.1f}  "
                      + " ".join(f"{l:6.3f}" for l in row) + f"   [{time.perf_counter() - t0:6.0f}s]", flush=True)
    summary = _summary(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results, "summary": summary,
                                                    "seconds": time.perf_counter() - t0}, indent=1))
    _plot(results, out)
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - t0:.0f}s")
    return 0


def _summary(results: dict) -> dict:
    summary = {}
    for key, res in results.items():
        bests = [res["log2_lrs"][best_index(res["loss"][w])] for w in res["widths"]]
        summary[key] = {"best_log2_lr": dict(zip(res["widths"], bests)), "shift_grid_steps": max(bests) - min(bests)}
        print(f"{key:12s} best log2(lr) by width {dict(zip(res['widths'], bests))}  spread {max(bests) - min(bests):.0f} grid steps")
    return summary


def _combine(paths: list[str], out: Path) -> int:
    """Mean held-out loss over seeds (one JSON per seed, same grid), its best LR per width, a plot."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]["results"]
    results: dict[str, dict] = {}
    for key, res in first.items():
        widths = res["widths"]
        loss = {}
        for w in widths:
            rows = [r["results"][key]["loss"][str(w)] for r in runs]
            if any(r["results"][key]["log2_lrs"] != res["log2_lrs"] for r in runs):
                raise SystemExit(f"{key}: the runs do not share one learning-rate grid; combine runs of one grid")
            loss[w] = [sum(col) / len(col) if all(math.isfinite(x) for x in col) else math.inf for col in zip(*rows)]
        results[key] = {"log2_lrs": res["log2_lrs"], "widths": widths, "loss": loss}
    seeds = [r["args"]["seed"] for r in runs]
    print(f"mean held-out loss over seeds {seeds}")
    summary = _summary(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"combined": paths, "seeds": seeds, "results": results,
                                                    "summary": summary}, indent=1))
    _plot(results, out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        res = results[key]
        for width in res["widths"]:
            row = [l if math.isfinite(l) else float("nan") for l in res["loss"][width]]
            line, = ax.plot(res["log2_lrs"], row, marker="o", ms=3, label=f"width {width}")
            b = best_index(res["loss"][width])
            ax.plot([res["log2_lrs"][b]], [row[b]], marker="*", ms=12, color=line.get_color())
        ax.set_title(key.replace("/", " — ").replace("mup", "μP").replace("sp", "SP"))
        ax.set_xlabel("log2 learning rate (base)")
        ax.set_ylabel("held-out loss")
        finite = [l for w in res["widths"] for l in res["loss"][w] if math.isfinite(l)]
        if finite:
            lo = min(finite)
            ax.set_ylim(lo - 0.05, min(max(finite), lo + 1.5))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
