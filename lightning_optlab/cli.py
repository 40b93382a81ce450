"""The ``optlab`` command: ``optlab demo``, ``optlab optimizers``."""

from __future__ import annotations

import argparse
import sys

from .optim.registry import ALIASES, available_optimizers


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(available_optimizers())
    parser = argparse.ArgumentParser(
        prog="optlab",
        description=f"lightning_optlab: train language models with modern optimizers. Optimizers: {names}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny LLaMA on an embedded corpus with several optimizers and report")
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--preset", default="llama-tiny", help="model preset (default llama-tiny)")
    demo.add_argument("--optimizers", default="", help="comma-separated demo runs (default: a selection of 6-8)")
    demo.add_argument("--out", default="optlab_runs/demo", help="output folder (default optlab_runs/demo)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 leaves torch's default)")
    sub.add_parser("optimizers", help="list the registered optimizers and their aliases")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "optimizers":
        for name in available_optimizers():
            aliases = sorted(a for a, n in ALIASES.items() if n == name)
            print(name + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
        return 0
    from .demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, preset=args.preset,
            optimizers=[o for o in args.optimizers.split(",") if o], out_dir=args.out, threads=args.threads,
            warmup_steps=min(20, max(0, args.steps // 10)), val_every=max(1, min(25, args.steps // 4)),
        )
    except ValueError as err:
        print(f"optlab demo: {err}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
