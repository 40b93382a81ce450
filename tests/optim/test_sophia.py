"""Sophia: a float64 re-derivation of the update, both Hessian estimators against independent
computations, their timing and unwrapping rules, validation, state_dict and health."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_optlab.optim.sophia import Sophia, sophia_gnb_estimate, sophia_hutchinson_estimate

SHAPES = [(5, 4), (7,), (2, 3, 4)]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _oracle_step(w, m, h, g, *, lr, beta1, rho, eps, wd, clamp=False):
    """The published rule, written out elementwise-style (no foreach, no clamp trick)."""
    m = beta1 * m + (1 - beta1) * g
    w = w - lr * wd * w
    hh = torch.where(h > 0, h, torch.zeros_like(h)) if clamp else h
    ratio = torch.minimum(m.abs() / (rho * hh + eps), torch.ones_like(m))
    return w - lr * torch.sign(m) * ratio, m


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_matches_a_float64_rederivation_with_hessian_updates(estimator):
    params = _params()
    groups = [
        {"params": params[:2], "lr": 0.02, "weight_decay": 0.1, "rho": 0.05},
        {"params": params[2:], "lr": 0.005, "weight_decay": 0.0, "betas": (0.9, 0.95)},
    ]
    opt = Sophia(groups, lr=0.01, rho=0.04, update_period=5, estimator=estimator)
    hp = [(0.02, 0.965, 0.99, 0.05, 0.1), (0.02, 0.965, 0.99, 0.05, 0.1), (0.005, 0.9, 0.95, 0.04, 0.0)]
    ws = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    hs = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(1)
    n_updates = 0
    for t in range(1, 31):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            lr, b1, _, rho, wd = hp[i]
            ws[i], ms[i] = _oracle_step(ws[i], ms[i], hs[i], gr, lr=lr, beta1=b1, rho=rho, eps=1e-15, wd=wd,
                                        clamp=estimator == "hutchinson")
        if t % 5 == 0:  # feed ĥ directly: magnitudes chosen so the clip is active on some coordinates only
            est = [torch.randn(p.shape, generator=g, dtype=p.dtype).abs() * 30 for p in params]
            if estimator == "hutchinson":
                est = [e - 20 for e in est]  # some negative estimates
            opt.update_hessian({p: e for p, e in zip(params, est)} if t % 10 else est)
            for i, e in enumerate(est):
                b2 = hp[i][2]
                hs[i] = b2 * hs[i] + (1 - b2) * e
            n_updates += 1
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    assert n_updates == 6
    for p, m, h in zip(params, ms, hs):
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["hessian"], h, rtol=1e-12, atol=1e-14)
    clip = opt.health()
    fracs = [v for k, v in clip.items() if k.endswith("clip_frac")]
    assert any(0 < f < 1 for f in fracs), f"test does not exercise both clip branches: {fracs}"


def test_float32_agrees_with_float64_and_skips_params_without_grad():
    p32 = _params(torch.float32)
    p64 = [nn.Parameter(p.detach().double()) for p in p32]
    o32, o64 = Sophia(p32, lr=0.01, update_period=3), Sophia(p64, lr=0.01, update_period=3)
    g = torch.Generator().manual_seed(2)
    for t in range(1, 21):
        grads = [torch.randn(p.shape, generator=g) for p in p32]
        grads[1] = None if t % 4 == 0 else grads[1]  # the vector sometimes has no gradient
        for a, b, gr in zip(p32, p64, grads):
            a.grad = None if gr is None else gr.clone()
            b.grad = None if gr is None else gr.double()
        o32.step()
        o64.step()
        if t % 3 == 0:
            est = [torch.rand(p.shape, generator=g) * 10 for p in p32]
            o32.update_hessian(est)
            o64.update_hessian([e.double() for e in est])
    assert o32.state[p32[1]]["step"] == 15 and o32.state[p32[0]]["step"] == 20
    for a, b in zip(p32, p64):
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-5, atol=1e-5)


# --- Sophia-G -----------------------------------------------------------------------------------


def _softmax_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    d, v = 4, 5
    lin = nn.Linear(d, v)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, d, generator=g))
        lin.bias.copy_(torch.randn(v, generator=g))
    frozen = nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    unused = nn.Parameter(torch.randn(2, generator=g))
    x = torch.randn(3, 6, d, generator=g)  # 18 predicted tokens
    y = torch.randint(0, v, (3, 6), generator=g)
    return lin, frozen, unused, x, y


def _step_once(opt, params, seed=5):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.step()
    opt.zero_grad()


def test_gnb_estimate_equals_b_times_squared_sampled_gradient():
    lin, frozen, unused, x, y = _softmax_problem()
    params = [lin.weight, lin.bias, frozen, unused]
    opt = Sophia(params, lr=0.01, update_period=2)
    _step_once(opt, [lin.weight, lin.bias, unused])
    _step_once(opt, [lin.weight, lin.bias, unused])  # step count 2: due
    h_unused = opt.state[unused]["hessian"].clone()
    logits = lin(x)
    assert sophia_gnb_estimate(opt, logits, generator=torch.Generator().manual_seed(7))
    # Independent: the same sample, then the analytic gradient of the mean CE of a linear softmax.
    probs = torch.softmax(logits.detach().reshape(-1, 5), -1)
    y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    b = y_hat.numel()
    delta = (probs - F.one_hot(y_hat, 5).to(probs)) / b  # dL/dlogits
    g_w = delta.T @ x.reshape(-1, 4)
    g_b = delta.sum(0)
    beta2 = 0.99
    torch.testing.assert_close(opt.state[lin.weight]["hessian"], (1 - beta2) * b * g_w**2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(opt.state[lin.bias]["hessian"], (1 - beta2) * b * g_b**2, rtol=1e-5, atol=1e-8)
    assert frozen not in opt.state  # not requiring grad: skipped
    assert torch.equal(opt.state[unused]["hessian"], h_unused)  # the logits do not depend on it
    assert opt.state[lin.weight]["hessian_step"] == 2


def test_gnb_timing_follows_the_optimizer_step_count_and_runs_once_per_step():
    lin, _, _, x, _ = _softmax_problem()
    opt = Sophia(lin.parameters(), lr=0.01, update_period=3)
    assert not sophia_gnb_estimate(opt, lin(x))  # step 0: never (the official loop starts after k steps)
    updated = []
    for t in range(1, 10):
        _step_once(opt, list(lin.parameters()), seed=t)
        before = opt.state[lin.weight]["hessian"].clone()
        ran = sophia_gnb_estimate(opt, lin(x))
        again = sophia_gnb_estimate(opt, lin(x))  # a second micro-batch at the same step count
        assert not again
        assert ran == (not torch.equal(before, opt.state[lin.weight]["hessian"]))
        if ran:
            updated.append(t)
        assert opt.health()["group0.param0/hessian_age"] == t - (updated[-1] if updated else 0)
    assert updated == [3, 6, 9]


def test_gnb_leaves_grads_alone_and_the_callers_backward_still_works():
    lin, _, _, x, y = _softmax_problem()
    opt = Sophia(lin.parameters(), lr=0.01, update_period=1)
    _step_once(opt, list(lin.parameters()))
    logits = lin(x)
    loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
    assert sophia_gnb_estimate(opt, logits)
    assert lin.weight.grad is None and lin.bias.grad is None
    loss.backward()
    expected = torch.autograd.grad(F.cross_entropy(lin(x).reshape(-1, 5), y.reshape(-1)), [lin.weight, lin.bias])
    torch.testing.assert_close(lin.weight.grad, expected[0])
    torch.testing.assert_close(lin.bias.grad, expected[1])


def test_gnb_custom_loss_and_num_tokens():
    lin, _, _, x, _ = _softmax_problem()
    o1 = Sophia(lin.parameters(), update_period=1)
    _step_once(o1, list(lin.parameters()))
    st = copy.deepcopy(o1.state_dict())
    o1b = Sophia(lin.parameters(), update_period=1)
    o1b.load_state_dict(st)
    sophia_gnb_estimate(o1, lin(x), generator=torch.Generator().manual_seed(3))
    sophia_gnb_estimate(
        o1b, lin(x), generator=torch.Generator().manual_seed(3), num_tokens=36,
        loss_fn=lambda lg, yh: F.cross_entropy(lg.reshape(-1, 5), yh.reshape(-1), reduction="sum") / 18,
    )
    torch.testing.assert_close(o1b.state[lin.weight]["hessian"], 2 * o1.state[lin.weight]["hessian"])


class _Wrapper:  # duck-type of Lightning's LightningOptimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


class _Mix:  # duck-type of a per-role mix
    def __init__(self, children):
        self.children = children


def test_estimates_unwrap_lightning_wrappers_and_mixes_and_ignore_other_optimizers():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    lin, _, _, x, _ = _softmax_problem()
    adam = torch.optim.AdamW([lin.bias], lr=0.1)
    sophia = Sophia([lin.weight], update_period=1)
    _step_once(sophia, [lin.weight])
    assert not sophia_gnb_estimate(LightningOptimizer(adam), lin(x))  # nothing to do for AdamW
    assert not sophia_gnb_estimate([adam], lin(x))
    for wrapped in (LightningOptimizer(sophia), _Wrapper(_Mix([adam, sophia])), [adam, _Wrapper(sophia)]):
        _step_once(sophia, [lin.weight])
        assert sophia_gnb_estimate(wrapped, lin(x))
        assert sophia.state[lin.weight]["hessian_step"] == sophia.state[lin.weight]["step"]
    assert not adam.state  # the AdamW child is untouched


# --- Sophia-H -----------------------------------------------------------------------------------


def test_hutchinson_estimate_is_u_times_hessian_times_u_per_sample():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a + a.T
    d = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    x = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    lin_only = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))  # enters the loss linearly
    opt = Sophia([x, w, lin_only], update_period=1, estimator="hutchinson", betas=(0.9, 0.5))
    _step_once(opt, [x, w, lin_only])

    def loss_fn():
        return 0.5 * x @ a @ x + 0.5 * (d * w * w).sum() + lin_only.sum()

    loss = loss_fn()
    h_before = {p: opt.state[p]["hessian"].clone() for p in (x, w, lin_only)}
    assert sophia_hutchinson_estimate(opt, loss, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)  # the same u, drawn in parameter order
    u = [torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1 for p in (x, w, lin_only)]
    expected = [u[0] * (a @ u[0]), d, torch.zeros(2, dtype=torch.float64)]  # u⊙Du = diag(D) when D is diagonal
    for p, e in zip((x, w, lin_only), expected):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.5 * h_before[p] + 0.5 * e, rtol=1e-12, atol=1e-12)
    loss.backward()  # the caller's backward still works
    torch.testing.assert_close(x.grad, a @ x.detach())


def test_hutchinson_is_unbiased_for_the_diagonal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a @ a.T
    x = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    opt = Sophia([x], update_period=1, estimator="hutchinson", betas=(0.9, 0.0))
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(5, dtype=torch.float64)
    n = 400
    for i in range(n):
        _step_once(opt, [x], seed=i)
        sophia_hutchinson_estimate(opt, 0.5 * x @ a @ x, generator=gen)
        total += opt.state[x]["hessian"]  # β2 = 0: h is the last sample
    off = (a - torch.diag(torch.diag(a))).abs().sum(1)
    assert ((total / n - torch.diag(a)).abs() <= 4 * off / n**0.5).all()


def test_hutchinson_timing_no_op():
    x = nn.Parameter(torch.randn(4))
    opt = Sophia([x], update_period=2, estimator="hutchinson")
    _step_once(opt, [x])
    assert not sophia_hutchinson_estimate(opt, (x**2).sum())
    _step_once(opt, [x])
    assert sophia_hutchinson_estimate(opt, (x**2).sum())
    assert not sophia_hutchinson_estimate(opt, (x**2).sum())


# --- validation, state_dict, health -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be ≥ 0, got -1.0"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (dict(rho=0.0), "rho must be in"),
        (dict(weight_decay=-0.1), "weight_decay must be ≥ 0, got -0.1"),
        (dict(update_period=0), "update_period must be an integer ≥ 1, got 0"),
        (dict(eps=0.0), "eps must be > 0, got 0.0"),
        (dict(estimator="newton"), "estimator must be one of .*got 'newton'"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sophia(_params(), **kwargs)


def test_bad_estimator_inputs_are_rejected():
    lin, _, _, x, _ = _softmax_problem()
    opt = Sophia(lin.parameters(), update_period=1)
    _step_once(opt, list(lin.parameters()))
    with pytest.raises(ValueError, match="logits must be a tensor of shape"):
        sophia_gnb_estimate(opt, torch.randn(5))
    with pytest.raises(ValueError, match="attached to the autograd graph"):
        sophia_gnb_estimate(opt, lin(x).detach())
    with pytest.raises(ValueError, match="scalar"):
        sophia_gnb_estimate(opt, lin(x), loss_fn=lambda lg, yh: F.cross_entropy(lg.reshape(-1, 5), yh.reshape(-1), reduction="none"))
    with pytest.raises(ValueError, match="call sophia_gnb_estimate"):
        sophia_hutchinson_estimate(opt, lin(x).sum())
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        sophia_hutchinson_estimate(Sophia(lin.parameters(), estimator="hutchinson"), lin(x))
    with pytest.raises(TypeError, match="expected an optimizer"):
        sophia_gnb_estimate("sophia", lin(x))
    with pytest.raises(ValueError, match=r"shape \(5, 4\), got \(4, 5\)"):
        opt.update_hessian({lin.weight: torch.ones(4, 5)})
    with pytest.raises(ValueError, match="one per parameter"):
        opt.update_hessian([torch.ones(5, 4)])
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        opt.update_hessian({nn.Parameter(torch.ones(2)): torch.ones(2)})


def test_state_dict_round_trip_continues_bit_identically():
    lin, _, _, x, y = _softmax_problem()

    def run(model, opt, n, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
            sophia_gnb_estimate(opt, logits, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()

    opt = Sophia([{"params": [lin.weight]}, {"params": [lin.bias], "weight_decay": 0.0}], lr=0.05, update_period=4)
    run(lin, opt, 13, seed=0)
    saved, snapshot = copy.deepcopy(opt.state_dict()), copy.deepcopy(lin)
    run(lin, opt, 12, seed=1)
    opt2 = Sophia([{"params": [snapshot.weight]}, {"params": [snapshot.bias], "weight_decay": 0.0}], lr=0.05, update_period=4)
    opt2.load_state_dict(saved)
    run(snapshot, opt2, 12, seed=1)
    assert torch.equal(lin.weight, snapshot.weight) and torch.equal(lin.bias, snapshot.bias)
    assert opt2.state[snapshot.weight]["hessian_step"] == 24


def test_health_reports_clip_fraction_effective_lr_and_hessian_age():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    opt = Sophia([w], lr=0.1, rho=0.5, weight_decay=0.0, betas=(0.5, 0.0), update_period=2)
    assert opt.health() == {}
    w.grad = torch.tensor([1.0, -1.0, 0.2, 0.0], dtype=torch.float64)
    opt.step()
    opt.update_hessian([torch.tensor([1.0, 4.0, 4.0, 1.0], dtype=torch.float64)])  # h = ĥ (β2 = 0)
    opt.step()  # m = 0.75 g; ρh = [0.5, 2, 2, 0.5]
    h = opt.health()
    m = torch.tensor([0.75, -0.75, 0.15, 0.0], dtype=torch.float64)
    denom = torch.tensor([0.5, 2.0, 2.0, 0.5], dtype=torch.float64) + 1e-15
    assert h["group0.param0/clip_frac"] == pytest.approx(0.25)  # only |0.75| / 0.5 ≥ 1
    eff = 0.1 / torch.maximum(denom, m.abs())
    assert h["group0.param0/eff_lr_min"] == pytest.approx(eff.min().item())
    assert h["group0.param0/eff_lr_max"] == pytest.approx(eff.max().item())
    upd = 0.1 * (m / denom).clamp(-1, 1)
    assert h["group0.param0/update_rms"] == pytest.approx(upd.pow(2).mean().sqrt().item())
    assert h["group0.param0/update_to_weight"] == pytest.approx(upd.pow(2).mean().sqrt().item() / w.pow(2).mean().sqrt().item())
    assert h["group0.param0/hessian_age"] == 1.0 and h["group0.param0/eps_frac"] == 0.0
    assert all(v == v and abs(v) != float("inf") for v in h.values())


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lin, _, _, x, _ = _softmax_problem()
        opt = Sophia(lin.parameters(), update_period=1)
        _step_once(opt, list(lin.parameters()))
        assert sophia_gnb_estimate(opt, lin(x[rank : rank + 1]), generator=torch.Generator().manual_seed(rank))
        torch.save(opt.state[lin.weight]["hessian"], f"{out_dir}/h{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gnb_under_data_parallelism_averages_the_sampled_gradient(tmp_path):
    """Two gloo ranks: h = B_total·(mean of the ranks' ĝ)², identical on both, as the official DDP loop."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    h0, h1 = torch.load(tmp_path / "h0.pt"), torch.load(tmp_path / "h1.pt")
    assert torch.equal(h0, h1)
    lin, _, _, x, _ = _softmax_problem()
    opt = Sophia(lin.parameters(), update_period=1)
    _step_once(opt, list(lin.parameters()))
    grads = []
    for rank in range(2):
        logits = lin(x[rank : rank + 1])
        probs = torch.softmax(logits.detach().reshape(-1, 5), -1)
        y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(rank)).squeeze(-1)
        grads.append(torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 5), y_hat), lin.weight)[0])
    g_mean = (grads[0] + grads[1]) / 2
    torch.testing.assert_close(h0, 0.01 * 12 * g_mean**2, rtol=1e-5, atol=1e-9)


def test_gnb_clips_the_sampled_gradient_like_the_reference_loop():
    lin, frozen, unused, x, y = _softmax_problem()
    opt = Sophia([lin.weight, lin.bias], lr=0.01, update_period=1)
    _step_once(opt, [lin.weight, lin.bias])
    logits = lin(x)
    assert sophia_gnb_estimate(opt, logits, generator=torch.Generator().manual_seed(7), clip_norm=0.01)
    probs = torch.softmax(logits.detach().reshape(-1, 5), -1)
    y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    b = y_hat.numel()
    delta = (probs - F.one_hot(y_hat, 5).to(probs)) / b
    g_w, g_b = delta.T @ x.reshape(-1, 4), delta.sum(0)
    total = torch.sqrt(g_w.pow(2).sum() + g_b.pow(2).sum())
    assert total > 0.02  # the clip binds
    c = 0.01 / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    torch.testing.assert_close(opt.state[lin.weight]["hessian"], 0.01 * b * (c * g_w) ** 2, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(opt.state[lin.bias]["hessian"], 0.01 * b * (c * g_b) ** 2, rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="clip_norm must be in"):
        sophia_gnb_estimate(opt, lin(x), clip_norm=0.0)


def test_gnb_skips_and_counts_an_estimate_from_non_finite_logits():
    lin, frozen, unused, x, y = _softmax_problem()
    opt = Sophia([lin.weight, lin.bias], lr=0.01, update_period=1)
    _step_once(opt, [lin.weight, lin.bias])
    h = [opt.state[p]["hessian"].clone() for p in (lin.weight, lin.bias)]
    logits = lin(x)
    logits = logits + torch.where(torch.arange(logits.numel()).view_as(logits) == 3, float("nan"), 0.0)
    assert sophia_gnb_estimate(opt, logits) is False  # torch.multinomial would have raised
    assert all(torch.equal(opt.state[p]["hessian"], v) for p, v in zip((lin.weight, lin.bias), h))
    assert opt.skipped_estimates == 1
    assert opt.pop_nonfinite_skips() == ["Sophia's Hessian estimate (non-finite logits)"]
    assert sophia_gnb_estimate(opt, lin(x)) is False  # visited at this step count: not retried
    _step_once(opt, [lin.weight, lin.bias])
    assert sophia_gnb_estimate(opt, lin(x)) is True and opt.skipped_estimates == 1
