"""Lion and Signum: agreement with lion-pytorch and a float64 re-derivation, presets, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_optlab.optim.sign import Lion, Signum

SHAPES = [(6, 5), (7,), (2, 3, 4)]
STEPS = 25


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(n_steps: int = STEPS, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(n_steps)]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _two_groups(params, **second):
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def test_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ours, ref = _params(), _params()
    grads = _grads()
    hp = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5)
    opt = Lion(_two_groups(ours, lr=1e-3, weight_decay=2.0), **hp)
    ref_opt = lion_pytorch.Lion(_two_groups(ref, lr=1e-3, weight_decay=2.0), **hp)  # decay as the paper
    _run(opt, ours, grads)
    _run(ref_opt, ref, grads)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-7)


def test_lion_matches_float64_rederivation():
    params = _params()
    grads = _grads()
    lr, (b1, b2), wd = 2e-3, (0.8, 0.95), 0.3
    opt = Lion(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    w = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    _run(opt, params, grads)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            g = g.double()
            c = b1 * m[k] + (1 - b1) * g
            w[k] = w[k] - lr * (torch.sign(c) + wd * w[k])
            m[k] = b2 * m[k] + (1 - b2) * g
    for p, ref in zip(params, w):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-6)


def test_signum_matches_float64_rederivation():
    params = _params()
    grads = _grads()
    hps = [dict(lr=1e-2, momentum=0.9, weight_decay=0.1), dict(lr=3e-3, momentum=0.5, weight_decay=0.0)]
    opt = Signum([{"params": params[:2], **hps[0]}, {"params": params[2:], **hps[1]}])
    which = [0, 0, 1]
    w = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    _run(opt, params, grads)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            hp = hps[which[k]]
            beta, lr, wd = hp["momentum"], hp["lr"], hp["weight_decay"]
            m[k] = beta * m[k] + (1 - beta) * g.double()
            w[k] = w[k] - lr * wd * w[k] - lr * torch.sign(m[k])
    for p, ref, mk in zip(params, w, m):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), mk, rtol=1e-5, atol=1e-6)


def test_signum_without_momentum_is_signsgd_exactly():
    params = _params()
    expected = [p.detach().clone() for p in params]
    grads = _grads()
    lr = 1e-2
    opt = Signum(params, lr=lr, momentum=0.0)
    _run(opt, params, grads)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            expected[k] = expected[k] - lr * torch.sign(g)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)
        assert "exp_avg" not in opt.state[p]
        assert opt.state[p]["step"] == STEPS


def test_lion_with_equal_betas_is_signum():
    a, b = _params(), _params()
    grads = _grads()
    _run(Lion(a, lr=1e-3, betas=(0.9, 0.9), weight_decay=0.2), a, grads)
    _run(Signum(b, lr=1e-3, momentum=0.9, weight_decay=0.2), b, grads)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1), lambda ps: Signum(ps, lr=1e-3)])
def test_state_dict_round_trip_continues_bit_identically(make):
    params = _params()
    grads = _grads(10)
    opt = make(params)
    _run(opt, params, grads[:5])
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(clones)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, params, grads[5:])
    _run(resumed, clones, grads[5:])
    for p, q in zip(params, clones):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], resumed.state[q]["exp_avg"])


def test_skips_params_without_grad_and_calls_closure():
    params = _params()
    before = params[1].detach().clone()
    opt = Lion(params, lr=1e-3)
    calls = []

    def closure():
        calls.append(1)
        loss = sum((p**2).sum() for p in (params[0], params[2]))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls and torch.isfinite(loss)
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state


@pytest.mark.parametrize("cls", [Lion, Signum])
def test_health_reports_the_sign_step(cls):
    params = _params()
    lr = 1e-3
    opt = cls([("w", params[0]), ("b", params[1]), ("t", params[2])], lr=lr)
    assert opt.health() == {}
    _run(opt, params, _grads(3))
    health = opt.health()
    for name, p in zip("wbt", params):
        stats = ("eff_lr_min", "eff_lr_q50", "eff_lr_max", "eps_frac", "update_rms", "update_to_weight")
        keys = {f"{name}/{k}" for k in stats}
        assert keys <= health.keys()
        assert all(math.isfinite(health[k]) for k in keys)
        assert health[f"{name}/eps_frac"] == 0.0
        # every coordinate of a random momentum is non-zero: each moves by exactly lr
        assert health[f"{name}/update_rms"] == pytest.approx(lr, rel=1e-6)
        m = opt.state[p]["exp_avg"]
        assert health[f"{name}/eff_lr_min"] == pytest.approx(lr / m.abs().max().item(), rel=1e-5)
        assert health[f"{name}/eff_lr_min"] <= health[f"{name}/eff_lr_q50"] <= health[f"{name}/eff_lr_max"]


def test_signsgd_health_uses_the_gradient():
    p = torch.nn.Parameter(torch.ones(4))
    opt = Signum([p], lr=0.1, momentum=0.0)
    p.grad = torch.tensor([1.0, -2.0, 0.0, 4.0])
    opt.step()
    health = opt.health()
    assert health["group0.param0/update_rms"] == pytest.approx(0.1 * math.sqrt(3 / 4))
    assert health["group0.param0/eff_lr_max"] == pytest.approx(0.1 / 1e-12)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: Lion(ps, lr=-1.0), "lr"),
        (lambda ps: Lion(ps, betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda ps: Lion(ps, betas=(0.9,)), "betas"),
        (lambda ps: Lion(ps, weight_decay=-0.1), "weight_decay"),
        (lambda ps: Signum(ps, lr=float("nan")), "lr"),
        (lambda ps: Signum(ps, momentum=1.0), "momentum"),
        (lambda ps: Signum(ps, momentum=-0.1), "momentum"),
        (lambda ps: Signum(ps, weight_decay=-1), "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make(_params())
