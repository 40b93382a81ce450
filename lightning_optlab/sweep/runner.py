"""Running sweep points: each an ordinary ``optlab fit`` run in its own folder, resumable.

A sweep folder holds ``sweep.json`` (the resolved spec) and one folder per point with

* ``point.json``: the run label, the axis values, the seed;
* ``config.yaml``: the point's full LightningCLI config (``optlab fit --config`` reproduces it);
* ``checkpoints/last.ckpt``: saved every ``checkpoint_every`` steps; a broken point resumes from it;
* ``curve.csv``: step, training seconds, training loss, validation loss;
* ``result.json``: written last, atomically; its presence marks the point finished (``done`` or
  ``diverged``), so a rerun skips it.

A point whose whole config is identical to a finished point of a folder in ``sweep.reuse`` is not
trained: that point's ``result.json`` (with ``reused_from`` naming it) and ``curve.csv`` are copied.

Points run one after another in this process (``executor="inline"``), as N subprocesses at a
time (``"local"``), or as submitit jobs (``"submitit-local"`` runs them as local subprocesses,
``"slurm"`` submits them to SLURM). :func:`collect` gathers every point into one tidy table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from .recipe import SweepPoint, SweepSpec, expand_points, point_config, resolve_recipe

__all__ = ["EXECUTORS", "RESULT_COLUMNS", "prepare_sweep", "run_point", "run_sweep", "collect", "point_status",
           "write_csv", "read_csv"]

EXECUTORS = ("inline", "local", "submitit-local", "slurm")

#: the fixed columns of the results table (axis columns and ``eval/...`` scores are added)
RESULT_COLUMNS = ("point", "label", "optimizer", "seed", "status", "final_train_loss", "final_val_loss", "steps",
                  "tokens", "train_seconds", "elapsed_seconds", "optimizer_share", "tokens_per_sec",
                  "diverged_step", "resumed_from_step", "error", "reused_from")

#: the final training loss is the mean over this fraction of the last steps (at least one step)
_TRAIN_LOSS_TAIL = 0.1


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a killed writer never leaves half a result


def prepare_sweep(recipe: str | Path | Mapping[str, Any], out_dir: str | Path, scale: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[SweepSpec, list[Path]]:
    """Write ``sweep.json`` and every point's ``point.json`` and ``config.yaml``; return the point folders.

    ``overrides`` (a config block, e.g. ``{"trainer": {"max_steps": 10}}``) is merged over the recipe;
    its ``sweep`` key, if any, over the sweep section.
    A point that has started (a checkpoint or a result) keeps its config: a rerun must not change a
    half-run point; one that has not started takes the recipe as it is now.
    """
    from .recipe import deep_merge

    config, sweep = resolve_recipe(recipe, scale)
    overrides = dict(overrides or {})
    if overrides.get("sweep"):  # `--set sweep.checkpoint_every=10` changes the sweep, not the runs' config
        sweep = deep_merge(sweep or {}, overrides.pop("sweep"))
    if overrides:
        config = deep_merge(config, overrides)
    spec = SweepSpec.from_dict(sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", {"scale": scale or "tiny", "spec": sweep, "axes": spec.axes(),
                                     "tolerance": spec.tolerance, "metric": spec.metric, "reference": spec.reference})
    dirs = []
    finished_elsewhere = _finished_points(spec.reuse, exclude=out)
    for point in expand_points(spec):
        d = out / point.name
        d.mkdir(exist_ok=True)
        cfg = point_config(config, spec, point)
        cfg.setdefault("trainer", {})["default_root_dir"] = str(d.resolve())
        run = next(r for r in spec.runs if r.label == point.label)
        meta = {"point": point.name, "label": point.label, "optimizer": cfg["optimizer"].get("name", "adamw"),
                "seed": point.seed, "values": dict(point.values), "checkpoint_every": spec.checkpoint_every,
                "run_optimizer": run.optimizer}
        if point_status(d) == "pending":  # not started: (re)write; a started point keeps the config it began with
            (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            _write_json(d / "point.json", meta)
            source = finished_elsewhere.get(_config_key(cfg))
            if source is not None:
                _copy_finished_point(source, d, meta)
                print(f"{point.name}: the same config as {source} (finished there), taken from it", flush=True)
        dirs.append(d)
    return spec, dirs


def _config_key(cfg: Mapping[str, Any]) -> str:
    """A point's config as a canonical string, without the folder it runs in."""
    trainer = {k: v for k, v in (cfg.get("trainer") or {}).items() if k != "default_root_dir"}
    return json.dumps({**cfg, "trainer": trainer}, sort_keys=True, default=str)


def _finished_points(folders: Iterable[str | Path], exclude: Path) -> dict[str, Path]:
    """Config key -> point folder, for every finished point (done or diverged) of the given sweep folders."""
    out: dict[str, Path] = {}
    for folder in folders:
        f = Path(folder)
        if f.resolve() == exclude.resolve():
            continue
        if not (f / "sweep.json").exists():
            print(f"sweep.reuse: {f} is not a sweep folder (yet); its points are not reused", flush=True)
            continue
        for result in sorted(f.glob("*/result.json")):
            if json.loads(result.read_text())["status"] in ("done", "diverged"):
                cfg = yaml.safe_load((result.parent / "config.yaml").read_text())
                out.setdefault(_config_key(cfg), result.parent)
    return out


def _copy_finished_point(source: Path, d: Path, meta: Mapping[str, Any]) -> None:
    """Take another sweep's identical finished point as this one: its result (under this point's name and axis
    values) and its loss curve; the checkpoints stay where they are."""
    theirs = json.loads((source / "result.json").read_text())
    their_axes = json.loads((source.parent / "sweep.json").read_text()).get("axes", [])
    result = {k: v for k, v in theirs.items() if k not in their_axes}
    result.update({"point": meta["point"], "label": meta["label"], "optimizer": meta["optimizer"],
                   "seed": meta["seed"], **meta["values"], "reused_from": str(source)})
    if (source / "curve.csv").exists():
        shutil.copyfile(source / "curve.csv", d / "curve.csv")
    _write_json(d / "result.json", result)


def point_status(point_dir: str | Path) -> str:
    """``done``/``diverged``/``failed`` (from ``result.json``), ``partial`` (a checkpoint, no result) or ``pending``."""
    d = Path(point_dir)
    if (d / "result.json").exists():
        return json.loads((d / "result.json").read_text())["status"]
    if (d / "checkpoints" / "last.ckpt").exists():
        return "partial"
    return "pending"


def _final_train_loss(curve: list[dict[str, float]]) -> float:
    losses = [r["train_loss"] for r in curve if r.get("train_loss") is not None]
    if not losses:
        return math.nan
    tail = losses[-max(1, int(len(losses) * _TRAIN_LOSS_TAIL)):]
    return float(sum(tail) / len(tail))


def _point_callbacks(config: Mapping[str, Any], point_dir: Path, checkpoint_every: int) -> tuple[list[Any], Any]:
    """The callbacks a point adds to its recipe's: curve recorder, resumable checkpoints, and a
    WallClock and a NonFiniteGuard when the recipe has none. Returns ``(callbacks, recorder)``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..callbacks.nonfinite import NonFiniteGuard
    from ..callbacks.wallclock import WallClock
    from .record import CurveRecorder

    named = [str(c.get("class_path", "")) if isinstance(c, Mapping) else "" for c in
             ((config.get("trainer") or {}).get("callbacks") or [])]
    clock = WallClock(verbose=False)
    recorder = CurveRecorder(clock)
    extra: list[Any] = [recorder, ModelCheckpoint(dirpath=str(point_dir / "checkpoints"), filename="step={step}",
                                                  every_n_train_steps=checkpoint_every, save_last=True,
                                                  save_top_k=0, auto_insert_metric_name=False)]
    if not any(c.endswith("WallClock") for c in named):
        extra.insert(0, clock)
    if not any(c.endswith("NonFiniteGuard") for c in named):
        extra.append(NonFiniteGuard(action="raise", check_state=False))
    return extra, recorder


def run_point(point_dir: str | Path) -> dict[str, Any]:
    """Train one point to the end (resuming from ``checkpoints/last.ckpt``) and write ``result.json``.

    A point that already has ``result.json`` is not run again; its result is returned. A
    non-finite loss, parameter or optimizer state (caught by a :class:`NonFiniteGuard`, added
    with ``action="raise"`` when the config has none; a recipe's guard with ``action="stop"``
    counts too) ends the point as ``diverged``. Any other exception is re-raised, leaving the
    point resumable.
    """
    import torch

    from ..callbacks.nonfinite import NonFiniteError, NonFiniteGuard
    from ..callbacks.wallclock import WallClock
    from ..checkpoint import read_global_step
    from ..cli import build_cli

    d = Path(point_dir).resolve()
    if (d / "result.json").exists():
        return json.loads((d / "result.json").read_text())
    meta = json.loads((d / "point.json").read_text())
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    extra, recorder = _point_callbacks(yaml.safe_load((d / "config.yaml").read_text()), d, meta["checkpoint_every"])
    # the point's own ModelCheckpoint makes it resumable, whatever the recipe says about checkpointing
    cli = build_cli(["--config", str(d / "config.yaml"), "--trainer.enable_checkpointing", "true"], run=False,
                    save_config_callback=None, trainer_defaults={"callbacks": extra})
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    if _launches_by_rerun(trainer, meta["point"]) and not _is_point_worker(d):
        # Lightning would start ranks 1..N-1 by re-running this process's command line (a sweep or
        # a test, not this point): run the point in its own worker, whose command line is the point
        _run_subprocess(d)
        if not (d / "result.json").exists():
            raise RuntimeError(f"point {meta['point']} (trainer.strategy ddp, several processes) ended without a "
                               f"result; see {d / 'run.log'}")
        return json.loads((d / "result.json").read_text())
    recorder.clock = next(c for c in trainer.callbacks if isinstance(c, WallClock))  # the recipe's, if it has one
    ckpt = d / "checkpoints" / "last.ckpt"
    # weights only and memory-mapped: no code from the file runs, the optimizer state is not read
    resumed_from = read_global_step(ckpt) if ckpt.exists() else None
    status, diverged_step, error = "done", None, None
    start = time.time()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt.exists() else None)
    except NonFiniteError as err:
        status, diverged_step, error = "diverged", trainer.global_step, str(err).splitlines()[0][:300]
    stops = [e for c in trainer.callbacks if isinstance(c, NonFiniteGuard) for e in c.events if e["action"] != "skip"]
    if status == "done" and stops:
        status, diverged_step = "diverged", stops[0]["step"]
    if status == "diverged":  # the guard checks every few steps: the loss curve may say when it began
        first_nan = _first_nonfinite_step(recorder.curve)
        if first_nan is not None and (diverged_step is None or first_nan < diverged_step):
            diverged_step = first_nan
    evals = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    final_val = math.nan
    if status == "done" and dm.config.val_batches > 0:
        final_val = float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])
    final_train = _final_train_loss(recorder.curve)
    if status == "done" and not (math.isfinite(final_train) and (math.isfinite(final_val) or dm.config.val_batches == 0)):
        status = "diverged"  # a NaN the guard did not check (e.g. between its checked steps)
        first_nan = _first_nonfinite_step(recorder.curve)
        diverged_step = trainer.global_step if first_nan is None else first_nan
    s = recorder.clock.summary
    result = {
        "point": meta["point"], "label": meta["label"], "optimizer": meta["optimizer"], "seed": meta["seed"],
        **meta["values"], "status": status, "final_train_loss": final_train, "final_val_loss": final_val,
        "steps": int(trainer.global_step), "tokens": int(module.tokens_seen),
        "train_seconds": s["train_seconds"], "elapsed_seconds": s["elapsed_seconds"],
        "optimizer_share": s["optimizer_share"], "tokens_per_sec": s["tokens_per_sec"],
        "diverged_step": diverged_step, "resumed_from_step": resumed_from, "error": error,
        "this_session_seconds": time.time() - start, **evals,
    }
    if trainer.is_global_zero:  # under DDP (one SLURM task per GPU) every rank gets here; one writes
        recorder.write(d / "curve.csv")
        _write_json(d / "result.json", result)
    return result


def _launches_by_rerun(trainer: Any, point: str) -> bool:
    """Whether ``trainer`` starts its other ranks by re-running the command line (``strategy: ddp``
    with several devices outside torchrun/SLURM). ``ddp_spawn`` is refused: its ranks train in
    spawned children, so the point's curve and result would not reach this process."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    processes = getattr(trainer.strategy, "num_processes", 1) * getattr(trainer.strategy, "num_nodes", 1)
    if isinstance(launcher, _MultiProcessingLauncher) and processes > 1:
        raise ValueError(f"point {point}: trainer.strategy {type(trainer.strategy).__name__} with start method "
                         f"{launcher._start_method!r} trains in spawned processes, so the point's curve and result "
                         "stay there; use strategy: ddp (each point's ranks are then started as "
                         "`python -m lightning_optlab.sweep.point POINT_DIR`), or run the point under torchrun/SLURM")
    return (isinstance(launcher, _SubprocessScriptLauncher) and processes > 1
            and not trainer.strategy.cluster_environment.creates_processes_externally)


def _is_point_worker(point_dir: Path) -> bool:
    """Whether this process is ``python -m lightning_optlab.sweep.point POINT_DIR`` for this point."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return (getattr(spec, "name", None) == "lightning_optlab.sweep.point" and len(sys.argv) == 2
            and Path(sys.argv[1]).resolve() == point_dir)


def _first_nonfinite_step(curve: list[dict[str, Any]]) -> int | None:
    """The first step of a loss curve whose training loss is NaN or infinite (None if none is)."""
    return next((r["step"] for r in curve if not math.isfinite(r.get("train_loss") or 0.0)), None)


def _interrupted(err: SystemExit) -> bool:
    """Whether a ``SystemExit`` comes from Ctrl-C (Lightning's handler raises ``SystemExit`` from the
    ``KeyboardInterrupt``), not from a point's own failure."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def point_threads(parallel: int, cores: int | None = None) -> int:
    """Threads per point when ``parallel`` points share the machine: its cores split between them.

    Each process otherwise takes every core for its own thread pool; two such points on two cores
    run ~3x slower than one thread each (measured on the small scale's 0.34M-parameter model).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, parallel))


def _run_subprocess(point_dir: Path, threads: int | None = None) -> None:
    env = dict(os.environ)
    if threads is not None and not env.get("OMP_NUM_THREADS"):  # the user's own setting wins
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(point_dir / "run.log", "a")
    try:
        proc = subprocess.run([sys.executable, "-m", "lightning_optlab.sweep.point", str(point_dir)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()
    if proc.returncode != 0:
        (point_dir / "last_error.txt").write_text(f"exit status {proc.returncode}; see run.log")


def run_sweep(recipe: str | Path | Mapping[str, Any], out_dir: str | Path, *, scale: str | None = None,
              executor: str = "inline", parallel: int | None = None, overrides: Mapping[str, Any] | None = None,
              slurm: Mapping[str, Any] | None = None, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished point of a recipe's sweep, then write ``results.csv``; returns its rows.

    Args:
        recipe: recipe path or mapping (``scales`` and ``sweep`` sections).
        out_dir: the sweep folder (points inside; a rerun skips finished points, resumes partial ones).
        scale: ``tiny`` (default) or ``paper``.
        executor: ``inline`` (this process, one after another), ``local`` (``parallel`` subprocesses
            at a time), ``submitit-local`` or ``slurm`` (one submitit job per point).
        parallel: points at a time for ``local`` (default: the sweep's ``parallel``).
        overrides: a config block merged over the recipe (e.g. fewer steps).
        slurm: submitit parameters merged over the sweep's ``slurm`` block.
        only: run only the points whose names contain one of these strings.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    spec, dirs = prepare_sweep(recipe, out_dir, scale, overrides)
    if only:
        keys = list(only)
        dirs = [d for d in dirs if any(k in d.name for k in keys)]
    todo = [d for d in dirs if not (d / "result.json").exists()]
    skipped = len(dirs) - len(todo)
    print(f"sweep {out_dir}: {len(dirs)} points, {skipped} finished (skipped), {len(todo)} to run "
          f"({sum(point_status(d) == 'partial' for d in todo)} resume from a checkpoint); executor {executor}")
    failures: dict[str, str] = {}
    bar = _progress(len(todo))

    def finished(d: Path) -> None:  # one line per finished point, whatever ran it, and the bar moves
        collect(out_dir, failures=failures)  # the table so far: `optlab report` works mid-sweep
        bar.update(1)
        bar.write(f"[{bar.n}/{len(todo)}] {point_line(d, failures)}")

    if executor == "inline":
        for i, d in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {d.name}", flush=True)
            try:
                run_point(d)
            except SystemExit as err:
                if _interrupted(err):  # Ctrl-C: Lightning turns it into SystemExit; stop the sweep, resumable
                    print(f"sweep interrupted during {d.name}; rerun the same command to resume", flush=True)
                    raise
                failures[d.name] = traceback.format_exc()
                (d / "last_error.txt").write_text(failures[d.name])
            except Exception:  # noqa: BLE001 - one broken point (or bad config) must not end the sweep
                failures[d.name] = traceback.format_exc()
                (d / "last_error.txt").write_text(failures[d.name])
            finished(d)
    elif executor == "local":
        n = parallel or spec.parallel
        with ThreadPoolExecutor(max_workers=n) as pool:
            threads = point_threads(n)
            running = {pool.submit(_run_subprocess, d, threads): d for d in todo}
            for future in as_completed(running):
                d = running[future]
                _note_failure(d, failures)
                finished(d)
    else:
        for d, error in _run_submitit(todo, Path(out_dir), executor, {**spec.slurm, **(slurm or {})}):
            if error is not None:
                failures[d.name] = error
            else:
                _note_failure(d, failures)
            finished(d)
    bar.close()
    for d in todo:
        if not (d / "result.json").exists() and d.name not in failures:
            failures[d.name] = (d / "last_error.txt").read_text() if (d / "last_error.txt").exists() else "no result"
    rows = collect(out_dir, failures=failures)
    print(f"results: {Path(out_dir) / 'results.csv'} ({sum(r['status'] == 'done' for r in rows)} done, "
          f"{sum(r['status'] == 'diverged' for r in rows)} diverged, {sum(r['status'] == 'failed' for r in rows)} failed, "
          f"{sum(r['status'] in ('partial', 'pending') for r in rows)} unfinished)")
    for name, text in failures.items():  # the reason of each failure, not only a count
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no result"
        if last.startswith("SystemExit"):
            last += " (a configuration error: its message is printed above)"
        print(f"  failed: {name}: {last[:300]}  [{Path(out_dir) / name / 'last_error.txt'}]")
    return rows


def _progress(total: int) -> Any:
    """The sweep's one overall progress bar (points done, elapsed, ETA), on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="point", file=sys.stderr, dynamic_ncols=True)


def point_line(d: Path, failures: Mapping[str, str]) -> str:
    """One line for a finished point: its name, status and final losses (or why it failed)."""
    if d.name in failures:
        lines = [ln for ln in failures[d.name].strip().splitlines() if ln.strip()]
        return f"{d.name}: failed ({(lines[-1] if lines else 'no result')[:160]})"
    try:
        res = json.loads((d / "result.json").read_text())
    except (OSError, ValueError):
        return f"{d.name}: no result"
    parts = [f"{k.replace('final_', '').replace('_', ' ')} {res[k]:.4f}" for k in ("final_val_loss", "final_train_loss")
             if isinstance(res.get(k), (int, float))]
    return f"{d.name}: {res.get('status', 'done')}" + (f", {', '.join(parts)}" if parts else "")


def _note_failure(d: Path, failures: dict[str, str]) -> None:
    """A point that ended without a result is a failure, with its last_error.txt as the reason."""
    if not (d / "result.json").exists() and d.name not in failures:
        failures[d.name] = (d / "last_error.txt").read_text() if (d / "last_error.txt").exists() else "no result"


def _run_submitit(todo: list[Path], out: Path, executor: str,
                  params: Mapping[str, Any]) -> Iterator[tuple[Path, str | None]]:
    """Submit one job per point; yield ``(point, error or None)`` as the jobs finish, in that order."""
    import submitit
    import submitit.helpers

    folder = out / "submitit" / "%j"
    if executor == "submitit-local":
        ex: Any = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(params.get("timeout_min", 60)))
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(**dict(params))
    jobs = []
    for d in todo:
        if executor == "slurm":
            ex.update_parameters(name=d.name)
        jobs.append((d, ex.submit(run_point, str(d))))
    print("submitted: " + ", ".join(f"{d.name} (job {j.job_id})" for d, j in jobs), flush=True)
    point_of = {id(job): d for d, job in jobs}
    poll = 1.0 if executor == "submitit-local" else 10.0  # SLURM's queue is asked less often
    for job in submitit.helpers.as_completed([j for _, j in jobs], poll_frequency=poll):
        try:
            job.result()
            yield point_of[id(job)], None
        except Exception as err:  # noqa: BLE001 - recorded as a failed row, resumable by a rerun
            yield point_of[id(job)], str(err)[-2000:]


def collect(out_dir: str | Path, failures: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every point of a sweep folder as one row (finished, diverged, failed or unfinished); writes ``results.csv``."""
    out = Path(out_dir)
    rows = []
    for meta_path in sorted(out.glob("*/point.json")):
        d = meta_path.parent
        if (d / "result.json").exists():
            rows.append(json.loads((d / "result.json").read_text()))
            continue
        meta = json.loads(meta_path.read_text())
        row = {"point": meta["point"], "label": meta["label"], "optimizer": meta["optimizer"], "seed": meta["seed"],
               **meta["values"], "status": point_status(d)}
        if failures and d.name in failures:
            row["status"], row["error"] = "failed", failures[d.name].strip().splitlines()[-1][:300]
        rows.append(row)
    write_csv(out / "results.csv", rows)
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows as a CSV: the fixed columns first, then axis columns, then ``eval/...`` scores."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    evals = sorted(k for k in keys if k.startswith("eval/"))
    fixed = [c for c in RESULT_COLUMNS if c in keys or c in ("point", "label", "optimizer", "seed", "status")]
    axes = [k for k in keys if k not in fixed and k not in evals and k != "this_session_seconds"]
    columns = fixed[:4] + axes + fixed[4:] + evals
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """A results table with numbers parsed (empty cells become None)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                if v == "":
                    parsed[k] = None
                    continue
                try:
                    parsed[k] = int(v) if k in ("seed", "steps", "tokens") else float(v)
                except ValueError:
                    parsed[k] = v
                if k in ("point", "label", "optimizer", "status", "error"):
                    parsed[k] = v
            out.append(parsed)
    return out
