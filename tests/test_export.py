"""optlab export: the pack's reference models as transformers' LlamaForCausalLM / GPT2LMHeadModel,
logits equal within 1e-5 on random inputs, μP multipliers folded into the weights."""

from __future__ import annotations

import pytest
import torch

from lightning_optlab.cli import main
from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.export import ExportError, export_model
from lightning_optlab.models import build_model

transformers = pytest.importorskip("transformers")


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():  # norms and biases away from their init, so a mapping mistake shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _max_diff(model, hf, vocab, t=24):
    idx = torch.randint(0, vocab, (3, t), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(idx) - hf(idx).logits).abs().max().item()


@pytest.mark.parametrize("spec, cls", [
    ({"preset": "llama-tiny", "n_kv_head": 2, "tie_embeddings": False}, "LlamaForCausalLM"),
    ({"preset": "llama-tiny", "tie_embeddings": True}, "LlamaForCausalLM"),
    ({"preset": "gpt2-tiny"}, "GPT2LMHeadModel"),
    ({"preset": "gpt2-tiny", "bias": False, "tie_embeddings": False}, "GPT2LMHeadModel"),
], ids=["llama-gqa", "llama-tied", "gpt2", "gpt2-nobias-untied"])
def test_export_logits_equal_the_packs_model(spec, cls):
    model = _perturbed(build_model(spec))
    hf = export_model(model)
    assert type(hf).__name__ == cls
    assert _max_diff(model, hf, model.config.vocab_size) < 1e-5


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_mup_multipliers_are_folded_into_the_weights(preset):
    pytest.importorskip("mup")
    from lightning_optlab.mup import build_mup_model

    model = _perturbed(build_mup_model({"preset": preset, "n_embd": 128, "tie_embeddings": False}, base=32))
    assert model.config.logit_scale != 1.0 and model.config.attn_scale != "sqrt"
    assert _max_diff(model, export_model(model), model.config.vocab_size) < 1e-5


def test_what_has_no_equivalent_is_refused_with_the_reason():
    with pytest.raises(ExportError, match="qk_layernorm=True has no equivalent"):
        export_model(build_model({"preset": "llama-tiny", "qk_layernorm": True}))
    with pytest.raises(ExportError, match="tied to the token embedding and multiplied by logit_scale"):
        export_model(build_model({"preset": "gpt2-tiny", "logit_scale": 0.5}))
    with pytest.raises(ExportError, match="grouped-query attention"):
        export_model(build_model({"preset": "gpt2-tiny", "n_kv_head": 2}))
    with pytest.raises(ExportError, match="neither LLaMA's"):
        export_model(build_model({"preset": "llama-tiny", "norm": "layernorm"}))


def test_optlab_export_writes_a_loadable_folder_with_its_tokenizer(tmp_path, capsys):
    model = _perturbed(build_model({"preset": "llama-tiny", "vocab_size": 257}))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"preset": "llama-tiny", "vocab_size": 257}}}, ckpt)
    ByteTokenizer().save(tmp_path / "run" / "tokenizer.json")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert _max_diff(model, hf, 257) < 1e-5
    ids = tok("hello world")["input_ids"]
    assert ids == ByteTokenizer().encode("hello world") and tok.eos_token_id == 256 == hf.config.eos_token_id


def test_optlab_export_of_a_non_checkpoint_is_one_line(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert "not a CausalLMModule checkpoint" in capsys.readouterr().err
