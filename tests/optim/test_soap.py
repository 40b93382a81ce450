"""SOAP: an independent re-derivation straight from docs/specs (soap.md) in plain per-parameter
torch code, pytorch_optimizer's SOAP on square full-rank layers, a 100-step MLP compared by
loss, robustness (failed decompositions, singular/NaN factors, non-finite gradients, bf16),
state_dict round trips across refreshes, validation, health and the refresh timer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lightning_optlab.optim import soap as soap_module
from lightning_optlab.optim.soap import SOAP

# ------------------------------------------------------------------------------------ oracle


def _merge(shape, max_dim):
    out, cur = [], 1
    for s in shape:
        if cur * s > max_dim:
            if cur > 1:
                out.append(cur)
                cur = s
            else:
                out.append(s)
                cur = 1
        else:
            cur *= s
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def _rot(x, qs, back):
    """Multiply dim i by Q_iᵀ (into the basis) or Q_i (back), one dimension at a time."""
    for i, q in enumerate(qs):
        if q is None:
            continue
        y = torch.tensordot(x, q, dims=([i], [1 if back else 0]))  # new axis last
        x = torch.movedim(y, -1, i)
    return x


class ReferenceSOAP:
    """soap.md written out for one tensor at a time: no batching, no skipped rotations."""

    def __init__(self, params, *, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True):
        self.params = list(params)
        self.hp = dict(lr=lr, b1=betas[0], b2=betas[1], bs=shampoo_beta if shampoo_beta >= 0 else betas[1], eps=eps,
                       wd=weight_decay, f=precondition_frequency, maxd=max_precond_dim, merge=merge_dims,
                       p1d=precondition_1d, norm=normalize_grads, bias=correct_bias)
        self.state = [None] * len(self.params)

    def _shape(self, p):
        h = self.hp
        return _merge(p.shape, h["maxd"]) if h["merge"] and p.dim() != 1 else tuple(p.shape)

    def _gram(self, g, i):
        others = [d for d in range(g.dim()) if d != i]
        return torch.tensordot(g, g, dims=(others, others))

    def _update_factors(self, st, g):
        for i, f in enumerate(st["F"]):
            if f is not None:
                f.lerp_(self._gram(g, i), 1 - self.hp["bs"])

    @torch.no_grad()
    def step(self, grads):
        h = self.hp
        for k, (p, grad) in enumerate(zip(self.params, grads)):
            shape = self._shape(p)
            g = grad.reshape(shape)
            st = self.state[k]
            if st is None:  # point 2: the first step only initializes
                if p.dim() == 1:
                    has = [h["p1d"] and p.shape[0] <= h["maxd"]]
                else:
                    has = [d <= h["maxd"] for d in shape]
                st = self.state[k] = {"t": 0, "M": torch.zeros(shape), "V": torch.zeros(shape)}
                st["F"] = [torch.zeros(d, d) if ok else None for d, ok in zip(shape, has)]
                self._update_factors(st, g)
                st["Q"] = [None if f is None else
                           torch.flip(torch.linalg.eigh(f + 1e-30 * torch.eye(f.shape[0]))[1], [1]) for f in st["F"]]
                continue
            st["t"] += 1  # point 3
            t = st["t"]
            gp = _rot(g, st["Q"], back=False)
            st["M"].mul_(h["b1"]).add_(gp, alpha=1 - h["b1"])
            st["V"].mul_(h["b2"]).add_(gp.square(), alpha=1 - h["b2"])
            n = st["M"] / (st["V"].sqrt() + h["eps"])
            step_size = h["lr"] * math.sqrt(1 - h["b2"] ** t) / (1 - h["b1"] ** t) if h["bias"] else h["lr"]
            n = _rot(n, st["Q"], back=True)
            if h["norm"]:
                n = n / (1e-30 + n.square().mean().sqrt())
            p.add_(n.reshape(p.shape), alpha=-step_size)
            p.add_(p, alpha=-h["lr"] * h["wd"])
            m_orig = _rot(st["M"], st["Q"], back=True)  # point 4
            self._update_factors(st, g)
            if t % h["f"] == 0:
                for i, (f, q) in enumerate(zip(st["F"], st["Q"])):
                    if f is None:
                        continue
                    d = torch.diag(q.T @ f @ q)
                    order = torch.argsort(d, descending=True)
                    q = q[:, order]
                    st["V"] = st["V"].index_select(i, order)
                    st["Q"][i] = torch.linalg.qr(f @ q)[0]
            st["M"] = _rot(m_orig, st["Q"], back=False)


# ------------------------------------------------------------------------------------ helpers


def _grad_sequence(shapes, n, seed):
    """Fixed random gradients (independent of the parameters, so both optimizers see the same
    inputs bit for bit) with a varying scale and some anisotropy."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(n):
        step = []
        for s in shapes:
            x = torch.randn(s, generator=g)
            if len(s) >= 2:
                x = x * torch.linspace(0.3, 2.0, s[-1])
            step.append(x * (1.0 + 0.5 * math.sin(t)))
        seq.append(step)
    return seq


def _run_pair(shapes, n_steps=13, seed=0, stack=False, **hp):
    gen = torch.Generator().manual_seed(seed + 100)
    init = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    ours = [nn.Parameter(w.clone()) for w in init]
    theirs = [w.clone() for w in init]
    opt = SOAP(ours, **hp)
    opt._stack_on_cpu = stack
    ref = ReferenceSOAP(theirs, **{k: v for k, v in hp.items() if k not in ("refresh", "spread_refresh")})
    for grads in _grad_sequence(shapes, n_steps, seed):
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    return ours, theirs, opt, ref


CASES = {
    "square": dict(shapes=[(8, 8), (6, 6)], hp={}),
    "rectangular_with_biases": dict(shapes=[(6, 10), (10,), (4, 6), (4,)], hp=dict(shampoo_beta=0.9)),
    "side_above_max_precond_dim": dict(shapes=[(12, 5), (5, 12), (12,)], hp=dict(max_precond_dim=8)),
    "vector_plain_adam": dict(shapes=[(7,)], hp={}),
    # a vector's factor gains rank one per step: refresh when it is full rank (see the note below)
    "vector_precondition_1d": dict(shapes=[(5,), (4,), (9,)],
                                   hp=dict(precondition_1d=True, max_precond_dim=8, precondition_frequency=5)),
    "tensor_3d": dict(shapes=[(4, 3, 5)], hp=dict(max_precond_dim=16)),
    "tensor_3d_merge_dims": dict(shapes=[(4, 3, 5), (2, 3, 20)], hp=dict(max_precond_dim=16, merge_dims=True)),
    "normalize_no_bias_correction": dict(shapes=[(5, 7), (7,)],
                                         hp=dict(normalize_grads=True, correct_bias=False, betas=(0.9, 0.99))),
}


# Tolerances are float32 rounding. The factors are bit-identical to the oracle's (same products,
# same eigh call), so even the first eigendecomposition of a rank-deficient factor gives the same
# basis. At a refresh, SOAP orders the basis by diag(Qᵀ F Q) computed as the column sums of
# Q ⊙ F Q (reusing F Q, as pytorch_optimizer does) where the oracle multiplies Qᵀ F Q out: equal
# up to rounding, which only matters where estimates tie at rounding level, i.e. in the null space
# of a rank-deficient factor (where any basis is as good and the reference itself is arbitrary).
# So every refresh below happens when the factors are full rank.
@pytest.mark.parametrize("case", list(CASES))
def test_matches_spec_rederivation(case):
    shapes, hp = CASES[case]["shapes"], dict(CASES[case]["hp"])
    hp.setdefault("lr", 1e-2)
    hp.setdefault("weight_decay", 0.05)
    hp.setdefault("precondition_frequency", 3)
    # 13 steps: 1 initialization, 12 updates, refreshes after updates 3, 6, 9 and 12 (5 and 10)
    ours, theirs, opt, ref = _run_pair(shapes, n_steps=13, **hp)
    for p, w in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), w, rtol=2e-5, atol=2e-6)
    for p, st in zip(ours, ref.state):
        s = opt.state[p]
        assert s["step"] == st["t"] == 12
        torch.testing.assert_close(s["exp_avg_sq"].view(st["V"].shape), st["V"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s["exp_avg"].view(st["M"].shape), st["M"], rtol=1e-4, atol=1e-6)
        for f, fr in zip(s["factors"], st["F"]):
            assert (f is None) == (fr is None)
            if f is not None:
                torch.testing.assert_close(f, fr, rtol=1e-5, atol=1e-5)
        for q, qr in zip(s["bases"], st["Q"]):
            assert (q is None) == (qr is None)
            if q is not None:  # the same basis up to column signs (V is squared; M follows Q)
                torch.testing.assert_close(q.abs(), qr.abs(), rtol=1e-4, atol=1e-5)


def test_structure_of_the_state():
    ours, _, opt, _ = _run_pair([(12, 5), (3,), (4, 3, 5)], n_steps=2, max_precond_dim=8, merge_dims=True)
    s_mat, s_vec, s_3d = (opt.state[p] for p in ours)
    assert s_mat["factors"][0] is None and s_mat["factors"][1].shape == (5, 5)
    assert s_vec["factors"] == [None] and s_vec["bases"] == [None]
    assert [None if f is None else f.shape[0] for f in s_3d["factors"]] == [4, 3, 5]  # no product ≤ 8 to merge


def test_stacked_rotations_match_the_reference():
    """The accelerator path (same-shaped matrices as one bmm stack), forced on the CPU."""
    shapes = [(6, 4)] * 3 + [(4, 6)] * 2 + [(6,)]
    ours, theirs, opt, _ = _run_pair(shapes, n_steps=10, stack=True, precondition_frequency=3, lr=1e-2)
    for p, w in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), w, rtol=2e-5, atol=2e-6)
    bases = [opt.state[p]["bases"][0] for p in ours[:3]]
    assert bases[0]._base is not None and all(b._base is bases[0]._base for b in bases)  # one stack, views


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("refresh", ["qr", "cholesky_qr"])
def test_gpu_matches_cpu_on_full_rank_layers(refresh):
    """The accelerator path (bmm stacks, batched CholeskyQR2) against the CPU path."""
    shapes = [(8, 8)] * 3 + [(6, 10)] * 2 + [(10,)]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in shapes]
    cpu = [nn.Parameter(w.clone()) for w in init]
    gpu = [nn.Parameter(w.cuda()) for w in init]
    opts = [SOAP(ps, lr=1e-2, precondition_frequency=3, refresh=refresh) for ps in (cpu, gpu)]
    for grads in _grad_sequence(shapes, 10, seed=8):
        for a, b, g in zip(cpu, gpu, grads):
            a.grad, b.grad = g.clone(), g.cuda()
        for opt in opts:
            opt.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=1e-4)
    assert opts[1].state[gpu[0]]["bases"][0]._base is not None  # stacked on the GPU


def test_mlp_100_steps_loss_matches_reference():
    """A tiny MLP on fresh minibatches (rank-deficient factors included: the readout's 16x16
    factor starts at rank 3), compared by held-out loss. Full-batch training would not do: its
    first update reuses the initializing gradient, whose components in the factors' null space
    are rounding noise that Adam's normalization blows up, in the reference as much as here."""
    torch.manual_seed(0)
    w_true = torch.randn(10, 3)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    ref_net = copy.deepcopy(net)
    opt = SOAP(net.parameters(), lr=1e-2, precondition_frequency=10)
    ref = ReferenceSOAP(list(ref_net.parameters()), lr=1e-2, precondition_frequency=10)
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(256, 10, generator=g)
    y_eval = torch.tanh(x_eval @ w_true)
    losses = []
    for step in range(100):
        x = torch.randn(32, 10, generator=g)
        y = torch.tanh(x @ w_true) + 0.1 * torch.randn(32, 3, generator=g)
        for model in (net, ref_net):
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ref.step([p.grad for p in ref_net.parameters()])
        if step % 5 == 4:
            with torch.no_grad():
                losses.append([nn.functional.mse_loss(m(x_eval), y_eval).item() for m in (net, ref_net)])
    assert losses[-1][0] < 0.15 * losses[0][0]
    for ours, theirs in losses:
        assert abs(ours - theirs) <= 1e-4 * theirs


def test_pytorch_optimizer_soap_on_square_full_rank_layers():
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [(8, 8), (5, 5)]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [nn.Parameter(w.clone()) for w in init]
    theirs = [nn.Parameter(w.clone()) for w in init]
    opt = SOAP(ours, lr=1e-2, weight_decay=0.05, precondition_frequency=3)
    peer = po.SOAP(theirs, lr=1e-2, weight_decay=0.05, precondition_frequency=3)
    for grads in _grad_sequence(shapes, 13, seed=4):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        peer.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ robustness


def _layer_setup(shapes=((6, 4), (4,)), seed=0, **hp):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(shapes))]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s, g in zip(shapes, gens)]
    hp.setdefault("precondition_frequency", 2)
    return params, SOAP(params, lr=1e-2, **hp)


def _steps(params, opt, n, seed=0, scale=1.0):
    for grads in _grad_sequence([tuple(p.shape) for p in params], n, seed):
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(p.dtype)
        opt.step()


def test_planted_singular_and_ill_conditioned_factors_give_finite_updates():
    params, opt = _layer_setup()
    _steps(params, opt, 2)
    st = opt.state[params[0]]
    st["factors"][0].zero_()  # singular: rank 0
    st["factors"][1].copy_(torch.diag(torch.tensor([1e30, 1.0, 1e-30, 0.0])))  # condition number ~ inf
    _steps(params, opt, 6, seed=1)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(math.isfinite(v) or "cond" in k for k, v in opt.health().items())


def test_planted_nan_factor_keeps_the_previous_basis_and_counts():
    params, opt = _layer_setup()
    _steps(params, opt, 2)
    st = opt.state[params[0]]
    q_before = st["bases"][0].clone()
    st["factors"][0].fill_(float("nan"))
    _steps(params, opt, 4, seed=1)  # refreshes after updates 2 and 4
    assert all(torch.isfinite(p).all() for p in params)
    assert torch.equal(st["bases"][0], q_before)
    assert opt.fallback_count >= 2 and st["fallbacks"] >= 2
    assert opt.health()["group0.param0/fallbacks"] >= 2


def test_failed_float32_eigh_is_retried_in_float64_and_counted(monkeypatch):
    real = torch.linalg.eigh

    def flaky(m, *a, **k):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("planted failure")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    params, opt = _layer_setup()
    _steps(params, opt, 3)
    st = opt.state[params[0]]
    assert st["fallbacks"] == 2 and opt.fallback_count == 2  # L and R of the matrix
    q = st["bases"][0]
    assert q.dtype == torch.float32 and torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    assert all(torch.isfinite(p).all() for p in params)


def test_eigh_returning_nan_everywhere_falls_back_to_identity(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: (torch.full(m.shape[:1], float("nan"), dtype=m.dtype),
                                                                  torch.full(m.shape, float("nan"), dtype=m.dtype)))
    params, opt = _layer_setup(precondition_frequency=100)
    _steps(params, opt, 4)
    q = opt.state[params[0]]["bases"][0]  # the identity's columns (in the flipped order)
    assert torch.equal(q.abs().sum(0), torch.ones(6)) and torch.equal(q.T @ q, torch.eye(6))
    assert opt.fallback_count == 2 and all(torch.isfinite(p).all() for p in params)


def test_qr_returning_nan_keeps_the_previous_basis(monkeypatch):
    params, opt = _layer_setup()
    _steps(params, opt, 1)
    q0 = [q.clone() for q in opt.state[params[0]]["bases"]]
    monkeypatch.setattr(torch.linalg, "qr", lambda m, *a, **k: (torch.full_like(m, float("nan")), m))
    # the CPU path forms Q without R
    monkeypatch.setattr(torch.linalg, "householder_product", lambda m, *a, **k: torch.full_like(m, float("nan")))
    _steps(params, opt, 4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(opt.state[params[0]]["bases"], q0))
    assert opt.fallback_count == 4  # two sides, two refreshes
    assert all(torch.isfinite(p).all() for p in params)


def _state_snapshot(opt, p):
    out = {}
    for k, v in opt.state[p].items():
        if torch.is_tensor(v):
            out[k] = v.clone()
        elif isinstance(v, list):
            out[k] = [None if x is None else x.clone() for x in v]
        else:
            out[k] = v
    return out


def _assert_same_state(a, b, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k in skip:
            continue
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], list):
            assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[k], b[k])), k
        else:
            assert a[k] == b[k], k


def test_nonfinite_gradient_is_skipped_leaving_state_unchanged():
    params, opt = _layer_setup()
    _steps(params, opt, 3)
    before = [_state_snapshot(opt, p) for p in params]
    w_before = [p.detach().clone() for p in params]
    params[0].grad = torch.full((6, 4), float("nan"))
    params[1].grad = torch.ones(4)
    opt.step()
    _assert_same_state(before[0], _state_snapshot(opt, params[0]), skip=("nonfinite_skips",))
    assert torch.equal(params[0].detach(), w_before[0])
    assert opt.state[params[0]]["nonfinite_skips"] == 1 and opt.nonfinite_skips == 1
    assert opt.state[params[1]]["step"] == before[1]["step"] + 1  # the finite one still stepped
    params[0].grad = torch.tensor(float("inf")).expand(6, 4).clone()
    opt.step()
    assert opt.nonfinite_skips == 2 and all(torch.isfinite(p).all() for p in params)


def test_nonfinite_gradient_on_the_first_step_is_skipped_too():
    params, opt = _layer_setup()
    params[0].grad = torch.full((6, 4), float("nan"))
    params[1].grad = torch.ones(4)
    opt.step()
    assert "step" not in opt.state[params[0]] and opt.nonfinite_skips == 1
    _steps(params, opt, 3)
    assert opt.state[params[0]]["step"] == 2 and torch.isfinite(params[0]).all()


def test_nonfinite_gradient_raises_with_the_parameter_name():
    net = nn.Sequential(nn.Linear(3, 2))
    opt = SOAP(net.named_parameters(), nonfinite="raise")
    net[0].weight.grad = torch.ones(2, 3)
    net[0].bias.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match=r"0\.bias"):
        opt.step()


def test_zero_gradients_only_decay_the_weights():
    params, opt = _layer_setup(precondition_frequency=2)
    w0 = [p.detach().clone() for p in params]
    for _ in range(5):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, w in zip(params, w0):  # 4 updates, each W ← W − 0.01·0.01·W
        torch.testing.assert_close(p.detach(), w * (1 - 1e-4) ** 4, rtol=1e-6, atol=0)


def test_bf16_parameters_keep_float32_state_and_track_float32():
    shapes = [(6, 4), (4,)]
    p16, opt16 = _layer_setup(shapes)
    p32, opt32 = _layer_setup(shapes)
    with torch.no_grad():
        for p in p16:
            p.data = p.data.bfloat16()
    _steps(p16, opt16, 8)
    _steps(p32, opt32, 8)
    st = opt16.state[p16[0]]
    assert p16[0].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in [st["exp_avg"], st["exp_avg_sq"], *st["factors"], *st["bases"]])
    for a, b in zip(p16, p32):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.detach(), rtol=0.05, atol=0.05)


def test_large_rectangular_shape_with_an_unrotated_side():
    params, opt = _layer_setup(shapes=((1500, 12), (12, 40)), max_precond_dim=1000, precondition_frequency=2)
    _steps(params, opt, 4)
    st = opt.state[params[0]]
    assert st["factors"][0] is None and st["factors"][1].shape == (12, 12)
    assert all(torch.isfinite(p).all() for p in params)


def test_sharded_parameters_are_refused_with_a_clear_error():
    p = nn.Parameter(torch.randn(8))
    p._fsdp_flattened = True  # what FSDP1 marks its flat parameters (and their views) with
    with pytest.raises(ValueError, match="SOAP needs whole tensors, but parameter 'group0.param0' is an FSDP1 .* Use FSDP2"):
        SOAP([p])

    class Shard:  # stands in for a DTensor placement (FSDP2, tensor parallelism)
        def is_shard(self):
            return True

    q = nn.Parameter(torch.randn(4, 4))
    q.placements = (Shard(),)
    opt = SOAP([("b", nn.Parameter(torch.randn(2)))])
    opt.add_param_group({"params": [q], "param_names": ["w"]})  # accepted: owner ranks gather shards
    q.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"got the shard 'w' .* \(no process group is initialized\)"):
        opt.step()


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(
    "options",
    [{}, dict(spread_refresh=True, refresh="cholesky_qr"), {"stack": True}, dict(stack=True, refresh="cholesky_qr")],
)
def test_state_dict_round_trip_continues_bit_identically_across_refreshes(options):
    options = dict(options)
    stack = options.pop("stack", False)
    shapes = [(6, 4), (6, 4), (4,), (3, 2, 5)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    a = [nn.Parameter(w.clone()) for w in init]
    a.append(nn.Parameter(torch.randn(5, 3).bfloat16()))
    hp = dict(lr=1e-2, precondition_frequency=3, max_precond_dim=8, merge_dims=True, **options)
    opt_a = SOAP(a, **hp)
    opt_a._stack_on_cpu = stack
    seq = _grad_sequence([tuple(p.shape) for p in a], 12, seed=5)

    def feed(params, opt, grads):
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()

    for grads in seq[:5]:  # init + 4 updates: a refresh after update 3
        feed(a, opt_a, grads)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = SOAP(b, **hp)
    opt_b._stack_on_cpu = stack
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=False))
    assert opt_b.state[b[-1]]["exp_avg"].dtype == torch.float32
    for grads in seq[5:]:  # refreshes after updates 6 and 9
        feed(a, opt_a, grads)
        feed(b, opt_b, grads)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    for p, q in zip(a, b):
        _assert_same_state(_state_snapshot(opt_a, p), _state_snapshot(opt_b, q))


# ------------------------------------------------------------------------------------ options


def test_options_that_change_numbers_still_train():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randn(64, 3)
    for hp in (dict(refresh="cholesky_qr"), dict(spread_refresh=True)):
        net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = SOAP(net.parameters(), lr=1e-2, precondition_frequency=4, **hp)
        first = None
        for _ in range(25):
            net.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < 0.8 * first and opt.fallback_count == 0
        if hp.get("spread_refresh"):
            phases = {opt.state[p]["refresh_phase"] for p in net.parameters() if p.dim() == 2}
            assert len(phases) == 2


def test_stacked_cholesky_qr_refresh_matches_the_one_by_one_refresh():
    shapes = [(6, 4)] * 3 + [(4, 6)]
    runs = []
    for stack in (False, True):
        ours, _, opt, _ = _run_pair(shapes, n_steps=10, stack=stack, precondition_frequency=3, lr=1e-2,
                                    refresh="cholesky_qr")
        runs.append(ours)
        assert opt.fallback_count == 0
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_last_refresh_seconds_counts_refresh_steps_only():
    params, opt = _layer_setup(precondition_frequency=2)
    seen = []
    for grads in _grad_sequence([(6, 4), (4,)], 5, seed=0):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        seen.append(opt.last_refresh_seconds)
    assert seen[0] > 0 and seen[2] > 0 and seen[4] > 0  # init, refreshes after updates 2 and 4
    assert seen[1] == 0.0 and seen[3] == 0.0


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precondition_frequency=0), r"precondition_frequency must be an integer ≥ 1, got 0"),
        (dict(max_precond_dim=0), r"max_precond_dim must be an integer ≥ 1, got 0"),
        (dict(lr=-1.0), r"lr must be ≥ 0, got -1.0"),
        (dict(betas=(0.95, 1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (dict(shampoo_beta=1.0), r"shampoo_beta must be in .*, got 1.0"),
        (dict(eps=0.0), r"eps must be > 0, got 0.0"),
        (dict(weight_decay=-0.1), r"weight_decay must be ≥ 0, got -0.1"),
        (dict(merge_dims="yes"), r"merge_dims must be True or False, got 'yes'"),
        (dict(refresh="svd"), r"refresh must be one of .*, got 'svd'"),
        (dict(nonfinite="zero"), r"nonfinite must be one of .*, got 'zero'"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOAP([nn.Parameter(torch.zeros(2, 2))], **kwargs)


# ------------------------------------------------------------------------------------ health


def test_health_is_finite_and_sensible():
    net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    opt = SOAP(net.named_parameters(), lr=1e-2, precondition_frequency=3)
    assert opt.health() == {}
    x = torch.randn(16, 5)

    def step():
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()

    step()  # initialization only: bases are exact eigenvectors
    h = opt.health()
    assert h["0.weight/steps_since_refresh"] == 0.0
    assert h["0.weight/staleness_R"] < 1e-4 and h["0.weight/staleness_L"] < 1e-4
    assert "0.weight/eff_lr_q50" not in h  # no update yet
    for _ in range(4):
        step()
    h = opt.health()
    assert h["0.weight/steps_since_refresh"] == 1.0  # refresh after update 3, now at 4
    assert h["0.weight/cond_L"] >= 1.0 and h["0.weight/fallbacks"] == 0.0
    assert 0 <= h["0.weight/staleness_L"] < 1.0
    assert h["0.weight/eff_lr_min"] <= h["0.weight/eff_lr_q50"] <= h["0.weight/eff_lr_max"]
    assert 0.0 <= h["0.bias/eps_frac"] <= 1.0
    assert "0.bias/cond_L" not in h and "0.bias/steps_since_refresh" not in h
    finite = {k: v for k, v in h.items() if "/cond_" not in k and "/min_eig_over_eps_" not in k}
    assert all(math.isfinite(v) for v in finite.values())
    assert h["1.weight/update_rms"] > 0 and h["1.weight/update_to_weight"] > 0


def test_module_exports():
    assert soap_module.__all__ == ["SOAP", "soap_rotated_adam_"]
