"""The ``optlab`` command: help, LightningCLI parsing and errors, scales, dispatch to mup/eval."""

import sys
import types

import pytest
import torch
import yaml

from lightning_optlab import cli
from lightning_optlab.cli import build_cli, main, resolve_config_args
from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.optim.registry import available_optimizers


@pytest.fixture
def recipe(tmp_path):
    """A tiny recipe with both scales (the paper block would not fit a CPU: it must not be used)."""
    data = {
        "model": {"model": {"preset": "llama-tiny", "block_size": 16}},
        "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "schedule": "cosine", "warmup_steps": 1},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 2, "val_batches": 1,
                 "work_dir": str(tmp_path / "data")},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "scales": {"tiny": {"trainer": {"max_steps": 3}},
                   "paper": {"trainer": {"max_steps": 22900}, "model": {"model": {"preset": "llama-150m"}}}},
        "sweep": {"grid": {"lr": [1e-3]}, "runs": [{"label": "adamw"}]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("# Finding: none (a test)\n" + yaml.safe_dump(data))
    return path


def test_top_level_help_lists_commands_and_optimizers(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in available_optimizers():
        assert name in out
    for command in ("fit", "validate", "test", "check", "sweep", "report", "mup", "eval", "demo", "optimizers"):
        assert f" {command}" in out.split("commands:")[1]


def test_fit_help_shows_the_optimizer_group(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--optimizer.name" in out and "--optimizer.lr" in out and "--model.model" in out
    assert "soap" in out and "--optimizer.optimizer" not in out  # no LightningCLI auto optimizer group


def _parse(args):
    return build_cli(args, run=False, save_config_callback=None)


def test_optimizer_group_from_yaml_and_command_line(recipe):
    args = resolve_config_args(["--config", str(recipe), "--optimizer.name", "soap", "--optimizer.lr", "3e-3",
                                "--optimizer.hparams", "{precondition_frequency: 5}"])
    built = _parse(args)
    spec = built.model.spec
    assert isinstance(spec, OptimizerSpec)
    assert (spec.name, spec.lr, spec.betas, spec.hparams) == ("soap", 3e-3, (0.9, 0.95), {"precondition_frequency": 5})
    assert spec.schedule == "cosine" and spec.total_steps == 3  # total_steps defaults to trainer.max_steps (tiny)
    assert built.trainer.max_steps == 3 and built.datamodule.config.seq_len == 16


def test_scale_selects_the_recipe_section(recipe):
    (args,) = [resolve_config_args(["--config", str(recipe), "--scale", "paper"])]
    config = yaml.safe_load(args[1])
    assert config["trainer"]["max_steps"] == 22900 and config["model"]["model"]["preset"] == "llama-150m"
    assert "scales" not in config and "sweep" not in config
    with pytest.raises(ValueError, match="scale must be one of tiny, small, paper, got 'huge'"):
        resolve_config_args(["--config", str(recipe), "--scale", "huge"])


@pytest.mark.parametrize("extra, message", [
    (["--optimizer.name", "adamq"], "unknown optimizer 'adamq'; known optimizers: adafactor"),
    (["--optimizer.lr", "-1"], "lr must be ≥ 0, got -1.0"),
    (["--optimizer.betas", "[0.9, 1.5]"], "betas"),
    (["--optimizer.lrr", "3"], "--optimizer.lrr"),
    (["--trainer.max_stepz", "3"], "--trainer.max_stepz"),
    (["--optimizer.name", "sophia", "--optimizer.hparams", "{rhoo: 0.04}"], "got unknown arguments ['rhoo']"),
])
def test_bad_values_and_unknown_keys_are_parser_errors(recipe, capsys, extra, message):
    assert main(["fit", "--config", str(recipe), *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_fit_trains_with_the_optimizer_given_on_the_command_line(recipe, tmp_path, capsys):
    torch.set_num_threads(1)
    root = tmp_path / "run"
    assert main(["fit", "--config", str(recipe), "--scale", "tiny", "--optimizer.name", "lion",
                 "--optimizer.lr", "3e-4", "--trainer.default_root_dir", str(root),
                 "--trainer.enable_checkpointing", "true"]) == 0
    ckpt = next(root.rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert [type(o).__name__ for o in [state["optimizer_states"]]] and "exp_avg" in str(state["optimizer_states"][0])
    saved = yaml.safe_load(next(root.rglob("config.yaml")).read_text())
    assert saved["optimizer"]["name"] == "lion" and saved["optimizer"]["lr"] == 3e-4
    # fit adds a NonFiniteGuard (raise) when the config has none, before the checkpoint callbacks
    assert any(k.startswith("NonFiniteGuard") for k in state["callbacks"])


def test_check_is_a_dry_run(recipe, capsys):
    assert main(["check", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "max_steps 3, sweep points 1" in out and "adamw: AdamW" in out


@pytest.mark.parametrize("command, module_name", [("mup", "lightning_optlab.mup.cli"),
                                                  ("eval", "lightning_optlab.eval.cli")])
def test_mup_and_eval_are_dispatched_lazily(monkeypatch, command, module_name):
    seen = []
    fake = types.ModuleType(module_name)
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, module_name, fake)
    assert main([command, "--x", "1"]) == 7 and seen == [["--x", "1"]]


def test_a_missing_subcommand_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli._DELEGATED, "mup", ("lightning_optlab.not_here.cli", "test"))
    assert main(["mup", "coord"]) == 2
    assert "lightning_optlab.not_here.cli is not available" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_sweep_and_report_subcommands(recipe, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--out", str(out), "--set", "trainer.max_steps=2",
                 "--set", "sweep.checkpoint_every=1"]) == 0
    result = yaml.safe_load((out / "adamw__lr=0.001__seed=0" / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 2  # --set reached the point's config
    assert "| adamw | adamw |" in capsys.readouterr().out
    assert main(["report", str(out), "--tolerance", "0.5"]) == 0
    assert "within 0.5 nats" in (out / "report.md").read_text()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "results.csv not found" in capsys.readouterr().err


def test_optlab_and_the_sweep_package_import_without_lightning():
    import subprocess

    code = ("import sys, lightning_optlab.cli, lightning_optlab.sweep; "
            "sys.exit(1 if 'lightning' in sys.modules or 'matplotlib' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # `optlab optimizers` stays instant
