"""Presets: every named size within 10% of its name (built on the meta device), lookup errors."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_optlab.models import (
    GPT,
    PRESETS,
    GPTConfig,
    Llama,
    LlamaConfig,
    available_presets,
    build_model,
    preset_config,
)
from lightning_optlab.params import classify_parameters


def nominal(name: str) -> float | None:
    m = re.search(r"-(\d+(?:\.\d+)?)([mb])$", name)
    return None if m is None else float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)


def analytic_count(cfg) -> int:
    """Parameters written out from the shapes (an oracle independent of the module tree)."""
    d, L, V, h = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.hidden_dim
    kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    norm = d * (1 + b) if cfg.norm == "layernorm" else d
    attn = 2 * d * d + 2 * d * kv + b * (2 * d + 2 * kv)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * h + b * ((2 if cfg.mlp == "swiglu" else 1) * h + d)
    total = L * (attn + mlp + 2 * norm) + norm + V * d
    total += 0 if cfg.tie_embeddings else V * d
    total += cfg.block_size * d if cfg.positions == "learned" else 0
    return total


def test_both_families_have_every_study_size():
    for family in ("gpt2", "llama"):
        for size in ("tiny", "50m", "150m", "300m", "600m", "1.2b", "2.7b"):
            assert f"{family}-{size}" in PRESETS
    assert "gpt2-124m" in PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_on_meta(name):
    with torch.device("meta"):
        model = build_model(name)
    assert model.wte.weight.is_meta  # no memory was allocated
    assert isinstance(model, Llama if name.startswith("llama") else GPT)
    count = model.num_params()
    assert count == analytic_count(model.config)
    target = nominal(name)
    if target is not None:
        assert abs(count / target - 1) <= 0.10, f"{name}: {count / 1e6:.1f}M parameters"


def test_gpt2_124m_is_gpt2_small():
    cfg = preset_config("gpt2-124m")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size) == (12, 768, 12, 50304, 1024)
    assert cfg.tie_embeddings and isinstance(cfg, GPTConfig)
    with torch.device("meta"):
        assert build_model(cfg).num_params() == 124_475_904  # nanoGPT's count with the padded vocabulary


def test_tiny_presets():
    for name in ("gpt2-tiny", "llama-tiny"):
        cfg = preset_config(name)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size) == (2, 64, 4, 256, 128)
    assert isinstance(preset_config("llama-tiny"), LlamaConfig)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama-7b'; known presets: .*llama-tiny"):
        build_model("llama-7b")


def test_overrides_are_validated_and_do_not_touch_the_registry():
    model = build_model("llama-tiny", vocab_size=300, qk_layernorm=True, z_loss=1e-4)
    assert model.lm_head.out_features == 300 and model.config.z_loss == 1e-4
    assert PRESETS["llama-tiny"].vocab_size == 256 and not PRESETS["llama-tiny"].qk_layernorm
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) n_layers; fields are: .*n_layer"):
        build_model("gpt2-tiny", n_layers=3)
    with pytest.raises(ValueError, match=r"n_head \(4\) must be a multiple of n_kv_head \(3\)"):
        build_model("llama-tiny", n_kv_head=3)
    cfg = preset_config("gpt2-tiny")
    cfg.n_layer = 5  # a copy
    assert PRESETS["gpt2-tiny"].n_layer == 2


def test_mapping_specs():
    model = build_model({"preset": "llama-tiny", "n_layer": 1})
    assert isinstance(model, Llama) and len(model.blocks) == 1
    model = build_model({"family": "llama", "n_embd": 32, "n_head": 2, "vocab_size": 50})
    assert isinstance(model, Llama) and model.config.positions == "rope"
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        build_model({"family": "mamba"})


@pytest.mark.parametrize("name", ["gpt2-50m", "llama-50m"])
@pytest.mark.parametrize("tied", [False, True])
def test_preset_roles(name, tied):
    with torch.device("meta"):
        model = build_model(name, tie_embeddings=tied)
    roles = classify_parameters(model)
    counts = {r: sum(1 for v in roles.values() if v == r) for r in ("embedding", "hidden", "readout", "norm", "bias")}
    L = model.config.n_layer
    assert counts["embedding"] == (2 if name.startswith("gpt2") else 1)
    assert counts["readout"] == (0 if tied else 1)
    per_block_mats = 6 if name.startswith("gpt2") else 7
    assert counts["hidden"] == L * per_block_mats
    assert counts["bias"] == (L * 6 if name.startswith("gpt2") else 0)
    assert counts["norm"] == (2 * L + 1) * (2 if name.startswith("gpt2") else 1)
