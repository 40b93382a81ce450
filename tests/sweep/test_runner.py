"""Sweeps end to end on a tiny model: skip finished points, resume a killed one, submitit, divergence."""

import csv
import json
import math
import os
from pathlib import Path

import pytest

from lightning_optlab.sweep import SweepSpec, point_status, read_csv, run_sweep
from lightning_optlab.sweep.record import read_curve

HERE = Path(__file__).parent


def _recipe(tmp_path: Path, lrs: list[float], *, optimizer: str = "adamw", callbacks: list | None = None) -> dict:
    """A recipe dict: llama-tiny on the embedded corpus (byte tokens), 8 steps, checkpoint every 4."""
    return {
        "seed_everything": 0,
        "model": {"model": {"preset": "llama-tiny", "block_size": 16}},
        "optimizer": {"name": optimizer, "lr": 1e-3, "betas": [0.9, 0.95], "schedule": "cosine", "warmup_steps": 1},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 4, "val_batches": 2,
                 "work_dir": str(tmp_path.parent / "shared_data")},
        "trainer": {"max_steps": 8, "accelerator": "cpu", "devices": 1, "val_check_interval": 4,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "callbacks": callbacks or []},
        "sweep": {"grid": {"lr": lrs}, "runs": [{"label": optimizer, "optimizer": {"name": optimizer}}],
                  "checkpoint_every": 4},
    }


@pytest.fixture
def subprocess_env(monkeypatch):
    # points of the local executor are subprocesses: one torch thread, and the test's callback importable
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def test_two_point_sweep_skips_finished_and_resumes_a_killed_point(tmp_path, subprocess_env):
    marker = tmp_path / "killed"
    killer = {"class_path": "killer.KillOnce", "init_args": {"at_step": 6, "lr": 3e-3, "marker": str(marker)}}
    recipe = _recipe(tmp_path, [1e-3, 3e-3], callbacks=[killer])
    out = tmp_path / "sweep"

    done, killed = "adamw__lr=0.001__seed=0", "adamw__lr=0.003__seed=0"
    run_sweep(recipe, out, executor="inline", only=["lr=0.001_"])  # the first point, in this process
    # the second point in a subprocess of the local executor, killed after step 6 (last checkpoint: step 4)
    rows = run_sweep(recipe, out, executor="local", parallel=1)
    by_point = {r["point"]: r for r in rows}
    assert marker.exists()  # the second point really was killed at step 6
    assert by_point[done]["status"] == "done" and by_point[killed]["status"] == "failed"
    assert point_status(out / killed) == "partial"  # a checkpoint (step 4), no result
    finished_mtime = (out / done / "result.json").stat().st_mtime_ns

    rows = run_sweep(recipe, out, executor="inline")
    by_point = {r["point"]: r for r in rows}
    assert (out / done / "result.json").stat().st_mtime_ns == finished_mtime  # skipped, not rerun
    resumed = by_point[killed]
    assert resumed["status"] == "done" and resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    assert resumed["tokens"] == 8 * 4 * 16  # tokens counted across the interruption, none twice
    curve = read_curve(out / killed / "curve.csv")
    assert [r["step"] for r in curve if r["train_loss"] is not None] == list(range(1, 9))

    # oracle: the same point never interrupted (run in this process) has the same loss sequence
    oracle = run_sweep(_recipe(tmp_path, [3e-3], callbacks=[killer]), tmp_path / "oracle", executor="inline")[0]
    ref_curve = read_curve(tmp_path / "oracle" / killed / "curve.csv")
    assert [r["train_loss"] for r in curve] == [r["train_loss"] for r in ref_curve]
    assert resumed["final_val_loss"] == oracle["final_val_loss"]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["point"] for t in table] == [done, killed]
    assert {"optimizer", "lr", "seed", "final_train_loss", "final_val_loss", "tokens", "train_seconds",
            "optimizer_share"} <= set(table[0])
    assert 0 < float(table[0]["optimizer_share"]) < 1


def test_submitit_local_executor_runs_each_point_as_a_job(tmp_path, subprocess_env):
    out = tmp_path / "sweep"
    rows = run_sweep(_recipe(tmp_path, [3e-3]), out, executor="submitit-local")
    assert [r["status"] for r in rows] == ["done"]
    jobs = [p for p in (out / "submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 1 and list(jobs[0].glob("*_result.pkl"))  # the point ran as a submitit job
    assert math.isfinite(rows[0]["final_val_loss"]) and rows[0]["final_val_loss"] < math.log(257)


def test_a_diverged_point_is_recorded_not_dropped_and_not_rerun(tmp_path):
    out = tmp_path / "sweep"
    recipe = _recipe(tmp_path, [0.01, 1e12], optimizer="sgd")
    recipe["optimizer"]["betas"] = [0.9, 0.0]
    rows = run_sweep(recipe, out, executor="inline")
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[0.01]["status"] == "done"
    bad = by_lr[1e12]
    assert bad["status"] == "diverged" and bad["diverged_step"] is not None and 0 <= bad["diverged_step"] < 8
    assert "non-finite" in bad["error"]
    # the step is the first non-finite training loss of the curve when there is one (the guard
    # may find it at a later checked step)
    curve = read_curve(out / "sgd__lr=1e+12__seed=0" / "curve.csv")
    first_nan = next((r["step"] for r in curve if r["train_loss"] is not None and not math.isfinite(r["train_loss"])), None)
    assert first_nan is None or bad["diverged_step"] == first_nan
    table = read_csv(out / "results.csv")
    assert [t["status"] for t in table] == ["done", "diverged"]
    result = json.loads((out / "sgd__lr=1e+12__seed=0" / "result.json").read_text())
    assert result["status"] == "diverged"
    mtime = (out / "sgd__lr=1e+12__seed=0" / "result.json").stat().st_mtime_ns
    run_sweep(recipe, out, executor="inline")
    assert (out / "sgd__lr=1e+12__seed=0" / "result.json").stat().st_mtime_ns == mtime


def test_ctrl_c_is_told_from_a_failing_point():
    from lightning_optlab.sweep.runner import _interrupted

    def lightning_like_exit():  # what Lightning's handler does with a KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1)

    with pytest.raises(SystemExit) as info:
        lightning_like_exit()
    assert _interrupted(info.value)
    assert not _interrupted(SystemExit(2))


def test_a_bad_point_config_fails_that_point_and_a_fixed_recipe_reruns_it(tmp_path, capsys):
    out = tmp_path / "sweep"
    recipe = _recipe(tmp_path, [1e-3])
    recipe["optimizer"]["warmup_steps"] = 20  # more than max_steps: the parser rejects the point
    (row,) = run_sweep(recipe, out, executor="inline")
    assert row["status"] == "failed" and point_status(out / row["point"]) == "pending"
    printed = capsys.readouterr()
    assert f"failed: {row['point']}: SystemExit" in printed.out and "last_error.txt" in printed.out
    assert "warmup_steps" in printed.err  # the parser's own message
    recipe["optimizer"]["warmup_steps"] = 1
    (row,) = run_sweep(recipe, out, executor="inline")  # a point that never started takes the fixed config
    assert row["status"] == "done"


class _Boom:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_code_is_refused_by_the_sweep_and_never_run(tmp_path, capsys):
    import torch

    out = tmp_path / "sweep"
    recipe = _recipe(tmp_path, [1e-3])
    from lightning_optlab.sweep.runner import prepare_sweep

    _, (point,) = prepare_sweep(recipe, out)
    marker = tmp_path / "ran"
    (point / "checkpoints").mkdir()
    torch.save({"global_step": 4, "payload": _Boom(marker)}, point / "checkpoints" / "last.ckpt")
    (row,) = run_sweep(recipe, out, executor="inline")
    assert not marker.exists()  # reading global_step did not unpickle the payload
    assert row["status"] == "failed"
    err = (point / "last_error.txt").read_text()
    assert "UntrustedCheckpointError" in err and "io.open" in err and str(point / "checkpoints" / "last.ckpt") in err


def _fake_point(d):
    """Stands in for a trained point: writes its result (the middle learning rate fails)."""
    d = Path(d)
    if "0.002" in d.name:
        (d / "last_error.txt").write_text("Traceback\nValueError: bad point\n")
        raise ValueError("bad point")
    (d / "result.tmp").write_text(json.dumps({"status": "done", "final_val_loss": 4.0, "final_train_loss": 4.5}))
    (d / "result.tmp").replace(d / "result.json")  # atomic, as the runner's own writes: other threads collect


class _FakeJob:
    def __init__(self, fn, arg, n):
        self.job_id, self._error = str(n), None
        try:
            fn(arg)
        except Exception as err:  # noqa: BLE001
            self._error = err

    def done(self):
        return True

    def result(self):
        if self._error is not None:
            raise self._error


class _FakeExecutor:
    def __init__(self, folder, **kw):
        self.n = 0

    def update_parameters(self, **kw):
        pass

    def submit(self, fn, arg):
        self.n += 1
        return _FakeJob(_fake_point, arg, self.n)


@pytest.mark.parametrize("executor", ["local", "submitit-local", "slurm"])
def test_every_executor_shows_one_progress_bar_and_a_line_per_finished_point(tmp_path, executor, monkeypatch, capsys):
    import submitit

    from lightning_optlab.sweep import runner

    def fake_subprocess(d, threads=None):
        try:
            _fake_point(d)
        except ValueError:
            pass

    monkeypatch.setattr(runner, "_run_subprocess", fake_subprocess)
    monkeypatch.setattr(submitit, "LocalExecutor", _FakeExecutor)
    monkeypatch.setattr(submitit, "AutoExecutor", lambda folder, cluster: _FakeExecutor(folder))
    rows = run_sweep(_recipe(tmp_path, [1e-3, 2e-3, 3e-3]), tmp_path / "sweep", executor=executor, parallel=2)
    out, err = capsys.readouterr()
    assert sorted(r["status"] for r in rows) == ["done", "done", "failed"]
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]  # tqdm.write: above the bar
    assert len(lines) == 3 and {ln[:5] for ln in lines} == {"[1/3]", "[2/3]", "[3/3]"}
    assert sum("done, val loss 4.0000, train loss 4.5000" in ln for ln in lines) == 2
    assert sum("failed (" in ln and "bad point" in ln for ln in lines) == 1
    assert "sweep: 100%" in err and "3/3" in err  # the overall bar (tqdm: elapsed<remaining = ETA)


def test_parallel_points_split_the_cores_unless_the_user_set_threads(tmp_path, monkeypatch):
    from lightning_optlab.sweep import runner

    assert runner.point_threads(2, cores=2) == 1 and runner.point_threads(2, cores=16) == 8
    assert runner.point_threads(3, cores=2) == 1 and runner.point_threads(1, cores=4) == 4
    seen = []

    class Done:
        returncode = 0

    monkeypatch.setattr(runner.subprocess, "run", lambda cmd, **kw: seen.append(kw["env"].get("OMP_NUM_THREADS")) or Done())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner._run_subprocess(tmp_path, threads=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    runner._run_subprocess(tmp_path, threads=1)
    assert seen == ["1", "3"]


def test_a_point_identical_to_another_sweeps_finished_point_is_taken_not_trained(tmp_path):
    """`sweep.reuse`: the momentum sweep's beta1 = 0.9 point at lr 1e-3 is the learning-rate sweep's lr = 1e-3
    point; it is copied (result under its own name and axis, curve), and the point unlike any is trained."""
    lr_sweep = _recipe(tmp_path, [1e-3, 2e-3])
    run_sweep(lr_sweep, tmp_path / "lr")
    momentum = _recipe(tmp_path, [1e-3])
    momentum["sweep"] = {"grid": {"momentum": [0.8, 0.9]}, "seeds": [0, 1], "checkpoint_every": 4,
                         "runs": [{"label": "adamw", "optimizer": {"name": "adamw", "lr": 1e-3}}],
                         "reuse": [str(tmp_path / "lr"), str(tmp_path / "not_yet_run")]}
    rows = {r["point"]: r for r in run_sweep(momentum, tmp_path / "mom")}
    theirs = json.loads((tmp_path / "lr" / "adamw__lr=0.001__seed=0" / "result.json").read_text())
    taken = rows["adamw__momentum=0.9__seed=0"]
    assert taken["reused_from"] == str(tmp_path / "lr" / "adamw__lr=0.001__seed=0")
    assert taken["final_val_loss"] == theirs["final_val_loss"] and taken["momentum"] == 0.9 and "lr" not in taken
    assert (tmp_path / "mom" / "adamw__momentum=0.9__seed=0" / "curve.csv").read_text() == \
        (tmp_path / "lr" / "adamw__lr=0.001__seed=0" / "curve.csv").read_text()
    assert not (tmp_path / "mom" / "adamw__momentum=0.9__seed=0" / "checkpoints").exists()
    # another seed, or another beta1, is another config: trained here
    for name in ("adamw__momentum=0.9__seed=1", "adamw__momentum=0.8__seed=0"):
        assert rows[name]["status"] == "done" and not rows[name].get("reused_from"), name
        assert (tmp_path / "mom" / name / "checkpoints").exists()
    assert rows["adamw__momentum=0.9__seed=1"]["final_val_loss"] != taken["final_val_loss"]
    table = read_csv(tmp_path / "mom" / "results.csv")
    assert [r["reused_from"] is not None for r in table].count(True) == 1


def test_sweep_reuse_must_be_a_list_of_folders():
    with pytest.raises(ValueError, match="sweep.reuse must be a list of sweep folders"):
        SweepSpec.from_dict({"runs": [{"optimizer": {"name": "adamw"}}], "reuse": "optlab_runs/lr_sweep-small"})
