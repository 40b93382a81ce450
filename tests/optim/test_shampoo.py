"""Shampoo: its grafting optimizers bit for bit, a float64 re-derivation of L^(-e) G R^(-e) with
grafting, sides above max_precond_dim, n-d tensors, robustness, state and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_optlab.optim import kronecker
from lightning_optlab.optim.shampoo import Shampoo, inverse_root_eigh, inverse_root_newton

SHAPES = [(6, 5), (7,), (2, 3, 4), (3, 9)]
STEPS = 22


def _params(shapes=SHAPES, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(shapes=SHAPES, n_steps=STEPS, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # a per-row scale makes the factors ill-conditioned enough for preconditioning to matter
    return [[torch.randn(s, generator=g, dtype=dtype) * (1 + torch.arange(s[0], dtype=dtype).view(-1, *[1] * (len(s) - 1)))
             for s in shapes] for _ in range(n_steps)]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _groups(params, **second):
    return [{"params": params[:2]}, {"params": params[2:], **second}]


# ----------------------------------------------------------- graft alone == torch optimizers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_grafting_without_preconditioning_is_torch_adamw_bitwise(dtype):
    ours, ref = _params(dtype=dtype), _params(dtype=dtype)
    grads = _grads(dtype=dtype)
    opt = Shampoo(_groups(ours, lr=2e-3, weight_decay=0.3), lr=1e-2, betas=(0.8, 0.95), graft_beta2=0.97,
                  graft_eps=1e-6, weight_decay=0.1, start_preconditioning_step=STEPS + 1, precondition_frequency=2)
    torch_opt = torch.optim.AdamW(_groups(ref, lr=2e-3, weight_decay=0.3), lr=1e-2, betas=(0.8, 0.97), eps=1e-6,
                                  weight_decay=0.1, foreach=False)
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q), (p - q).abs().max()


def test_adam_grafting_matches_torch_adamw_foreach():
    ours, ref = _params(), _params()
    grads = _grads()
    opt = Shampoo(ours, lr=1e-2, betas=(0.9, 0.5), start_preconditioning_step=100)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True)
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_adagrad_and_rmsprop_grafting_without_preconditioning_are_torch_bitwise():
    grads = _grads()
    for kind, ref_cls, ref_kw in (
        ("adagrad", torch.optim.Adagrad, dict(eps=1e-7)),
        ("rmsprop", torch.optim.RMSprop, dict(alpha=0.9, eps=1e-7)),
    ):
        ours, ref = _params(), _params()
        opt = Shampoo(_groups(ours, lr=0.03), lr=0.1, betas=(0.0, 0.99), grafting=kind, graft_beta2=0.9,
                      graft_eps=1e-7, start_preconditioning_step=STEPS + 1)
        torch_opt = ref_cls(_groups(ref, lr=0.03), lr=0.1, foreach=False, **ref_kw)
        _run(opt, ours, grads)
        _run(torch_opt, ref, grads)
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), (kind, (p - q).abs().max())


def test_one_dimensional_parameters_follow_the_graft_while_matrices_are_preconditioned():
    ours, ref = _params(), _params()
    grads = _grads()
    opt = Shampoo(ours, lr=1e-2, start_preconditioning_step=1, precondition_frequency=3)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0, foreach=False)
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    assert torch.equal(ours[1], ref[1])  # the vector
    assert not torch.allclose(ours[0], ref[0])  # the matrix was preconditioned
    assert "factors" not in opt.state[ours[1]]


# ----------------------------------------------------------------- float64 re-derivation
def _inv_root(f, eps, e):
    lam, q = torch.linalg.eigh(f + eps * torch.eye(f.shape[0], dtype=f.dtype))
    return q @ torch.diag(lam.pow(-e)) @ q.T


def _apply_roots(x, roots):
    # x ×_i root_i along every axis that has a root (roots are symmetric)
    for axis, r in enumerate(roots):
        if r is not None:
            x = torch.movedim(torch.tensordot(r, x, dims=([1], [axis])), 0, axis)
    return x


def _reference(params, grads, *, lr, betas, eps, e, f, start, grafting, gb2=0.999, geps=1e-8, wd=0.0,
               max_dim=10**9, summed=False, merge=False):
    """Shampoo written out from the update rule, in float64, one parameter at a time."""
    b1, b2 = betas
    out = []
    for k, p in enumerate(params):
        w = p.detach().double().clone()
        shape = kronecker.merged_shape(w.shape, max_dim) if merge and w.dim() >= 2 else w.shape
        sides = [d <= max_dim for d in shape] if w.dim() >= 2 else [False]
        facs = [torch.zeros(d, d, dtype=torch.float64) if s else None for d, s in zip(shape, sides)]
        roots = [None] * len(facs)
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        exponent = 1 / (2 * len(shape)) if e == "auto" else e
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[k].double()
            m = b1 * m + (1 - b1) * g
            m_hat = m / (1 - b1**t)
            v = gb2 * v + (1 - gb2) * g * g
            graft = m_hat / ((v / (1 - gb2**t)).sqrt() + geps) if grafting == "adam" else m_hat
            gm = g.reshape(shape)
            for i, fac in enumerate(facs):
                if fac is not None:
                    gi = torch.movedim(gm, i, 0).reshape(shape[i], -1)
                    facs[i] = fac + gi @ gi.T if summed else b2 * fac + (1 - b2) * gi @ gi.T
            if any(s for s in sides) and t >= start and (t - start) % f == 0:
                roots = [_inv_root(fac, eps, exponent) if fac is not None else None for fac in facs]
            if any(r is not None for r in roots) and t >= start:
                pdir = _apply_roots(m_hat.reshape(shape), roots).reshape(w.shape)
                u = pdir * (graft.norm() / pdir.norm()) if grafting != "none" else pdir
            else:
                u = graft
            w = w - lr * wd * w - lr * u
        out.append(w)
    return out


@pytest.mark.parametrize("exponent", [0.25, 0.5, "auto"])
@pytest.mark.parametrize("grafting", ["none", "adam", "sgd"])
def test_matches_float64_rederivation(exponent, grafting):
    params = _params()
    grads = _grads()
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-10, exponent=exponent, precondition_frequency=4,
              start_preconditioning_step=3, grafting=grafting, weight_decay=0.1)
    opt = Shampoo(params, **hp)
    _run(opt, params, grads)
    ref = _reference(_params(), grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, e=exponent, f=4, start=3,
                     grafting=grafting, wd=0.1)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-11)
    assert opt.state[params[0]]["last_refresh"] == 19  # refreshes at 3, 7, 11, 15, 19


def test_summed_factors_and_sides_above_max_precond_dim_match_the_rederivation():
    shapes = [(6, 5), (4, 9), (2, 3, 7), (12, 3)]
    params, grads = _params(shapes), _grads(shapes)
    opt = Shampoo(params, lr=5e-3, betas=(0.5, 1.0), eps=1e-9, max_precond_dim=6, precondition_frequency=3,
                  start_preconditioning_step=2)
    _run(opt, params, grads)
    ref = _reference(_params(shapes), grads, lr=5e-3, betas=(0.5, 1.0), eps=1e-9, e=0.25, f=3, start=2,
                     grafting="adam", max_dim=6, summed=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-11)
    assert opt.state[params[1]]["factors"][1] is None and opt.state[params[1]]["factors"][0].shape == (4, 4)
    assert [f is None for f in opt.state[params[2]]["factors"]] == [False, False, True]


def test_merge_dims_matches_the_rederivation_of_the_merged_matrix():
    shapes = [(2, 3, 4), (3, 2, 2, 5)]
    params, grads = _params(shapes), _grads(shapes)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-10, max_precond_dim=6, merge_dims=True, exponent="auto",
              precondition_frequency=5, start_preconditioning_step=2)
    opt = Shampoo(params, **hp)
    _run(opt, params, grads)
    ref = _reference(_params(shapes), grads, lr=1e-2, betas=(0.9, 0.99), eps=1e-10, e="auto", f=5, start=2,
                     grafting="adam", max_dim=6, merge=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-11)
    assert [tuple(f.shape) for f in opt.state[params[0]]["factors"]] == [(6, 6), (4, 4)]
    assert [tuple(f.shape) for f in opt.state[params[1]]["factors"]] == [(6, 6), (2, 2), (5, 5)]


# -------------------------------------------------------------------------------- roots
def test_newton_root_agrees_with_eigh_and_the_optimizer_with_newton_trains_alike():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 40, generator=g) * torch.logspace(0, -1.5, 12).view(-1, 1)
    f = a @ a.T
    exact = _inv_root(f.double(), 1e-6, 0.25)
    for p, e in ((4, 0.25), (2, 0.5)):
        x, err = inverse_root_newton(f, p, 1e-6)
        assert err < 1e-4
        torch.testing.assert_close(x.double(), _inv_root(f.double(), 1e-6, e), rtol=2e-3, atol=1e-4)
    root, fell_back = inverse_root_eigh(f, 0.25, 1e-6)
    assert not fell_back
    torch.testing.assert_close(root.double(), exact, rtol=2e-3, atol=1e-4)
    shapes = [(6, 5), (4, 8)]
    runs = []
    for root_kind in ("eigh", "newton"):
        params = _params(shapes, dtype=torch.float32)
        opt = Shampoo(params, lr=1e-2, eps=1e-6, root=root_kind, precondition_frequency=3, start_preconditioning_step=1)
        _run(opt, params, _grads(shapes, dtype=torch.float32))
        runs.append(params)
        assert opt.state[params[0]]["fallbacks"] == 0
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_planted_singular_factor_stays_finite():
    # row 0 of the gradient is always zero: L is singular, with eps far below float32's precision
    params = _params([(6, 5)], dtype=torch.float32)
    grads = _grads([(6, 5)], dtype=torch.float32)
    for gs in grads:
        gs[0][0].zero_()
    for exponent in (0.25, 0.5):
        for root in ("eigh", "newton"):
            ps = [torch.nn.Parameter(params[0].detach().clone())]
            opt = Shampoo(ps, lr=1e-2, exponent=exponent, root=root, precondition_frequency=2, start_preconditioning_step=1)
            _run(opt, ps, grads)
            assert torch.isfinite(ps[0]).all()
            torch.testing.assert_close(ps[0][0], params[0][0])  # a row with no gradient does not move
            h = opt.health()
            assert all(math.isfinite(v) for v in h.values())
            assert h["group0.param0/min_eig_over_eps_L"] < 1e6  # the singularity is visible


def test_failed_root_keeps_the_previous_one_and_is_counted():
    params = _params([(6, 5)], dtype=torch.float32)
    grads = _grads([(6, 5)], dtype=torch.float32)
    opt = Shampoo(params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=1)
    _run(opt, params, grads[:3])  # refreshes at 1 and 3
    state = opt.state[params[0]]
    kept = state["roots"][0].clone()
    state["factors"][0][2, 1] = float("nan")  # a corrupted factor: no eigendecomposition exists
    _run(opt, params, grads[3:8])  # refreshes at 5 and 7
    assert torch.equal(state["roots"][0], kept)
    assert state["roots_kept"] == 2 and state["fallbacks"] == 2
    assert torch.isfinite(params[0]).all()
    h = opt.health()
    assert h["group0.param0/fallbacks"] == 2 and h["group0.param0/roots_kept"] == 2


def test_nonfinite_gradient_is_skipped_or_raises_with_the_parameter_name():
    params = _params([(6, 5), (7,)], dtype=torch.float32)
    grads = _grads([(6, 5), (7,)], dtype=torch.float32)
    opt = Shampoo(params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=1)
    _run(opt, params, grads[:4])
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict())
    bad = [g.clone() for g in grads[4]]
    bad[0][2, 3] = float("nan")
    _run(opt, params, [bad])
    assert torch.equal(params[0], before_p[0])  # skipped
    assert not torch.equal(params[1], before_p[1])  # the finite parameter still stepped
    after = opt.state_dict()["state"][0]
    for key, val in before_s["state"][0].items():
        if key != "nonfinite_skips":
            assert _same(val, after[key]), key
    assert after["nonfinite_skips"] == 1
    named = [("blocks.0.weight", torch.nn.Parameter(torch.zeros(3, 3)))]
    opt = Shampoo(named, nonfinite="raise")
    named[0][1].grad = torch.full((3, 3), float("inf"))
    with pytest.raises(ValueError, match="non-finite gradient in parameter 'blocks.0.weight'"):
        opt.step()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_zero_gradients_and_bf16_parameters():
    params = [torch.nn.Parameter(torch.randn(6, 5).bfloat16()), torch.nn.Parameter(torch.zeros(4, 3)),
              torch.nn.Parameter(torch.randn(5).bfloat16())]
    opt = Shampoo(params, lr=1e-2, precondition_frequency=2, start_preconditioning_step=1)
    start = [p.detach().float().norm() for p in params]
    for t in range(6):
        params[0].grad = (params[0].detach().float() * 2).bfloat16()
        params[1].grad = torch.zeros(4, 3)
        params[2].grad = (params[2].detach().float() * 2).bfloat16()
        opt.step()
    for k in (0, 2):
        assert params[k].dtype == torch.bfloat16 and torch.isfinite(params[k].float()).all()
        assert params[k].detach().float().norm() < start[k]
    assert torch.equal(params[1], torch.zeros(4, 3))
    assert opt.state[params[0]]["factors"][0].dtype == torch.float32
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------- state, health
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    shapes = [(6, 5), (7,), (2, 3, 4)]
    grads = _grads(shapes, n_steps=16, dtype=torch.float32)
    hp = dict(lr=1e-2, weight_decay=0.1, precondition_frequency=3, start_preconditioning_step=2)
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(shapes, dtype=torch.float32)]
    opt = Shampoo(params, **hp)
    grads = [[g.to(dtype) for g in gs] for gs in grads]
    _run(opt, params, grads[:7])
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _run(opt, params, grads[7:])
    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = Shampoo(params2, **hp)
    opt2.load_state_dict(saved)
    assert opt2.state[params2[0]]["factors"][0].dtype == torch.float32
    _run(opt2, params2, grads[7:])
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_health_reports_factor_statistics_and_refresh_time():
    params = _params([(6, 5), (7,)], dtype=torch.float32)
    grads = _grads([(6, 5), (7,)], dtype=torch.float32)
    opt = Shampoo(params, lr=1e-2, precondition_frequency=4, start_preconditioning_step=2)
    _run(opt, params, grads[:6])  # refreshes at 2 and 6
    assert opt.last_refresh_seconds > 0
    h = opt.health()
    assert h["group0.param0/steps_since_refresh"] == 0
    assert h["group0.param0/staleness_L"] < 1e-5 and h["group0.param0/staleness_R"] < 1e-5
    assert h["group0.param0/cond_L"] >= 1 and h["group0.param0/cond_R"] >= 1
    assert h["group0.param0/eff_lr"] == pytest.approx(1e-2 * h["group0.param0/graft_norm_ratio"])
    assert h["group0.param0/eff_lr_min"] <= h["group0.param0/eff_lr_q50"] <= h["group0.param0/eff_lr_max"]
    assert h["group0.param0/update_rms"] > 0 and "cond_L" not in "".join(k for k in h if k.startswith("group0.param1"))
    _run(opt, params, grads[6:9])
    assert opt.last_refresh_seconds == 0.0
    h = opt.health()
    assert h["group0.param0/steps_since_refresh"] == 3
    assert 1e-5 < h["group0.param0/staleness_L"] < 1
    assert all(math.isfinite(v) for v in h.values())


# ------------------------------------------------------------------------------ sharding
def test_one_rank_shards_train_as_whole_tensors_and_flattened_views_warned():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        start, grads = torch.randn(4, 3, dtype=torch.float64), [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
        w = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        v = torch.nn.Parameter(start.clone())
        a = Shampoo([("h.w", w)], lr=0.1, precondition_frequency=2, start_preconditioning_step=1)
        b = Shampoo([("h.w", v)], lr=0.1, precondition_frequency=2, start_preconditioning_step=1)
        for g in grads:  # the owner-rank path (optim/distributed.py) on one rank: the same update
            w.grad, v.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(w.full_tensor(), v.detach(), rtol=0, atol=1e-12)
        assert a.state_dict()["state"][0]["step"] == 4
    finally:
        dist.destroy_process_group()
    flat = torch.zeros(40)
    view = torch.nn.Parameter(torch.zeros(1))
    view.data = flat[8:20]  # what FSDP1 with use_orig_params=True hands out
    with pytest.warns(UserWarning, match="gets the graft's update only"):
        Shampoo([view])


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be ≥ 0, got -1.0"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9, 0.0)), r"betas\[1\] must be in \(0.0, 1.0\]"),
        (dict(betas=0.9), "betas must be a pair"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(weight_decay=-0.1), "weight_decay must be ≥ 0"),
        (dict(exponent=0.0), r"exponent must be in \(0.0, 1.0\]"),
        (dict(exponent="half"), "exponent must be a number in"),
        (dict(precondition_frequency=0), "precondition_frequency must be an integer ≥ 1, got 0"),
        (dict(start_preconditioning_step=0), "start_preconditioning_step must be an integer ≥ 1"),
        (dict(max_precond_dim=1.5), "max_precond_dim must be an integer ≥ 1"),
        (dict(grafting="adamw"), "grafting must be one of 'adam', 'adagrad', 'rmsprop', 'sgd', 'none', got 'adamw'"),
        (dict(root="svd"), "root must be one of 'eigh', 'newton'"),
        (dict(root="newton", exponent=0.3), "exponent must be 1/p"),
        (dict(nonfinite="zero"), "nonfinite must be one of 'skip', 'raise', 'ignore', got 'zero'"),
        (dict(graft_beta2=1.0), r"graft_beta2 must be in \[0, 1\)"),
        (dict(graft_eps=-1.0), "graft_eps must be > 0"),
        (dict(merge_dims=1), "merge_dims must be True or False"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shampoo(_params(), **kwargs)
    with pytest.raises(ValueError, match=match):  # also as a per-group override
        Shampoo([{"params": _params(), **kwargs}])
