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
