"""Sweeps: grids over one or two hyperparameters x seeds x optimizers, their runner and their reports.

Each point is an ordinary ``optlab fit`` run in its own folder (rerun-safe, resumable); the
results are one tidy table (``results.csv``); :func:`build_report` draws the studies' plots
(final loss against learning rate, the optimum marked; loss against steps and wall-clock) and
the table of best loss, its learning rate and the stability width. Lightning is imported only
when a point runs.
"""

from .recipe import SCALES, RunSpec, SweepPoint, SweepSpec, deep_merge, expand_points, point_config, resolve_recipe
from .report import build_report, stability_range, summarize
from .runner import EXECUTORS, collect, point_status, prepare_sweep, read_csv, run_point, run_sweep, write_csv

__all__ = [
    "SCALES",
    "EXECUTORS",
    "RunSpec",
    "SweepSpec",
    "SweepPoint",
    "deep_merge",
    "resolve_recipe",
    "expand_points",
    "point_config",
    "prepare_sweep",
    "run_point",
    "run_sweep",
    "collect",
    "point_status",
    "read_csv",
    "write_csv",
    "build_report",
    "summarize",
    "stability_range",
]
