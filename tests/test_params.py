import warnings

import pytest
import torch
from torch import nn

from lightning_optlab.params import ROLES, classify_parameters, group_parameters


def test_roles_of_a_language_model(tiny_lm):
    roles = classify_parameters(tiny_lm)
    assert roles["wte.weight"] == "embedding"
    assert roles["wpe"] == "embedding"
    assert roles["lm_head.weight"] == "readout"
    assert roles["ln_f.weight"] == "norm" and roles["ln_f.bias"] == "norm"
    assert roles["blocks.0.ln1.bias"] == "norm"
    assert roles["blocks.0.attn.q_proj.weight"] == "hidden"
    assert roles["blocks.1.fc.weight"] == "hidden"
    assert roles["blocks.1.fc.bias"] == "bias"
    assert roles["blocks.0.attn.o_proj.bias"] == "bias"
    assert set(roles.values()) == set(ROLES)
    assert list(roles) == [n for n, _ in tiny_lm.named_parameters()]


def test_last_linear_is_readout_of_any_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    roles = classify_parameters(model)
    assert roles == {"0.weight": "hidden", "0.bias": "bias", "2.weight": "hidden", "2.bias": "bias",
                     "4.weight": "readout", "4.bias": "bias"}


def test_readout_rules_apply_in_priority_order_over_the_whole_model():
    """A named readout (optlab_readout) beats a MuReadout, which beats a Linear named like a
    readout, wherever each sits in the module tree."""
    from mup import MuReadout

    from lightning_optlab.models import build_model
    from lightning_optlab.params import readout_module_name

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.output = nn.Linear(8, 8), nn.Linear(8, 8)

    class WithMuReadout(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.block, self.decoder = nn.Embedding(10, 8), Block(), MuReadout(8, 10)

    assert readout_module_name(WithMuReadout()) == "decoder"
    assert classify_parameters(WithMuReadout())["block.output.weight"] == "hidden"

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.model = build_model({"preset": "gpt2-tiny", "tie_embeddings": False})

    assert readout_module_name(Wrapper()) == "model.lm_head"


def test_tied_readout_counts_once_as_embedding(tiny_lm):
    tiny_lm.lm_head.weight = tiny_lm.wte.weight
    roles = classify_parameters(tiny_lm)
    assert "lm_head.weight" not in roles and roles["wte.weight"] == "embedding"


def test_overrides_first_match_wins(tiny_lm):
    roles = classify_parameters(tiny_lm, {r"attn\.q_proj": "readout", r"attn": "norm"})
    assert roles["blocks.0.attn.q_proj.weight"] == "readout"
    assert roles["blocks.0.attn.k_proj.weight"] == "norm"
    assert roles["blocks.0.fc.weight"] == "hidden"


def test_override_matching_nothing_warns(tiny_lm):
    with pytest.warns(UserWarning, match="matched no parameter"):
        classify_parameters(tiny_lm, {r"^nonexistent": "norm"})


def test_bad_override_role_and_regex(tiny_lm):
    with pytest.raises(ValueError, match="unknown parameter role 'matrix'"):
        classify_parameters(tiny_lm, {"fc": "matrix"})
    with pytest.raises(ValueError, match="not a valid regex"):
        classify_parameters(tiny_lm, {"fc(": "hidden"})


def test_frozen_parameters_are_left_out(tiny_lm):
    tiny_lm.wte.weight.requires_grad_(False)
    assert "wte.weight" not in classify_parameters(tiny_lm)


def test_default_grouping_decays_hidden_and_readout_only(tiny_lm):
    groups = group_parameters(tiny_lm, weight_decay=0.1)
    by_role = {g["role"]: g for g in groups}
    assert {r: g["weight_decay"] for r, g in by_role.items()} == {
        "embedding": 0.0, "hidden": 0.1, "readout": 0.1, "norm": 0.0, "bias": 0.0}
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(tiny_lm.parameters()))
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])


def test_role_overrides_replace_group_settings(tiny_lm):
    groups = group_parameters(tiny_lm, 0.1, role_overrides={"embedding": {"weight_decay": 0.05, "lr": 1e-2}})
    emb = next(g for g in groups if g["role"] == "embedding")
    assert emb["weight_decay"] == 0.05 and emb["lr"] == 1e-2
    with pytest.raises(ValueError, match="unknown parameter role"):
        group_parameters(tiny_lm, 0.1, role_overrides={"norms": {"lr": 1.0}})


# --------------------------------------------------------------------------- roles you can trust
class _GatedReadout(torch.nn.Module):
    """A model whose readout (proj_out, d -> V) is followed by another Linear (a gate, d -> d)."""

    def __init__(self, vocab=50, d=8, t=16) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos_emb = torch.nn.Parameter(torch.zeros(t, d))
        self.table = torch.nn.Parameter(torch.zeros(t, d))
        self.body = torch.nn.Linear(d, d)
        self.proj_out = torch.nn.Linear(d, vocab, bias=False)
        self.gate = torch.nn.Linear(d, d)


def test_a_guessed_readout_is_the_vocabulary_sized_linear_and_warns_naming_the_fix():
    with pytest.warns(UserWarning) as record:
        roles = classify_parameters(_GatedReadout())
    assert roles["proj_out.weight"] == "readout" and roles["gate.weight"] == "hidden"
    text = "\n".join(str(w.message) for w in record)
    assert "'proj_out.weight' got the role 'readout' by a guess" in text and "role_patterns" in text
    assert "'pos_emb' got the role 'embedding' by a guess" in text
    assert "'table' got the role 'hidden' by a guess" in text and "position table would be 'embedding'" in text


def test_named_roles_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roles = classify_parameters(_GatedReadout(), {r"^proj_out\.": "readout", r"^pos_emb$": "embedding",
                                                      r"^table$": "embedding"})
    assert roles["table"] == "embedding"


def test_gpt2_tied_embedding_decay_is_off_by_default_and_settable():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=16))
    groups = {g["role"]: g for g in group_parameters(model, 0.1)}
    assert "transformer.wte.weight" in groups["embedding"]["param_names"] and groups["embedding"]["weight_decay"] == 0.0
    assert "readout" not in groups  # lm_head is the same tensor as wte
    decayed = {g["role"]: g for g in group_parameters(model, 0.1, role_overrides={"embedding": {"weight_decay": 0.1}})}
    assert decayed["embedding"]["weight_decay"] == 0.1
    as_readout = {g["role"]: g for g in group_parameters(model, 0.1, role_patterns={r"wte\.weight$": "readout"})}
    assert as_readout["readout"]["param_names"] == ["transformer.wte.weight"] and as_readout["readout"]["weight_decay"] == 0.1


def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=16)).eval()


def test_hf_conv1d_weights_are_tagged_and_conv1d_to_linear_is_exact():
    from lightning_optlab.params import conv1d_to_linear

    model = _hf_gpt2()
    classify_parameters(model)
    assert model.transformer.h[0].attn.c_attn.weight.optlab_in_out
    idx = torch.randint(0, 64, (2, 8))
    before = model(idx).logits
    conv1d_to_linear(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (48, 16)
    assert torch.allclose(model(idx).logits, before, atol=1e-6)


def test_adam_mini_refuses_conv1d_naming_the_parameter_and_accepts_the_converted_model():
    from lightning_optlab import configure
    from lightning_optlab.params import conv1d_to_linear

    model = _hf_gpt2()
    with pytest.raises(ValueError, match=r"c_attn.weight' is stored \(in_features, out_features\).*conv1d_to_linear"):
        opt = configure(model, "adam_mini", lr=1e-3, n_heads=2)["optimizer"]
        model(torch.randint(0, 64, (2, 8))).logits.sum().backward()
        opt.step()
    model = conv1d_to_linear(_hf_gpt2())
    opt = configure(model, "adam_mini", lr=1e-3, n_heads=2)["optimizer"]
    model(torch.randint(0, 64, (2, 8))).logits.sum().backward()
    opt.step()


def test_muon_original_scale_reads_conv1d_as_out_by_in():
    from lightning_optlab.optim.muon import muon_scale, out_in_shape

    model = _hf_gpt2()
    classify_parameters(model)
    w = model.transformer.h[0].mlp.c_fc.weight  # (16 in, 64 out)
    assert out_in_shape(w) == (64, 16)
    lin = torch.nn.Linear(16, 64)
    assert muon_scale("original", *out_in_shape(w)) == muon_scale("original", *out_in_shape(lin.weight)) == 2.0
