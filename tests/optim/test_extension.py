"""The extension point: an optimizer defined here, outside the package, registered with one call,
works wherever a built-in one does: configure, YAML optimizer.name, μP with its declared family,
the per-role mix, health, the guards, sweeps and the benchmark."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_optlab import OptimizerSpec, configure, register_optimizer
from lightning_optlab.callbacks import PreconditionerHealth
from lightning_optlab.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig
from lightning_optlab.mup import build_mup_model
from lightning_optlab.optim import HParams, OptimizerMix, OptlabOptimizer, Traits, available_optimizers, unregister_optimizer
from lightning_optlab.optim.base import check_beta, check_lr, check_weight_decay
from lightning_optlab.optim.health import HealthMixin, quantile_stats, update_stats

ROOT = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class NormalizedSGDHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 0.05
    #: momentum μ in [0, 1)
    momentum: float = 0.9
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0
    #: skip non-finite gradients by default
    nonfinite: str = "skip"

    def check(self) -> None:
        check_lr(self.lr)
        check_beta("momentum", self.momentum)
        check_weight_decay(self.weight_decay)


class NormalizedSGD(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """b ← μ·b + g;  W ← W − ηλW − η·b / RMS(b): entries of size about 1, like Adam's (μP's "adam" family)."""

    hparams_class = NormalizedSGDHParams
    traits = Traits(mup_family="adam", nonfinite="skip")

    def __init__(self, params, lr=0.05, momentum=0.9, weight_decay=0.0, nonfinite="skip"):
        NormalizedSGDHParams(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite=nonfinite)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite=nonfinite))

    def _update(self):
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(buf / buf.pow(2).mean().sqrt().clamp_min(1e-12), alpha=-lr)

    def _param_health(self, p, group, state):
        buf = state["momentum_buffer"]
        rms = buf.pow(2).mean().sqrt().clamp_min(1e-12)
        out = quantile_stats("eff_lr", torch.full_like(p, float(group["lr"])) / rms)
        out.update(update_stats(p, float(group["lr"]) * buf / rms))
        return out


class NoMup(NormalizedSGD):
    traits = Traits()


@pytest.fixture
def registered():
    register_optimizer("normalized_sgd", NormalizedSGD, aliases=["nsgd"])
    try:
        yield "normalized_sgd"
    finally:
        unregister_optimizer("normalized_sgd")
    assert "normalized_sgd" not in available_optimizers()


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))


def _data(n_batches=8, batch=4, seq=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (n_batches * batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1) * torch.randint(1, 3, (n_batches * batch, 1), generator=g)) % 32
    return torch.utils.data.DataLoader(list(tokens), batch_size=batch, shuffle=False)


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                     callbacks=callbacks, **kw)


def test_registration_is_validated(registered):
    assert registered in available_optimizers()
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("soap", NormalizedSGD)
    with pytest.raises(TypeError, match="subclass of lightning_optlab.optim.OptlabOptimizer"):
        register_optimizer("plain_sgd", torch.optim.SGD)
    with pytest.raises(ValueError, match="lowercase letters"):
        register_optimizer("Bad Name", NormalizedSGD)


def test_configure_per_role_mix_and_declared_arguments(registered):
    model = _gpt()
    opt = configure(model, "nsgd", lr=0.1, weight_decay=0.1, momentum=0.8)["optimizer"]
    assert isinstance(opt, NormalizedSGD) and {g["role"] for g in opt.param_groups} >= {"hidden", "readout", "norm"}
    assert all(g["momentum"] == 0.8 for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"unknown arguments \['rho'\]; it accepts: lr, momentum, weight_decay, nonfinite"):
        configure(model, registered, rho=0.1)
    with pytest.raises(ValueError, match="param group 0: momentum must be in"):  # per-group validation from the dataclass
        NormalizedSGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 2.0}])
    mix = configure(model, "adamw", lr=1e-3, mix=[{"optimizer": registered, "roles": ["hidden"], "lr": 0.05}])["optimizer"]
    assert isinstance(mix, OptimizerMix) and len(mix.children) == 2
    assert isinstance(mix.children[0], torch.optim.AdamW) and isinstance(mix.children[1], NormalizedSGD)
    assert {g["role"] for g in mix.children[1].param_groups} == {"hidden"}


def test_mup_uses_the_declared_family(registered):
    mu = build_mup_model({"preset": "llama-tiny", "n_layer": 1, "block_size": 16}, base=32, n_embd=64)
    opt = configure(mu, registered, lr=0.1, mup=True)["optimizer"]
    mults = {n: g["mup_lr_mult"] for g in opt.param_groups for n in g["param_names"]}
    assert mults["blocks.0.attn.q_proj.weight"] == pytest.approx(0.5)  # hidden: η/m_in, width 64 over base 32
    assert mults["wte.weight"] == 1.0 and mults["ln_f.weight"] == 1.0
    adam = configure(mu, "adamw", lr=0.1, mup=True)["optimizer"]  # the family it declares: Adam's rule
    assert mults == {n: g["mup_lr_mult"] for g in adam.param_groups for n in g["param_names"]}
    with pytest.raises(ValueError, match="declares no μP rule"):
        NoMup.mup_family_for({})


def test_yaml_optimizer_name(registered, tmp_path):
    from lightning_optlab.cli import build_cli

    data = {
        "model": {"model": {"preset": "llama-tiny", "block_size": 16}},
        "optimizer": {"name": registered, "lr": 0.05, "hparams": {"momentum": 0.5}},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 2, "val_batches": 1,
                 "work_dir": str(tmp_path / "data")},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "max_steps": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = build_cli(["--config", str(path)], run=False, save_config_callback=None).model.spec
    assert spec.name == registered and spec.hparams == {"momentum": 0.5}


class _NaNAt(Callback):
    def __init__(self, at, name):
        self.at, self.name = at, name

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.at:
            dict(pl_module.named_parameters())[self.name].grad.view(-1)[0] = math.nan


def test_health_and_the_guards_through_lightning(registered, tmp_path):
    health = PreconditionerHealth(every_n_steps=2, per_parameter=True, plot=False)
    module = CausalLMModule(_gpt(), OptimizerSpec(name=registered, lr=0.02))
    _trainer(tmp_path, [health], max_steps=4).fit(module, _data())
    key = "health_param/model.blocks.0.mlp.up_proj.weight/eff_lr_max"
    assert key in health.last_metrics and health.last_metrics[key] > 0
    assert "health/hidden/update_rms" in health.last_metrics
    # its declared nonfinite="skip" skips a NaN gradient itself; the guard (raise, every 20th step) still raises
    module = CausalLMModule(_gpt(), OptimizerSpec(name=registered, lr=0.02))
    guard = NonFiniteGuard(action="raise")
    with pytest.raises(NonFiniteError, match=r"parameter model\.lm_head\.weight \(skipped by the optimizer\)"):
        _trainer(tmp_path, [_NaNAt(3, "model.lm_head.weight"), guard], max_steps=6).fit(module, _data())


def test_sweep_runs_the_registered_optimizer(registered, tmp_path):
    from lightning_optlab.sweep import run_sweep

    recipe = {
        "seed_everything": 0,
        "model": {"model": {"preset": "llama-tiny", "block_size": 16}},
        "optimizer": {"name": registered, "lr": 0.02},
        "data": {"data": "embedded", "tokenizer": "bytes", "seq_len": 16, "batch_size": 4, "val_batches": 1,
                 "work_dir": str(tmp_path / "shared_data")},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 1, "val_check_interval": 3,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False},
        "sweep": {"grid": {"lr": [0.02]}, "runs": [{"label": registered, "optimizer": {"name": registered}}]},
    }
    rows = run_sweep(recipe, tmp_path / "sweep", executor="inline")
    assert [r["status"] for r in rows] == ["done"] and rows[0]["optimizer"] == registered
    assert math.isfinite(rows[0]["final_val_loss"])


def test_benchmark_times_the_registered_optimizer(registered, capsys):
    spec = importlib.util.spec_from_file_location("optim_step_bench_ext", ROOT / "benchmarks" / "optim_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--optimizers", registered, "--width", "16", "--layers", "1", "--vocab", "64",
                           "--steps", "1", "--rounds", "1", "--no-peers", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in rows if r and r[0] == registered)
    assert float(row[1]) > 0 and float(row[-1]) == pytest.approx(4.0, abs=0.01)  # one momentum buffer: 4 B/param
