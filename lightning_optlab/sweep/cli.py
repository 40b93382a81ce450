"""``optlab sweep RECIPE`` and ``optlab report RUNS_DIR``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from .runner import EXECUTORS

__all__ = ["main"]


def _sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="run a recipe's grid of optimizers x hyperparameters x seeds",
                       description="Run every point of a recipe's `sweep` section, each an ordinary run in its own "
                                   "folder under --out: a rerun skips finished points and resumes broken ones from "
                                   "their last checkpoint. Writes OUT/results.csv and, unless --no-report, the report.")
    p.add_argument("recipe", help="recipe YAML with a `sweep` section (recipes/*.yaml)")
    p.add_argument("--scale", default=None, help="tiny (default), small or paper")
    p.add_argument("--out", default=None, help="sweep folder (default optlab_runs/<recipe name>-<scale>)")
    p.add_argument("--executor", default="inline", choices=EXECUTORS,
                   help="inline: one after another in this process; local: --parallel subprocesses at a time; "
                        "submitit-local / slurm: one submitit job per point")
    p.add_argument("--parallel", type=int, default=None, help="points at a time for --executor local")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a config value for every point, e.g. --set trainer.max_steps=100 (repeatable)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=YAML",
                   help="submitit parameter for --executor slurm, e.g. --slurm slurm_partition=gpu (repeatable)")
    p.add_argument("--only", action="append", default=None, help="run only points whose folder name contains this")
    p.add_argument("--no-report", action="store_true", help="do not build the report after the sweep")


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="plots and tables of a sweep folder",
                       description="Build report.md, report.json and PNG plots from RUNS_DIR/results.csv.")
    p.add_argument("runs_dir", help="a sweep folder (written by optlab sweep)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="stability tolerance in nats (default: the sweep's, else 0.1)")
    p.add_argument("--metric", default=None, choices=["final_val_loss", "final_train_loss"])
    p.add_argument("--out", default=None, help="where to write the report (default RUNS_DIR)")


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    from .recipe import set_path

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_path(out, key.strip(), yaml.safe_load(value))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optlab")
    sub = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(sub)
    _report_parser(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .report import build_report

    try:
        if args.command == "sweep":
            from pathlib import Path

            from .runner import run_sweep

            out = args.out or f"optlab_runs/{Path(args.recipe).stem}-{args.scale or 'tiny'}"
            rows = run_sweep(args.recipe, out, scale=args.scale, executor=args.executor, parallel=args.parallel,
                             overrides=_pairs(args.set, "--set"), slurm=_pairs(args.slurm, "--slurm"), only=args.only)
            if not args.no_report and any(r["status"] in ("done", "diverged") for r in rows):
                report = build_report(out)
                print(report["table"])
                print(f"report: {Path(out) / 'report.md'}")
            return 1 if any(r["status"] == "failed" for r in rows) else 0  # a point crashed: say so
        report = build_report(args.runs_dir, tolerance=args.tolerance, metric=args.metric, out_dir=args.out)
        print(report["markdown"])
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"optlab {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
