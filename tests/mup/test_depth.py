"""μP's depth rules (lightning_optlab.mup.depth): the branch multipliers on the modules, the per-family
η/λ/ε corrections on the groups, equality with plain μP at the proxy's depth, the module's checkpoint
check and the transfer command."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_optlab import OptimizerSpec
from lightning_optlab.configure import build_optimizer
from lightning_optlab.lit import CausalLMModule, LMDataModule
from lightning_optlab.models import resolve_config
from lightning_optlab.mup import build_mup_model, transfer
from lightning_optlab.mup import depth as depth_mod
from lightning_optlab.mup.cli import main as mup_main

ADAMW_MIX = [{"optimizer": "adamw", "roles": ["embedding", "readout", "norm"]}]  # llama: no biases
#: one optimizer per μP family (and the graft that decides Shampoo's), with the hparams they need
FAMILIES = {
    "adamw": ("adamw", {}, []), "lion": ("lion", {}, []), "sophia": ("sophia", {}, []),
    "soap": ("soap", {"precondition_frequency": 1}, []), "shampoo": ("shampoo", {"precondition_frequency": 1}, []),
    "sgd": ("sgd", {"momentum": 0.9}, []), "muon": ("muon", {}, ADAMW_MIX), "adafactor": ("adafactor", {}, []),
}


def _cfg(preset="llama-tiny", **kw):
    return dataclasses.replace(resolve_config(preset), vocab_size=64, block_size=16, **kw)


def _step(model, name, hparams, mix, lr=1e-2, steps=2):
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 9))
    opt = build_optimizer(model, OptimizerSpec(name=name, lr=lr, weight_decay=0.1, mup=True, hparams=hparams, mix=mix))
    outs = []
    for _ in range(steps):
        logits = model(idx[:, :-1])
        outs.append(logits.detach().clone())
        loss = model.loss(logits, idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return outs, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rule", ["depth_mup", "completep"])
def test_every_rule_is_plain_mup_at_the_proxys_depth(family, rule):
    """At the base depth (width 2x the base) a depth rule changes nothing: outputs and updates bit for bit."""
    name, hparams, mix = FAMILIES[family]
    cfg = _cfg(n_embd=64, n_layer=2, qk_layernorm=True, z_loss=1e-4)
    base = dataclasses.replace(cfg, n_embd=32)
    torch.manual_seed(0)
    plain = build_mup_model(cfg, base=base)
    torch.manual_seed(0)
    ruled = build_mup_model(cfg, base=base, depth=rule)
    assert ruled.config.residual_scale == 1.0 and all(b.residual_scale == 1.0 for b in ruled.blocks)
    assert ruled.optlab_mup_depth == {"rule": rule, "base_depth": 2, "depth": 2}
    out_a, w_a = _step(plain, name, hparams, mix)
    out_b, w_b = _step(ruled, name, hparams, mix)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert all(torch.equal(a, b) for a, b in zip(w_a, w_b))


@pytest.mark.parametrize("preset, tied", [("gpt2-tiny", True), ("gpt2-tiny", False), ("llama-tiny", False)])
def test_branch_multiplier_and_residual_init_on_the_modules(preset, tied):
    cfg = _cfg(preset, n_embd=64, n_layer=8, tie_embeddings=tied, zero_readout=False)
    base = dataclasses.replace(cfg, n_embd=32, n_layer=2)
    for rule, alpha in (("depth_mup", 0.5), ("completep", 1.0)):
        torch.manual_seed(0)
        model = build_mup_model(cfg, base=base, depth=rule)
        assert model.config.residual_scale == pytest.approx((2 / 8) ** alpha)
        assert all(b.residual_scale == pytest.approx((2 / 8) ** alpha) for b in model.blocks)
        assert model.config.residual_init_layers == 2  # the proxy's residual init, at every depth
        tagged = {n for n, p in model.named_parameters() if hasattr(p, "optlab_depth")}
        assert tagged == {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
        assert {p.optlab_depth for n, p in model.named_parameters() if n in tagged} == {(rule, 4.0)}
    # the branch multiplier is in the forward pass: the residual stream's branch part scales by it
    torch.manual_seed(0)
    plain = build_mup_model(cfg, base=base)
    torch.manual_seed(0)
    ruled = build_mup_model(cfg, base=base, depth="completep")
    std = {n: p.std().item() for n, p in plain.named_parameters() if n.endswith("o_proj.weight")}
    std_ruled = {n: p.std().item() for n, p in ruled.named_parameters() if n.endswith("o_proj.weight")}
    for n in std:  # plain μP: init_std / sqrt(2·8) / sqrt(m_in); completep: the proxy's / sqrt(2·2)
        assert std_ruled[n] / std[n] == pytest.approx(2.0, rel=1e-6)
    idx = torch.randint(0, 64, (2, 8))
    x = ruled.wte(idx) + ruled.wpe(torch.arange(8)) if ruled.wpe is not None else ruled.wte(idx)
    block = ruled.blocks[0]
    rope = None if ruled.wpe is not None else __import__("lightning_optlab.models.layers", fromlist=["x"]).rotary_cos_sin(
        torch.arange(8), ruled.config.head_dim)
    mid = x + 0.25 * block.attn(block.ln_1(x), rope)
    expect = mid + 0.25 * block.mlp(block.ln_2(mid))
    assert torch.allclose(block(x, rope), expect, atol=1e-6)


def _groups(model, name, hparams=None, mix=None):
    eps = {"eps": 1e-8} if name == "adamw" else {}
    opt = build_optimizer(model, OptimizerSpec(name=name, lr=1e-2, weight_decay=0.1, mup=True, **eps,
                                               hparams=hparams or {}, mix=mix or []))
    return [g for leaf in getattr(opt, "optimizers", [opt]) for g in leaf.param_groups]


@pytest.mark.parametrize("rule, alpha", [("depth_mup", 0.5), ("completep", 1.0)])
def test_group_corrections_per_family(rule, alpha):
    """m_L = 4, width 1x: scale-invariant η·m_L^(α-1), λ·m_L^(1-α), ε·m_L^-α; SGD η·m_L^(2α-1); embeddings,
    final norm and readout untouched."""
    cfg = _cfg(n_embd=32, n_layer=8)
    base = dataclasses.replace(cfg, n_layer=2)
    m = 4.0
    for name in ("adamw", "lion", "sgd"):
        torch.manual_seed(0)
        model = build_mup_model(cfg, base=base, depth=rule)
        names = {id(p): n for n, p in model.named_parameters()}
        kind_lr = m ** (2 * alpha - 1) if name == "sgd" else m ** (alpha - 1)
        hp = {"momentum": 0.9} if name == "sgd" else {}
        for g in _groups(model, name, hp):
            inside = all(names[id(p)].startswith("blocks.") for p in g["params"])
            if not inside and any(names[id(p)].startswith("blocks.") for p in g["params"]):
                assert name == "sgd" and alpha == 0.5  # SGD's factor m_L^0 = 1: one group with ln_f
                inside = False
            assert g["lr"] == pytest.approx(1e-2 * (kind_lr if inside else 1.0)), (name, g["role"])
            if g["role"] == "hidden":  # (norms and embeddings are not decayed by default)
                assert g["weight_decay"] == pytest.approx(0.1 / kind_lr)
            if name == "adamw":
                assert g["eps"] == pytest.approx(1e-8 * (m ** -alpha if inside else 1.0))
            if inside:
                assert g["mup_depth_lr_mult"] == pytest.approx(kind_lr)


def test_depth_and_width_together_in_a_mix():
    """Muon on hidden matrices, AdamW on the rest: width and depth factors multiply, per part."""
    cfg = _cfg(n_embd=64, n_layer=4)
    base = dataclasses.replace(cfg, n_embd=32, n_layer=2)
    torch.manual_seed(0)
    model = build_mup_model(cfg, base=base, depth="depth_mup")
    groups = _groups(model, "muon", mix=ADAMW_MIX)
    adam_norms = [g for g in groups if g["role"] == "norm" and "mup_depth_lr_mult" in g]
    assert adam_norms and all(g["lr"] == pytest.approx(1e-2 * 2 ** -0.5) for g in adam_norms)
    hidden = [g for g in groups if g["role"] == "hidden"]
    assert hidden and all(g["mup_depth_lr_mult"] == pytest.approx(2 ** -0.5) for g in hidden)
    width_only = _groups(build_mup_model(cfg, base=base), "muon", mix=ADAMW_MIX)
    w_lrs = sorted(g["lr"] for g in width_only if g["role"] == "hidden")
    assert sorted(g["lr"] for g in hidden) == pytest.approx([lr * 2 ** -0.5 for lr in w_lrs])


def test_a_family_without_a_depth_rule_and_bad_settings_are_refused(monkeypatch):
    cfg = _cfg(n_embd=32, n_layer=4)
    model = build_mup_model(cfg, base=dataclasses.replace(cfg, n_layer=2), depth="completep")
    monkeypatch.delitem(depth_mod.DEPTH_KINDS, "sign")
    with pytest.raises(ValueError, match="μP family 'sign' .* has no depth rule"):
        _groups(model, "lion")
    with pytest.raises(ValueError, match="depth must be one of"):
        build_mup_model(cfg, base=32, depth="cubic")
    with pytest.raises(ValueError, match="needs base_depth"):
        build_mup_model(cfg, base=32, depth="completep")
    with pytest.raises(ValueError, match="needs base_depth"):
        CausalLMModule({"preset": "llama-tiny"}, mup={"base": 32, "depth": "completep"})
    with pytest.raises(ValueError, match="reference models only"):
        CausalLMModule(torch.nn.Linear(2, 2), mup={"base": 32, "depth": "completep", "base_depth": 2})


def test_resume_keeps_the_depth_rule_and_refuses_another(tmp_path):
    torch.set_num_threads(1)
    model = {"preset": "llama-tiny", "n_layer": 4, "n_embd": 64, "block_size": 32}
    mup = {"base": {"preset": "llama-tiny", "n_layer": 2, "n_embd": 32, "block_size": 32}, "depth": "completep"}
    dm = lambda: LMDataModule(data="embedded", tokenizer="bytes", seq_len=32, batch_size=4, val_batches=1,  # noqa: E731
                              work_dir=str(tmp_path / "data"))
    trainer = lambda **kw: L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,  # noqa: E731
                                     enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                                     limit_val_batches=0, **kw)
    spec = OptimizerSpec(name="adamw", lr=4e-3)
    first = CausalLMModule(model, spec, mup=mup)
    assert first.hparams["mup"]["depth"] == "completep"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(max_steps=2, callbacks=[ckpt]).fit(first, datamodule=dm())
    assert first.model.config.residual_scale == 0.5
    path = tmp_path / "ckpt" / "step=2.ckpt"
    saved = torch.load(path, weights_only=False)["optlab_mup_depth"]
    assert saved == {"rule": "completep", "base_depth": 2, "depth": 4}
    resumed = CausalLMModule(model, spec, mup=mup)
    trainer(max_steps=3).fit(resumed, datamodule=dm(), ckpt_path=path)
    assert resumed.model.config.residual_scale == 0.5
    for other in ({**mup, "depth": "depth_mup"}, {"base": mup["base"]}):
        with pytest.raises(ValueError, match="depth rule completep from base depth 2 to 4"):
            trainer(max_steps=3).fit(CausalLMModule(model, spec, mup=other), datamodule=dm(), ckpt_path=path)


PROXY = {
    "model": {"model": {"preset": "llama-tiny", "n_embd": 32, "n_layer": 2},
              "mup": {"base": {"preset": "llama-tiny", "n_embd": 32, "n_layer": 2}}},
    "optimizer": {"name": "adamw", "lr": 4e-3, "weight_decay": 0.1, "mup": True},
}


def test_transfer_applies_the_depth_rule_and_prints_it(tmp_path, capsys):
    target = {"preset": "llama-tiny", "n_embd": 128, "n_layer": 8}
    result = transfer(PROXY, target, depth="depth_mup")
    holder = result["recipe"]["model"]["mup"]
    assert holder["depth"] == "depth_mup" and holder["base_depth"] == 2
    assert result["depth"]["branch_multiplier"] == pytest.approx(0.5)
    assert not any("depth" in n.split(":")[0] for n in result["notes"])  # depth left the "not transferred" list
    lrs = {(role, round(lr, 12)) for _, role, lr, _, _ in result["role_lrs"]}
    assert ("hidden", round(4e-3 / 4 * 0.5, 12)) in lrs and ("embedding", 4e-3) in lrs  # η/m_in · m_L^-1/2
    # a recipe that asks for the rule gets it without the flag
    asking = {**PROXY, "model": {**PROXY["model"], "mup": {**PROXY["model"]["mup"], "depth": "completep"}}}
    assert transfer(asking, target)["depth"]["rule"] == "completep"
    # the written recipe builds the same model
    rebuilt = CausalLMModule(result["recipe"]["model"]["model"], mup=holder)
    assert rebuilt.mup_depth == {"depth": "depth_mup", "base_depth": 2}
    import yaml
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(PROXY))
    assert mup_main(["transfer", str(tmp_path / "proxy.yaml"), "--target", "llama-tiny", "--depth", "completep",
                     "--out", str(tmp_path / "t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "depth rule: completep (α = 1), 2 → 2 layers" in out and "depth η multipliers by role" in out


def test_export_folds_the_branch_multiplier():
    pytest.importorskip("transformers")
    from lightning_optlab.export import export_model

    for preset in ("llama-tiny", "gpt2-tiny"):
        cfg = _cfg(preset, n_embd=64, n_layer=4, tie_embeddings=False)
        torch.manual_seed(0)
        model = build_mup_model(cfg, base=dataclasses.replace(cfg, n_embd=32, n_layer=2), depth="completep").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        idx = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            assert (model(idx) - export_model(model)(idx).logits).abs().max().item() < 1e-5


def test_describe_names_the_factors():
    line = depth_mod.describe("completep", 32, 8)
    assert "branch multiplier 0.25" in line and "×1 (scale-invariant)" in line and "×4 (SGD)" in line
    assert math.isclose(depth_mod.branch_multiplier("depth_mup", 32, 8), 0.5)
    assert depth_mod.describe("none", 32, 8).startswith("depth rule: none")
