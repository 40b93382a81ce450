"""Our adapter and lm-eval's own Hugging Face wrapper (HFLM) agree on a tiny random GPT-2."""

import pytest
import torch
from lm_eval.api.instance import Instance

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # HFLM imports it

from lightning_optlab.data.tokenizer import train_bpe  # noqa: E402
from lightning_optlab.eval import ModuleLM  # noqa: E402

torch.set_num_threads(1)

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Question: what is a fox?\nAnswer: an animal.",
         "A magnet will pick up a paper clip. Water turns into ice when it is frozen."] * 4


def hf_tokenizer_from(tok):
    """A transformers tokenizer over the very same ``tokenizers`` object: both see the same ids."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, eos_token=tok.eos_token)


@pytest.fixture(scope="module")
def setup():
    from lm_eval.models.huggingface import HFLM
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_bpe(TEXTS, vocab_size=300)  # built here from local text: no download
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)).eval()
    hf = HFLM(pretrained=model, tokenizer=hf_tokenizer_from(tok), batch_size=4, device="cpu")
    ours = ModuleLM(model, tok, batch_size=4)
    return hf, ours, tok


def test_same_token_ids(setup):
    hf, ours, _ = setup
    for text in TEXTS[:3] + ["  spaces  and\nnewlines "]:
        assert hf.tok_encode(text) == ours.tok_encode(text)
    assert hf.eot_token_id == ours.eot_token_id and hf.max_length == ours.max_length == 24


def test_a_tokenizer_that_adds_bos_by_default_is_asked_not_to(setup):
    from transformers import PreTrainedTokenizerFast

    _, ours, tok = setup
    bos_adding = PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, eos_token=tok.eos_token,
                                         bos_token=tok.eos_token)
    bos_adding._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single=f"{tok.eos_token} $A", special_tokens=[(tok.eos_token, tok.eos_id)])
    assert bos_adding.encode("The fox")[0] == tok.eos_id  # adds BOS unless told not to
    lm = ModuleLM(ours.model, bos_adding)
    assert lm.tok_encode("The fox") == tok.encode("The fox")


def test_loglikelihoods_equal_hflm(setup):
    hf, ours, _ = setup
    pairs = [("Question: what is a fox?\nAnswer:", " an animal."), ("The quick brown", " fox"), ("", "Water turns"),
             ("A magnet will pick up", " a paper clip. Water turns"),  # HFLM refuses continuations longer than L
             (TEXTS[0] * 2, " jumps"), ("The lazy dog ", "jumps")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    mine = ours.loglikelihood(reqs, disable_tqdm=True)
    assert [x for x, _ in mine] == pytest.approx([x for x, _ in theirs], abs=2e-4)
    assert [g for _, g in mine] == [g for _, g in theirs]


def test_rolling_loglikelihoods_equal_hflm(setup):
    hf, ours, _ = setup
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS[:3])]
    assert ours.loglikelihood_rolling(reqs, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(reqs, disable_tqdm=True), abs=5e-4)
