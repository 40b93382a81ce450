"""Bring your own model: random-weight Hugging Face causal LMs (built from small configs, nothing
downloaded) train through CausalLMModule with the pack's optimizers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_optlab import OptimizerSpec
from lightning_optlab.lit import CausalLMModule, LMDataModule
from lightning_optlab.lit.module import logits_of

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the byte tokenizer's ids


def hf_llama(width: int = 32, vocab: int = VOCAB, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg)


def hf_gpt2(width: int = 32, vocab: int = VOCAB, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_positions=64, **kw)
    return transformers.GPT2LMHeadModel(cfg)


SPECS = {
    "adamw": dict(name="adamw", lr=3e-3, weight_decay=0.1),
    "soap": dict(name="soap", lr=3e-3, betas=(0.95, 0.95), hparams={"precondition_frequency": 2}),
    "muon+adamw": dict(name="muon", lr=0.02, mix=[dict(optimizer="adamw", roles=["embedding", "readout", "norm", "bias"],
                                                       lr=3e-3)]),
}


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(module, tmp_path, steps=12, **dm_kw):
    dm = LMDataModule(**{**dict(data="embedded", tokenizer="bytes", seq_len=32, batch_size=4, val_batches=1,
                                work_dir=str(tmp_path / "data")), **dm_kw})
    rec = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=steps, limit_val_batches=1, val_check_interval=steps,
                        num_sanity_val_steps=0, callbacks=[rec], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return rec.losses, trainer


@pytest.mark.parametrize("factory", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("opt", list(SPECS))
def test_hf_causal_lm_trains_with_the_packs_optimizers(tmp_path, factory, opt):
    module = CausalLMModule(factory(), OptimizerSpec(**SPECS[opt]))
    losses, trainer = _fit(module, tmp_path)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_hf_loss_is_the_shifted_target_cross_entropy():
    model = hf_gpt2().eval()
    module = CausalLMModule(model)
    batch = torch.randint(0, VOCAB, (2, 9))
    ours = module._loss(module(batch[:, :-1]), batch[:, 1:], train=False)
    # the model's own labels loss shifts inside: logits[:, :-1] against ids[:, 1:]
    theirs = model(batch, labels=batch).loss
    full = torch.nn.functional.cross_entropy(model(batch).logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    assert torch.allclose(theirs, full, atol=1e-6)
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(
        model(batch[:, :-1]).logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)), atol=1e-6)


def test_logits_of_accepts_tensors_tuples_and_logits_objects():
    t = torch.zeros(1, 2, 3)
    assert logits_of(t) is t
    assert logits_of((t, None)) is t
    assert logits_of(transformers.modeling_outputs.CausalLMOutput(logits=t)) is t
    with pytest.raises(TypeError, match="returns the .B, T, V. logits"):
        logits_of({"x": 1})


def test_the_models_own_tokenizer_is_kept_and_its_file_feeds_the_data(tmp_path):
    from lightning_optlab.data.tokenizer import ByteTokenizer

    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    ByteTokenizer().save(path)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "hf")
    module = CausalLMModule(hf_llama(vocab=len(hf_tok)), OptimizerSpec(lr=3e-3), tokenizer=hf_tok)
    assert module.tokenizer is hf_tok
    losses, _ = _fit(module, tmp_path, steps=2, tokenizer=str(tmp_path / "hf" / "tokenizer.json"))
    assert len(losses) == 2


def test_a_model_smaller_than_the_tokenizer_is_refused_before_training(tmp_path):
    module = CausalLMModule(hf_llama(vocab=100), OptimizerSpec(lr=3e-3))
    with pytest.raises(ValueError, match="257 ids but the model's output has 100 logits"):
        _fit(module, tmp_path, steps=1)


def test_a_base_module_is_not_a_submodule(tmp_path):
    pytest.importorskip("mup")
    base = hf_llama(width=16)
    module = CausalLMModule(hf_llama(width=32), OptimizerSpec(lr=3e-3), mup=base)
    assert not any(n.startswith("mup_base") for n, _ in module.named_parameters())
    assert module.mup_base is base
