"""WallClock: exact time split under a patched clock, tokens/s, MFU, accumulation, targets, resume."""

from __future__ import annotations

import warnings

import lightning as L
import lightning.fabric.accelerators.cuda
import pytest
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_optlab.callbacks import wallclock
from lightning_optlab.callbacks.wallclock import (
    PEAK_FLOPS_CORRECTIONS,
    WallClock,
    default_tokens_per_batch,
    format_summary,
    peak_flops_for,
)

# dyadic durations: every sum below is exact in binary floating point
DATA, FWD, OPT, REFRESH, OTHER, VAL = 0.0625, 0.25, 0.5, 0.125, 0.015625, 1.0
B, T, VOCAB = 4, 8, 11
#: the training loss the module reports at each optimizer step (step index 0, 1, ...)
LOSSES = [5.0, 4.0, 4.5, 3.4, 3.6, 3.2, 3.3, 3.0, 3.1, 2.9, 2.8, 2.7]


class FakeClock:
    """A host clock that moves only when told to."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(wallclock, "_now", c)
    return c


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001
        pass

    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
        self.calls.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {k for _, m in self.calls for k in m}

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(s, m[key]) for s, m in self.calls if key in m]


class ClockedSGD(torch.optim.SGD):
    """SGD whose update takes OPT seconds; every second step also reports a REFRESH-second refresh."""

    def __init__(self, params, clock: FakeClock) -> None:  # noqa: ANN001
        super().__init__(params, lr=0.1)
        self.clock, self.count = clock, 0

    def step(self, closure=None):  # noqa: ANN001, ANN201
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        self.clock.advance(OPT / 2)
        self.count += 1
        if self.count % 2 == 0:
            self.last_refresh_seconds = float(str(REFRESH))  # a fresh float object each refresh
        # torch's hooked SGD.step: the post-hook fires at its end too, and again at the end of
        # this step, which is the one that counts
        super().step()
        self.clock.advance(OPT / 2)
        return loss


class ClockedModule(L.LightningModule):
    """Forward+backward takes FWD seconds a micro-batch, validation VAL seconds a batch; the
    reported loss is LOSSES[step] (same value, real gradient)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.clock = clock
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.clock.advance(FWD)
        logits = self.head(self.emb(batch[:, :-1]))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        return loss - loss.detach() + LOSSES[self.global_step]

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.clock.advance(VAL)
        self.log("val/loss", LOSSES[max(self.global_step - 1, 0)] - 0.5)

    def test_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.clock.advance(VAL / 2)

    def configure_optimizers(self):  # noqa: ANN201
        return ClockedSGD(self.parameters(), self.clock)


class Advance(Callback):
    """Placed before the WallClock: data wait before each batch, and time after the step."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.clock.advance(DATA)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.clock.advance(OTHER)


def _loader(n_batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(0, VOCAB, (n_batches * B, T + 1), generator=g), batch_size=B)


def _fit(clock: FakeClock, cb: WallClock, max_steps: int, *, accumulate: int = 1, val_every: int | None = None,
         extra: list[Callback] | None = None, ckpt_path: str | None = None, batches: int = 12, log_every: int = 1):
    logger = RecordingLogger()
    module = ClockedModule(clock)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=logger, callbacks=[Advance(clock), cb, *(extra or [])],
        accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2 if val_every else 0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, log_every_n_steps=log_every,
    )
    trainer.fit(module, _loader(batches), _loader(2) if val_every else None, ckpt_path=ckpt_path)
    return trainer, logger


def test_step_split_is_exact(clock: FakeClock) -> None:
    cb = WallClock(verbose=False)
    _, logger = _fit(clock, cb, max_steps=4, val_every=2)
    s = cb.summary
    assert s["steps"] == 4
    assert s["data_seconds"] == 4 * DATA  # validation (every 2 batches) is not data wait
    assert s["fwd_bwd_seconds"] == 4 * FWD
    assert s["optimizer_seconds"] == 4 * OPT
    assert s["refresh_seconds"] == 2 * REFRESH  # steps 2 and 4 refreshed
    assert s["other_seconds"] == 4 * OTHER
    step = DATA + FWD + OPT + OTHER
    assert s["train_seconds"] == 4 * step
    assert s["val_seconds"] == 2 * 2 * VAL
    assert s["optimizer_share"] == pytest.approx(OPT / step, rel=1e-12)
    assert s["tokens"] == 4 * B * T
    assert s["tokens_per_sec"] == pytest.approx(B * T / step, rel=1e-12)
    assert s["mfu"] is None  # CPU, no peak given
    # per-step logs: one per step, at Lightning's step index, exact values
    assert [st for st, _ in logger.series("wallclock/step_seconds")] == [0, 1, 2, 3]
    assert [v for _, v in logger.series("wallclock/refresh_seconds")] == [0.0, REFRESH, 0.0, REFRESH]
    assert all(v == pytest.approx(B * T / step) for _, v in logger.series("wallclock/tokens_per_sec"))
    assert [v for _, v in logger.series("wallclock/train_seconds")] == [step * i for i in (1, 2, 3, 4)]
    assert logger.series("wallclock/val_seconds") == [(1, 2 * VAL), (3, 4 * VAL)]
    assert s["elapsed_seconds"] == 4 * step + 4 * VAL


def test_gradient_accumulation_sums_micro_batches(clock: FakeClock) -> None:
    cb = WallClock(log_every_n_steps=2, verbose=False)
    _, logger = _fit(clock, cb, max_steps=4, accumulate=3)
    s = cb.summary
    assert s["steps"] == 4 and s["tokens"] == 4 * 3 * B * T
    assert s["data_seconds"] == 4 * 3 * DATA
    # the batch-end time of a micro-batch that does not step belongs to its forward+backward
    assert s["fwd_bwd_seconds"] == 4 * (3 * FWD + 2 * OTHER)
    assert s["optimizer_seconds"] == 4 * OPT and s["other_seconds"] == 4 * OTHER
    # logged every 2 steps: per-step averages over the interval
    step = 3 * DATA + 3 * FWD + 2 * OTHER + OPT + OTHER
    assert logger.series("wallclock/step_seconds") == [(1, step), (3, step)]
    assert logger.series("wallclock/refresh_seconds") == [(1, REFRESH / 2), (3, REFRESH / 2)]


def test_logging_interval_follows_the_trainer_by_default(clock: FakeClock) -> None:
    cb = WallClock(verbose=False)
    _, logger = _fit(clock, cb, max_steps=7, log_every=3)
    step = DATA + FWD + OPT + OTHER
    assert logger.series("wallclock/step_seconds") == [(2, step), (5, step)]
    # the interval's average: one refresh (step 2) in the first three, two (steps 4, 6) in the next
    assert logger.series("wallclock/refresh_seconds") == [(2, REFRESH / 3), (5, 2 * REFRESH / 3)]


def test_mfu_from_given_flops_and_peak(clock: FakeClock) -> None:
    cb = WallClock(flops_per_token=1000.0, peak_flops=1e6, verbose=False)
    _, logger = _fit(clock, cb, max_steps=2)
    step = DATA + FWD + OPT + OTHER
    assert cb.summary["mfu"] == pytest.approx(1000.0 * (B * T / step) / 1e6, rel=1e-12)
    assert [v for _, v in logger.series("wallclock/mfu")] == pytest.approx([1000.0 * B * T / step / 1e6] * 2)


def test_flops_per_token_read_from_the_model(clock: FakeClock) -> None:
    class WithFlops(ClockedModule):
        def flops_per_token(self, seq_len: int | None = None) -> float:
            self.asked = seq_len
            return 500.0

    cb = WallClock(peak_flops=1e6, verbose=False)
    module = WithFlops(clock)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader(2))
    assert module.asked == T  # the trained sequence length, from the (B, T + 1) batch
    assert cb.summary["mfu"] == pytest.approx(500.0 * cb.summary["tokens_per_sec"] / 1e6)


def test_targets_on_training_loss_reached_at_the_right_step(clock: FakeClock, capsys: pytest.CaptureFixture) -> None:
    cb = WallClock(targets=[3.5, 3.25, 1.0])
    _, logger = _fit(clock, cb, max_steps=8, accumulate=2)
    step = 2 * DATA + 2 * FWD + OTHER + OPT + OTHER
    t35, t325 = cb.summary["targets"]["3.5"], cb.summary["targets"]["3.25"]
    # LOSSES: 5.0 4.0 4.5 3.4 ... -> first ≤ 3.5 after step 4, first ≤ 3.25 after step 6 (3.2)
    assert (t35["step"], t35["tokens"], t35["train_seconds"]) == (4, 4 * 2 * B * T, 4 * step)
    assert (t325["step"], t325["tokens"], t325["train_seconds"]) == (6, 6 * 2 * B * T, 6 * step)
    assert cb.summary["targets"]["1"] is None
    assert logger.series("wallclock/target_3.5/tokens") == [(3, 4 * 2 * B * T)]
    assert logger.series("wallclock/target_3.25/step") == [(5, 6)]
    out = capsys.readouterr().out
    assert "WallClock summary" in out and "optimizer share" in out and "not reached" in out


def test_targets_on_a_logged_validation_metric(clock: FakeClock) -> None:
    cb = WallClock(targets=[3.0], monitor="val/loss", verbose=False)
    _fit(clock, cb, max_steps=8, val_every=2)
    # val/loss after step k is LOSSES[k - 1] - 0.5: ≤ 3.0 first after step 4 (3.4 - 0.5)
    rec = cb.summary["targets"]["3"]
    assert (rec["step"], rec["tokens"], rec["loss"]) == (4, 4 * B * T, pytest.approx(2.9))
    assert rec["train_seconds"] == 4 * (DATA + FWD + OPT + OTHER)
    assert rec["elapsed_seconds"] == rec["train_seconds"] + 2 * 2 * VAL  # two validations of 2 batches


def test_evaluation_blocks_are_charged_to_eval_not_data(clock: FakeClock) -> None:
    class Evaluate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            with WallClock.time_evaluation(trainer):
                clock.advance(2.0)

    cb = WallClock(verbose=False)
    _fit(clock, cb, max_steps=3, extra=[Evaluate()])
    assert cb.summary["eval_seconds"] == 3 * 2.0
    assert cb.summary["data_seconds"] == 3 * DATA


def test_test_loop_counts_as_evaluation(clock: FakeClock) -> None:
    cb = WallClock(verbose=False)
    trainer, _ = _fit(clock, cb, max_steps=2)
    trainer.test(trainer.lightning_module, _loader(3), verbose=False)
    assert cb.summary["eval_seconds"] == 3 * VAL / 2
    assert cb.summary["train_seconds"] == 2 * (DATA + FWD + OPT + OTHER)


def test_resume_continues_the_clock(clock: FakeClock, tmp_path) -> None:  # noqa: ANN001
    full = WallClock(targets=[3.5], verbose=False)
    _fit(clock, full, max_steps=8, batches=4)

    first = WallClock(targets=[3.5], verbose=False)
    trainer, _ = _fit(clock, first, max_steps=4, batches=4)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert first.summary["targets"]["3.5"]["step"] == 4
    second = WallClock(targets=[3.5], verbose=False)
    _, logger = _fit(clock, second, max_steps=8, batches=4, ckpt_path=str(tmp_path / "mid.ckpt"))

    a, b = full.summary, second.summary
    for key in ("steps", "tokens", "train_seconds", "data_seconds", "fwd_bwd_seconds", "optimizer_seconds", "refresh_seconds"):
        assert a[key] == b[key], key
    assert b["targets"] == a["targets"]
    assert logger.series("wallclock/target_3.5/step") == []  # reached before the resume: not logged again
    assert logger.series("wallclock/train_seconds")[0] == (4, 5 * (DATA + FWD + OPT + OTHER))
    assert b["elapsed_seconds"] >= first.summary["elapsed_seconds"] + 4 * (DATA + FWD + OPT + OTHER)


def test_logger_receives_the_documented_keys(clock: FakeClock) -> None:
    cb = WallClock(targets=[4.25], flops_per_token=10.0, peak_flops=1e9, verbose=False)
    _, logger = _fit(clock, cb, max_steps=2, val_every=2)
    expected = {f"wallclock/{k}" for k in (
        "step_seconds", "data_seconds", "fwd_bwd_seconds", "optimizer_seconds", "refresh_seconds", "other_seconds",
        "optimizer_share", "tokens_per_sec", "mfu", "train_seconds", "elapsed_seconds", "val_seconds",
        "target_4.25/step", "target_4.25/tokens", "target_4.25/train_seconds", "target_4.25/elapsed_seconds")}
    assert expected <= logger.keys()


def test_hooks_removed_after_fit(clock: FakeClock) -> None:
    cb = WallClock(verbose=False)
    trainer, _ = _fit(clock, cb, max_steps=1)
    assert cb._handles == []
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


@pytest.fixture
def ampere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning asks the (absent) GPU whether it has TF32 for 32-bit precision: say it has."""
    monkeypatch.setattr(lightning.fabric.accelerators.cuda, "_is_ampere_or_later", lambda device=None: True)


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        # from Lightning's get_available_flops
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),
        ("NVIDIA H100 PCIe", "16-mixed", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA L4", "bf16-mixed", 121e12),
        # from PEAK_FLOPS_CORRECTIONS (NVIDIA data sheets, dense)
        ("NVIDIA H100 NVL", "bf16-true", 835.5e12),
        ("NVIDIA H200", "bf16-mixed", 989.5e12),
        ("NVIDIA H200 NVL", "bf16-mixed", 835.5e12),
        ("NVIDIA GH200 480GB", "bf16-mixed", 989.5e12),
        ("NVIDIA L40S", "bf16-mixed", 362.05e12),
        ("NVIDIA L40", "bf16-mixed", 181.05e12),
        ("NVIDIA A100-SXM4-80GB", "64-true", None),
        ("Some Future GPU", "bf16-mixed", None),
    ],
)
def test_peak_flops_table(monkeypatch: pytest.MonkeyPatch, ampere: None, name: str, precision: str,
                          expected: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_for(torch.device("cuda", 0), precision) == expected
    assert peak_flops_for(torch.device("cpu"), precision) is None


@pytest.mark.parametrize(
    "name, corrected",
    [("NVIDIA H100 80GB HBM3", False), ("NVIDIA A100-SXM4-80GB", False), ("NVIDIA L4", False),
     ("NVIDIA L40S", True), ("NVIDIA L40", True), ("NVIDIA H100 NVL", True), ("NVIDIA H200", True)],
)
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_peak_flops_come_from_lightning_unless_corrected(monkeypatch: pytest.MonkeyPatch, ampere: None, name: str,
                                                         corrected: bool, precision: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # 32-true: the TF32 peak
    cuda = torch.device("cuda", 0)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning warns about the devices it does not know
        lightnings = get_available_flops(cuda, dtype)
    ours = peak_flops_for(cuda, precision)
    assert any(chip in name.lower() for chip, _ in PEAK_FLOPS_CORRECTIONS) == corrected
    if corrected:  # Lightning's number is wrong (L40S gets the L4's, H100 NVL twice the dense peak) or missing
        assert ours != lightnings
        row = next(v for chip, v in PEAK_FLOPS_CORRECTIONS if chip in name.lower())
        assert ours == (row[0] if dtype is torch.bfloat16 else row[1])
    else:
        assert ours == float(lightnings)


def test_peak_flops_fp32_depends_on_matmul_precision(monkeypatch: pytest.MonkeyPatch, ampere: None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops_for(torch.device("cuda", 0), "32-true") == 66.9e12  # Lightning's FP32
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops_for(torch.device("cuda", 0), "32-true") == 494.7e12  # Lightning's TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert peak_flops_for(torch.device("cuda", 0), "32-true") == 183e12  # corrected TF32
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops_for(torch.device("cuda", 0), "32-true") == 91.6e12  # corrected FP32


@pytest.mark.parametrize("name, peak", [("NVIDIA A100-SXM4-80GB", 156e12), ("NVIDIA L40S", 183e12)])
def test_mfu_with_the_device_peak(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, ampere: None, name: str,
                                  peak: float) -> None:
    # the module runs on the CPU; the callback is told it runs on the named GPU (32-true: TF32 peak)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    real = wallclock.peak_flops_for
    monkeypatch.setattr(wallclock, "peak_flops_for", lambda device, precision: real(torch.device("cuda", 0), precision))
    fpt = 6e9
    cb = WallClock(flops_per_token=fpt, verbose=False)
    _, logger = _fit(clock, cb, max_steps=4, log_every=2)
    assert cb._peak == peak
    tokens_per_sec = logger.series("wallclock/tokens_per_sec")
    mfu = logger.series("wallclock/mfu")
    assert [st for st, _ in mfu] == [st for st, _ in tokens_per_sec] == [1, 3]
    step = DATA + FWD + OPT + OTHER
    for (_, tps), (_, m) in zip(tokens_per_sec, mfu):
        assert tps == pytest.approx(B * T / step, rel=1e-12)
        assert m == pytest.approx(fpt * tps / peak, rel=1e-12)
    assert cb.summary["mfu"] == pytest.approx(fpt * cb.summary["tokens_per_sec"] / peak, rel=1e-12)


def test_peak_flops_argument_overrides_the_device(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(wallclock, "peak_flops_for", lambda device, precision: 362.05e12)
    cb = WallClock(flops_per_token=1000.0, peak_flops=1e6, verbose=False)
    _fit(clock, cb, max_steps=1)
    assert cb._peak == 1e6


def test_tokens_per_batch() -> None:
    assert default_tokens_per_batch(torch.zeros(4, 9, dtype=torch.long)) == 32
    assert default_tokens_per_batch((torch.zeros(4, 8), torch.zeros(4, 8))) == 32
    assert default_tokens_per_batch({"input_ids": torch.zeros(2, 5)}) == 10
    assert default_tokens_per_batch("text") is None


def test_custom_tokens_per_batch(clock: FakeClock) -> None:
    cb = WallClock(tokens_per_batch=lambda batch: 7, verbose=False)
    _fit(clock, cb, max_steps=2)
    assert cb.summary["tokens"] == 14


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=[3.5, float("nan")]), "targets must be finite"),
        (dict(targets=["3.5"]), "targets must be finite"),
        (dict(log_every_n_steps=0), "log_every_n_steps must be an integer ≥ 1 or None"),
        (dict(flops_per_token=-1.0), "flops_per_token must be a positive number"),
        (dict(peak_flops=0), "peak_flops must be a positive number"),
        (dict(monitor=""), "monitor must be a logged metric name"),
        (dict(tokens_per_batch=3), "tokens_per_batch must be a callable"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WallClock(**kwargs)


def test_format_summary_lists_targets() -> None:
    cb = WallClock(targets=[3.0])
    text = format_summary(cb.summary)
    assert "target loss 3" in text and "not reached" in text
