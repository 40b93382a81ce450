"""PreconditionerHealth: statistics against direct computations, roles, keys, resume, plot, numerics."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_optlab import OptimizerSpec
from lightning_optlab.callbacks.health import PreconditionerHealth, aggregate_by_role, effective_lr_tensor
from lightning_optlab.callbacks.nonfinite import NonFiniteGuard
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig
from lightning_optlab.optim import get_optimizer_class
from lightning_optlab.optim.health import named_params, quantile_stats
from lightning_optlab.params import classify_parameters

READOUT = "model.lm_head.weight"
QS = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64)
Q_KEYS = ("min", "q05", "q50", "q95", "max")
ADAMW = dict(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, schedule="cosine", warmup_steps=2, total_steps=8)


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def health(self) -> dict[int, dict[str, float]]:
        """``{optimizer steps taken: metrics}`` of the calls carrying health keys (the callback logs
        the statistics after update k at Lightning's index k - 1, beside that update's train/loss)."""
        return {s + 1: m for s, m in self.calls if any(k.startswith("health") for k in m)}


class GradRecorder(Callback):
    """Each parameter's gradient norm, read where PreconditionerHealth reads it."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step + 1] = {
            n: p.grad.norm().item() for n, p in pl_module.named_parameters() if p.grad is not None
        }


class TorchAdamWModule(CausalLMModule):
    """Plain ``torch.optim.AdamW`` over ``self.parameters()``: no names, no roles, no health()."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3, betas=(0.9, 0.95))


class MatrixStatsSGD(torch.optim.SGD):
    """An SGD whose health() adds the keys a matrix preconditioner reports."""

    def health(self):
        out = {}
        for i, (name, p, group) in enumerate(named_params(self)):
            out[f"{name}/precond_cond_max"] = float(10 + i)
            out[f"{name}/steps_since_refresh"] = float(i % 3)
            out[f"{name}/fallback_count"] = 1.0
        return out


class MatrixStatsModule(CausalLMModule):
    def configure_optimizers(self):
        return MatrixStatsSGD(self.parameters(), lr=0.05)


def _data(n_batches=8, batch=4, seq=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (n_batches * batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1) * torch.randint(1, 3, (n_batches * batch, 1), generator=g)) % 32
    return DataLoader(list(tokens), batch_size=batch, shuffle=False)


def _module(spec=None, cls=CausalLMModule):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return cls(model, OptimizerSpec(**(spec or ADAMW)))


def _fit(tmp_path, module, callbacks, logger=None, data=None, **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger if logger is not None else False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, callbacks=callbacks, **kw)
    trainer.fit(module, data or _data())
    return trainer


def _quantiles(values: torch.Tensor) -> list[float]:
    return torch.quantile(values.detach().double().flatten(), QS).tolist()


def _adamw_direct(opt, p):
    """Effective LR, eps fraction and update statistics of AdamW, from its state by hand."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    st = opt.state[p]
    t = st["step"].item()
    b1, b2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    sqrt_v_hat = (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt()
    eff = lr / (sqrt_v_hat + eps)
    update = lr * (st["exp_avg"].double() / (1 - b1**t)) / (sqrt_v_hat + eps)
    u_rms = update.pow(2).mean().sqrt().item()
    return eff, {
        "eps_frac": (sqrt_v_hat < eps).double().mean().item(),
        "update_rms": u_rms,
        "update_to_weight": u_rms / p.double().pow(2).mean().sqrt().item(),
    }


# --- one shared run: statistics against direct computations, roles, keys ------------------------------


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """5 optimizer steps of 2 accumulated batches each; health after steps 2, 4 and the last (5)."""
    logger, grads = RecordingLogger(), GradRecorder()
    cb = PreconditionerHealth(every_n_steps=2, per_parameter=True, plot=False)
    module = _module()
    trainer = _fit(tmp_path_factory.mktemp("adamw"), module, [grads, cb], logger, max_steps=5, accumulate_grad_batches=2)
    return module, trainer, logger, grads, cb


def test_adamw_statistics_and_grad_norms_match_direct_computation(adamw_run):
    module, trainer, logger, grads, _ = adamw_run
    logged = logger.health()[5]
    opt = trainer.optimizers[0]
    for name, p in module.named_parameters():
        eff, stats = _adamw_direct(opt, p)
        for key, expected in zip(Q_KEYS, _quantiles(eff)):
            assert logged[f"health_param/{name}/eff_lr_{key}"] == pytest.approx(expected, rel=1e-5), (name, key)
        for key, expected in stats.items():
            assert logged[f"health_param/{name}/{key}"] == pytest.approx(expected, rel=1e-4, abs=1e-12), (name, key)
        # the norm of the accumulated gradient of that optimizer step
        assert logged[f"health_param/{name}/grad_norm"] == pytest.approx(grads.norms[5][name], rel=1e-6)
    # readout rows: quantiles over the rows of the row-mean effective LR
    eff, _ = _adamw_direct(opt, dict(module.named_parameters())[READOUT])
    for key, expected in zip(Q_KEYS, _quantiles(eff.mean(dim=1))):
        assert logged[f"health/readout_rows/eff_lr_{key}"] == pytest.approx(expected, rel=1e-5)


def test_roles_aggregate_per_parameter_statistics(adamw_run):
    module, _, logger, _, _ = adamw_run
    logged = logger.health()[4]
    roles = classify_parameters(module)
    assert set(roles.values()) == {"embedding", "hidden", "readout", "norm", "bias"}
    for role in set(roles.values()):
        names = [n for n, r in roles.items() if r == role]
        stats = ("eff_lr_min", "eff_lr_q50", "eff_lr_max", "update_rms")
        per = {k: [logged[f"health_param/{n}/{k}"] for n in names] for k in stats}
        assert logged[f"health/{role}/eff_lr_min"] == min(per["eff_lr_min"])
        assert logged[f"health/{role}/eff_lr_max"] == max(per["eff_lr_max"])
        assert logged[f"health/{role}/eff_lr_q50"] == pytest.approx(sum(per["eff_lr_q50"]) / len(names), rel=1e-12)
        assert logged[f"health/{role}/update_rms"] == pytest.approx(sum(per["update_rms"]) / len(names), rel=1e-12)
        grad_norms = [logged[f"health_param/{n}/grad_norm"] for n in names]
        assert logged[f"health/{role}/grad_norm"] == pytest.approx(math.sqrt(sum(g * g for g in grad_norms)), rel=1e-12)
    total = [v for k, v in logged.items() if k.startswith("health_param/") and k.endswith("/grad_norm")]
    assert logged["health/grad_norm"] == pytest.approx(math.sqrt(sum(g * g for g in total)), rel=1e-12)


def test_logger_receives_expected_keys_at_optimizer_steps(adamw_run):
    _, trainer, logger, _, cb = adamw_run
    logged = logger.health()
    # 10 batches, accumulation 2: optimizer steps 1..5; records after steps 2, 4 and the last
    assert trainer.global_step == 5 and sorted(logged) == [2, 4, 5] and cb.series["steps"] == [2, 4, 5]
    # the logger receives them at Lightning's index of the same update's train/loss
    assert sorted(s for s, m in logger.calls if "health/grad_norm" in m) == [1, 3, 4]
    keys = logged[4]
    for role in ("embedding", "hidden", "readout", "norm", "bias"):
        for stat in ("eff_lr_min", "eff_lr_q05", "eff_lr_q50", "eff_lr_q95", "eff_lr_max", "eps_frac",
                     "update_rms", "update_to_weight", "grad_norm"):
            assert f"health/{role}/{stat}" in keys, (role, stat)
    assert {"health/grad_norm", "health/compute_seconds", "health/readout_rows/eff_lr_q50",
            f"health_param/{READOUT}/eff_lr_q95", f"health_param/{READOUT}/grad_norm"} <= set(keys)
    assert all(math.isfinite(v) for v in keys.values())


def test_aggregate_by_role_rules():
    per = {"a": {"eff_lr_min": 1.0, "eff_lr_max": 5.0, "clip_frac": 0.2, "block_eff_lr_max": 3.0},
           "b": {"eff_lr_min": 0.5, "eff_lr_max": 9.0, "clip_frac": 0.4},
           "c": {"eff_lr_min": 7.0}}
    out = aggregate_by_role(per, {"a": "hidden", "b": "hidden"})
    assert out["hidden"] == pytest.approx({"eff_lr_min": 0.5, "eff_lr_max": 9.0, "clip_frac": 0.3, "block_eff_lr_max": 3.0})
    assert out["other"] == {"eff_lr_min": 7.0}


def test_adalayer_readout_rows_are_its_per_row_block_learning_rates(tmp_path):
    logger = RecordingLogger()
    module = _module(dict(name="adalayer", lr=3e-3, betas=(0.9, 0.95)))
    trainer = _fit(tmp_path, module, [PreconditionerHealth(every_n_steps=2, per_parameter=True, plot=False)], logger, max_steps=2)
    opt = trainer.optimizers[0]
    p = dict(module.named_parameters())[READOUT]
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    st = opt.state[p]
    v_hat = st["block_exp_avg_sq"].double() / (1 - group["betas"][1] ** st["step"])
    assert v_hat.numel() == p.shape[0]  # one block per row (per logit)
    rows = group["lr"] / (v_hat.sqrt() + group["eps"])
    logged = logger.health()[2]
    for key, expected in zip(Q_KEYS, _quantiles(rows)):
        assert logged[f"health/readout_rows/eff_lr_{key}"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name, kwargs", [
    ("adamw", {}), ("sgd", {"momentum": 0.9}), ("adagrad", {}), ("adafactor", {}), ("sophia", {}),
    ("torch_adam", {}),
])
def test_effective_lr_tensor_agrees_with_the_optimizers_health(name, kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    cls = torch.optim.Adam if name == "torch_adam" else get_optimizer_class(name)
    opt = cls(params, lr=0.01, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        sum((p**2 * torch.arange(1.0, p.numel() + 1).view(p.shape)).sum() for p in params).backward()
        opt.step()
    from lightning_optlab.callbacks.health import optimizer_health

    health = optimizer_health(opt)
    for key, p, group in named_params(opt):
        eff = effective_lr_tensor(opt, p, group, opt.state[p])
        assert eff is not None and eff.shape == p.shape
        for stat, value in quantile_stats("eff_lr", eff).items():
            assert value == pytest.approx(health[f"{key}/{stat}"], rel=1e-5), (key, stat)


# --- torch optimizers, generic keys, logging ----------------------------------------------------------


def test_torch_optimizer_without_names_or_roles(tmp_path):
    logger = RecordingLogger()
    module = _module(cls=TorchAdamWModule)
    trainer = _fit(tmp_path, module, [PreconditionerHealth(every_n_steps=2, per_parameter=True, plot=False)], logger, max_steps=2)
    logged = logger.health()[2]
    eff, _ = _adamw_direct(trainer.optimizers[0], dict(module.named_parameters())[READOUT])
    assert logged[f"health_param/{READOUT}/eff_lr_q50"] == pytest.approx(_quantiles(eff)[2], rel=1e-5)
    for role in ("embedding", "hidden", "readout", "norm", "bias"):  # roles from classify_parameters
        assert f"health/{role}/eff_lr_q50" in logged
    assert "health/readout_rows/eff_lr_q50" in logged
    assert not any("group0.param" in k for k in logged)


def test_matrix_statistics_pass_through(tmp_path):
    logger = RecordingLogger()
    module = _module(cls=MatrixStatsModule)
    _fit(tmp_path, module, [PreconditionerHealth(every_n_steps=2, per_parameter=True, plot=False)], logger, max_steps=2)
    logged = logger.health()[2]
    names = list(dict(module.named_parameters()))
    hidden = [i for i, n in enumerate(names) if classify_parameters(module)[n] == "hidden"]
    assert logged[f"health_param/{names[0]}/precond_cond_max"] == 10.0
    assert logged["health/hidden/steps_since_refresh"] == pytest.approx(sum(i % 3 for i in hidden) / len(hidden))
    assert logged["health/readout/fallback_count"] == 1.0


def test_roles_and_per_parameter_switches(tmp_path):
    logger = RecordingLogger()
    no_params = PreconditionerHealth(every_n_steps=2, per_parameter=False, plot=False)
    no_roles = PreconditionerHealth(every_n_steps=2, roles=False, per_parameter=True, plot=False)
    _fit(tmp_path, _module(), [no_params, no_roles], logger, max_steps=2)
    first, second = [m for s, m in logger.calls if s == 1 and "health/compute_seconds" in m]
    assert not any(k.startswith("health_param/") for k in first) and "health/hidden/eff_lr_q50" in first
    assert not any(k.startswith("health/hidden") for k in second) and f"health_param/{READOUT}/eff_lr_q50" in second


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_steps=0), "every_n_steps must be an integer ≥ 1, got 0"),
    (dict(every_n_steps=2.5), "every_n_steps"),
    (dict(histograms="yes"), "histograms must be True or False"),
    (dict(plot_path="health.pdf"), "plot_path must name a .png"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreconditionerHealth(**kwargs)


# --- resume, plot, histograms, numerics ---------------------------------------------------------------


def test_resume_continues_the_series(tmp_path):
    # 4 batches an epoch: the checkpoint at step 4 is at an epoch boundary, so the resumed run
    # sees the same batches (a plain DataLoader cannot resume mid-epoch)
    straight_cb = PreconditionerHealth(every_n_steps=2, plot=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    _fit(tmp_path / "a", _module(), [straight_cb, saver], data=_data(n_batches=4), max_steps=8, enable_checkpointing=True)

    resumed_cb = PreconditionerHealth(every_n_steps=2, plot=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=8,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[resumed_cb],
                        default_root_dir=tmp_path / "b")
    trainer.fit(_module(), _data(n_batches=4), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert resumed_cb.series["steps"] == straight_cb.series["steps"] == [2, 4, 6, 8]
    assert resumed_cb.series["eff_lr"] == straight_cb.series["eff_lr"]
    assert resumed_cb.series["readout_rows"] == straight_cb.series["readout_rows"]


def test_plot_file_is_written(tmp_path):
    cb = PreconditionerHealth(every_n_steps=3)  # records after steps 3 and 4 (the last)
    _fit(tmp_path, _module(dict(name="sgd", lr=0.1, betas=(0.98, 0.0),
                                mix=[dict(optimizer="adalayer", roles=["readout", "norm"], lr=3e-3)])), [cb])
    path = tmp_path / "preconditioner_health.png"  # the default: default_root_dir without a logger
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert cb.written_plot == path and cb.series["steps"] == [3, 4]
    assert cb.series["readout_kind"].startswith("per-row block")


def test_identical_losses_with_and_without_the_callbacks(tmp_path):
    class Losses(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(outputs["loss"].item())

    plain, watched = Losses(), Losses()
    a, b = _module(), _module()
    _fit(tmp_path / "a", a, [plain], max_steps=4)
    health = PreconditionerHealth(every_n_steps=2, histograms=True, plot_path=tmp_path / "figs" / "eff_lr.png")
    callbacks = [watched, health, NonFiniteGuard("skip", snapshot=True)]
    logger = TensorBoardLogger(tmp_path / "b", name="tb")
    _fit(tmp_path / "b", b, callbacks, logger=logger, max_steps=4)
    assert plain.values == watched.values and len(plain.values) == 4
    assert health.series["steps"] == [2, 4] and (tmp_path / "figs" / "eff_lr.png").is_file()
    # the histograms went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert {f"health_hist/{READOUT}/log10_eff_lr", f"health_hist/{READOUT}/grad"} <= set(events.Tags()["histograms"])
    assert "health/hidden/eff_lr_q50" in events.Tags()["scalars"]
    # histograms sit at the scalars' indices (update N at N - 1)
    hist_steps = [e.step for e in events.Histograms(f"health_hist/{READOUT}/grad")]
    scalar_steps = [e.step for e in events.Scalars("health/hidden/eff_lr_q50")]
    assert hist_steps == scalar_steps == [1, 3]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_figure_panels_group_layers_and_pool_vectors():
    from lightning_optlab.callbacks.health import _panel_specs

    steps = [10, 20]
    eff, meta = {}, {}
    for layer in range(25):  # 50 matrices: more than one panel each allows
        for kind in ("attn.weight", "mlp.weight"):
            eff[f"model.h.{layer}.{kind}"] = [[1.0, 2.0, 3.0, 4.0, 5.0 + layer]] * 2
            meta[f"model.h.{layer}.{kind}"] = {"role": "hidden", "ndim": 2}
    eff["model.ln.weight"], eff["model.ln.bias"] = [[0.5, 1.0, 2.0, 3.0, 4.0]] * 2, [[0.1, 3.0, 4.0, 5.0, 9.0]] * 2
    meta["model.ln.weight"] = meta["model.ln.bias"] = {"role": "norm", "ndim": 1}
    series = {"steps": steps, "eff_lr": eff, "meta": meta, "readout_rows": [[math.nan] * 5] * 2, "readout_kind": ""}
    panels = {title: (role, curves) for title, role, curves in _panel_specs(series)}
    assert set(panels) == {"h.*.attn.weight (25 layers, dark = first)", "h.*.mlp.weight (25 layers, dark = first)",
                           "2 vectors pooled: min, mean quantiles, max"}
    role, curves = panels["h.*.attn.weight (25 layers, dark = first)"]
    assert role == "hidden" and len(curves) == 25 and curves[3][0][4] == 8.0
    role, (pooled,) = panels["2 vectors pooled: min, mean quantiles, max"]
    assert role == "norm" and pooled[0] == pytest.approx([0.1, 2.0, 3.0, 4.0, 9.0])


def test_roles_follow_the_specs_role_patterns():
    from lightning_optlab import OptimizerSpec
    from lightning_optlab.callbacks.health import module_roles
    from lightning_optlab.lit import CausalLMModule
    from lightning_optlab.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    plain = CausalLMModule(model, OptimizerSpec(name="adamw"))
    assert module_roles(plain)["model.wpe.weight"] == "embedding"
    patterned = CausalLMModule(model, OptimizerSpec(name="adamw", role_patterns={r"\.wpe\.": "norm"}))
    roles = module_roles(patterned)
    assert roles["model.wpe.weight"] == "norm" and roles["model.wte.weight"] == "embedding"
