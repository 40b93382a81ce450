"""``optlab fit`` starts multi-process runs the ways Lightning users start them.

Two CPU processes (gloo) through the real command line: ``--trainer.strategy ddp`` (Lightning's
subprocess launcher re-runs the command for rank 1), ``ddp_spawn`` (pickles the trainer),
``torchrun`` and a SLURM allocation simulated by its environment variables. The data are token
shards, whose batch ``k`` of rank ``r`` holds blocks ``(k * world + r) * b + i``: two ranks of
batch ``b/2`` read exactly the blocks of one rank of batch ``b``, so the 2-process loss (the mean
of the ranks' losses) equals the 1-process loss at the same global batch.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).parents[2]
OPTLAB = Path(sys.executable).parent / "optlab"  # the console script, as a user runs it
STEPS, GLOBAL_BATCH = 4, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "embedded-bytes"
    res = subprocess.run([sys.executable, "-m", "lightning_optlab", "data", "prepare", "embedded", "--tokenizer",
                          "bytes", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(Path(__file__).parent)])  # the worktree's package, RankDump
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    for k in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("LOCAL_RANK", "RANK",
                                                                                   "WORLD_SIZE", "NODE_RANK")]:
        del env[k]
    return {**env, **extra}


def _config(tmp: Path, shards: Path, world: int) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {"model": {"preset": "llama-tiny", "block_size": 32}},
        "optimizer": {"name": "adamw", "lr": 3.0e-3, "schedule": "constant"},
        "data": {"data": str(shards), "seq_len": 32, "batch_size": GLOBAL_BATCH // world, "val_batches": 0},
        "trainer": {"max_steps": STEPS, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp),
                    "callbacks": [{"class_path": "_rank_dump.RankDump", "init_args": {"out": str(tmp / "dump")}}]},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])


def _dumps(tmp: Path, world: int, environment: str | None = None) -> list[dict]:
    dumps = [torch.load(tmp / "dump" / f"rank{r}.pt") for r in range(world)]  # every rank finished
    for r, d in enumerate(dumps):
        assert d["world_size"] == world and d["rank"] == r and len(d["losses"]) == STEPS
        assert environment is None or d["environment"] == environment
        assert all(torch.isfinite(torch.tensor(d["losses"])))
    for name, p in dumps[0]["params"].items():  # DDP keeps the replicas equal
        for d in dumps[1:]:
            torch.testing.assert_close(d["params"][name], p, rtol=0, atol=0)
    return dumps


def _fit(tmp: Path, shards: Path, cmd: list[str], *extra: str, world: int = 2, environment: str | None = None) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    args = [*cmd, "fit", "--config", str(_config(tmp, shards, world)), *extra]
    res = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=tmp, timeout=240)
    _check(res)
    return _dumps(tmp, world, environment)


def _assert_same_as_one_process(tmp: Path, shards: Path, two: list[dict]) -> None:
    one = _fit(tmp / "one", shards, [sys.executable, "-m", "lightning_optlab"], world=1)[0]
    mean = [sum(vals) / len(vals) for vals in zip(*(d["losses"] for d in two))]
    assert mean == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    for name, p in one["params"].items():
        torch.testing.assert_close(two[0]["params"][name], p, rtol=1e-4, atol=1e-5)


def test_ddp_subprocess_launcher_matches_one_process(tmp_path, shards):
    """The command of the issue's form: rank 1 is started by Lightning from this command line."""
    two = _fit(tmp_path / "two", shards, [str(OPTLAB)], "--trainer.strategy", "ddp", "--trainer.devices", "2",
               environment="LightningEnvironment")
    _assert_same_as_one_process(tmp_path, shards, two)


def test_ddp_spawn(tmp_path, shards):
    _fit(tmp_path, shards, [sys.executable, "-m", "lightning_optlab"], "--trainer.strategy", "ddp_spawn",
         "--trainer.devices", "2")


def test_torchrun(tmp_path, shards):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "lightning_optlab"]
    _fit(tmp_path, shards, torchrun, "--trainer.strategy", "ddp", "--trainer.devices", "2",
         environment="TorchElasticEnvironment")


def test_slurm_environment(tmp_path, shards):
    """``srun --ntasks 2 optlab fit ...``: two tasks that SLURM starts, told their ranks by its variables."""
    tmp_path.mkdir(exist_ok=True)
    config = _config(tmp_path, shards, 2)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_NAME="optlab", SLURM_JOB_ID="4242",
                   SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([str(OPTLAB), "fit", "--config", str(config), "--trainer.strategy", "ddp",
                                       "--trainer.devices", "2"], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=240)
        _check(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    _dumps(tmp_path, 2, environment="SLURMEnvironment")


def _sweep_recipe(tmp: Path, shards: Path, strategy: str) -> dict:
    cfg = yaml.safe_load(_config(tmp, shards, 2).read_text())
    cfg["trainer"].update(strategy=strategy, devices=2, callbacks=[])
    cfg["data"]["val_batches"] = 1
    cfg["sweep"] = {"grid": {"lr": [3.0e-3]}, "runs": [{"label": "adamw", "optimizer": {"name": "adamw"}}],
                    "checkpoint_every": STEPS}
    return cfg


def test_sweep_point_with_ddp_runs_its_ranks_in_its_own_worker(tmp_path, shards, monkeypatch):
    """An inline sweep (this process is pytest, not the point) hands a 2-process DDP point to
    ``python -m lightning_optlab.sweep.point POINT_DIR``, whose command line Lightning re-runs."""
    from lightning_optlab.sweep import run_sweep

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    rows = run_sweep(_sweep_recipe(tmp_path, shards, "ddp"), tmp_path / "sweep", executor="inline")
    assert [r["status"] for r in rows] == ["done"], rows
    assert rows[0]["steps"] == STEPS and math.isfinite(rows[0]["final_val_loss"])
    assert rows[0]["tokens"] == STEPS * GLOBAL_BATCH * 32  # both ranks' tokens: the global batch


def test_sweep_point_with_ddp_spawn_is_refused_before_training(tmp_path, shards, capsys):
    from lightning_optlab.sweep import run_sweep

    rows = run_sweep(_sweep_recipe(tmp_path, shards, "ddp_spawn"), tmp_path / "sweep", executor="inline")
    assert [r["status"] for r in rows] == ["failed"]
    error = next((tmp_path / "sweep").glob("*/last_error.txt")).read_text()
    assert "ddp_spawn" in error.lower() or "spawn" in error
    assert "use strategy: ddp" in error
    assert not list((tmp_path / "sweep").glob("*/checkpoints/*.ckpt"))


def test_check_prints_the_memory_per_rank_of_the_configs_strategy(capsys):
    from lightning_optlab.cli import main

    assert main(["check", "--config", str(ROOT / "recipes" / "lr_sweep.yaml"), "--scale", "paper", "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "ddp x8" in out and "factors" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("adamw ") and "GiB" in line)
    gib = [float(x) for x in row.split() if x.replace(".", "").isdigit()]
    weights, grads, state = gib[:3]
    assert state == pytest.approx(2 * weights, rel=0.02) and grads == pytest.approx(weights, rel=0.02)


def test_the_2_7b_targets_shard_with_model_parallel_strategy():
    import inspect

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_optlab.memory import parallel_layout
    from lightning_optlab.sweep import resolve_recipe

    config, _ = resolve_recipe(ROOT / "recipes" / "adamw_lion_sophia_budget.yaml", "paper")
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert set(strategy["init_args"]) <= set(inspect.signature(ModelParallelStrategy).parameters)
    assert parallel_layout(config["trainer"]) == ("fsdp2", 64)
    assert parallel_layout({"devices": 8, "strategy": "ddp"}) == ("ddp", 8)
    assert parallel_layout({"devices": "auto"}) == ("ddp", 1)


def test_several_devices_with_a_one_process_strategy_is_refused_before_training(tmp_path, shards, capsys):
    from lightning_optlab.cli import main

    code = main(["fit", "--config", str(_config(tmp_path, shards, 2)), "--trainer.strategy", "single_device",
                 "--trainer.devices", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--trainer.devices 2" in err and "single_device" in err and "--trainer.strategy ddp" in err
    assert not (tmp_path / "dump").exists()  # nothing trained


def test_validate_under_ddp_through_the_cli_module(tmp_path, shards):
    """``python -m lightning_optlab.cli validate``: the other entry point, the other subcommands."""
    config = _config(tmp_path, shards, 2)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["val_batches"] = 2
    config.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "lightning_optlab.cli", "validate", "--config", str(config),
                          "--trainer.strategy", "ddp", "--trainer.devices", "2"], capture_output=True, text=True,
                         env=_env(), cwd=tmp_path, timeout=240)
    _check(res)
    log = res.stdout + res.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "val/loss" in log
