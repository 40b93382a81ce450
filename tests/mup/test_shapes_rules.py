"""μP base shapes and per-family rules, against the `mup` package's own optimizers and hand derivations."""

from __future__ import annotations

import math

import mup as mup_pkg
import pytest
import torch

from lightning_optlab.configure import OptimizerSpec, build_optimizer, configure
from lightning_optlab.models import build_model
from lightning_optlab.mup import (
    base_config,
    base_shapes_state,
    build_mup_model,
    check_base_shapes,
    fan_in_mults,
    set_base_shapes,
)

TINY = {"preset": "llama-tiny", "n_layer": 1, "block_size": 16}


def _pair(width: int, base: int, family: str = "llama-tiny", seed: int = 0):
    torch.manual_seed(seed)
    mu = build_mup_model({**TINY, "preset": family}, base=base, n_embd=width)
    torch.manual_seed(seed)
    sp = build_model({**TINY, "preset": family}, n_embd=width)
    return mu, sp


def _lrs(opt) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "soap", "sophia"])
def test_at_the_base_width_mup_equals_sp_outputs_and_first_update(family, name):
    mu, sp = _pair(32, 32, family)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(mu(idx), sp(idx))
    kw = {"betas": (0.9, 0.9)} if name == "sgd" else {}
    for model, flag in ((mu, True), (sp, False)):
        opt = build_optimizer(model, OptimizerSpec(name=name, lr=1e-2, weight_decay=0.1, mup=flag, **kw))
        for _ in range(2):  # SOAP's first step only sets up its preconditioner
            loss = model.loss(model(idx), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, a), (_, b) in zip(mu.named_parameters(), sp.named_parameters()):
        assert torch.equal(a, b), n


def test_fan_in_init_and_readout_multiplier():
    mu, sp = _pair(128, 32)
    mults = fan_in_mults(mu)
    assert mults["blocks.0.attn.q_proj.weight"] == 4.0
    # same random draws, std divided by sqrt(fan-in multiplier) on the hidden matrices only
    for (n, a), (_, b) in zip(mu.named_parameters(), sp.named_parameters()):
        expected = b / math.sqrt(mults[n]) if n in mults else b
        torch.testing.assert_close(a, expected, rtol=1e-6, atol=0, msg=n)
    assert mu.config.logit_scale == 0.25  # base / width (mup's MuReadout output multiplier)
    assert mu.config.softmax_scale == pytest.approx(math.sqrt(8) / 32)  # 1/d_head, = 1/sqrt(8) at the base head size 8
    assert not mu.config.zero_readout and sp.config.logit_scale == 1.0


def _mup_package_groups(model, cls, **kw):
    return _lrs(cls(model.parameters(), **kw))


def test_adam_rule_matches_mup_muadamw():
    mu, _ = _pair(128, 32)
    ours = _lrs(build_optimizer(mu, OptimizerSpec(name="adamw", lr=1e-2, weight_decay=0.1, mup=True,
                                                    overrides={r: {"weight_decay": 0.1} for r in ("embedding", "norm")})))
    ref = _mup_package_groups(mu, mup_pkg.MuAdamW, lr=1e-2, weight_decay=0.1)
    for n, p in mu.named_parameters():
        assert ours[id(p)]["lr"] == pytest.approx(ref[id(p)]["lr"]), n
        assert ours[id(p)]["weight_decay"] == pytest.approx(ref[id(p)]["weight_decay"]), n


def test_sgd_rule_matches_mup_musgd():
    mu, _ = _pair(128, 32)
    ours = _lrs(build_optimizer(mu, OptimizerSpec(name="sgd", lr=0.1, weight_decay=1e-3, mup=True,
                                                    overrides={r: {"weight_decay": 1e-3} for r in ("embedding", "norm")})))
    ref = _mup_package_groups(mu, mup_pkg.MuSGD, lr=0.1, weight_decay=1e-3)
    for n, p in mu.named_parameters():
        assert ours[id(p)]["lr"] == pytest.approx(ref[id(p)]["lr"]), n
        assert ours[id(p)]["weight_decay"] == pytest.approx(ref[id(p)]["weight_decay"]), n


@pytest.mark.parametrize("name", ["lion", "sophia", "adafactor", "adam_mini", "adalayer", "shampoo"])
def test_adam_like_families_scale_hidden_lr_by_inverse_fan_in(name):
    mu, _ = _pair(128, 32)
    hparams = {"n_heads": 4} if name == "adam_mini" else {}
    groups = _lrs(build_optimizer(mu, OptimizerSpec(name=name, lr=1e-3, mup=True, hparams=hparams)))
    for n, p in mu.named_parameters():
        shape = p.infshape
        want = 1e-3 / shape[1].width_mult() if shape.ninf() == 2 else 1e-3
        assert groups[id(p)]["lr"] == pytest.approx(want), n


def test_muon_rule_keeps_the_update_spectral_norm_across_width():
    """Spectral scaling: ‖ΔW‖₂ of a square hidden matrix is width-independent under μP, ∝ sqrt(width) in SP."""
    mix = [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"]}]
    norms = {}
    for width in (32, 128):
        for flag in (True, False):
            torch.manual_seed(0)
            model = build_mup_model(TINY, base=32, n_embd=width) if flag else build_model(TINY, n_embd=width)
            opt = build_optimizer(model, OptimizerSpec(name="muon", lr=0.02, mup=flag, mix=mix))
            before = model.blocks[0].attn.o_proj.weight.detach().clone()
            idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
            model.loss(model(idx), idx).backward()
            opt.step()
            delta = model.blocks[0].attn.o_proj.weight.detach() - before
            norms[width, flag] = torch.linalg.matrix_norm(delta, ord=2).item()
    assert norms[128, True] / norms[32, True] == pytest.approx(1.0, rel=0.25)
    assert norms[128, False] / norms[32, False] == pytest.approx(2.0, rel=0.25)  # rms_match: 0.2·sqrt(width)


def test_soap_readout_rule():
    mu, _ = _pair(128, 32)
    groups = build_optimizer(mu, OptimizerSpec(name="soap", lr=1e-3, mup=True)).param_groups
    readout = [g for g in groups if g["role"] == "readout"][0]
    assert readout["lr"] == pytest.approx(1e-3 * 2.0)  # sqrt(width multiplier 4)


def test_mix_parts_get_their_own_rule():
    mu, _ = _pair(128, 32)
    opt = build_optimizer(mu, OptimizerSpec(name="sgd", lr=0.1, mup=True,
                                            mix=[{"optimizer": "adalayer", "roles": ["readout", "norm"], "lr": 1e-3}]))
    by_role = {(g["role"], round(g["lr"], 8)) for g in opt.param_groups}
    assert ("readout", 1e-3) in by_role and ("norm", 1e-3) in by_role  # Adam-like rule: vectors unchanged
    assert ("embedding", 0.4) in by_role  # MuSGD: vector-like lr × width multiplier


def test_bad_inputs_give_clear_errors():
    cfg = build_model(TINY, n_embd=64).config
    with pytest.raises(ValueError, match="larger than the target width"):
        base_config(cfg, 128)
    with pytest.raises(ValueError, match="architectures differ"):
        base_config(cfg, "gpt2-tiny")
    with pytest.raises(ValueError, match="larger than the target"):
        build_mup_model(TINY, base={**TINY, "n_embd": 128}, n_embd=64)
    with pytest.raises(ValueError, match="no μP rule"):
        OptimizerSpec(name="shampoo", mup=True, hparams={"grafting": "none"})
    plain = build_model(TINY)
    with pytest.raises(ValueError, match=r"mup base shapes missing.*set_base_shapes"):
        configure(plain, "adamw", mup=True)
    with pytest.raises(ValueError, match="Muon's μP rule covers hidden matrices only"):
        build_optimizer(build_mup_model(TINY, base=32, n_embd=64),
                        OptimizerSpec(name="muon", mup=True, role_patterns={r"wte": "hidden"},
                                      mix=[{"optimizer": "adamw", "roles": ["readout", "norm"]}]))


def test_base_shapes_survive_state_and_compile_and_mismatch_is_caught():
    mu = build_mup_model(TINY, base=32, n_embd=64)
    state = base_shapes_state(mu)
    # recomputed from the config: a fresh model (e.g. a resumed run) has the same base shapes
    check_base_shapes(build_mup_model(TINY, base=32, n_embd=64), state)
    with pytest.raises(ValueError, match="differ"):
        check_base_shapes(build_mup_model(TINY, base=16, n_embd=64), state)
    # the stored form rebuilds the same multipliers on a plain model
    plain = build_model(TINY, n_embd=64)
    set_base_shapes(plain, state)
    assert {n: p.infshape.width_mult() for n, p in plain.named_parameters()} == \
           {n: p.infshape.width_mult() for n, p in mu.named_parameters()}
    # torch.compile wraps without copying: same Parameter objects, infshape kept, same groups;
    # the eager backend runs dynamo's graph capture without needing a C compiler
    compiled = torch.compile(mu, backend="eager")
    assert all(hasattr(p, "infshape") for p in compiled.parameters())
    spec = OptimizerSpec(name="adamw", lr=1e-2, mup=True)
    ours = sorted((g["role"], g["lr"], len(g["params"])) for g in build_optimizer(compiled, spec).param_groups)
    assert ours == sorted((g["role"], g["lr"], len(g["params"])) for g in build_optimizer(mu, spec).param_groups)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(compiled(idx), mu(idx))
    # load_state_dict copies into the same objects: multipliers survive a checkpoint load
    mu2 = build_mup_model(TINY, base=32, n_embd=64)
    mu2.load_state_dict(torch.load(_save(mu), weights_only=True))
    assert all(hasattr(p, "infshape") for p in mu2.parameters())


def _save(model) -> "io.BytesIO":
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    return buf


def test_rounded_mlp_width_is_still_a_width_dimension():
    """SwiGLU's hidden size rounded up to a multiple of 256 is 256 at widths 32 and 64: the delta
    model must be wide enough for mup to see the MLP grow, or gate/up/down become vector-like."""
    cfg = {**TINY, "mlp_multiple_of": 256}
    model = build_mup_model(cfg, base=32, n_embd=128)
    shapes = {n: p.infshape for n, p in model.named_parameters()}
    gate = next(n for n in shapes if "gate" in n)
    down = next(n for n in shapes if "down" in n)
    assert shapes[gate].ninf() == 2 and shapes[down].ninf() == 2
    assert shapes[gate][0].width_mult() == pytest.approx(512 / 256)  # 8·128/3 → 512, base 256
    opt = build_optimizer(model, OptimizerSpec(name="adamw", lr=1e-2, mup=True))
    assert _lrs(opt)[id(dict(model.named_parameters())[gate])]["lr"] == pytest.approx(1e-2 / 4)  # fan-in 128/32


def test_adafactor_and_shampoo_graft_eps_scale_and_relative_step_is_refused():
    model = build_mup_model(TINY, base=32, n_embd=128)
    hidden = next(p for n, p in model.named_parameters() if "q_proj" in n)
    opt = build_optimizer(model, OptimizerSpec(name="adafactor", lr=1e-2, eps=1e-8, mup=True))
    assert _lrs(opt)[id(hidden)]["eps"] == pytest.approx(1e-8 / 4)
    opt = build_optimizer(model, OptimizerSpec(name="shampoo", lr=1e-2, mup=True, hparams={"graft_eps": 1e-8}))
    assert _lrs(opt)[id(hidden)]["graft_eps"] == pytest.approx(1e-8 / 4)
    with pytest.raises(ValueError, match="relative_step"):
        OptimizerSpec(name="adafactor", lr=1e-2, mup=True, hparams={"relative_step": True})
