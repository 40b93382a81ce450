"""Fault injection: kill ``optlab fit`` N times, resume each time, and check nothing was lost.

    python benchmarks/faults.py --kills 20 --steps 24          # on demand
    python benchmarks/faults.py --kills 3 --steps 8            # what the test suite runs

A tiny LLaMA trains on the embedded corpus, checkpointing every step (``step=N.ckpt`` and
``last.ckpt``). First an uninterrupted run records, per step, the training loss (bit for bit, as
``float.hex``) and a fingerprint of the batch (the data position). Then the same run is killed N
times with SIGKILL and resumed from ``last.ckpt`` after each kill. The kills alternate between

* a *timer kill*: the parent waits until the run has logged a randomly chosen step, then sleeps a
  random few milliseconds and sends SIGKILL (a moment anywhere in training, a checkpoint write
  included when it falls there);
* a *kill during a checkpoint write*: the run's :class:`FaultLog` callback writes half of the
  checkpoint into the writer's temporary file (``.NAME.PID.tmp``, where
  :func:`~lightning_optlab.checkpoint.save_checkpoint_atomic` writes) and ends the process with
  ``os._exit(9)`` (no cleanup, like SIGKILL), leaving on disk exactly what a kill mid-write leaves.

After every kill, every ``*.ckpt`` must load with ``torch.load(weights_only=True)`` and pass its
CRC checks. Every resumed segment must log, step for step, the losses and batches of the
uninterrupted run, starting right after its checkpoint's step, and the last run's final
checkpoint must hold the same data position. No partial temporary file may be left at the end.
The last line reads ``N kills, N exact resumes, 0 unreadable checkpoints``; the exit status is
0 when that is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

try:  # the callback below is loaded by the child processes (class_path "faults.FaultLog")
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the script needs Lightning anyway
    Callback = object  # type: ignore[misc,assignment]


class FaultLog(Callback):
    """Log ``{"run", "step", "loss", "batch"}`` per optimizer step to ``log`` (one JSON line, flushed);
    with ``kill_in_save_at`` set, die halfway through writing that step's ``last.ckpt`` (``kill_file="last"``)
    or its ``step=N.ckpt`` (``"step"``)."""

    def __init__(self, log: str, run: int, kill_in_save_at: int = -1, kill_file: str = "last") -> None:
        self.log_path, self.run, self.kill_at, self.kill_file = Path(log), run, kill_in_save_at, kill_file
        self._batch = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.kill_at < 0:
            return
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_or_die(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            name = Path(path).name  # a rerun step's file may be versioned: step=7-v1.ckpt
            step_file = name.startswith((f"step={self.kill_at}.", f"step={self.kill_at}-v"))
            wanted = name == "last.ckpt" if self.kill_file == "last" else step_file
            if trainer.global_step == self.kill_at and wanted:
                import io as _io

                import torch

                from lightning_optlab.checkpoint import temp_path_for

                buf = _io.BytesIO()
                torch.save(checkpoint, buf)
                data = buf.getvalue()
                with open(temp_path_for(path), "wb") as f:  # where the atomic writer was writing
                    f.write(data[: len(data) // 2])
                    f.flush()
                os._exit(9)
            save(checkpoint, path, storage_options)

        io.save_checkpoint = save_or_die

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        import torch

        weights = torch.arange(1, batch.numel() + 1, dtype=torch.int64).reshape(batch.shape)
        self._batch = int((batch.long() * weights).sum())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        line = {"run": self.run, "step": int(trainer.global_step), "loss": loss.hex(), "batch": self._batch}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()


def _config(out: Path, steps: int, run: int, log: Path, kill_in_save_at: int = -1, kill_file: str = "last"
            ) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"model": {"preset": "llama-tiny", "block_size": 16, "n_layer": 1}},
        "optimizer": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                      "schedule": "cosine", "warmup_steps": 2},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 2, "val_batches": 0,
                 "work_dir": str(out / "data")},
        "trainer": {
            "max_steps": steps, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "filename": "step={step}",
                               "every_n_train_steps": 1, "save_top_k": -1, "save_last": True,
                               "auto_insert_metric_name": False}},
                {"class_path": "faults.FaultLog",
                 "init_args": {"log": str(log), "run": run, "kill_in_save_at": kill_in_save_at,
                               "kill_file": kill_file}},
            ],
        },
    }
    path = out / f"config_{run}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _start(out: Path, config: Path) -> subprocess.Popen:
    last = out / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "lightning_optlab.cli", "fit", "--config", str(config)]
    if last.exists():
        cmd += ["--ckpt_path", str(last)]
    log = open(out / "runs.log", "a")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=str(out))
    finally:
        log.close()


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return out


def _logged_step(log: Path, run: int) -> int:
    return max((e["step"] for e in _read_log(log) if e["run"] == run), default=0)


def _check_checkpoints(folder: Path) -> tuple[int, int]:
    """``(checkpoints checked, unreadable)``: each must load weights-only and pass its CRC checks."""
    import torch

    from lightning_optlab.checkpoint import verify_checkpoint

    checked = bad = 0
    for path in sorted(folder.glob("*.ckpt")):
        checked += 1
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            verify_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - counted and printed
            bad += 1
            print(f"  unreadable: {path}: {err}", flush=True)
    return checked, bad


def _data_position(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True).get("LMDataModule")


def run_faults(out: Path, kills: int, steps: int, seed: int = 0, timeout: float = 300.0) -> dict[str, int]:
    """Run the experiment in ``out``; returns the counts (kills, exact resumes, unreadable, leftovers)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    ref_dir, dir_ = out / "reference", out / "faulty"
    for d in (ref_dir, dir_):
        d.mkdir(exist_ok=True)
    ref_log, log = ref_dir / "steps.jsonl", dir_ / "steps.jsonl"
    for p in (ref_log, log):
        p.unlink(missing_ok=True)
    proc = _start(ref_dir, _config(ref_dir, steps, 0, ref_log))
    if proc.wait(timeout) != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {ref_dir / 'runs.log'}")
    reference = {e["step"]: (e["loss"], e["batch"]) for e in _read_log(ref_log)}
    assert sorted(reference) == list(range(1, steps + 1)), "the reference run did not log every step"

    unreadable, partial, resumed_from = 0, 0, {}
    for run in range(1, kills + 2):  # `kills` killed runs, then one to the end
        last = dir_ / "checkpoints" / "last.ckpt"
        start_step = _step_of(last) if last.exists() else 0
        resumed_from[run] = start_step
        if start_step >= steps - 2 and run <= kills:
            raise RuntimeError(f"the run finished before kill {run}: use more --steps than kills")
        killing = run <= kills
        in_save = killing and run % 2 == 0
        # a kill within the next few steps, never in the last one (the run must not finish first)
        target = rng.randint(start_step + 1, max(start_step + 1, min(steps - 2, start_step + 3))) if killing else -1
        proc = _start(dir_, _config(dir_, steps, run, log, kill_in_save_at=target if in_save else -1,
                                    kill_file=rng.choice(["last", "step"])))
        if killing and not in_save:
            deadline = time.time() + timeout
            while _logged_step(log, run) < max(target, start_step + 1) and proc.poll() is None:
                if time.time() > deadline:
                    proc.kill()
                    raise RuntimeError("a run did not reach its kill step in time")
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout)
        if killing and code == 0:
            raise RuntimeError(f"run {run} finished before it was killed; see {dir_ / 'runs.log'}")
        if not killing and code != 0:
            raise RuntimeError(f"the final run failed (exit {code}); see {dir_ / 'runs.log'}")
        _, bad = _check_checkpoints(dir_ / "checkpoints")
        unreadable += bad
        partial += len(list((dir_ / "checkpoints").glob(".*.tmp")))  # left by this kill; the next run removes them

    entries = _read_log(log)
    exact = 0
    for run in range(2, kills + 2):  # each run after a kill is a resume
        seg = [e for e in entries if e["run"] == run]
        steps_seen = [e["step"] for e in seg]
        continues = bool(seg) and steps_seen == list(range(resumed_from[run] + 1, resumed_from[run] + 1 + len(seg)))
        same = all(reference.get(e["step"]) == (e["loss"], e["batch"]) for e in seg)
        exact += int(continues and same)
    final_same = _data_position(dir_ / "checkpoints" / "last.ckpt") == _data_position(
        ref_dir / "checkpoints" / "last.ckpt")
    if not final_same:
        exact = min(exact, kills - 1)
        print("  the final data position differs from the uninterrupted run's", flush=True)
    leftovers = sorted(p.name for p in (dir_ / "checkpoints").glob(".*.tmp"))
    if leftovers:
        print(f"  partial temporary files left: {leftovers}", flush=True)
    return {"kills": kills, "exact": exact, "unreadable": unreadable, "leftovers": len(leftovers),
            "partial_after_kills": partial}


def _step_of(path: Path) -> int:
    from lightning_optlab.checkpoint import read_global_step

    return read_global_step(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 2 x kills + 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="optlab_runs/faults")
    args = p.parse_args(argv)
    steps = args.steps or 2 * args.kills + 4
    import shutil

    out = Path(args.out)
    shutil.rmtree(out / "faulty", ignore_errors=True)
    shutil.rmtree(out / "reference", ignore_errors=True)
    r = run_faults(out, args.kills, steps, seed=args.seed)
    print(f"  partial temp files left by the kills: {r['partial_after_kills']} (removed by the next run: "
          f"{r['leftovers'] == 0})", flush=True)
    print(f"{r['kills']} kills, {r['exact']} exact resumes, {r['unreadable']} unreadable checkpoints"
          + (f", {r['leftovers']} partial temp files left" if r["leftovers"] else ""), flush=True)
    return 0 if r["exact"] == r["kills"] and r["unreadable"] == 0 and r["leftovers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
