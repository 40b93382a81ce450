"""ModuleLM scores requests as a direct float64 computation with the model does."""

import copy
import random

import pytest
import torch
from lm_eval.api.instance import Instance

from lightning_optlab.data.tokenizer import ByteTokenizer
from lightning_optlab.eval import ModuleLM, chunk_requests
from lightning_optlab.models import GPT, GPTConfig

torch.set_num_threads(1)
L = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=257, block_size=L, n_layer=2, n_head=2, n_embd=16))
    return m.train()  # the adapter must put it back into train mode


def _direct(model, ctx, cont):
    """log p(cont | ctx): every continuation token scored from a window of at most L tokens,
    the windows cut exactly as documented (the last chunk first, L continuation tokens each)."""
    whole = ctx + cont
    model64 = model.double()
    total, greedy = 0.0, True
    end = len(whole)
    with torch.no_grad():
        while end > len(ctx):
            start = max(len(ctx), end - L)
            inputs = whole[max(0, end - 1 - L):end - 1]
            logp = torch.log_softmax(model64(torch.tensor([inputs]))[0], -1)
            offset = max(0, end - 1 - L)
            for p in range(start, end):  # token whole[p] is predicted at input position p - 1 - offset
                row = logp[p - 1 - offset]
                total += row[whole[p]].item()
                greedy &= int(row.argmax()) == whole[p]
            end = start
    model.float()
    return total, greedy


def test_chunks_cover_the_continuation_once():
    ctx, cont = list(range(5)), list(range(100, 140))
    chunks = chunk_requests(ctx, cont, 16)
    assert [t for _, _, targets in chunks for t in targets] == cont
    whole = ctx + cont
    for inputs, first, targets in chunks:
        assert len(inputs) <= 16
        k = whole.index(targets[0])
        assert inputs[first] == whole[k - 1]  # the position that predicts the first target
    assert chunk_requests([1, 2, 3], [4, 5], 16) == [([1, 2, 3, 4], 2, [4, 5])]


def test_loglikelihood_tokens_equal_a_direct_computation(model):
    rng = random.Random(0)
    reqs = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (15, 1), (3, 13), (40, 2), (30, 12), (2, 16), (4, 17), (7, 45), (60, 33)]:
        reqs.append(([rng.randrange(257) for _ in range(n_ctx)], [rng.randrange(257) for _ in range(n_cont)]))
    lm = ModuleLM(model, ByteTokenizer(), batch_size=3)
    got = lm.score_tokens(reqs)
    for (ctx, cont), (logp, greedy) in zip(reqs, got):
        ref, ref_greedy = _direct(model, ctx, cont)
        assert logp == pytest.approx(ref, abs=1e-4, rel=1e-5)
        assert greedy == ref_greedy
    assert model.training
    # batching and ordering do not change the numbers
    one = ModuleLM(model, ByteTokenizer(), batch_size=1).score_tokens(reqs[::-1])[::-1]
    assert [x for x, _ in one] == pytest.approx([x for x, _ in got], abs=1e-5)


def test_greedy_flag_on_the_models_own_argmax(model):
    ctx = [10, 20, 30]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    lm = ModuleLM(model, ByteTokenizer())
    assert lm.score_tokens([(ctx, [nxt])])[0][1] is True
    assert lm.score_tokens([(ctx, [(nxt + 1) % 257])])[0][1] is False


def test_lm_eval_requests_split_context_and_continuation_like_lm_eval(model):
    lm = ModuleLM(model, ByteTokenizer(), batch_size=4)
    pairs = [("Question: why?\nAnswer:", " because"), ("Answer: ", "yes"), ("", "hello"), ("x" * 40, " long tail")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    expect = [
        _direct(model, list(b"Question: why?\nAnswer:"), list(b" because")),
        _direct(model, list(b"Answer:"), list(b" yes")),  # the context's trailing space moves over
        _direct(model, [256], list(b"hello")),  # an empty context is the end-of-text token
        _direct(model, list(b"x" * 40), list(b" long tail")),
    ]
    for (logp, greedy), (ref, ref_greedy) in zip(got, expect):
        assert logp == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_rolling_loglikelihood_is_the_whole_texts_log_probability(model):
    lm = ModuleLM(model, ByteTokenizer())
    text = "short text"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert got == pytest.approx(_direct(model, [256], list(text.encode()))[0], abs=1e-4)
    # longer than the context: disjoint windows, each conditioned on what fits before it
    long = "a longer text that does not fit into sixteen tokens"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)], disable_tqdm=True)
    ids = list(long.encode())
    ref = _direct(model, [256], ids[:L])[0]
    for s in range(L, len(ids), L):
        ref += _direct(model, ids[max(0, s + min(L, len(ids) - s) - 1 - L):s], ids[s:s + L])[0]
    assert got == pytest.approx(ref, abs=1e-3)


def test_generate_until_is_greedy_and_stops(model):
    lm = ModuleLM(model, ByteTokenizer(), max_gen_toks=6)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["\x00never"]}), 0)])
    ids = list(b"abc")
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids[-L:]]))[0, -1].argmax())
            if nxt == 256:
                break
            ids.append(nxt)
    assert text == ByteTokenizer().decode(ids[3:])
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["."], "do_sample": True}), 0)])


def test_arguments_are_checked(model):
    with pytest.raises(ValueError, match="max_length"):
        ModuleLM(torch.nn.Linear(2, 2), ByteTokenizer())
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got 0"):
        ModuleLM(model, ByteTokenizer(), batch_size=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        ModuleLM(model, type("Tok", (), {"encode": lambda s, t: [], "decode": lambda s, i: ""})())


def test_adapter_runner_and_cli_import_no_lightning():
    import subprocess
    import sys

    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import lightning_optlab.eval, lightning_optlab.eval.cli, lightning_optlab.eval.run, lightning_optlab.eval.tasks
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_float64_model_is_scored_in_float64(model):
    """The adapter scores in the model's dtype (float32 at least): a float64 model must not be cut
    to float32 on the way (it was, 6.5e-6 off the direct computation)."""
    rng = random.Random(1)
    reqs = [([rng.randrange(257) for _ in range(n)], [rng.randrange(257) for _ in range(m)]) for n, m in [(3, 4), (9, 20)]]
    refs = [_direct(model, ctx, cont)[0] for ctx, cont in reqs]
    model64 = copy.deepcopy(model).double()
    got = ModuleLM(model64, ByteTokenizer(), batch_size=2).score_tokens(reqs)
    for (logp, _), ref in zip(got, refs):
        assert logp == pytest.approx(ref, abs=1e-10, rel=1e-12)


@pytest.mark.parametrize("call, args", [
    ("loglikelihood", ("ab", "c")),
    ("loglikelihood_rolling", ("abcdef",)),
    ("generate_until", ("abc", {"until": ["\x00never"], "max_gen_toks": 2})),
])
def test_progress_bars_follow_lm_evals_disable_tqdm(model, call, args, capsys):
    lm = ModuleLM(model, ByteTokenizer(), max_length=16)
    request = [Instance(call, {}, args, 0)]
    getattr(lm, call)(request, disable_tqdm=True)
    assert "requests" not in capsys.readouterr().err
    getattr(lm, call)(request)  # lm-eval's default: disable_tqdm=False shows its bar, as HFLM does
    assert f"Running {call} requests" in capsys.readouterr().err
    lm_rank1 = ModuleLM(model, ByteTokenizer(), max_length=16, rank=1, world_size=1)  # not rank 0: no bar
    getattr(lm_rank1, call)(request)
    assert "requests" not in capsys.readouterr().err
