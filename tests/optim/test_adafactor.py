"""Adafactor with momentum: a per-element float64 re-derivation of the spec, options, state."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from lightning_optlab.optim import adafactor as adafactor_module
from lightning_optlab.optim.adafactor import Adafactor

SHAPES = [(4, 3), (5,), (2, 3, 4), ()]
STEPS = 20


def _params(shapes=SHAPES, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(shapes=SHAPES, n_steps: int = STEPS, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # gradient scales differ per tensor so that the factorization is not trivially uniform
    return [[torch.randn(s, generator=g) * (k + 1) for k, s in enumerate(shapes)] for _ in range(n_steps)]


def _run(opt, params, grads) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


class Oracle:
    """The spec's rule, written out per element in Python floats (float64)."""

    def __init__(self, w, *, lr, betas, eps, eps1, wd, clip=None, relative=False):
        self.shape = tuple(w.shape)
        self.w = {i: float(w[i]) for i in itertools.product(*map(range, self.shape))}
        self.m = {i: 0.0 for i in self.w}
        self.v = {i: 0.0 for i in self.w}  # for < 2 dims
        self.r: dict = {}  # (batch, i) -> row factor, for >= 2 dims
        self.c: dict = {}  # (batch, j) -> column factor
        self.lr, (self.b1, self.b2), self.eps, self.eps1, self.wd = lr, betas, eps, eps1, wd
        self.clip, self.relative, self.t, self.clip_factors = clip, relative, 0, []

    def step(self, g):
        g = {i: float(g[i]) for i in self.w}
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        for i in self.w:
            self.m[i] = b1 * self.m[i] + (1 - b1) * g[i]
        u = {}
        if len(self.shape) >= 2:
            m, n = self.shape[-2:]
            for batch in itertools.product(*map(range, self.shape[:-2])):
                for i in range(m):
                    row_mean = sum(g[batch + (i, j)] ** 2 + self.eps1 for j in range(n)) / n
                    self.r[batch, i] = b2 * self.r.get((batch, i), 0.0) + (1 - b2) * row_mean
                for j in range(n):
                    col_mean = sum(g[batch + (i, j)] ** 2 + self.eps1 for i in range(m)) / m
                    self.c[batch, j] = b2 * self.c.get((batch, j), 0.0) + (1 - b2) * col_mean
                r_mean = sum(self.r[batch, i] for i in range(m)) / m
                for i in range(m):
                    for j in range(n):
                        v_hat = self.r[batch, i] * self.c[batch, j] / r_mean / (1 - b2**t)
                        k = batch + (i, j)
                        u[k] = self.m[k] / (1 - b1**t) / (math.sqrt(v_hat) + self.eps)
        else:
            for i in self.w:
                self.v[i] = b2 * self.v[i] + (1 - b2) * g[i] ** 2
                u[i] = self.m[i] / (1 - b1**t) / (math.sqrt(self.v[i] / (1 - b2**t)) + self.eps)
        if self.clip is not None:
            rms = math.sqrt(sum(x * x for x in u.values()) / len(u))
            factor = 1.0 / max(1.0, rms / self.clip)
            self.clip_factors.append(factor)
            u = {i: x * factor for i, x in u.items()}
        lr = self.lr
        if self.relative:
            w_rms = math.sqrt(sum(x * x for x in self.w.values()) / len(self.w))
            lr = min(self.lr, 1 / math.sqrt(t)) * max(1e-3, w_rms)
        for i in self.w:
            self.w[i] = self.w[i] - lr * self.wd * self.w[i] - lr * u[i]

    def tensor(self):
        out = torch.zeros(self.shape, dtype=torch.float64)
        for i, x in self.w.items():
            out[i] = x
        return out


def _check_against_oracle(groups_hps, opt_kwargs, *, which, rtol=2e-5, atol=1e-6):
    """Run Adafactor with one param group per entry of ``groups_hps`` against the oracle."""
    params, grads = _params(), _grads()
    groups = [
        {"params": [p for p, w in zip(params, which) if w == gi], **hp} for gi, hp in enumerate(groups_hps)
    ]
    opt = Adafactor(groups, **opt_kwargs)
    oracles = []
    for k, p in enumerate(params):
        hp = {**opt.defaults, **groups_hps[which[k]]}
        oracles.append(
            Oracle(
                p.detach(),
                lr=hp["lr"],
                betas=hp["betas"],
                eps=hp["eps"],
                eps1=hp["eps_factored"],
                wd=hp["weight_decay"],
                clip=hp["clip_threshold"],
                relative=hp["relative_step"],
            )
        )
    _run(opt, params, grads)
    for step_grads in grads:
        for o, g in zip(oracles, step_grads):
            o.step(g)
    for p, o in zip(params, oracles):
        torch.testing.assert_close(p.detach().double(), o.tensor(), rtol=rtol, atol=atol)
    return opt, oracles


def test_matches_per_element_rederivation_with_param_groups():
    hps = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.99))]
    _check_against_oracle(hps, {}, which=[0, 0, 1, 1])


def test_matches_rederivation_with_defaults_and_large_eps():
    # eps = 1e-2 makes ε2 matter next to sqrt(V̂); eps_factored large makes ε1 matter too
    _check_against_oracle([dict(lr=5e-3)], dict(eps=1e-2, eps_factored=1e-3), which=[0, 0, 0, 0])


def test_matches_rederivation_with_update_clipping():
    opt, oracles = _check_against_oracle(
        [dict(lr=1e-2, weight_decay=0.05)], dict(clip_threshold=0.5), which=[0, 0, 0, 0]
    )
    assert min(min(o.clip_factors) for o in oracles) < 0.9  # the clip was active
    assert any(k.endswith("/clip_scale") for k in opt.health())


def test_matches_rederivation_with_relative_step():
    _check_against_oracle([dict(lr=1e-2, weight_decay=0.1)], dict(relative_step=True), which=[0, 0, 0, 0])


def test_matches_rederivation_with_relative_step_and_clipping():
    _check_against_oracle([dict(lr=0.3)], dict(relative_step=True, clip_threshold=1.0), which=[0, 0, 0, 0])


@pytest.mark.parametrize("max_total", [1 << 25, 30])
def test_stacked_same_shape_matrices_match_the_oracle(monkeypatch, max_total):
    # On an accelerator same-shaped small matrices are reduced as one stack; force that path on
    # the CPU (and, with max_total=30, stacks of at most two 4x3 matrices).
    monkeypatch.setattr(adafactor_module, "_STACK_ON_CPU", True)
    monkeypatch.setattr(adafactor_module, "_STACK_MAX_TOTAL", max_total)
    shapes = [(4, 3), (4, 3), (5,), (4, 3), (2, 3, 4), (2, 3, 4), (4, 3)]
    params, grads = _params(shapes), _grads(shapes)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, eps_factored=1e-30, weight_decay=0.1)
    opt = Adafactor(params, **hp)
    oracles = [Oracle(p.detach(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, eps1=1e-30, wd=0.1) for p in params]
    for t, step_grads in enumerate(grads):
        for k, (p, g) in enumerate(zip(params, step_grads)):
            # the last matrix skips every third step: its step count, and bias correction, lag
            p.grad = None if (k == len(params) - 1 and t % 3 == 0) else g.clone()
            if p.grad is not None:
                oracles[k].step(g)
        opt.step()
    assert opt.state[params[-1]]["step"] < opt.state[params[0]]["step"]
    for p, o in zip(params, oracles):
        torch.testing.assert_close(p.detach().double(), o.tensor(), rtol=2e-5, atol=1e-6)


def test_clipping_that_never_binds_equals_no_clipping():
    a, b = _params(), _params()
    grads = _grads()
    _run(Adafactor(a, lr=1e-2, weight_decay=0.1), a, grads)
    _run(Adafactor(b, lr=1e-2, weight_decay=0.1, clip_threshold=1e6), b, grads)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_is_factored_for_matrices_and_full_for_vectors():
    params = _params([(6, 5), (7,), (2, 3, 4)])
    opt = Adafactor(params)
    _run(opt, params, _grads([(6, 5), (7,), (2, 3, 4)], n_steps=1))
    mat, vec, ten = (opt.state[p] for p in params)
    assert mat["exp_avg_sq_row"].shape == (6,) and mat["exp_avg_sq_col"].shape == (5,)
    assert ten["exp_avg_sq_row"].shape == (2, 3) and ten["exp_avg_sq_col"].shape == (2, 4)
    assert "exp_avg_sq" not in mat and "exp_avg_sq_row" not in vec
    assert vec["exp_avg_sq"].shape == (7,)
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["step"] == 1
        assert all(v.dtype == p.dtype for v in state.values() if isinstance(v, torch.Tensor))
    state_floats = sum(v.numel() for v in mat.values() if isinstance(v, torch.Tensor))
    assert state_floats == 6 * 5 + 6 + 5  # M plus (m + n) floats


def test_zero_gradients_give_finite_zero_updates():
    params = _params([(4, 3), (5,)])
    before = [p.detach().clone() for p in params]
    opt = Adafactor(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert all(math.isfinite(v) for v in opt.health().values())


def test_bfloat16_params_keep_bfloat16_state():
    p = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = Adafactor([p], lr=1e-2, clip_threshold=1.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.isfinite(p).all()
    assert all(v.dtype == torch.bfloat16 for v in opt.state[p].values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("kwargs", [dict(weight_decay=0.1), dict(clip_threshold=1.0, relative_step=True)])
def test_state_dict_round_trip_continues_bit_identically(kwargs):
    params = _params()
    grads = _grads(n_steps=10)
    opt = Adafactor(params, lr=1e-2, **kwargs)
    _run(opt, params, grads[:5])
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = Adafactor(clones, lr=1e-2, **kwargs)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, params, grads[5:])
    _run(resumed, clones, grads[5:])
    for p, q in zip(params, clones):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_skips_params_without_grad_and_calls_closure():
    params = _params()
    before = params[1].detach().clone()
    opt = Adafactor(params, lr=1e-2)

    def closure():
        loss = sum((p**2).sum() for k, p in enumerate(params) if k != 1)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state


def test_decreases_a_quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(torch.randn(8))
    opt = Adafactor([w, b], lr=3e-2)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = (w**2).sum() + (b**2).sum()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.1 * first


def test_health_uses_the_factored_second_moment():
    params = _params([(6, 5), (7,)])
    lr, eps = 1e-2, 1e-8
    opt = Adafactor([("w", params[0]), ("b", params[1])], lr=lr, eps=eps)
    assert opt.health() == {}
    _run(opt, params, _grads([(6, 5), (7,)], n_steps=4))
    health = opt.health()
    state = opt.state[params[0]]
    b2, t = opt.defaults["betas"][1], state["step"]
    r, c = state["exp_avg_sq_row"].double(), state["exp_avg_sq_col"].double()
    sqrt_v_hat = (torch.outer(r, c) / r.mean() / (1 - b2**t)).sqrt()
    eff_lr = lr / (sqrt_v_hat + eps)
    assert health["w/eff_lr_min"] == pytest.approx(eff_lr.min().item(), rel=1e-5)
    assert health["w/eff_lr_max"] == pytest.approx(eff_lr.max().item(), rel=1e-5)
    for name in "wb":
        for key in ("eff_lr_q05", "eff_lr_q50", "eff_lr_q95", "eps_frac", "update_rms", "update_to_weight"):
            assert math.isfinite(health[f"{name}/{key}"])
        assert health[f"{name}/eps_frac"] == 0.0
        assert 0 < health[f"{name}/update_rms"] < 10 * lr


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(betas=(1.0, 0.95)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(eps_factored=-1e-30), "eps_factored"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=float("inf")), "clip_threshold"),
        (dict(relative_step="yes"), "relative_step"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adafactor(_params(), **kwargs)


def test_sparse_gradients_are_rejected():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Adafactor([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_a_group_of_vectors_only_steps():
    """A param group holding no matrix (e.g. the norms' group) has no factored state to build."""
    import torch as _torch

    from lightning_optlab.optim import Adafactor as _Adafactor

    vec, mat = _torch.nn.Parameter(_torch.randn(5)), _torch.nn.Parameter(_torch.randn(3, 4))
    opt = _Adafactor([{"params": [vec]}, {"params": [mat]}], lr=0.1)
    vec.grad, mat.grad = _torch.randn(5), _torch.randn(3, 4)
    before = vec.detach().clone()
    opt.step()
    assert not _torch.equal(before, vec) and _torch.isfinite(vec).all()
