"""Requests/s of our lm-eval adapter (``ModuleLM``) vs lm-eval's own Hugging Face wrapper (``HFLM``).

Both score the same ``loglikelihood`` requests — those lm-eval builds for the shipped ARC-Easy,
ARC-Challenge, HellaSwag and MMLU samples (zero-shot), repeated to a few hundred — on the same tiny
randomly initialized ``transformers`` GPT-2, with the same token ids (one byte-level BPE, trained
here on the embedded corpus, seen by HFLM through ``PreTrainedTokenizerFast``) and the same batch
size, in interleaved rounds so machine noise hits both alike. The best round of each counts. The
log-likelihoods are checked to agree before timing. Bar: ratio ≥ 1.0.

    python benchmarks/eval_throughput.py                 # CPU, one thread
    python benchmarks/eval_throughput.py --device cuda --n-embd 768 --n-layer 12 --batch-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def _requests(repeat: int) -> list:
    from lightning_optlab.eval import SAMPLE_TASKS, TaskSet, prepare_samples

    task_dir = tempfile.mkdtemp(prefix="optlab_bench_tasks_")
    prepare_samples(task_dir)
    suite = TaskSet(SAMPLE_TASKS, task_dir=task_dir)
    reqs = []
    for task in suite.loaded["tasks"].values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        reqs += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return reqs * repeat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the embedded corpus")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1,
                        help="copies of the sample tasks' requests (identical copies share forward passes in both)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lightning_optlab.data.corpus import embedded_corpus
    from lightning_optlab.data.tokenizer import train_bpe
    from lightning_optlab.eval import ModuleLM

    tok = train_bpe((text for _, text in embedded_corpus()), vocab_size=args.vocab)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=args.n_positions, n_embd=args.n_embd,
                                       n_layer=args.n_layer, n_head=4, bos_token_id=tok.eos_id,
                                       eos_token_id=tok.eos_id)).to(args.device).eval()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf_tokenizer, eos_token=tok.eos_token)
    lms = {"HFLM (lm-eval)": HFLM(pretrained=model, tokenizer=hf_tok, batch_size=args.batch_size, device=args.device),
           "ModuleLM (ours)": ModuleLM(model, tok, batch_size=args.batch_size)}
    reqs = _requests(args.repeat)
    base, ours = (lm.loglikelihood(reqs[: len(reqs) // args.repeat], disable_tqdm=True) for lm in lms.values())
    worst = max(abs(a[0] - b[0]) for a, b in zip(base, ours))
    assert worst < 1e-3, f"the two wrappers disagree by {worst:.2e} nats"

    best = {name: float("inf") for name in lms}
    for _ in range(args.rounds):
        for name, lm in lms.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lm.loglikelihood(reqs, disable_tqdm=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {args.n_layer}x{args.n_embd}, {n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
          f"context {args.n_positions}; {len(reqs)} loglikelihood requests (ARC-E/ARC-C/HellaSwag/MMLU samples "
          f"x{args.repeat}); batch {args.batch_size}; {args.device}, {args.threads} thread(s); best of {args.rounds}; "
          f"max |Δ log-likelihood| {worst:.1e}")
    print("| wrapper | requests/s | ratio vs HFLM |")
    print("|---|---:|---:|")
    ref = len(reqs) / best["HFLM (lm-eval)"]
    for name, secs in best.items():
        print(f"| {name} | {len(reqs) / secs:,.1f} | {len(reqs) / secs / ref:.2f}x |")


if __name__ == "__main__":
    main()
