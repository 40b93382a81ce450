"""Reference models: shapes, masking, switches, attention maths, rotary positions, GQA, roles."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lightning_optlab.models import (
    GPT,
    GPTConfig,
    Llama,
    LlamaConfig,
    apply_rotary,
    build_model,
    max_attention_logits,
    rotary_cos_sin,
    set_record_max_logit,
)
from lightning_optlab.params import classify_parameters

FAMILIES = {"gpt2": GPTConfig, "llama": LlamaConfig}


def tiny(family: str, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    cfg = FAMILIES[family](**base)
    return (GPT if family == "gpt2" else Llama)(cfg).eval()


def ids(b=3, t=12, v=37, seed=1):
    return torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))


def manual_attention(attn, x, rope=None):
    """softmax(s·q·kᵀ + causal mask)·v per head, written out, through the module's weights."""
    b, t, c = x.shape
    h, hk, d = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(b, t, h, d).transpose(1, 2))
    k = attn.k_norm(attn.k_proj(x).view(b, t, hk, d).transpose(1, 2))
    v = attn.v_proj(x).view(b, t, hk, d).transpose(1, 2)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    y = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, c)), scores


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_forward_shape_and_finite(family, tied):
    model = tiny(family, tie_embeddings=tied)
    logits = model(ids())
    assert logits.shape == (3, 12, 37)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(ids(t=17))


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_masking(family):
    """Changing tokens after position 5 leaves the logits at positions ≤ 5 unchanged."""
    model = tiny(family)
    a = ids()
    b = a.clone()
    b[:, 6:] = (b[:, 6:] + 7) % 37
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :6], lb[:, :6])
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_float32_cross_entropy_plus_z_loss(family):
    model = tiny(family, z_loss=1e-2)
    logits = model(ids()).to(torch.bfloat16)
    targets = ids(seed=2)
    targets[0, :4] = -100  # ignored positions count in neither mean
    x = logits.float().reshape(-1, 37)
    t = targets.reshape(-1)
    keep = t != -100
    log_z = torch.log(torch.exp(x.double()).sum(-1))
    nll = log_z - x.double().gather(1, t.clamp_min(0)[:, None]).squeeze(1)
    expected = nll[keep].mean() + 1e-2 * (log_z[keep] ** 2).mean()
    got = model.loss(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    plain = tiny(family, z_loss=0.0)
    torch.testing.assert_close(plain.loss(logits, targets).double(), nll[keep].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_layernorm_adds_norm_params_and_changes_outputs(family):
    off, on = tiny(family), tiny(family, qk_layernorm=True)
    extra = set(dict(on.named_parameters())) - set(dict(off.named_parameters()))
    assert extra and all(".attn.q_norm." in n or ".attn.k_norm." in n for n in extra)
    per_norm = 8 * (2 if family == "gpt2" else 1)  # head_dim weights (+ biases for LayerNorm)
    assert on.num_params() - off.num_params() == 2 * 2 * per_norm  # 2 layers x (q, k)
    on.load_state_dict(off.state_dict(), strict=False)  # same weights; only the norms differ
    assert not torch.allclose(on(ids()), off(ids()), atol=1e-4)
    roles = classify_parameters(on)
    assert all(roles[n] == "norm" for n in extra)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", ["sqrt", "inverse", 0.37])
def test_attention_scale_matches_manual_attention(family, scale):
    model = tiny(family, attn_scale=scale, qk_layernorm=True)
    attn = model.blocks[0].attn
    expected_scale = {"sqrt": 1 / math.sqrt(8), "inverse": 1 / 8}.get(scale, scale)
    assert attn.scale == pytest.approx(expected_scale)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    rope = rotary_cos_sin(torch.arange(10), 8) if family == "llama" else None
    want, _ = manual_attention(attn, x, rope)
    torch.testing.assert_close(attn(x, rope), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_query_attention(family):
    model = tiny(family, n_kv_head=2)
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (2 * 8, 32) and attn.v_proj.weight.shape == (2 * 8, 32)
    assert model.num_params() < tiny(family).num_params()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4))
    rope = rotary_cos_sin(torch.arange(10), 8) if family == "llama" else None
    want, _ = manual_attention(attn, x, rope)
    torch.testing.assert_close(attn(x, rope), want, rtol=1e-5, atol=1e-5)
    assert model(ids()).shape == (3, 12, 37)


def test_tied_embeddings_share_storage():
    tied, untied = tiny("gpt2", tie_embeddings=True), tiny("gpt2")
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 37 * 32  # the readout, counted once when tied
    # a step on the shared tensor moves both
    tied.loss(tied(ids()), ids(seed=5)).backward()
    with torch.no_grad():
        tied.wte.weight -= tied.wte.weight.grad
    assert torch.equal(tied.lm_head.weight, tied.wte.weight)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_roles(family, tied):
    model = tiny(family, tie_embeddings=tied, bias=True)
    roles = classify_parameters(model)
    assert roles["wte.weight"] == "embedding"
    if family == "gpt2":
        assert roles["wpe.weight"] == "embedding"
    assert ("lm_head.weight" in roles) is (not tied)  # a tied readout is the embedding tensor
    if not tied:
        assert roles["lm_head.weight"] == "readout"
    for name, role in roles.items():
        if name.startswith(("wte", "wpe", "lm_head")):
            continue
        if ".ln_" in name or name.startswith("ln_f") or "_norm." in name:
            assert role == "norm", name
        elif name.endswith(".bias"):
            assert role == "bias", name
        else:
            assert role == "hidden" and name.endswith("_proj.weight"), name


def test_rotary_dot_products_depend_on_offset_only():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    pos = torch.arange(0, 64)
    cos, sin = rotary_cos_sin(pos, 16)

    def rotated_dot(m, n):
        qm = apply_rotary(q[None], cos[m : m + 1], sin[m : m + 1])[0]
        kn = apply_rotary(k[None], cos[n : n + 1], sin[n : n + 1])[0]
        return torch.dot(qm, kn)

    for m, n in [(0, 3), (5, 2), (10, 10)]:
        for shift in (1, 7, 40):
            torch.testing.assert_close(rotated_dot(m, n), rotated_dot(m + shift, n + shift), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rotated_dot(0, 3), rotated_dot(0, 4))
    torch.testing.assert_close(rotated_dot(4, 4), torch.dot(q, k), rtol=1e-5, atol=1e-5)  # same position: no change
    # a rotation: norms are kept
    torch.testing.assert_close(apply_rotary(q[None], cos[9:10], sin[9:10]).norm(), q.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_max_logit_recording(family):
    model = tiny(family, n_kv_head=2, attn_scale=0.3)
    assert set_record_max_logit(model, True) == 2
    x = ids()
    model(x)
    recorded = max_attention_logits(model)
    assert sorted(recorded) == ["blocks.0.attn", "blocks.1.attn"]
    # the manual oracle: the first block's attention input is ln_1 of the embeddings
    h = model.wte(x) + (model.wpe(torch.arange(12)) if model.wpe is not None else 0)
    rope = rotary_cos_sin(torch.arange(12), 8) if family == "llama" else None
    _, scores = manual_attention(model.blocks[0].attn, model.blocks[0].ln_1(h), rope)
    torch.testing.assert_close(recorded["blocks.0.attn"], scores.max().detach(), rtol=1e-5, atol=1e-5)
    assert not recorded["blocks.0.attn"].requires_grad
    assert set_record_max_logit(model, False) == 2
    assert all(a.max_logit is None for a in model.attention_modules())


def _forward_flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_max_logit_costs_nothing_when_off():
    model = tiny("llama")
    x = ids()
    base = _forward_flops(model, x)
    set_record_max_logit(model, True)
    on = _forward_flops(model, x)
    set_record_max_logit(model, False)
    off = _forward_flops(model, x)
    assert off == base and on > base
    # the extra cost is one (B·H) × T × d_head × T matmul per layer
    assert on - base == 2 * (2 * 3 * 4 * 12 * 8 * 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_token_matches_torch_flop_counter(family):
    """6N + 12·L·d·T equals torch's count of a forward+backward, once the vector parameters
    (norms, biases: no matmul, so the counter skips them) are taken out of N."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(family).train()
    x = ids(b=2, t=16)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as c:
        model.loss(model(x), ids(b=2, t=16, seed=9)).backward()
    measured = c.get_total_flops() / x.numel()
    vectors = sum(p.numel() for p in model.parameters() if p.ndim < 2)
    assert model.flops_per_token(seq_len=16) - 6 * vectors == measured


@pytest.mark.parametrize("family", FAMILIES)
def test_init_scales_and_mup_options(family):
    torch.manual_seed(0)
    cfg = FAMILIES[family](vocab_size=64, block_size=8, n_layer=4, n_head=4, n_embd=192, init_std=0.05)
    model = build_model(cfg)
    o = model.blocks[3].attn.o_proj.weight
    assert o.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.03)
    assert model.blocks[3].attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.03)
    assert model.lm_head.weight.std().item() == pytest.approx(0.05, rel=0.03)
    flat = build_model(cfg, scale_residual_init=False)
    assert flat.blocks[3].attn.o_proj.weight.std().item() == pytest.approx(0.05, rel=0.03)
    mup = build_model(cfg, zero_readout=True, zero_query=True, attn_scale="inverse", logit_scale=0.25)
    assert all(b.attn.q_proj.weight.abs().sum() == 0 for b in mup.blocks)
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(mup(x), torch.zeros(2, 8, 64))  # a zero readout gives zero logits
    plain = build_model(cfg)
    scaled = build_model(cfg, logit_scale=0.25)
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled(x), 0.25 * plain(x))


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = build_model("llama-tiny")
    assert model.wte.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(out).all()
    assert all(torch.equal(b.ln_1.weight, torch.ones(64)) for b in model.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_only_in_training(family):
    model = tiny(family, dropout=0.3)
    x = ids()
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_on_a_fixed_batch(family):
    model = tiny(family, qk_layernorm=True, z_loss=1e-4).train()
    x = ids(b=4, t=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = model.loss(model(x[:, :-1]), x[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be a multiple of n_kv_head \(3\)"),
        (dict(n_layer=0), r"n_layer must be an integer ≥ 1, got 0"),
        (dict(vocab_size=2.5), r"vocab_size must be an integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(z_loss=-1e-4), r"z_loss must be a finite number ≥ 0"),
        (dict(attn_scale="cube"), r"attn_scale must be one of 'sqrt', 'inverse', got 'cube'"),
        (dict(attn_scale=-0.1), r"attn_scale must be a finite number > 0, got -0.1"),
        (dict(norm="batchnorm"), r"norm must be one of 'layernorm', 'rmsnorm'"),
        (dict(mlp="relu"), r"mlp must be one of 'gelu', 'swiglu'"),
        (dict(positions="alibi"), r"positions must be one of 'learned', 'rope'"),
        (dict(init_std=0.0), r"init_std must be a finite number > 0"),
        (dict(positions="rope", n_embd=12, n_head=4), r"rotary positions need an even head size, got .* = 3"),
        (dict(zero_readout=True, tie_embeddings=True), r"untie the embeddings"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)
