"""Recipes: one YAML per study, at up to three scales, with an optional sweep section.

A recipe is an ordinary LightningCLI config (``trainer``, ``model``, ``optimizer``, ``data``,
``seed_everything``) plus two optional top-level sections:

* ``scales``: ``{tiny: {...}, small: {...}, paper: {...}}``; the chosen scale's block is deep-merged over the
  rest (mappings merge key by key, lists and scalars replace), so a recipe states its common
  set-up once and only the differences per scale. ``optlab fit --config R.yaml --scale paper``;
  the default scale is ``tiny``.
* ``sweep``: the grid (see :class:`SweepSpec`), itself overridable per scale through
  ``scales.<scale>.sweep``.

``resolve_recipe(path, scale)`` returns the plain LightningCLI config and the sweep spec.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["SCALES", "AXIS_ALIASES", "deep_merge", "resolve_recipe", "load_yaml", "RunSpec", "SweepSpec", "SweepPoint",
           "expand_points", "set_path"]

#: the scales a recipe may define
SCALES = ("tiny", "small", "paper")

#: sweep axis shortcuts -> where they live in the config (``betas.0``: the first element)
AXIS_ALIASES: dict[str, str] = {
    "lr": "optimizer.lr",
    "momentum": "optimizer.betas.0",
    "beta1": "optimizer.betas.0",
    "beta2": "optimizer.betas.1",
    "eps": "optimizer.eps",
    "weight_decay": "optimizer.weight_decay",
    "warmup_steps": "optimizer.warmup_steps",
}

_RECIPE_ONLY_KEYS = ("scales", "sweep", "scale")


class RecipeYAMLError(ValueError):
    """A recipe or config file that exists but is not valid YAML (the message names the file and line)."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a dict (an empty file is ``{}``); a shipped recipe's bare name (``lr_sweep``) is found
    in the package (:func:`lightning_optlab.recipe_files.find_recipe`). Invalid YAML is an error naming the
    file, line and column."""
    from ..recipe_files import find_recipe

    path = find_recipe(path)  # FileNotFoundError naming the file and the shipped recipes
    try:
        with open(path, encoding="utf-8") as f:  # a stream, so that PyYAML's marks name the file
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise RecipeYAMLError(f"{path} is not valid YAML{where}: {problem}" + (f" ({context})" if context else "")
                              + "; fix that line (YAML is indentation-sensitive; quote values with ':' or '#')") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: mappings key by key, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_recipe(data: Mapping[str, Any]) -> bool:
    """Whether a loaded config uses the recipe extensions (``scales`` / ``sweep``)."""
    return any(k in data for k in _RECIPE_ONLY_KEYS)


def resolve_recipe(source: str | Path | Mapping[str, Any], scale: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(LightningCLI config, sweep section or None)`` of a recipe at ``scale`` (default ``tiny``)."""
    data = load_yaml(source) if not isinstance(source, Mapping) else dict(source)
    scale = scale or data.get("scale") or "tiny"
    scales = data.get("scales") or {}
    if not isinstance(scales, Mapping):
        raise ValueError(f"`scales` must map scale names to config blocks, got {type(scales).__name__}")
    unknown = sorted(set(scales) - set(SCALES))
    if unknown:
        raise ValueError(f"unknown scale(s) {unknown} in `scales`; allowed: {', '.join(SCALES)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scales and scale not in scales:
        raise ValueError(f"this recipe defines the scale(s) {', '.join(scales)}, not {scale!r}")
    base = {k: v for k, v in data.items() if k not in _RECIPE_ONLY_KEYS}
    base["sweep"] = data.get("sweep")
    merged = deep_merge(base, scales.get(scale) or {})
    sweep = merged.pop("sweep", None)
    return merged, sweep


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set ``config[a][b]...`` for ``path = "a.b..."``; a numeric part indexes a list (``betas.0``)."""
    parts = path.split(".")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if node.get(part) is None:
            if nxt.isdigit():
                raise ValueError(f"cannot set {path!r}: {'.'.join(parts[:i + 1])} is not set; give it explicitly "
                                 f"(e.g. betas: [0.9, 0.95]) in the run's optimizer block")
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@dataclass(kw_only=True)
class RunSpec:
    """One optimizer configuration of a sweep (a line in the study's plot)."""

    #: name of the run in tables and plots (default: the optimizer name)
    label: str = ""
    #: OptimizerSpec fields merged over the recipe's ``optimizer`` block
    optimizer: dict[str, Any] = field(default_factory=dict)
    #: other config overrides of this run (e.g. ``{"model": {"model": {"qk_layernorm": false}}}``)
    config: dict[str, Any] = field(default_factory=dict)
    #: this run's own grid, replacing the sweep's (e.g. SGD's larger learning rates)
    grid: dict[str, list[Any]] | None = None
    #: other seeds at chosen points of this run's grid, e.g. ``[{lr: 3.16e-3, seeds: [0, 1, 2]}]``: each
    #: entry names a value on every axis of the grid; the points there run these seeds instead of
    #: ``sweep.seeds`` (more seeds only where a point decides a finding)
    seeds_at: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = str(self.optimizer.get("name", "")) or "run"
        if not re.fullmatch(r"[A-Za-z0-9_.+()=,-]+", self.label):
            raise ValueError(f"run label {self.label!r} must use letters, digits and _.+()=,- only (it names folders)")


@dataclass(kw_only=True)
class SweepSpec:
    """A grid over one or two hyperparameters, seeds and optimizer configurations.

    Example (YAML, inside a recipe)::

        sweep:
          grid: {lr: [1.0e-3, 3.0e-3, 1.0e-2]}
          seeds: [0, 1]
          runs:
            - {label: adamw, optimizer: {name: adamw, betas: [0.9, 0.95]}}
            - {label: sgd, optimizer: {name: sgd, betas: [0.98, 0.0]}, grid: {lr: [0.1, 0.3, 1.0]}}
    """

    #: axis -> values; an axis is a shortcut (lr, momentum, beta1, beta2, eps, weight_decay,
    #: warmup_steps) or a dotted config path (``optimizer.hparams.precondition_frequency``)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    #: seeds (``seed_everything``: initialization and sampling; the data order is fixed)
    seeds: list[int] = field(default_factory=lambda: [0])
    #: the optimizer configurations
    runs: list[RunSpec] = field(default_factory=list)
    #: report: a learning rate is "stable" when its final loss is within this many nats of the best
    tolerance: float = 0.1
    #: report: the metric judged (``final_val_loss`` or ``final_train_loss``)
    metric: str = "final_val_loss"
    #: report: label whose final loss the others race to (steps and wall-clock to reach it), e.g. "adamw"
    reference: str | None = None
    #: points run at the same time by the local executor
    parallel: int = 1
    #: submitit executor parameters for ``--executor slurm`` (``timeout_min``, ``slurm_partition``, ...)
    slurm: dict[str, Any] = field(default_factory=dict)
    #: save a resumable checkpoint every this many optimizer steps
    checkpoint_every: int = 50
    #: other sweep folders (e.g. ``optlab_runs/lr_sweep-small``) whose finished points are taken
    #: instead of trained again wherever a point's whole config is identical to one of theirs
    reuse: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs = [r if isinstance(r, RunSpec) else RunSpec(**r) for r in self.runs]
        if not self.runs:
            raise ValueError("sweep.runs is empty; list at least one optimizer, e.g. runs: [{optimizer: {name: adamw}}]")
        labels = [r.label for r in self.runs]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise ValueError(f"sweep run labels must be unique, {dupes} repeat; give each run a `label`")
        for grid in [self.grid] + [r.grid for r in self.runs if r.grid is not None]:
            _check_grid(grid)
        _check_seeds(self.seeds, "sweep.seeds")
        for run in self.runs:
            _check_seeds_at(run, run.grid if run.grid is not None else self.grid)
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"sweep.tolerance must be a finite number ≥ 0 (nats), got {self.tolerance!r}")
        if self.metric not in ("final_val_loss", "final_train_loss"):
            raise ValueError(f"sweep.metric must be final_val_loss or final_train_loss, got {self.metric!r}")
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"sweep.reference {self.reference!r} is not a run label; labels: {', '.join(labels)}")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise ValueError(f"sweep.parallel must be an integer ≥ 1, got {self.parallel!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"sweep.checkpoint_every must be an integer ≥ 1, got {self.checkpoint_every!r}")
        if not (isinstance(self.reuse, list) and all(isinstance(x, str) and x for x in self.reuse)):
            raise ValueError(f"sweep.reuse must be a list of sweep folders, e.g. [optlab_runs/lr_sweep-small], "
                             f"got {self.reuse!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SweepSpec:
        if not data:
            raise ValueError("this recipe has no `sweep` section; add one (see lightning_optlab.sweep.SweepSpec)")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown sweep key(s) {unknown}; allowed: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    def axes(self) -> list[str]:
        """Every axis name across the runs, in first-seen order."""
        out: list[str] = []
        for grid in [self.grid] + [r.grid or {} for r in self.runs]:
            out += [a for a in grid if a not in out]
        return out


def _check_grid(grid: Mapping[str, Any]) -> None:
    if not isinstance(grid, Mapping) or not 0 <= len(grid) <= 2:
        raise ValueError(f"a sweep grid has one or two axes (hyperparameter -> list of values), got {grid!r}")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid axis {axis!r} needs a non-empty list of values, got {values!r}")
        if axis == "seed":
            raise ValueError("seeds are given by sweep.seeds, not as a grid axis")


def _check_seeds(seeds: Any, where: str) -> None:
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{where} must be a non-empty list of distinct integers, got {seeds!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _check_seeds_at(run: RunSpec, grid: Mapping[str, list[Any]]) -> None:
    where = f"run {run.label!r} seeds_at"
    if not isinstance(run.seeds_at, list):
        raise ValueError(f"{where} must be a list like [{{lr: 3.16e-3, seeds: [0, 1, 2]}}], got {run.seeds_at!r}")
    seen: list[dict[str, Any]] = []
    for entry in run.seeds_at:
        if not isinstance(entry, Mapping) or "seeds" not in entry:
            raise ValueError(f"{where}: each entry names the grid values and their seeds, "
                             f"e.g. {{lr: 3.16e-3, seeds: [0, 1, 2]}}; got {entry!r}")
        _check_seeds(entry["seeds"], f"{where} seeds")
        values = {k: v for k, v in entry.items() if k != "seeds"}
        if set(values) != set(grid):
            raise ValueError(f"{where} entry {entry!r} must give a value for each grid axis "
                             f"({', '.join(grid) or 'none'}), and only those")
        for axis, value in values.items():
            if not any(_same(value, v) for v in grid[axis]):
                raise ValueError(f"{where}: {axis}={value!r} is not in the run's grid {grid[axis]!r}")
        if any(all(_same(values[a], s[a]) for a in values) for s in seen):
            raise ValueError(f"{where} names the point {values!r} twice")
        seen.append(values)


def _seeds_for(run: RunSpec, spec: SweepSpec, values: Mapping[str, Any]) -> list[int]:
    for entry in run.seeds_at:
        if all(_same(entry[a], v) for a, v in values.items()):
            return list(entry["seeds"])
    return list(spec.seeds)


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: a run label, its axis values and a seed; ``name`` is its folder."""

    label: str
    values: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def name(self) -> str:
        parts = [self.label] + [f"{_short(a)}={_fmt(v)}" for a, v in self.values] + [f"seed={self.seed}"]
        return "__".join(parts)


def _short(axis: str) -> str:
    return axis.split(".")[-1] if axis not in AXIS_ALIASES else axis


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(v))


def expand_points(spec: SweepSpec) -> list[SweepPoint]:
    """Every (run, grid point, seed), runs in order, then grid values, then seeds."""
    points = []
    for run in spec.runs:
        grid = run.grid if run.grid is not None else spec.grid
        axes = list(grid)
        for combo in itertools.product(*(grid[a] for a in axes)):
            for seed in _seeds_for(run, spec, dict(zip(axes, combo))):
                points.append(SweepPoint(run.label, tuple(zip(axes, combo)), int(seed)))
    return points


def point_config(base: Mapping[str, Any], spec: SweepSpec, point: SweepPoint) -> dict[str, Any]:
    """The LightningCLI config of ``point``: base, the run's overrides, then the axis values and seed."""
    run = next(r for r in spec.runs if r.label == point.label)
    cfg = deep_merge(base, run.config)
    opt = dict(cfg.get("optimizer") or {})
    if "name" in run.optimizer:  # another algorithm: the base block's algorithm-specific keys do not carry over
        if run.optimizer["name"] != opt.get("name"):
            opt = {k: v for k, v in opt.items() if k not in ("betas", "eps", "hparams", "mix")}
    cfg["optimizer"] = deep_merge(opt, run.optimizer)
    for axis, value in point.values:
        path = AXIS_ALIASES.get(axis, axis)
        if path.startswith("optimizer.betas."):
            betas = cfg["optimizer"].get("betas")
            if betas is None:
                raise ValueError(f"sweep axis {axis!r} sets {path}; run {run.label!r} must give betas explicitly "
                                 "(e.g. betas: [0.9, 0.95]) so that the other beta is a stated value")
            cfg["optimizer"]["betas"] = list(betas)
        set_path(cfg, path, value)
    cfg["seed_everything"] = point.seed
    return cfg
