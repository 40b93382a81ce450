"""ScheduleFreeAdamW: equal to the official schedulefree.AdamWScheduleFree, validation, state_dict, health."""

from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from torch import nn

from lightning_optlab.optim.schedule_free import ScheduleFreeAdamW

SHAPES = [(5, 4), (7,), (2, 3, 4)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _groups(params):
    return [
        {"params": params[:2], "lr": 0.02, "weight_decay": 0.05},
        {"params": params[2:], "lr": 0.005, "weight_decay": 0.0, "betas": (0.95, 0.99)},
    ]


@pytest.mark.parametrize("foreach", [True, False])
def test_equals_the_official_optimizer_with_eval_train_switches(foreach):
    ours_p, ref_p = _params(), _params()
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=5, foreach=foreach)
    ours = ScheduleFreeAdamW(_groups(ours_p), **kw)
    ref = schedulefree.AdamWScheduleFree(_groups(ref_p), **kw)
    ref.train()
    g = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        grads = [torch.randn(p.shape, generator=g) for p in ours_p]
        for a, b, gr in zip(ours_p, ref_p, grads):
            a.grad, b.grad = gr.clone(), gr.clone()  # step normalizes .grad in place: one copy each
        ours.step()
        ref.step()
        if t % 4 == 0:  # evaluate, then train on
            ours.eval()
            ref.eval()
            assert not ours.train_mode
            for a, b in zip(ours_p, ref_p):
                assert torch.equal(a, b)
            ours.train()
            ref.train()
        for a, b in zip(ours_p, ref_p):
            assert torch.equal(a, b), f"step {t}: differs by {(a - b).abs().max().item():.3e}"
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(ours.state[a]["z"], ref.state[b]["z"])
        assert torch.equal(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


def test_starts_in_train_mode_and_switches_like_upstream():
    p = nn.Parameter(torch.ones(3))
    opt = ScheduleFreeAdamW([p], lr=0.1)
    assert opt.train_mode and opt.param_groups[0]["train_mode"]
    opt.eval()  # before any step: only the flag changes (x = y = z)
    assert torch.equal(p, torch.ones(3)) and not opt.train_mode
    with pytest.raises(Exception, match="not in train mode"):
        p.grad = torch.ones(3)
        opt.step()


@pytest.mark.parametrize("save_in_eval", [False, True])
def test_state_dict_round_trip_continues_bit_identically(save_in_eval):
    params = _params()
    opt = ScheduleFreeAdamW(_groups(params), warmup_steps=3)
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(20)]

    def run(o, ps, steps):
        for gs in steps:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            o.step()

    run(opt, params, grads[:9])
    if save_in_eval:  # a checkpoint as the Lightning callback writes it: x with the eval-mode state
        opt.eval()
    saved, snapshot = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    if save_in_eval:
        opt.train()
    run(opt, params, grads[9:])

    params2 = [nn.Parameter(s) for s in snapshot]
    opt2 = ScheduleFreeAdamW(_groups(params2), warmup_steps=3)
    opt2.load_state_dict(saved)
    assert opt2.train_mode == (not save_in_eval)
    opt2.train()
    run(opt2, params2, grads[9:])
    # In eval mode the original went y -> x -> y around the save with the same operations the
    # resumed run applies to the saved x: bit-identical either way.
    for a, b in zip(params, params2):
        assert torch.equal(a, b), f"resumed run differs by {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be ≥ 0, got -1.0"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
        (dict(eps=0.0), "eps must be > 0, got 0.0"),
        (dict(weight_decay=-1e-3), "weight_decay must be ≥ 0, got -0.001"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer ≥ 0, got -1"),
        (dict(warmup_steps=2.5), "warmup_steps must be an integer ≥ 0, got 2.5"),
        (dict(r=-1.0), r"r must be in \[0.0, inf\], got -1.0"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleFreeAdamW(_params(), **kwargs)


def test_health_reads_the_state_with_upstreams_bias_correction():
    params = _params()
    opt = ScheduleFreeAdamW(_groups(params), lr=0.01, warmup_steps=10)
    assert opt.health() == {}
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    h = opt.health()
    group = opt.param_groups[0]
    lr_t = 0.02 * 4 / 10  # warmup: the 4th step used (k+1)/warmup_steps of lr
    v_hat = opt.state[params[0]]["exp_avg_sq"] / (1 - 0.999**4)
    eff = lr_t / (v_hat.sqrt() + 1e-8)
    assert group["scheduled_lr"] == pytest.approx(lr_t)
    assert h["group0.param0/eff_lr_min"] == pytest.approx(eff.min().item(), rel=1e-6)
    assert h["group0.param0/eff_lr_max"] == pytest.approx(eff.max().item(), rel=1e-6)
    assert h["group0.param0/eps_frac"] == 0.0 and h["group0.param0/train_mode"] == 1.0
    # z's last step is lr_t times the normalized gradient upstream leaves in .grad
    rms = (lr_t * params[0].grad).pow(2).mean().sqrt().item()
    assert h["group0.param0/update_rms"] == pytest.approx(rms, rel=1e-6)
    assert all(v == v and abs(v) != float("inf") for v in h.values())
    opt.zero_grad()
    opt.eval()
    h = opt.health()
    assert h["group1.param0/train_mode"] == 0.0 and "group0.param0/update_rms" not in h
    assert "group0.param0/eff_lr_q50" in h
