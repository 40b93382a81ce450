"""StabilityMonitor: each statistic against a direct computation, spikes, resume, zero effect on training."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_optlab.callbacks.stability import LossSpikeDetector, StabilityMonitor
from lightning_optlab.callbacks.wallclock import WallClock
from lightning_optlab.configure import OptimizerSpec
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig
from lightning_optlab.params import classify_parameters

VOCAB, T, B = 32, 8, 4


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

    def at(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, m in self.calls:
            if s == step:
                out.update(m)
        return out

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(s, m[key]) for s, m in self.calls if key in m]


def _loader(n: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(torch.randint(0, VOCAB, (n * B, T + 1), generator=g), batch_size=B)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=16))


def _trainer(callbacks: list[Callback], max_steps: int, logger=False, accumulate: int = 1) -> L.Trainer:  # noqa: ANN001
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, callbacks=callbacks,
                     accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)


class Witness(Callback):
    """Before the monitor: the model and batches of every step; after it, the weights."""

    def __init__(self) -> None:
        self.models: dict[int, nn.Module] = {}
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        step = trainer.global_step
        if step not in self.models:
            self.models[step] = copy.deepcopy(pl_module.model)
        self.batches.setdefault(step, []).append(batch.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


class Probe(Callback):
    """After the monitor: whether recording is switched on during each step."""

    def __init__(self) -> None:
        self.flags: dict[int, tuple[list[bool], int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        attn = [b.attn.record_max_logit for b in pl_module.model.blocks]
        self.flags[trainer.global_step] = (attn, len(pl_module.model._forward_hooks))


def _direct_max_logit(model: GPT, layer: int, idx: torch.Tensor) -> float:
    """max over heads and causal pairs of s·q·k, from the attention input, re-derived by hand."""
    seen = {}
    attn = model.blocks[layer].attn
    handle = attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(idx)
        handle.remove()
        x = seen["x"]
        b, t, c = x.shape
        h = model.config.n_head
        q = attn.q_norm(attn.q_proj(x).view(b, t, h, c // h).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(x).view(b, t, h, c // h).transpose(1, 2))
        s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(c // h)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return s[..., causal].max().item()


def test_statistics_match_direct_computation() -> None:
    witness, probe, logger = Witness(), Probe(), RecordingLogger()
    monitor = StabilityMonitor(every_n_steps=2)
    module = CausalLMModule(_gpt(), OptimizerSpec(name="adamw", lr=1e-2, weight_decay=0.1))
    _trainer([witness, monitor, probe], max_steps=3, logger=logger, accumulate=2).fit(module, _loader(8))

    # recording is on for monitored steps 0 and 2 only (both micro-batches), off in between
    assert probe.flags[0] == ([True, True], 1) and probe.flags[2] == ([True, True], 1)
    assert probe.flags[1] == ([False, False], 0)
    assert all(not b.attn.record_max_logit for b in module.model.blocks) and not module.model._forward_hooks
    assert "stability/logit_rms" not in logger.at(1)

    for step in (0, 2):
        logged, model, batches = logger.at(step), witness.models[step], witness.batches[step]
        assert len(batches) == 2
        with torch.no_grad():
            logits = [model(b[:, :-1]).double() for b in batches]
        rms = math.sqrt(sum(z.pow(2).mean().item() for z in logits) / 2)
        log_z = sum(torch.logsumexp(z, -1).mean().item() for z in logits) / 2
        assert logged["stability/logit_rms"] == pytest.approx(rms, rel=1e-5)
        assert logged["stability/log_z_mean"] == pytest.approx(log_z, rel=1e-5)
        per_layer = [max(_direct_max_logit(model, i, b[:, :-1]) for b in batches) for i in range(2)]
        for i, value in enumerate(per_layer):
            assert logged[f"stability/attn_max_logit/model.blocks.{i}.attn"] == pytest.approx(value, rel=1e-5)
        assert logged["stability/attn_max_logit"] == pytest.approx(max(per_layer), rel=1e-5)
        before = dict(model.named_parameters())
        roles = classify_parameters(module)
        ratios, role_dw, role_w = {}, {}, {}
        for name, w1 in witness.after[step + 1].items():
            w0 = before[name].detach().double()
            dw, w = (w1.double() - w0).norm().item(), w0.norm().item()
            role = roles[f"model.{name}"]
            role_dw[role] = role_dw.get(role, 0.0) + dw**2
            role_w[role] = role_w.get(role, 0.0) + w**2
            key = f"stability/update_ratio/model.{name}"
            if w0.ndim >= 2:
                assert logged[key] == pytest.approx(dw / w, rel=1e-5)  # one key per weight matrix
            else:
                assert key not in logged
            if w > 0:
                ratios[name] = dw / w
        for role in role_w:
            if role_w[role] == 0:  # the zero-initialized biases of step 0
                assert f"stability/update_ratio_role/{role}" not in logged
                continue
            expected = math.sqrt(role_dw[role] / role_w[role])
            assert logged[f"stability/update_ratio_role/{role}"] == pytest.approx(expected, rel=1e-5)
        assert set(role_w) == {"embedding", "hidden", "readout", "norm", "bias"}
        assert logged["stability/update_ratio_max"] == pytest.approx(max(ratios.values()), rel=1e-5)


class StandInAttention(nn.Module):
    """A minimal attention layer implementing the ``record_max_logit``/``max_logit`` contract."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.record_max_logit, self.max_logit = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x)
        if self.record_max_logit:
            with torch.no_grad():
                s = q @ k.transpose(-2, -1)
                t = x.shape[1]
                self.max_logit = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf).amax().float()
        return F.scaled_dot_product_attention(q, k, self.v(x), is_causal=True, scale=1.0)


class StandInLM(nn.Module):
    """No ``optlab_readout``: the readout is found by the parameter-role rule (last Linear)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = StandInAttention(8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        return self.out(h + self.mix(h)) * 3.0  # a logit multiplier outside the readout layer


def test_stand_in_model_and_params_readout_rule() -> None:
    witness, logger = Witness(), RecordingLogger()
    monitor = StabilityMonitor(every_n_steps=1, relative_updates=False, per_layer=False)
    module = CausalLMModule(StandInLM(), OptimizerSpec(name="sgd", lr=0.1))
    _trainer([witness, monitor], max_steps=2, logger=logger).fit(module, _loader(2))
    for step in (0, 1):
        model, (batch,) = witness.models[step], witness.batches[step]
        logged = logger.at(step)
        with torch.no_grad():
            h = model.emb(batch[:, :-1])
            readout = model.out(h + model.mix(h)).double()  # the readout layer's own output
            q, k = model.mix.q(h), model.mix.k(h)
            s = (q.double() @ k.double().transpose(-2, -1))[..., torch.ones(T, T, dtype=torch.bool).tril()]
        assert logged["stability/logit_rms"] == pytest.approx(readout.pow(2).mean().sqrt().item(), rel=1e-5)
        assert logged["stability/log_z_mean"] == pytest.approx(torch.logsumexp(readout, -1).mean().item(), rel=1e-5)
        assert logged["stability/attn_max_logit"] == pytest.approx(s.max().item(), rel=1e-5)
        assert not any("/mix" in k or "update_ratio" in k for k in logged)  # per_layer=False, no updates


def test_readout_argument_names_the_hooked_module() -> None:
    logger = RecordingLogger()
    witness = Witness()
    monitor = StabilityMonitor(every_n_steps=1, attention=False, relative_updates=False, readout="model")
    module = CausalLMModule(StandInLM(), OptimizerSpec(name="sgd", lr=0.1))
    _trainer([witness, monitor], max_steps=1, logger=logger).fit(module, _loader(1))
    with torch.no_grad():
        logits = witness.models[0](witness.batches[0][0][:, :-1]).double()  # includes the × 3
    assert logger.at(0)["stability/logit_rms"] == pytest.approx(logits.pow(2).mean().sqrt().item(), rel=1e-5)

    bad = StabilityMonitor(readout="model.nope")
    with pytest.raises(ValueError, match="readout module 'model.nope' not found"):
        _trainer([bad], max_steps=1).fit(CausalLMModule(StandInLM(), OptimizerSpec(name="sgd", lr=0.1)), _loader(1))


def test_spike_detector_on_a_synthetic_sequence() -> None:
    det = LossSpikeDetector(threshold=1.5, window=8, warmup=4)
    falling = [10.0 / (1 + i) for i in range(30)]
    assert all(det.update(x) is None for x in falling)  # a falling loss never spikes

    det = LossSpikeDetector(threshold=1.5, window=8, warmup=4)
    seq = [3.0, 3.1, 2.9, 3.2, 2.95, 5.0, 3.0, float("nan"), 3.05, 4.4, 4.7]
    out = [det.update(x) for x in seq]
    # warm-up: nothing in the first 4; 5.0 > 1.5 · median(3.0, 3.1, 2.9, 3.2, 2.95) = 4.5
    assert out[:5] == [None] * 5
    assert out[5] == pytest.approx(5.0 / 3.0)
    assert out[6] is None and math.isnan(out[7])  # non-finite: a spike, kept out of the window
    assert out[8] is None
    assert out[9] is None  # 4.4 < 1.5 · 3.025 = 4.5375
    # the window now holds the last 8: 3.1, 2.9, 3.2, 2.95, 5.0, 3.0, 3.05, 4.4 (median 3.075)
    assert out[10] == pytest.approx(4.7 / 3.075)
    assert list(det.history)[-1] == 4.7 and len(det.history) == 8


SCHEDULE = [3.0, 3.1, 2.9, 3.0, 3.05, 2.95, 3.0, 6.0, 3.0, 2.9, 3.0, 2.95, 9.0, 3.0]


class ScheduledLoss(L.LightningModule):
    """Reports SCHEDULE[step] as its loss (real gradients)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 4), nn.Linear(4, VOCAB)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = F.cross_entropy(self.head(self.emb(batch[:, :-1])).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        return loss - loss.detach() + SCHEDULE[self.global_step]

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_spikes_counted_and_logged_at_their_step() -> None:
    logger = RecordingLogger()
    monitor = StabilityMonitor(every_n_steps=5, spike_threshold=1.5, spike_window=10, spike_warmup=3)
    _trainer([monitor], max_steps=len(SCHEDULE), logger=logger).fit(ScheduledLoss(), _loader(len(SCHEDULE)))
    assert monitor.spike_count == 2
    assert [(s, l) for s, l, _ in monitor.spikes] == [(7, 6.0), (12, 9.0)]
    assert logger.series("stability/loss_spike_ratio") == [(7, pytest.approx(2.0)), (12, pytest.approx(3.0))]
    # checked in batches (no sync per step): on monitored steps 0, 5, 10 and at the end
    assert [s for s, _ in logger.series("stability/spike_count")] == [0, 5, 10, 13]
    assert logger.series("stability/spike_count")[-1][1] == 2.0


class SaveAt(Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_continues_the_spike_series(tmp_path) -> None:  # noqa: ANN001
    def monitor() -> StabilityMonitor:
        return StabilityMonitor(every_n_steps=5, spike_threshold=1.5, spike_window=10, spike_warmup=3)

    full = monitor()
    _trainer([full], max_steps=len(SCHEDULE)).fit(ScheduledLoss(), _loader(len(SCHEDULE)))
    first = monitor()
    path = str(tmp_path / "mid.ckpt")
    _trainer([first, SaveAt(9, path)], max_steps=9).fit(ScheduledLoss(), _loader(len(SCHEDULE)))
    state = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    # steps 6-8 (with the spike at 7) were not checked yet: they travel in the checkpoint
    assert state["spike_count"] == 0 and [s for s, _ in state["pending"]] == [6, 7, 8]
    second = monitor()
    _trainer([second], max_steps=len(SCHEDULE)).fit(ScheduledLoss(), _loader(len(SCHEDULE)), ckpt_path=path)
    assert second.spikes == full.spikes and second.spike_count == full.spike_count == 2
    assert list(second.detector.history) == list(full.detector.history)


def test_identical_losses_with_and_without_the_callbacks() -> None:
    def run(callbacks: list[Callback]) -> tuple[list[float], list[torch.Tensor]]:
        losses: list[float] = []

        class Record(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                losses.append(outputs["loss"].item())

        L.seed_everything(0, verbose=False)
        module = CausalLMModule(_gpt(), OptimizerSpec(name="adamw", lr=1e-2, weight_decay=0.1))
        _trainer([*callbacks, Record()], max_steps=5, accumulate=2).fit(module, _loader(10))
        return losses, [p.detach().clone() for p in module.parameters()]

    plain_losses, plain_params = run([])
    losses, params = run([WallClock(targets=[3.0], verbose=False), StabilityMonitor(every_n_steps=2)])
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))


def test_warns_without_attention_modules() -> None:
    module = CausalLMModule(nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, VOCAB)), OptimizerSpec(name="sgd", lr=0.1))
    with pytest.warns(UserWarning, match="record_max_logit"):
        _trainer([StabilityMonitor(every_n_steps=1)], max_steps=1).fit(module, _loader(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps must be an integer ≥ 1"),
        (dict(spike_threshold=1.0), "spike_threshold must be a factor > 1"),
        (dict(spike_threshold=float("inf")), "spike_threshold must be a factor > 1"),
        (dict(spike_window=0), "spike_window must be an integer ≥ 1"),
        (dict(spike_window=5, spike_warmup=6), r"spike_warmup \(6\) must be ≤ spike_window \(5\)"),
        (dict(readout=""), "readout must be a module name"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StabilityMonitor(**kwargs)
