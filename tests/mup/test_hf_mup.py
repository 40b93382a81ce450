"""μP for your own model: Hugging Face Llama and GPT-2 from their configs (base and delta on meta),
the readout multiplier and init applied, hidden-group learning rates scaled, a flat coordinate check
over 3 widths; a μP request on a model without a readout multiplier is an error."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("mup")
transformers = pytest.importorskip("transformers")

from lightning_optlab import OptimizerSpec  # noqa: E402
from lightning_optlab.configure import plan_param_groups  # noqa: E402
from lightning_optlab.mup import coord_check, coord_ratios, config_at_width, hf_base_shapes, mup_hf_model  # noqa: E402


def llama_cfg(width=32):
    return transformers.LlamaConfig(vocab_size=257, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                    num_attention_heads=width // 8, num_key_value_heads=width // 16, head_dim=8,
                                    max_position_embeddings=64, bos_token_id=None, eos_token_id=None)


def gpt2_cfg(width=32):
    return transformers.GPT2Config(vocab_size=257, n_embd=width, n_layer=2, n_head=width // 8, n_positions=64,
                                   bos_token_id=None, eos_token_id=None)


CFGS = {"llama": llama_cfg, "gpt2": gpt2_cfg}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("family", list(CFGS))
def test_hidden_group_learning_rates_scale_with_width(family):
    model = mup_hf_model(CFGS[family](64), base_width=16)
    (_, _, groups, _), = plan_param_groups(model, OptimizerSpec(name="adamw", lr=1e-2, mup=True))
    lrs = {g["role"]: g["lr"] for g in groups}
    assert lrs["hidden"] == pytest.approx(1e-2 / 4)
    assert lrs["embedding"] == pytest.approx(1e-2)
    assert type(model.get_output_embeddings()).__name__ in ("MuReadout", "MuSharedReadout")


@pytest.mark.parametrize("family", list(CFGS))
def test_at_the_base_width_the_model_is_the_configs_own(family):
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(CFGS[family](32)).eval()
    torch.manual_seed(0)
    mu = mup_hf_model(CFGS[family](32), base_width=32).eval()
    idx = torch.randint(0, 257, (2, 8))
    assert torch.allclose(plain(idx).logits, mu(idx).logits, atol=1e-6)


@pytest.mark.parametrize("family", list(CFGS))
def test_coordinate_check_is_flat_over_three_widths_under_mup(family):
    def factory(width):
        return mup_hf_model(config_at_width(CFGS[family](32), width), base_width=32)

    # measured (RMS at width 128 / width 32 after 3 AdamW steps): μP 0.78..1.31 (Llama), 0.95..1.04 (GPT-2);
    # SP up to 26 (Llama) and 11 (GPT-2)
    records = coord_check(factory, "adamw", widths=[32, 64, 128], steps=3, lr=1e-2, batch_size=4, seq_len=16)
    ratios = coord_ratios(records, t=3)
    assert "logits" in ratios and len(ratios) >= 4
    assert all(1 / 1.5 < r < 1.5 for r in ratios.values()), ratios

    def sp(width):
        return transformers.AutoModelForCausalLM.from_config(config_at_width(CFGS[family](32), width))

    sp_ratios = coord_ratios(coord_check(sp, "adamw", widths=[32, 64, 128], steps=3, lr=1e-2, mup=False,
                                         batch_size=4, seq_len=16), t=3)
    assert max(sp_ratios.values()) > 4, sp_ratios


def test_mup_on_a_model_without_a_readout_multiplier_is_an_error():
    model = transformers.AutoModelForCausalLM.from_config(llama_cfg(64))
    hf_base_shapes(model, 16)  # base shapes alone: the logits are still the standard parametrization's
    with pytest.raises(ValueError, match=r"readout 'lm_head' is a plain Linear without μP's 1/width output multiplier"):
        plan_param_groups(model, OptimizerSpec(name="adamw", lr=1e-2, mup=True))


def test_a_base_module_works_through_causal_lm_module():
    from lightning_optlab.lit import CausalLMModule
    from lightning_optlab.mup import set_base_shapes

    with torch.device("meta"):
        base = transformers.AutoModelForCausalLM.from_config(config_at_width(llama_cfg(), 16))
        delta = transformers.AutoModelForCausalLM.from_config(config_at_width(llama_cfg(), 32))
    model = mup_hf_model(llama_cfg(64), base_width=16)
    set_base_shapes(model, base, delta=delta)  # the same shapes, given as modules
    module = CausalLMModule(model, OptimizerSpec(name="adamw", lr=1e-2), mup=base)
    assert module.spec.mup
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert {g["role"]: g["lr"] for g in groups}["hidden"] == pytest.approx(1e-2 / 4)


@pytest.mark.parametrize("family", list(CFGS))
def test_causal_lm_module_takes_a_base_width_for_a_hugging_face_model(family):
    from lightning_optlab.lit import CausalLMModule

    torch.manual_seed(0)
    module = CausalLMModule(transformers.AutoModelForCausalLM.from_config(CFGS[family](64)),
                            OptimizerSpec(name="adamw", lr=1e-2), mup=16)
    assert module.spec.mup
    assert type(module.model.get_output_embeddings()).__name__ in ("MuReadout", "MuSharedReadout")
    lrs = {g["role"]: g["lr"] for g in module.configure_optimizers()["optimizer"].param_groups}
    assert lrs["hidden"] == pytest.approx(1e-2 / 4) and lrs["embedding"] == pytest.approx(1e-2)
    # the same model as mup_hf_model builds from the config
    torch.manual_seed(0)
    ref = mup_hf_model(CFGS[family](64), base_width=16)
    for (n, p), (_, q) in zip(module.model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n

    def factory(width):  # the coordinate check through CausalLMModule(model, spec, mup=32)
        model = transformers.AutoModelForCausalLM.from_config(config_at_width(CFGS[family](32), width))
        return CausalLMModule(model, OptimizerSpec(name="adamw", lr=1e-2), mup=32).model

    ratios = coord_ratios(coord_check(factory, "adamw", widths=[32, 64, 128], steps=3, lr=1e-2, batch_size=4,
                                      seq_len=16), t=3)
    assert "logits" in ratios and all(1 / 1.5 < r < 1.5 for r in ratios.values()), ratios
