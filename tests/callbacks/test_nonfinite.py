"""NonFiniteGuard: raise / skip / stop on a NaN injected at a chosen step, through a tiny Lightning run."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_optlab import OptimizerSpec
from lightning_optlab.callbacks.nonfinite import NonFiniteError, NonFiniteGuard, nonfinite_indices
from lightning_optlab.lit import CausalLMModule
from lightning_optlab.models import GPT, GPTConfig
from lightning_optlab.optim import available_optimizers, get_optimizer_class

READOUT = "model.lm_head.weight"

SPECS = {name: dict(name=name, lr=3e-3, weight_decay=0.1) for name in available_optimizers()}
SPECS["sgd"] = dict(name="sgd", lr=0.1, betas=(0.9, 0.0))
SPECS["adam_mini"] = dict(name="adam_mini", lr=3e-3, hparams={"n_heads": 2})
SPECS["sophia"] = dict(name="sophia", lr=1e-3)  # Hessian estimates at steps 0, 10, ...: not at the skipped step
for _name in list(SPECS):  # matrix-only methods (Muon) take hidden matrices; the rest goes to AdamW
    if get_optimizer_class(_name).traits.matrix_only:
        SPECS[_name] = dict(name=_name, lr=0.02, mix=[dict(optimizer="adamw", roles=["embedding", "readout", "norm", "bias"])])
SPECS["sgd+adalayer"] = dict(name="sgd", lr=0.1, betas=(0.98, 0.0),
                             mix=[dict(optimizer="adalayer", roles=["readout", "norm"], lr=3e-3)])


def _data(n_batches=10, batch=4, seq=16):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (n_batches * batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1) * torch.randint(1, 3, (n_batches * batch, 1), generator=g)) % 32
    return DataLoader(list(tokens), batch_size=batch, shuffle=False)


def _module(spec=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return CausalLMModule(model, OptimizerSpec(**(spec or SPECS["adamw"])))


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, callbacks=callbacks, **kw)


def _raw(trainer):
    return trainer.optimizers[0]


class NaNGradient(Callback):
    """Puts a NaN (or inf) into one gradient coordinate of ``name`` at optimizer step ``at``."""

    def __init__(self, at, name=READOUT, value=math.nan):
        self.at, self.name, self.value = at, name, value

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.at:
            dict(pl_module.named_parameters())[self.name].grad.view(-1)[3] = self.value


class InfiniteLR(Callback):
    """Finite gradients, non-finite update: the learning rate is inf for step ``at`` (the constant
    schedule sets it back when it steps)."""

    def __init__(self, at):
        self.at = at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            for g in optimizer.param_groups:
                g["lr"] = math.inf


class Recorder(Callback):
    """Parameters and optimizer state (deep copies) at the start and end of every batch."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _snap(trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        opt = _raw(trainer)
        state = copy.deepcopy(opt.state_dict())
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in opt.param_groups]
        return params, state, copy.deepcopy(groups)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = self._snap(trainer, pl_module)


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# --- the fused check -------------------------------------------------------------------------------


def test_nonfinite_indices_finds_exactly_the_bad_tensors():
    ts = [torch.randn(5, 3), torch.randn(4), torch.full((2,), 1e38), torch.empty(0), torch.randn(3).half()]
    assert nonfinite_indices(ts) == []  # 1e38 is finite: its 2-norm would overflow, its inf-norm does not
    ts[1][2] = math.nan
    ts[4][0] = math.inf
    assert nonfinite_indices(ts) == [1, 4]
    assert nonfinite_indices([]) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(action="ignore"), "action must be one of"),
    (dict(check_every_n_steps=0), "check_every_n_steps must be an integer ≥ 1, got 0"),
    (dict(max_consecutive_skips=-1), "max_consecutive_skips"),
    (dict(snapshot="yes"), "snapshot must be True or False"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonFiniteGuard(**kwargs)


# --- raise ----------------------------------------------------------------------------------------


def test_raise_names_parameter_and_step_before_the_update(tmp_path):
    rec = Recorder()
    module = _module()
    with pytest.raises(NonFiniteError, match=r"gradient at step 3 .*model\.lm_head\.weight \(nan\)"):
        _trainer(tmp_path, [rec, NaNGradient(at=3), NonFiniteGuard("raise", check_every_n_steps=1)], max_steps=5).fit(module, _data())
    params_before, _, _ = rec.before[3]
    for name, p in module.named_parameters():
        assert torch.equal(p, params_before[name]), f"{name} was updated although its gradient was NaN"


def test_raise_on_a_nonfinite_update_from_finite_gradients(tmp_path):
    with pytest.raises(NonFiniteError, match=r"update after the update at step 2 .*parameter model\."):
        _trainer(tmp_path, [InfiniteLR(at=2), NonFiniteGuard("raise", check_every_n_steps=1)], max_steps=4).fit(_module(), _data())


def test_raise_on_nonfinite_optimizer_state(tmp_path):
    class PoisonState(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:  # after step index 1; found after the update of step 2
                p = dict(pl_module.named_parameters())[READOUT]
                _raw(trainer).state[p]["exp_avg_sq"].view(-1)[0] = math.inf

    with pytest.raises(NonFiniteError, match=r"optimizer state after the update at step 2 .*'exp_avg_sq' of model\.lm_head"):
        _trainer(tmp_path, [PoisonState(), NonFiniteGuard("raise", check_every_n_steps=1)], max_steps=4).fit(_module(), _data())


# --- skip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(SPECS))
def test_skip_leaves_params_and_state_bitwise_untouched_and_training_continues(label, tmp_path):
    rec = Recorder()
    guard = NonFiniteGuard("skip")
    module = _module(SPECS[label])
    k = 2
    trainer = _trainer(tmp_path, [rec, NaNGradient(at=k), guard], max_steps=4)
    with pytest.warns(UserWarning, match=f"skipped the update of step {k}"):
        trainer.fit(module, _data())
    assert trainer.global_step == 4
    before, after = rec.before[k], rec.after[k + 1]  # around the skipped update
    for part, a, b in zip(("parameters", "optimizer state", "param-group entries"), before, after):
        assert _equal(a, b), f"{label}: {part} changed by the skipped step"
    assert not _equal(rec.after[k + 1][0], rec.after[4][0]), "training did not continue after the skip"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [(e["step"], e["where"], e["action"]) for e in guard.events] == [(k, "gradient", "skip")]
    assert READOUT in guard.events[0]["tensors"][0]


def test_skip_with_snapshot_undoes_a_nonfinite_update(tmp_path):
    rec = Recorder()
    module = _module()
    trainer = _trainer(tmp_path, [rec, NonFiniteGuard("skip", snapshot=True), InfiniteLR(at=2)], max_steps=4)
    with pytest.warns(UserWarning, match="skipped the update of step 2"):
        trainer.fit(module, _data())
    assert trainer.global_step == 4
    for a, b in zip(rec.before[2], rec.after[3]):
        assert _equal(a, b)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [g["lr"] for g in _raw(trainer).param_groups] == [3e-3] * len(_raw(trainer).param_groups)


def test_skip_without_snapshot_cannot_undo_an_update_and_raises(tmp_path):
    with pytest.raises(NonFiniteError, match=r"snapshot=True"):
        _trainer(tmp_path, [NonFiniteGuard("skip"), InfiniteLR(at=2)], max_steps=4).fit(_module(), _data())


def test_sophia_estimator_state_is_restored_with_snapshot(tmp_path):
    """Sophia updates its Hessian in the training step (update_period=2: at steps 0, 2, ...),
    before the gradient check; only the snapshot puts it back."""
    rec = Recorder()
    module = _module(dict(name="sophia", lr=1e-3, hparams={"update_period": 2}))
    trainer = _trainer(tmp_path, [rec, NaNGradient(at=2), NonFiniteGuard("skip", snapshot=True)], max_steps=4)
    with pytest.warns(UserWarning, match="skipped the update of step 2"):
        trainer.fit(module, _data())
    for a, b in zip(rec.before[2], rec.after[3]):
        assert _equal(a, b)


def test_too_many_consecutive_skips_raise(tmp_path):
    class AlwaysNaN(NaNGradient):
        def on_after_backward(self, trainer, pl_module):
            dict(pl_module.named_parameters())[self.name].grad.view(-1)[0] = math.nan

    with pytest.raises(NonFiniteError, match="skipped 3 steps in a row"), pytest.warns(UserWarning):
        guard = NonFiniteGuard("skip", max_consecutive_skips=2)
        _trainer(tmp_path, [AlwaysNaN(at=0), guard], max_steps=5).fit(_module(), _data())


def test_checks_follow_check_every_n_steps(tmp_path):
    guard = NonFiniteGuard("skip", check_every_n_steps=2)
    with pytest.warns(UserWarning, match="step 2"), pytest.raises(NonFiniteError, match="end of training"):
        _trainer(tmp_path, [NaNGradient(at=1), guard], max_steps=3).fit(_module(), _data())
    # step 1 is not checked: its NaN reaches the weights, and the next checked step (2) finds
    # the gradients the NaN weights produce; skipping cannot undo step 1, so the run does not
    # end quietly: the last check, at the end of training, raises
    assert [(e["step"], e["where"]) for e in guard.events] == [(2, "gradient"), (3, "end of training")]


def test_weights_only_checkpoints_are_never_written_with_nan(tmp_path):
    """Lightning skips on_save_checkpoint for weights-only saves; the guard checks before them."""
    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=1, save_last=True,
                            save_weights_only=True, filename="{step}")
    guard = NonFiniteGuard()  # raise, checked every 20 steps: the NaN at step 3 is not seen by a step check
    trainer = _trainer(tmp_path, [NaNGradient(at=3), guard, saver], max_steps=10, enable_checkpointing=True)
    with pytest.raises(NonFiniteError, match="weights-only checkpoint"):
        trainer.fit(_module(), _data())
    files = sorted(p.name for p in ckpt_dir.iterdir())
    assert files == ["last.ckpt", "step=2.ckpt"]
    for name in files:
        sd = torch.load(ckpt_dir / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values())


# --- stop -----------------------------------------------------------------------------------------


def test_stop_saves_the_last_good_state_and_stops(tmp_path):
    rec = Recorder()
    guard = NonFiniteGuard("stop")
    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = _trainer(tmp_path, [rec, NaNGradient(at=5), guard, saver], max_steps=8, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="saved the state from before that update"):
        trainer.fit(_module(), _data())
    assert trainer.global_step == 6 and trainer.should_stop  # stopped right after the bad step
    path = ckpt_dir / "nonfinite-guard-before-step=5.ckpt"
    assert guard.saved_checkpoints == [str(path)]
    saved = torch.load(path, weights_only=False)
    good = rec.before[5][0]
    assert saved["state_dict"].keys() == good.keys()
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, good[name]), name
    assert _equal(saved["optimizer_states"][0]["state"], rec.before[5][1]["state"])
    # the checkpoint saved before the NaN is intact and readable
    earlier = torch.load(ckpt_dir / "step=4.ckpt", weights_only=False)
    for name, value in earlier["state_dict"].items():
        assert torch.equal(value, rec.after[4][0][name]), name
    # and the guard's checkpoint resumes training
    resumed = _trainer(tmp_path / "resume", [], max_steps=7)
    resumed.fit(_module(), _data(), ckpt_path=path)
    assert resumed.global_step == 7


def test_stop_with_snapshot_after_a_nonfinite_update(tmp_path):
    rec = Recorder()
    guard = NonFiniteGuard("stop", snapshot=True, dirpath=tmp_path / "guard")
    trainer = _trainer(tmp_path, [rec, guard, InfiniteLR(at=3)], max_steps=8)
    with pytest.warns(UserWarning, match="stopped training"):
        trainer.fit(_module(), _data())
    assert trainer.global_step == 4
    saved = torch.load(tmp_path / "guard" / "nonfinite-guard-before-step=3.ckpt", weights_only=False)
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, rec.before[3][0][name]), name


def test_events_round_trip_through_state_dict():
    guard = NonFiniteGuard("skip")
    guard.events = [{"step": 3, "where": "gradient", "tensors": ["x (nan)"], "action": "skip"}]
    other = NonFiniteGuard("skip")
    other.load_state_dict(copy.deepcopy(guard.state_dict()))
    assert other.events == guard.events


# --- defaults, the fast check's overflow, and checkpoints ------------------------------------------


def test_default_rate_depends_on_the_action():
    assert NonFiniteGuard().check_every_n_steps == 20  # raise: a NaN in the weights stays, found later
    assert NonFiniteGuard("skip").check_every_n_steps == 1  # every bad update must be caught to be undone
    assert NonFiniteGuard("stop").check_every_n_steps == 1
    assert NonFiniteGuard("raise", check_every_n_steps=3).check_every_n_steps == 3


def test_fast_check_overflow_is_confirmed_not_reported():
    # 1-norms of these overflow float32 (and float16), but every value is finite
    ts = [torch.full((4, 4), 3e38), torch.full((8,), 6e4).half(), torch.randn(3, dtype=torch.float64),
          torch.full((1 << 16,), 3e38)]  # the last is summed on its own (large), the others concatenated
    assert torch.isinf(ts[0].sum()) and torch.isinf(ts[3].sum())
    assert nonfinite_indices(ts) == []
    ts[1][5] = -math.inf
    ts[3][7] = math.nan
    assert nonfinite_indices(ts) == [1, 3]
    # +inf and -inf in one batch cancel to NaN, not to a finite number
    assert nonfinite_indices([torch.tensor([math.inf]), torch.tensor([-math.inf])]) == [0, 1]
    # a non-contiguous view is checked too
    x = torch.randn(6, 6)
    x[2, 3] = math.nan
    assert nonfinite_indices([x.t()[1::2]]) == [0] and nonfinite_indices([x.t()[::2]]) == []  # column 3 of x


def test_default_raise_finds_a_nan_at_the_next_checked_step(tmp_path):
    # a NaN gradient at step 3 poisons the readout; the default guard (every 20th step) finds it at 20
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 20 .*up to 19 steps earlier"):
        _trainer(tmp_path, [NaNGradient(at=3), NonFiniteGuard()], max_steps=22).fit(_module(), _data(22))


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path):
    # checked only every 20 steps, the NaN of step 3 would reach the checkpoint of step 4: refused
    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    guard = NonFiniteGuard("raise")
    trainer = _trainer(tmp_path, [NaNGradient(at=3), guard, saver], max_steps=8, enable_checkpointing=True)
    with pytest.raises(NonFiniteError, match="checkpoint was not written"):
        trainer.fit(_module(), _data())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step=2.ckpt"]
    good = torch.load(ckpt_dir / "step=2.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert guard.events[-1]["where"] == "checkpoint" and guard.events[-1]["step"] == 4


# --- skips made by the optimizer itself ------------------------------------------------------------

SKIPPING = [n for n in available_optimizers() if get_optimizer_class(n).traits.nonfinite == "skip"]
HIDDEN = "model.blocks.0.mlp.up_proj.weight"


@pytest.mark.parametrize("name", SKIPPING)
def test_a_gradient_the_optimizer_skips_makes_the_guard_raise_at_its_default_rate(tmp_path, name):
    """SOAP, Shampoo and Muon skip a NaN gradient themselves (nonfinite='skip'); at a step the guard
    does not check (default rate: every 20th) it still learns of the skip and raises, naming it."""
    assert set(SKIPPING) >= {"soap", "shampoo", "muon"}
    guard = NonFiniteGuard(action="raise")
    trainer = _trainer(tmp_path, [NaNGradient(at=3, name=HIDDEN), guard], max_steps=8)
    with pytest.raises(NonFiniteError, match=r"step 3 .*parameter model\.blocks\.0\.mlp\.up_proj\.weight \(skipped by the optimizer\)"):
        trainer.fit(_module(SPECS[name]), _data())
    assert guard.events[-1]["step"] == 3 and trainer.global_step == 3


def test_a_gradient_the_optimizer_skips_is_recorded_under_skip(tmp_path):
    guard = NonFiniteGuard(action="skip", check_every_n_steps=5)
    trainer = _trainer(tmp_path, [NaNGradient(at=3, name=HIDDEN), guard], max_steps=6)
    with pytest.warns(UserWarning, match="skipped the update of step 3"):
        trainer.fit(_module(SPECS["soap"]), _data())
    assert [e["step"] for e in guard.events] == [3] and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
