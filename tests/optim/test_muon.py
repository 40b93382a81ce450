"""Muon: torch.optim.Muon's update, a float64 polar-decomposition reference within the
Newton-Schulz tolerance, the configurator route with AdamW on the other roles, state, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optlab
from lightning_optlab.optim import registry
from lightning_optlab.optim.mix import OptimizerMix
from lightning_optlab.optim.muon import Muon, muon_scale, newton_schulz5

# two matrices of one shape exercise the batched Newton-Schulz path
SHAPES = [(6, 5), (5, 8), (8, 8), (8, 8), (12, 4)]
STEPS = 24
# Singular values of the quintic Newton-Schulz output (5 steps) lie in this band for every
# singular value of u above ~2e-3·‖u‖_F (Jordan et al. 2024: "S' ~ Uniform(0.5, 1.5)" loosely).
NS_BAND = (0.68, 1.2)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from threads, and on a busy 2-core machine every multi-threaded
    # bfloat16 product waits ~10 ms at OpenMP barriers (torch.optim.Muon's iteration is bf16).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(shapes=SHAPES, n_steps=STEPS, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(n_steps)]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _groups(params, **second):
    return [{"params": params[:3]}, {"params": params[3:], **second}]


@pytest.mark.parametrize("scale, adjust, nesterov", [("rms_match", "match_rms_adamw", True), ("original", "original", False)])
def test_bfloat16_newton_schulz_is_torch_muon(scale, adjust, nesterov):
    ours, ref = _params(), _params()
    grads = _grads()
    hp = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    opt = Muon(_groups(ours, lr=0.01, weight_decay=0.0), scale=scale, ns_dtype="bfloat16", **hp)
    torch_opt = torch.optim.Muon(_groups(ref, lr=0.01, weight_decay=0.0), adjust_lr_fn=adjust, **hp)
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    for p, q in zip(ours, ref):
        # bf16 rounding of the batched vs per-matrix products may differ in the last bit
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[0], ref[0])  # a shape of its own takes torch's exact path


def test_float32_newton_schulz_agrees_with_torch_muon_within_bfloat16_rounding():
    ours, ref = _params(), _params()
    grads = _grads()
    opt = Muon(ours, lr=0.02)  # CPU default: float32 iteration
    torch_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    for step_grads in grads:
        before = [p.detach().clone() for p in ours]
        for p, q, g in zip(ours, ref, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        for p, q, b in zip(ours, ref, before):
            # both started from the same point this step: the updates differ by torch's bf16
            # rounding only (about 2% of the update's norm after five iterations)
            step_ours, step_ref = p - b, q - b
            assert (step_ours - step_ref).norm() <= 0.05 * step_ref.norm()
        with torch.no_grad():
            for p, q in zip(ours, ref):
                q.copy_(p)


def test_updates_match_a_float64_polar_decomposition_within_the_newton_schulz_band():
    shapes = [(6, 14), (14, 6), (9, 20)]
    params, grads = _params(shapes, dtype=torch.float64), _grads(shapes, dtype=torch.float64)
    lr, mu, wd = 0.03, 0.9, 0.2
    opt = Muon([{"params": params[:2]}, {"params": params[2:], "adjust_lr_fn": "original"}], lr=lr, momentum=mu,
               weight_decay=wd, ns_dtype="float64")
    bufs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for step_grads in grads:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for k, (p, b, g) in enumerate(zip(params, before, step_grads)):
            bufs[k] = mu * bufs[k] + g  # the paper's sum form
            u = g + mu * bufs[k]
            uu, sig, vt = torch.linalg.svd(u, full_matrices=False)
            s = muon_scale("original" if k == 2 else "match_rms_adamw", *u.shape)
            o = (b * (1 - lr * wd) - p.detach()) / (lr * s)  # the Newton-Schulz output this step used
            core = uu.T @ o @ vt.T  # diagonal, with the NS singular values, if O = U S' Vᵀ
            diag = core.diagonal()
            assert (core - torch.diag(diag)).abs().max() < 1e-9
            assert (diag >= NS_BAND[0]).all() and (diag <= NS_BAND[1]).all(), diag
            # and O is within the band's distance of the exact polar factor U Vᵀ
            assert torch.linalg.matrix_norm(o - uu @ vt, ord=2) <= 1 - NS_BAND[0] + 1e-9


def test_newton_schulz_kernel_batched_equals_one_by_one_and_tolerates_tall_and_zero():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    batched = newton_schulz5(u)
    for k in range(3):
        torch.testing.assert_close(batched[k], newton_schulz5(u[k]), rtol=1e-12, atol=1e-12)
    sv = torch.linalg.svdvals(batched)
    assert (sv >= NS_BAND[0]).all() and (sv <= NS_BAND[1]).all()
    assert torch.equal(newton_schulz5(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_non_matrix_parameters_are_refused_with_the_route_to_adamw():
    named = [("blocks.0.fc.weight", torch.nn.Parameter(torch.zeros(4, 3))), ("blocks.0.ln.weight", torch.nn.Parameter(torch.ones(4)))]
    with pytest.raises(ValueError, match=r"parameter 'blocks.0.ln.weight' has shape \(4,\).*mix=\[\{'optimizer': 'adamw'"):
        Muon(named)
    with pytest.raises(ValueError, match=r"role 'hidden'\) has shape \(2, 3, 4\)"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 3, 4))], "role": "hidden"}])
    opt = Muon([torch.nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="Muon orthogonalizes 2-D hidden weight matrices only"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.warns(UserWarning, match="Muon was given the embedding parameters"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(5, 3))], "role": "embedding"}])


def test_one_rank_shards_train_as_whole_matrices_and_flat_views_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        start = torch.randn(4, 3, dtype=torch.float64)
        w = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        v = torch.nn.Parameter(start.clone())
        a, b = Muon([w], lr=0.05, ns_dtype="float32"), Muon([v], lr=0.05, ns_dtype="float32")
        for _ in range(3):
            g = torch.randn(4, 3, dtype=torch.float64)
            w.grad, v.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(w.full_tensor(), v.detach(), rtol=0, atol=1e-12)
        a.distribute = "replicate"
        with pytest.raises(ValueError, match=r"got the shard 'group0.param0' .* \(distribute='replicate'\)"):
            a.step()
    finally:
        dist.destroy_process_group()
    view = torch.nn.Parameter(torch.zeros(1))
    view.data = torch.zeros(40)[8:20]
    with pytest.raises(ValueError, match="1-D view of a larger buffer, as FSDP1 with use_orig_params=True"):
        Muon([view])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be ≥ 0, got -1.0"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (dict(ns_steps=0), "ns_steps must be an integer ≥ 1, got 0"),
        (dict(ns_steps=100), "ns_steps must be < 100"),
        (dict(weight_decay=-1.0), "weight_decay must be ≥ 0"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(nesterov=1), "nesterov must be True or False"),
        (dict(scale="match_rms_adamw"), "scale must be one of 'rms_match', 'original'"),
        (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients must be three finite numbers"),
        (dict(ns_dtype="half"), "ns_dtype must be one of"),
        (dict(nonfinite="zero"), "nonfinite must be one of 'skip', 'raise', 'ignore', got 'zero'"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(_params(), **kwargs)


def test_bad_group_overrides_are_rejected():
    with pytest.raises(ValueError, match="adjust_lr_fn must be"):
        Muon([{"params": _params(), "adjust_lr_fn": "rms"}])
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        Muon([{"params": _params(), "momentum": 1.5}])


def test_nonfinite_gradient_is_skipped_or_raises_with_the_parameter_name():
    params, grads = _params(), _grads(n_steps=5)
    opt = Muon(params, lr=0.02)
    _run(opt, params, grads[:3])
    before = [p.detach().clone() for p in params]
    buf = opt.state[params[1]]["momentum_buffer"].clone()
    bad = [g.clone() for g in grads[3]]
    bad[1][0, 0] = float("nan")
    _run(opt, params, [bad])
    assert torch.equal(params[1], before[1]) and torch.equal(opt.state[params[1]]["momentum_buffer"], buf)
    assert opt.state[params[1]]["nonfinite_skips"] == 1 and opt.state[params[1]]["step"] == 3
    assert not torch.equal(params[0], before[0])
    named = [("h.weight", torch.nn.Parameter(torch.zeros(3, 3)))]
    opt = Muon(named, nonfinite="raise")
    named[0][1].grad = torch.full((3, 3), float("inf"))
    with pytest.raises(ValueError, match="non-finite gradient in parameter 'h.weight'"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    grads = [[g.to(dtype) for g in gs] for gs in _grads(n_steps=12)]
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
    opt = Muon(_groups(params, lr=0.01, weight_decay=0.1), lr=0.02)
    _run(opt, params, grads[:6])
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _run(opt, params, grads[6:])
    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = Muon(_groups(params2, lr=0.01, weight_decay=0.1), lr=0.02)
    opt2.load_state_dict(saved)
    _run(opt2, params2, grads[6:])
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p.float()).all() for p in params)


def test_state_moves_between_torch_muon_and_ours():
    params, grads = _params(), _grads(n_steps=10)
    torch_opt = torch.optim.Muon(params, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    _run(torch_opt, params, grads[:5])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    ref_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # torch's loader may alias tensors
    opt = Muon(params, lr=0.02, ns_dtype="bfloat16")
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    _run(opt, params, grads[5:7])
    _run(ref_opt, ref, grads[5:7])
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4)
    back = torch.optim.Muon(ref, lr=0.02)
    back.load_state_dict(opt.state_dict())  # and back: torch ignores our extra keys


def test_health_reports_orthogonality_and_an_adamw_sized_update():
    params, grads = _params(), _grads(n_steps=6)
    opt = Muon(params, lr=0.02)
    assert opt.health() == {}
    _run(opt, params, grads)
    h = opt.health()
    for k in range(len(SHAPES)):
        pre = f"group0.param{k}/"
        assert 0 <= h[pre + "ortho_error"] < 0.5
        assert NS_BAND[0] - 0.05 <= h[pre + "ns_sv_min"] <= h[pre + "ns_sv_max"] <= NS_BAND[1]
        # rms_match: RMS(η·s·O) = 0.2·η when every singular value of O is 1
        assert 0.2 * 0.02 * 0.6 < h[pre + "update_rms"] < 0.2 * 0.02 * 1.2
        assert h[pre + "eff_lr_min"] <= h[pre + "eff_lr_q50"] <= h[pre + "eff_lr_max"]
        assert all(math.isfinite(v) for v in h.values())
    # a rank-deficient momentum (a zero row) keeps every statistic finite
    w = torch.nn.Parameter(torch.randn(5, 7))
    opt = Muon([w], lr=0.02, ns_dtype="float64")
    w.grad = torch.randn(5, 7)
    w.grad[2] = 0
    opt.step()
    h = opt.health()
    assert all(math.isfinite(v) for v in h.values())
    # gain per unit of momentum along its singular directions: (Uᵀ O V)_ii / σ_i, and a^5/‖u‖ in the
    # direction with σ = 0 (the iteration is a·x near 0)
    buf = opt.state[w]["momentum_buffer"].double()
    u, sig, vt = torch.linalg.svd(buf, full_matrices=False)
    gains = (u.T @ newton_schulz5(buf) @ vt.T).diagonal()[:4] / sig[:4]
    lr_s = 0.02 * muon_scale("match_rms_adamw", 5, 7)
    assert h["group0.param0/eff_lr_min"] == pytest.approx(lr_s * gains.min().item(), rel=1e-6)  # quantiles are float32
    assert h["group0.param0/eff_lr_max"] == pytest.approx(lr_s * 3.4445**5 / buf.norm().item(), rel=1e-6)


def test_configure_routes_non_hidden_roles_to_adamw(tiny_lm, lm_batch, monkeypatch):
    if "muon" not in registry.OPTIMIZERS:
        monkeypatch.setitem(registry.OPTIMIZERS, "muon", "muon:Muon")
    mix = [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm", "bias"], "lr": 3e-3}]
    out = lightning_optlab.configure(tiny_lm, "muon", lr=0.02, weight_decay=0.1, mix=mix)
    opt = out["optimizer"]
    assert isinstance(opt, OptimizerMix) and isinstance(opt.children[0], Muon)
    muon_params = [p for g in opt.children[0].param_groups for p in g["params"]]
    assert muon_params and all(p.ndim == 2 for p in muon_params)
    assert {g["role"] for g in opt.children[0].param_groups} == {"hidden"}
    start = tiny_lm.loss(lm_batch).item()
    for _ in range(30):
        opt.zero_grad()
        tiny_lm.loss(lm_batch).backward()
        opt.step()
        out["lr_scheduler"]["scheduler"].step()
    assert tiny_lm.loss(lm_batch).item() < 0.7 * start
    h = opt.health()
    assert "blocks.0.attn.q_proj.weight/ortho_error" in h and "wte.weight/update_rms" in h
    with pytest.raises(ValueError, match="Muon orthogonalizes 2-D hidden weight matrices only"):
        with pytest.warns(UserWarning, match="Muon was given the"):  # embedding and readout
            lightning_optlab.configure(tiny_lm, "muon", lr=0.02)  # without the mix the norms reach Muon


def test_auto_ns_dtype_follows_the_cpu_bf16_flags(tmp_path, monkeypatch):
    from lightning_optlab.optim import muon as muon_module

    with_units, without = tmp_path / "amd", tmp_path / "old"
    with_units.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert muon_module.cpu_has_bf16_units(str(with_units)) is True
    assert muon_module.cpu_has_bf16_units(str(without)) is False
    assert muon_module.cpu_has_bf16_units(str(tmp_path / "missing")) is False
    cpu = torch.device("cpu")
    monkeypatch.setattr(muon_module, "cpu_has_bf16_units", lambda: True)
    assert muon_module._ns_dtype("auto", cpu) == torch.bfloat16 and muon_module._ns_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(muon_module, "cpu_has_bf16_units", lambda: False)
    assert muon_module._ns_dtype("auto", cpu) == torch.float32
    assert muon_module._ns_dtype("auto", torch.device("cuda")) == torch.bfloat16


# --- fused QKV: Q, K and V orthogonalized separately --------------------------------------------------


def _muon_step_on(p, grad, lr=0.1):
    p.grad = grad.clone()
    opt = Muon([p], lr=lr, momentum=0.0, nesterov=False, ns_dtype="float64")
    before = p.detach().clone()
    opt.step()
    return p.detach() - before


def test_gpt2_c_attn_conv1d_is_split_into_q_k_v_blocks():
    transformers = pytest.importorskip("transformers")
    from lightning_optlab.optim.muon import muon_scale
    from lightning_optlab.params import classify_parameters

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).double()
    classify_parameters(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: stored (in=16, out=48)
    assert c_attn.optlab_fused_qkv == 1 and c_attn.optlab_in_out and c_attn.shape == (16, 48)
    assert not hasattr(model.transformer.h[0].attn.c_proj.weight, "optlab_fused_qkv")
    grad = torch.randn_like(c_attn)
    step = _muon_step_on(c_attn, grad)
    # reference: in nn.Linear's (out, in) layout, [Q; K; V] rows, each block on its own
    g = grad.T
    blocks = [newton_schulz5(b, 5) for b in g.split(16, dim=0)]
    expected = -0.1 * muon_scale("match_rms_adamw", 16, 16) * torch.cat(blocks).T
    torch.testing.assert_close(step, expected, rtol=1e-10, atol=1e-12)
    # and not the whole matrix at once
    whole = -0.1 * muon_scale("match_rms_adamw", 48, 16) * newton_schulz5(g, 5).T
    assert (step - whole).abs().max() > 1e-3
    # health() reads the blocks too: each block is near-orthogonal (the stacked matrix would be ~sqrt(3) off)
    opt = Muon([c_attn], lr=0.1, momentum=0.5, ns_dtype="float64")
    c_attn.grad = grad.clone()
    opt.step()
    stats = {k.rsplit("/", 1)[-1]: v for k, v in opt.health().items()}
    assert stats["ortho_error"] < 0.6 and 0.6 < stats["ns_sv_min"] <= stats["ns_sv_max"] < 1.25, stats
    assert stats["scale"] == muon_scale("match_rms_adamw", 16, 16)


def test_linear_qkv_and_interleaved_query_key_value():
    from lightning_optlab.params import classify_parameters

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24, bias=False)
            self.query_key_value = torch.nn.Linear(8, 24, bias=False)

    class Model(torch.nn.Module):
        config = type("Cfg", (), {"num_attention_heads": 2})()

        def __init__(self):
            super().__init__()
            self.attn = Attn().double()

    model = Model()
    wrapped = torch.nn.Sequential(model)  # as a LightningModule holds it: the head count is found inside
    classify_parameters(wrapped)
    qkv, neox = model.attn.qkv.weight, model.attn.query_key_value.weight
    assert qkv.optlab_fused_qkv == 1 and neox.optlab_fused_qkv == 2
    grad = torch.randn(24, 8, dtype=torch.float64)
    step = _muon_step_on(qkv, grad)
    expected = torch.cat([newton_schulz5(b, 5) for b in grad.split(8)])
    torch.testing.assert_close(step, -0.1 * 0.2 * math.sqrt(8) * expected, rtol=1e-10, atol=1e-12)
    # GPT-NeoX: rows are [q_0; k_0; v_0; q_1; k_1; v_1] per head (head size 4)
    step = _muon_step_on(neox, grad)
    per_head = grad.reshape(2, 3, 4, 8)
    o = [newton_schulz5(per_head[:, j].reshape(8, 8), 5).reshape(2, 4, 8) for j in range(3)]
    expected = torch.stack(o, dim=1).reshape(24, 8)
    torch.testing.assert_close(step, -0.1 * 0.2 * math.sqrt(8) * expected, rtol=1e-10, atol=1e-12)


def test_interleaved_qkv_without_a_head_count_warns_naming_the_fix():
    from lightning_optlab.params import classify_parameters

    model = torch.nn.Sequential()
    model.add_module("query_key_value", torch.nn.Linear(8, 24))
    with pytest.warns(UserWarning, match=r"'query_key_value.weight' looks like a per-head interleaved .*optlab_fused_qkv"):
        classify_parameters(model)
    assert not hasattr(model.query_key_value.weight, "optlab_fused_qkv")


def test_a_shard_stand_in_keeps_the_parameters_tags():
    """Under owner ranks a shard's update is computed on a whole-tensor stand-in: it must carry the
    parameter's tags (here Conv1D orientation and a fused QKV layout, which change Muon's update)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        start = torch.randn(4, 12, dtype=torch.float64)  # a Conv1D c_attn: (in, 3·in), stored transposed
        w = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        v = torch.nn.Parameter(start.clone())
        for p in (w, v):
            p.optlab_in_out, p.optlab_fused_qkv = True, 1
        a, b = Muon([w], lr=0.05, ns_dtype="float32"), Muon([v], lr=0.05, ns_dtype="float32")
        for _ in range(2):
            g = torch.randn(4, 12, dtype=torch.float64)
            w.grad, v.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(w.full_tensor(), v.detach(), rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()
