"""The shared Kronecker-factor module: shapes, masks, Gram contractions, projections, the safe
eigendecomposition with its fallbacks, SOAP's first basis, the QR refresh and CholeskyQR2."""

from __future__ import annotations

import pytest
import torch

from lightning_optlab.optim import kronecker as K


@pytest.mark.parametrize(
    "shape, max_dim, expected",
    [
        ((128, 64, 3, 3), 1000, (128, 576)),
        ((64, 3, 3), 10000, (576,)),
        ((4, 3, 5), 16, (12, 5)),
        ((4, 3, 5), 8, (4, 3, 5)),
        ((3, 20000, 5), 100, (3, 20000, 5)),
        ((20000, 1), 100, (20000,)),
        ((1, 1), 10, (1,)),
        ((), 10, (1,)),
        ((7,), 5, (7,)),
    ],
)
def test_merged_shape(shape, max_dim, expected):
    out = K.merged_shape(shape, max_dim)
    assert out == expected
    assert torch.Size(out).numel() == torch.Size(shape).numel()


def test_factor_mask():
    assert K.factor_mask((5,), 10, False) == [False]
    assert K.factor_mask((5,), 10, True) == [True]
    assert K.factor_mask((50,), 10, True) == [False]
    assert K.factor_mask((12, 5), 8, False) == [False, True]
    assert K.factor_mask((4, 3, 5), 16, False, merge_dims=True) == [True, True]  # (12, 5)
    assert K.factor_mask((2, 3), 10, False, merge_dims=True) == [True]  # a matrix merged to (6,) keeps it
    assert K.factor_mask((), 10, False) == []


def test_gram_matches_einsum_and_update_factors():
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(K.gram(g, 0), torch.einsum("abc,ibc->ai", g, g))
    torch.testing.assert_close(K.gram(g, 1), torch.einsum("abc,aic->bi", g, g))
    torch.testing.assert_close(K.gram(g, 2), torch.einsum("abc,abi->ci", g, g))
    m = torch.randn(6, 4)
    assert torch.equal(K.gram(m, 0), m @ m.T) and torch.equal(K.gram(m, 1), m.T @ m)
    v = torch.randn(5)
    assert torch.equal(K.gram(v, 0), torch.outer(v, v))
    assert K.gram(m.bfloat16(), 0).dtype == torch.float32

    factors = [torch.eye(6), None]
    K.update_factors_(factors, m, beta=0.9)
    torch.testing.assert_close(factors[0], 0.9 * torch.eye(6) + 0.1 * m @ m.T)
    assert factors[1] is None
    summed = [torch.zeros(6, 6), torch.ones(4, 4)]
    K.update_factors_(summed, m, beta=None)
    torch.testing.assert_close(summed[1], 1 + m.T @ m)
    with pytest.raises(ValueError, match="factors for a gradient of shape"):
        K.update_factors_([None], m, beta=0.9)


def _orth(n, seed):
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_project_rotates_each_dimension_and_back():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    qs = [_orth(4, 0), None, _orth(5, 1)]
    y = K.project(x, qs, transpose=True)
    torch.testing.assert_close(y, torch.einsum("abc,ai,ck->ibk", x, qs[0], qs[2]))
    torch.testing.assert_close(K.project(y, qs, transpose=False), x)
    m = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(K.project(m, [qs[0], qs[2]], True), qs[0].T @ m @ qs[2])
    torch.testing.assert_close(K.project(m, [None, qs[2]], False), m @ qs[2].T)
    v = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(K.project(v, [qs[0]], True), qs[0].T @ v)
    assert K.project(m, [None, None], True) is m
    stack = torch.randn(3, 4, 5, dtype=torch.float64)
    ls = torch.stack([_orth(4, i) for i in range(3)])
    rs = torch.stack([_orth(5, 10 + i) for i in range(3)])
    out = K.project_matrices(stack, ls, rs, transpose=True)
    for i in range(3):
        torch.testing.assert_close(out[i], K.project(stack[i], [ls[i], rs[i]], True))
    torch.testing.assert_close(K.project_matrices(out, ls, None, False)[1], ls[1] @ out[1])


def test_safe_eigh_and_its_fallbacks(monkeypatch):
    a = torch.randn(5, 5)
    a = a @ a.T
    evals, evecs, fell_back = K.safe_eigh(a)
    assert not fell_back and evals.dtype == torch.float32
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, a, rtol=1e-4, atol=1e-4)
    # bf16 input: computed in float32
    assert K.safe_eigh(a.bfloat16())[0].dtype == torch.float32

    real = torch.linalg.eigh
    calls = []

    def failing_below_float64(m, *args, **kw):
        calls.append(m.dtype)
        if m.dtype != torch.float64:
            raise torch.linalg.LinAlgError("planted")
        return real(m, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", failing_below_float64)
    evals, evecs, fell_back = K.safe_eigh(a)
    assert fell_back and calls == [torch.float32, torch.float64] and evecs.dtype == torch.float32

    def nan_without_jitter(m, *args, **kw):
        jittered = m.diagonal().min() > a.diagonal().min().double() + 1e-12
        if m.dtype == torch.float64 and jittered:
            return real(m, *args, **kw)
        return torch.full(m.shape[:1], float("nan"), dtype=m.dtype), torch.full(m.shape, float("nan"), dtype=m.dtype)

    monkeypatch.setattr(torch.linalg, "eigh", nan_without_jitter)
    evals, evecs, fell_back = K.safe_eigh(a)  # float32 NaN, float64 NaN, jittered float64 ok
    assert fell_back and torch.isfinite(evecs).all()

    monkeypatch.setattr(torch.linalg, "eigh", real)
    bad = a.clone()
    bad[0, 0] = float("nan")
    evals, evecs, fell_back = K.safe_eigh(bad)  # nothing can work: identity, finite diagonal
    assert fell_back and torch.equal(evecs, torch.eye(5)) and torch.isfinite(evals).all()


def test_eigenbasis_is_the_reference_call_flipped():
    g = torch.randn(6, 3)
    f = g @ g.T  # rank 3: the null space makes any other call give a different basis
    expected = torch.flip(torch.linalg.eigh(f + 1e-30 * torch.eye(6))[1], [1])
    evals, q, fell_back = K.eigenbasis(f)
    assert torch.equal(q, expected) and not fell_back
    assert torch.all(evals[:-1] >= evals[1:])


def test_power_qr_refresh_against_the_literal_rule():
    g = torch.randn(6, 20, dtype=torch.float64)
    f = g @ g.T
    q = _orth(6, 3)
    new, order = K.power_qr_refresh(f, q)
    d = torch.diag(q.T @ f @ q)
    expected_order = torch.argsort(d, descending=True)
    assert torch.equal(order, expected_order)
    expected = torch.linalg.qr(f @ q[:, expected_order])[0]
    torch.testing.assert_close(new, expected)
    chol, order2 = K.power_qr_refresh(f, q, method="cholesky_qr")
    assert torch.equal(order2, order)
    torch.testing.assert_close(chol.abs(), expected.abs())  # same basis up to column signs
    # failure in every precision: None (the caller keeps its basis)
    bad = f.clone()
    bad[1, 2] = float("inf")
    assert K.power_qr_refresh(bad, q)[0] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 7), (64, 64), (130, 130), (40, 12)])
def test_cpu_qr_without_r_is_torch_qr_bit_for_bit(shape, dtype):
    """The CPU refresh's QR skips R (geqrf + householder_product); its Q must be the very one
    torch.linalg.qr returns, since SOAP's reference-exact mode depends on it."""
    gen = torch.Generator().manual_seed(shape[0])
    for _ in range(3):
        a = torch.randn(shape, generator=gen, dtype=dtype)
        y = a @ torch.randn(shape[1], shape[1], generator=gen, dtype=dtype)
        assert torch.equal(K._try_qr(y), torch.linalg.qr(y)[0])


def test_cholesky_qr2():
    y = torch.randn(8, 5, dtype=torch.float64)
    q = K.cholesky_qr2(y)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(q.abs(), torch.linalg.qr(y)[0].abs())
    assert K.cholesky_qr2(torch.zeros(4, 4)) is None  # rank-deficient: Cholesky fails


def test_condition_number():
    assert K.condition_number(torch.tensor([4.0, -2.0, 1.0])) == 4.0
    assert K.condition_number(torch.tensor([1.0, 0.0])) == float("inf")
    assert K.condition_number(torch.tensor([1.0, 0.0]), floor=0.5) == 2.0
    assert K.condition_number(torch.zeros(3)) == 0.0


# ---------------------------------------------------------------- the shared factor state


def test_work_shape_and_new_factors():
    assert K.work_shape((128, 64, 3, 3), 1000, True) == (128, 576)
    assert K.work_shape((128, 64, 3, 3), 1000, False) == (128, 64, 3, 3)
    assert K.work_shape((7,), 5, True) == (7,)  # a vector is never merged
    assert K.work_shape((), 5, True) == (1,)
    fs = K.new_factors((6, 20, 3), 8, False, False, dtype=torch.float32, device="cpu")
    assert [None if f is None else tuple(f.shape) for f in fs] == [(6, 6), None, (3, 3)]
    assert all(bool((f == 0).all()) for f in fs if f is not None)
    merged = K.new_factors((4, 2, 5), 8, False, True, dtype=torch.float64, device="cpu")
    assert [tuple(f.shape) for f in merged] == [(8, 8), (5, 5)] and merged[0].dtype == torch.float64
    assert K.new_factors((5,), 8, False, False, dtype=torch.float32, device="cpu") == [None]
    assert [tuple(f.shape) for f in K.new_factors((5,), 8, True, False, dtype=torch.float32, device="cpu")] == [(5, 5)]


def test_refresh_due():
    assert [t for t in range(1, 20) if K.refresh_due(t, 4, 3)] == [3, 7, 11, 15, 19]
    assert [t for t in range(1, 12) if K.refresh_due(t, 5, 5)] == [5, 10]
    assert [t for t in range(1, 5) if K.refresh_due(t, 1, 1)] == [1, 2, 3, 4]


def test_update_factor_states_updates_and_schedules():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 6, generator=g)]
    states = [
        {"step": 4, "factors": K.new_factors((4, 3), 8, False, False, dtype=torch.float32, device="cpu")},
        {"step": 4, "factors": [None]},  # nothing preconditioned: skipped
        {"step": 5, "factors": K.new_factors((2, 6), 8, False, False, dtype=torch.float32, device="cpu")},
    ]
    expected = [[f.clone() for f in s["factors"]] if s["factors"][0] is not None else None for s in states]
    for e, grad in zip(expected, grads):
        if e is not None:
            K.update_factors_(e, grad, 0.9)
    due = K.update_factor_states_(states, grads, 0.9, frequency=2, first=2)
    assert due == [0]  # steps 2, 4, 6, ...: the first tensor (step 4), not the third (step 5)
    for s, e in zip(states, expected):
        if e is not None:
            assert all(torch.equal(f, x) for f, x in zip(s["factors"], e))
    assert K.update_factor_states_(states, grads, None, frequency=2, first=[3, 3, 3]) == [2]  # per-tensor firsts


def test_mark_refreshed_and_timed():
    state = {"step": 7, "last_refresh": 0, "fallbacks": 1}
    K.mark_refreshed(state)
    assert state == {"step": 7, "last_refresh": 7, "fallbacks": 1}
    K.mark_refreshed(state, 2)
    assert state["fallbacks"] == 3
    ran = []
    seconds = K.timed(lambda: ran.append(1))
    assert ran == [1] and seconds >= 0.0


def test_soap_and_shampoo_keep_the_same_factors():
    """One factor state: the same shapes and masks, and the same EMA of the same gradients."""
    from lightning_optlab.optim.shampoo import Shampoo
    from lightning_optlab.optim.soap import SOAP

    g = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (3, 20, 2), (4, 2, 5)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    opts = []
    for cls, kw in ((SOAP, dict(shampoo_beta=0.9)), (Shampoo, dict(betas=(0.9, 0.9)))):
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = cls(ps, max_precond_dim=10, merge_dims=True, precondition_frequency=100, **kw)
        for step in grads:
            for p, x in zip(ps, step):
                p.grad = x.clone()
            opt.step()
        opts.append([opt.state[p]["factors"] for p in ps])
    for soap_fs, shampoo_fs in zip(*opts):
        assert [None if f is None else f.shape for f in soap_fs] == [None if f is None else f.shape for f in shampoo_fs]
        for a, b in zip(soap_fs, shampoo_fs):
            if a is not None:  # SOAP's first step lerps the Gram matrix, Shampoo adds it fused: rounding apart
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
