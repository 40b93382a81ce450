"""Learning-rate transfer under μP vs standard parametrization (SP), for AdamW and Lion.

A flag-level front end to :mod:`lightning_optlab.mup.lr_transfer` (the recipe-driven command is
``optlab mup lr-transfer --config recipes/mup-lr-transfer.yaml``). For each optimizer,
parametrization, width and learning rate, trains a tiny LLaMA-style model on byte-level batches
of the embedded corpus (same seed, same batches; 10% warmup, cosine to 10%; zero-initialized
readout in both parametrizations) and records the held-out loss. Under μP the best learning rate
should stay put across widths (Yang et al. 2022, Fig. 1); under SP it should move down as width
grows. Prints the best LR per width (grid arg-min and fitted parabola vertex), writes a JSON and a
plot.

    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py            # ~15 min on one core
    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py --quick    # a smoke run
    # several seeds, then the mean held-out loss per point:
    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py --qk-layernorm --seed 1 --out /tmp/s1.png
    python benchmarks/mup_lr_transfer.py --combine docs/img/mup_lr_transfer_qknorm.json /tmp/s1.json \
        --out /tmp/qknorm_seeds.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_optlab.mup import lr_transfer as lt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--base-width", type=int, default=None, help="μP base width (default: the narrowest width)")
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "lion"])
    ap.add_argument("--log2-lrs", type=float, nargs="+", default=None, help="log2 of the LRs (default per optimizer)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qk-layernorm", action="store_true",
                    help="the studies' 'standard' variant: QK-norm and z-loss 1e-4 (Wortsman et al. 2023: fewer attention-logit instabilities)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="mup_lr_transfer.png")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="average the held-out losses of earlier runs (per-seed or combined JSONs, weighted by their "
                         "seed counts) instead of training; a point that diverged in any run counts as diverged")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.combine:
        record = lt.combine([json.loads(Path(p).read_text()) for p in args.combine])
        record["combined"] = list(args.combine)
    else:
        import torch

        torch.set_num_threads(1)
        if args.quick:
            args.widths, args.steps = [32, 64], 10
        optimizers = {}
        for name in args.optimizers:
            spec = dict(lt.DEFAULT_OPTIMIZERS.get(name, {}))
            if args.log2_lrs:
                spec["log2_lrs"] = args.log2_lrs
            optimizers[name] = spec
        cfg = lt.LRTransferConfig(model=args.model, widths=args.widths, base_width=args.base_width,
                                  optimizers=optimizers, steps=args.steps, batch_size=args.batch_size,
                                  seq_len=args.seq_len, qk_layernorm=args.qk_layernorm,
                                  z_loss=1e-4 if args.qk_layernorm else 0.0, seeds=[args.seed])
        record = lt.run_seed(cfg, args.seed)
        record["args"] = vars(args)
    lt.write_report(record, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
