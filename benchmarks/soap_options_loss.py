"""What SOAP's number-changing speed options do to the loss: ``refresh="cholesky_qr"`` and
``spread_refresh=True`` against the reference-exact default, on the same runs.

Trains a small LLaMA-style model on byte-level batches of the embedded corpus (same batches and
same initialization for every variant of a seed) with SOAP at its reference defaults (lr 3e-3,
betas (0.95, 0.95), weight decay 0.01, precondition_frequency 10), once per variant and seed, and
reports the held-out loss, its paired difference to the default (mean ± standard error over
seeds), the seconds spent in refreshes and the wall-clock per step relative to the default.
Writes a JSON and a plot of the training curves.

    OMP_NUM_THREADS=1 python benchmarks/soap_options_loss.py                  # ~6 min on one core
    OMP_NUM_THREADS=1 python benchmarks/soap_options_loss.py --steps 20 --seeds 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lightning_optlab.configure import OptimizerSpec, configure
from lightning_optlab.mup.experiment import eval_loss, fixed_batches, width_model

VARIANTS: dict[str, dict] = {
    "default (qr)": {},
    "cholesky_qr": {"refresh": "cholesky_qr"},
    "spread_refresh": {"spread_refresh": True},
    "both": {"refresh": "cholesky_qr", "spread_refresh": True},
}


def train(model: torch.nn.Module, hparams: dict, batches: list[torch.Tensor], lr: float) -> dict:
    spec = OptimizerSpec(name="soap", lr=lr, weight_decay=0.01, schedule="cosine", warmup_steps=len(batches) // 10,
                         total_steps=len(batches), min_lr_ratio=0.1,
                         hparams={"precondition_frequency": 10, **hparams})
    made = configure(model, spec)
    opt, sched = made["optimizer"], made["lr_scheduler"]["scheduler"]
    losses, refresh = [], 0.0
    t0 = time.perf_counter()
    for batch in batches:
        loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        refresh += opt.last_refresh_seconds
    seconds = time.perf_counter() - t0
    return {"train_losses": losses, "seconds": seconds, "refresh_seconds": refresh,
            "fallbacks": opt.fallback_count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="docs/img/soap_options_loss.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        batches = fixed_batches(args.steps, args.batch_size, args.seq_len, seed=seed)
        held = fixed_batches(8, 16, args.seq_len, seed=seed + 1, offset=1)
        for name, hp in VARIANTS.items():
            model = width_model(args.model, args.width, mup=False, base_width=args.width, seed=seed)
            rec = train(model, hp, batches, args.lr)
            ok = len(rec["train_losses"]) == args.steps
            rec["held_out"] = eval_loss(model, held) if ok else math.inf
            rec["seed"] = seed
            runs[name].append(rec)
            print(f"seed {seed} {name:16s} held-out {rec['held_out']:.4f}  {rec['seconds']:6.1f}s "
                  f"(refresh {rec['refresh_seconds']:.1f}s)  fallbacks {rec['fallbacks']}", flush=True)
    base = runs["default (qr)"]
    print(f"\n{args.model} width {args.width}, {args.steps} steps, seeds {args.seeds}; SOAP lr {args.lr:g}, f=10")
    print(f"{'variant':18s}{'held-out':>10s}{'Δ vs default':>20s}{'time ratio':>12s}{'refresh s':>11s}")
    table = {}
    for name, recs in runs.items():
        held = [r["held_out"] for r in recs]
        diffs = [r["held_out"] - b["held_out"] for r, b in zip(recs, base)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        ratio = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(recs, base))
        refresh = statistics.mean(r["refresh_seconds"] for r in recs)
        table[name] = {"held_out_mean": statistics.mean(held), "diff_mean": statistics.mean(diffs), "diff_se": se,
                       "time_ratio": ratio, "refresh_seconds": refresh}
        print(f"{name:18s}{statistics.mean(held):10.4f}{statistics.mean(diffs):+12.4f} ± {se:.4f}"
              f"{ratio:12.2f}{refresh:11.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "table": table, "runs": runs}, indent=1))
    _plot(runs, out, args)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _plot(runs: dict[str, list[dict]], out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = 10
    for name, recs in runs.items():
        curves = [r["train_losses"] for r in recs if len(r["train_losses"]) == args.steps]
        if not curves:
            continue
        mean = [statistics.mean(col) for col in zip(*curves)]
        smooth = [statistics.mean(mean[max(0, i - k + 1): i + 1]) for i in range(len(mean))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {len(args.seeds)} seeds, {k}-step average)")
    ax.set_title(f"SOAP options, {args.model} width {args.width}", fontsize=10)
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
