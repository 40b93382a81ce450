import math

import pytest
import torch

from lightning_optlab.schedules import ScheduleFactor, build_scheduler


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _opt(lrs=(1.0, 0.25)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=1.0)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_per_group_multipliers_are_preserved(schedule):
    opt = _opt()
    sched = build_scheduler(opt, schedule, warmup_steps=3, total_steps=20, min_lr_ratio=0.1)
    for a, b in _lrs(opt, sched, 25):
        assert b == pytest.approx(0.25 * a)


def test_warmup_then_cosine_to_floor_closed_form():
    opt = _opt((2.0,))
    sched = build_scheduler(opt, "cosine", warmup_steps=4, total_steps=24, min_lr_ratio=0.1)
    got = [lr[0] for lr in _lrs(opt, sched, 30)]
    for s, lr in enumerate(got):
        if s < 4:
            want = 2.0 * (s + 1) / 5
        elif s < 24:
            want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 20)))
        else:
            want = 0.2
        assert lr == pytest.approx(want, rel=1e-12)


def test_linear_and_wsd_shapes():
    lin = ScheduleFactor("linear", warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert [lin(s) for s in (0, 5, 10, 12)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    wsd = ScheduleFactor("wsd", warmup_steps=2, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert wsd(0) == pytest.approx(1 / 3) and wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(80) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0


def test_scheduler_state_round_trips():
    opt = _opt()
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    _lrs(opt, sched, 4)
    sd = sched.state_dict()
    opt2 = _opt()
    sched2 = build_scheduler(opt2, "cosine", warmup_steps=2, total_steps=10)
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == sched.last_epoch
    assert sched2.lr_lambdas[0](5) == sched.lr_lambdas[0](5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="cosin"), "unknown schedule 'cosin'"),
        (dict(schedule="cosine"), "needs total_steps"),
        (dict(schedule="linear", warmup_steps=10, total_steps=10), "must exceed warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer ≥ 0, got -1"),
        (dict(schedule="cosine", total_steps=10, min_lr_ratio=1.5), "min_lr_ratio must be in \\[0, 1\\], got 1.5"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleFactor(**kwargs)
