"""`optlab fit --ckpt_path`: changed settings are refused (or applied with --resume_override optimizer),
damaged and unsafe checkpoints are named; and the CLI's other refusals (max_steps 0, --scale, bad YAML)."""

import os

import pytest
import torch
import yaml

from lightning_optlab.cli import main, resolve_config_args

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config and the checkpoint of 3 steps of it (constant schedule, llama-tiny at width 64)."""
    tmp = tmp_path_factory.mktemp("resume")
    config = {
        "seed_everything": 0,
        "model": {"model": {"preset": "llama-tiny", "block_size": 16}},
        "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 2, "val_batches": 0,
                 "work_dir": str(tmp / "data")},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "max_steps": 3,
                    "default_root_dir": str(tmp / "run")},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    (ckpt,) = (tmp / "run").rglob("*.ckpt")
    return path, ckpt, tmp


def _resume(trained, *extra, root="again"):
    path, ckpt, tmp = trained
    return main(["fit", "--config", str(path), "--ckpt_path", str(ckpt), "--trainer.max_steps", "5",
                 "--trainer.default_root_dir", str(tmp / root), *extra])


def test_a_resume_with_a_changed_model_or_optimizer_is_refused_with_every_difference(trained, capsys):
    code = _resume(trained, "--model.model", "{preset: llama-tiny, block_size: 16, n_embd: 128}",
                   "--optimizer.lr", "0.1", "--optimizer.betas", "[0.8, 0.95]", "--optimizer.schedule", "wsd")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "refused" in err and str(trained[1]) in err
    for line in ("model.n_embd: 64 → 128", "optimizer.lr: 0.001 → 0.1", "optimizer.betas: [0.9, 0.95] → [0.8, 0.95]",
                 "optimizer.schedule: 'constant' → 'wsd'"):
        assert line in err, err
    assert "--resume_override optimizer" in err
    assert not (trained[2] / "again").exists() or not list((trained[2] / "again").rglob("*.ckpt"))
    # the same settings resume (and train on) without a word
    assert _resume(trained, root="same") == 0


def test_resume_override_applies_the_new_optimizer_settings_and_reports_them(trained, capsys):
    assert _resume(trained, "--optimizer.lr", "0.01", "--optimizer.weight_decay", "0.0",
                   "--resume_override", "optimizer", root="override") == 0
    out = capsys.readouterr().out
    assert "applied changed optimizer settings" in out and "optimizer.lr: 0.001 → 0.01" in out
    (ckpt,) = (trained[2] / "override").rglob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 5
    groups = saved["optimizer_states"][0]["param_groups"]
    assert {g["lr"] for g in groups} == {0.01} and {g["initial_lr"] for g in groups} == {0.01}
    assert {g["weight_decay"] for g in groups} == {0.0}
    assert saved["optimizer_states"][0]["state"]  # the moments were restored, not restarted
    # the model is never overridden
    assert _resume(trained, "--model.model", "{preset: llama-tiny, block_size: 16, n_layer: 3}",
                   "--resume_override", "optimizer", root="override2") == 2
    assert "model.n_layer: 2 → 3" in capsys.readouterr().err


@pytest.mark.parametrize("content, words", [(b"", "is empty"), (None, "cut short"), (b"\x00junk" * 50, "not a torch")])
def test_a_damaged_resume_checkpoint_is_named_without_a_traceback(trained, tmp_path, capsys, content, words):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(trained[1].read_bytes()[:5000] if content is None else content)
    path = trained[0]
    assert main(["fit", "--config", str(path), "--ckpt_path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"optlab fit: " in err and str(bad) in err and words in err and "Traceback" not in err
    assert "--weights_only false" not in err


def test_max_steps_zero_is_a_parser_error_about_max_steps(trained, capsys):
    assert main(["fit", "--config", str(trained[0]), "--trainer.max_steps", "0"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the error line (the usage above lists every option)
    assert "--trainer.max_steps must be ≥ 1" in last and "total_steps" not in last


def test_scale_on_a_config_without_scales_is_an_error(trained):
    with pytest.raises(ValueError, match=r"--scale huge: .*config.yaml is a plain config without `scales:`"):
        resolve_config_args(["--config", str(trained[0]), "--scale", "huge"])


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  model: {preset: llama-tiny\noptimizer:\n  lr: 1e-3\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "is not valid YAML at line" in err and "<unicode string>" not in err


def test_schedule_warnings_for_a_short_schedule_and_an_endless_warmup(trained):
    from lightning_optlab.cli import build_cli

    def parse(*extra):
        return build_cli(["--config", str(trained[0]), *extra], run=False, save_config_callback=None)

    with pytest.warns(UserWarning, match=r"total_steps \(2\) < trainer.max_steps \(3\)"):
        parse("--optimizer.schedule", "cosine", "--optimizer.total_steps", "2")
    with pytest.warns(UserWarning, match=r"warmup_steps \(5\) ≥ trainer.max_steps \(3\) under the constant"):
        parse("--optimizer.warmup_steps", "5")
    with pytest.warns(UserWarning, match=r"warmup_steps \(4\) ≥ total_steps \(4\) under the constant"):
        parse("--optimizer.warmup_steps", "4", "--optimizer.total_steps", "4")


def test_a_kill_mid_save_leaves_no_partial_file_after_the_next_save(trained, tmp_path):
    _, ckpt, tmp = trained
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = ckpt.parent / f".{ckpt.name}.{dead}.tmp"
    stale.write_bytes(ckpt.read_bytes()[:1000])  # what a writer killed mid-save leaves
    assert _resume(trained, root="after_kill") == 0
    assert not stale.exists()  # removed when the resume read that folder


def test_broken_yaml_of_sweep_and_mup_transfer_names_the_file(tmp_path, capsys):
    from lightning_optlab.mup.cli import main as mup_main
    from lightning_optlab.sweep.cli import main as sweep_main

    bad = tmp_path / "proxy.yaml"
    bad.write_text("model: [llama-tiny\n")
    assert mup_main(["transfer", str(bad), "--target", "llama-tiny", "--out", str(tmp_path / "t.yaml")]) == 2
    assert sweep_main(["sweep", str(bad), "--out", str(tmp_path / "s")]) == 2
    for err in capsys.readouterr().err.strip().splitlines():
        assert str(bad) in err and "not valid YAML at line" in err and "<unicode string>" not in err
